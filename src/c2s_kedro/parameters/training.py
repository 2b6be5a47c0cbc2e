"""Settings of the training pipelines: pretraining, finetuning, and the perturbation fine-tuning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from c2s_kedro.parameters import at_least

if TYPE_CHECKING:
    from c2s_kedro.core.models.training import TrainingSettings


@dataclass(frozen=True)
class TrainingParameters:
    """What every fine-tuning run takes (``finetuning`` and ``perturbation.finetuning``)."""

    loss_on_response_only: bool
    loss_average: str  # sample | token
    mlflow_prefix: str
    max_eval_samples: int | None = at_least(1)
    checkpoint_dir: str
    resume: bool
    keep_checkpoints: bool
    lora: dict[str, Any] | None
    processes: int = at_least(1)  # training processes on this machine, one per GPU (core.models.launch)
    training_arguments: dict[str, Any]  # passed to transformers.TrainingArguments unchanged

    def training_settings(self) -> TrainingSettings:
        """The settings of ``core.models.training.finetune``."""
        from c2s_kedro.core.models.training import TrainingSettings  # imports transformers: not when parameters are read

        return TrainingSettings(
            training_arguments=self.training_arguments, checkpoint_dir=self.checkpoint_dir,
            loss_on_response_only=self.loss_on_response_only, loss_average=self.loss_average,
            mlflow_prefix=self.mlflow_prefix, lora=self.lora, resume=self.resume, keep_checkpoints=self.keep_checkpoints,
            processes=self.processes,
        )


@dataclass(frozen=True)
class FinetuningParameters(TrainingParameters):
    tasks: list[str]
    formatter: str | None
    formatter_options: dict[str, Any]
    prompt_templates: dict[str, str | None]  # task -> template file in the reference format; null: ours
    top_k_genes: int | None = at_least(1)
    label_column: str
    organism_column: str
    seed: int = at_least(0)
    min_train_cells_per_label: int | None = at_least(1)  # class-balanced sampling: rare labels' train cells repeated
    task_repeats: dict[str, int] | None = at_least(1)  # task -> prompts of that task per train cell and epoch


@dataclass(frozen=True)
class PretrainingParameters:
    architecture: dict[str, Any]  # GPTNeoXConfig keys
    max_genes: int = at_least(1)
    max_eval_samples: int | None = at_least(1)
    label_column: str
    organism_column: str
    seed: int = at_least(0)
    checkpoint_dir: str
    resume: bool
    keep_checkpoints: bool
    processes: int = at_least(1)
    training_arguments: dict[str, Any]

    def training_settings(self) -> TrainingSettings:
        """The settings of ``core.models.training.finetune`` for pretraining: next-token prediction on the
        whole text (prompt and sentence), every token weighing the same (the Trainer's default),
        all weights trained, losses logged to MLflow under ``pretraining``."""
        from c2s_kedro.core.models.training import TrainingSettings  # imports transformers: not when parameters are read

        return TrainingSettings(
            training_arguments=self.training_arguments, checkpoint_dir=self.checkpoint_dir,
            loss_on_response_only=False, loss_average="token", mlflow_prefix="pretraining", lora=None,
            resume=self.resume, keep_checkpoints=self.keep_checkpoints, processes=self.processes,
        )
