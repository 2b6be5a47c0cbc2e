"""Settings of the training pipelines: pretraining, finetuning, and the perturbation fine-tuning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TrainingParameters:
    """What every fine-tuning run takes (``finetuning`` and ``perturbation.finetuning``)."""

    loss_on_response_only: bool
    loss_average: str  # sample | token
    mlflow_prefix: str
    max_eval_samples: int | None
    checkpoint_dir: str
    resume: bool
    keep_checkpoints: bool
    lora: dict[str, Any] | None
    training_arguments: dict[str, Any]  # passed to transformers.TrainingArguments unchanged


@dataclass(frozen=True)
class FinetuningParameters(TrainingParameters):
    tasks: list[str]
    formatter: str | None
    formatter_options: dict[str, Any]
    top_k_genes: int | None
    label_column: str
    organism_column: str
    seed: int


@dataclass(frozen=True)
class PretrainingParameters:
    architecture: dict[str, Any]  # GPTNeoXConfig keys
    max_genes: int
    label_column: str
    organism_column: str
    seed: int
    checkpoint_dir: str
    resume: bool
    keep_checkpoints: bool
    training_arguments: dict[str, Any]
