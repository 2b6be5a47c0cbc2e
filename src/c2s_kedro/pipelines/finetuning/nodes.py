"""Nodes of the finetuning pipeline."""

from __future__ import annotations

import logging
from typing import Any

import matplotlib.pyplot as plt
from datasets import Dataset, DatasetDict, concatenate_datasets

from c2s_kedro.core import plotting
from c2s_kedro.core.models import LanguageModel
from c2s_kedro.core.prompts import build_formatter
from c2s_kedro.core.sentences import select_cells
from c2s_kedro.core.training import summarize_history, tokenize_dataset, train_causal_lm, training_arguments

logger = logging.getLogger(__name__)
SETTINGS = "conf/base/parameters_finetuning.yml"


def format_finetuning_prompts(
    cell_sentences: Dataset, data_split: dict[str, Any], foundation_model: LanguageModel, params: dict[str, Any]
) -> DatasetDict:
    """Prompts (``sample_type``, ``model_input``, ``response``) of each task for the train, val and
    test cells of ``data_split``, fitted to the model's context. Val is capped at
    ``max_eval_samples``."""
    label = params["label_column"]
    if label not in cell_sentences.column_names:
        raise KeyError(
            f"finetuning.label_column '{label}' is not a column of cell_sentences; available: "
            f"{', '.join(cell_sentences.column_names)}. Add it to sentence_conversion.label_columns or change it in {SETTINGS}."
        )
    parts = {}
    for part in ("train", "val", "test"):
        cells = select_cells(cell_sentences, data_split[part])
        formatted = []
        for task in params["tasks"]:
            formatter = build_formatter(
                task, params.get("formatter"), params.get("formatter_options"), seed=params.get("seed", 0),
                **({} if params.get("formatter") else {
                    "top_k_genes": params.get("top_k_genes"), "label_column": label,
                    "organism_column": params.get("organism_column", "organism"),
                    "tokenizer": foundation_model.tokenizer, "max_tokens": foundation_model.context_length,
                }),
            )
            formatted.append(formatter.format_dataset(cells))
        parts[part] = concatenate_datasets(formatted).shuffle(seed=params.get("seed", 0), keep_in_memory=True).flatten_indices(keep_in_memory=True)
    cap = params.get("max_eval_samples")
    if cap is not None and parts["val"].num_rows > cap:
        parts["val"] = parts["val"].select(range(cap), keep_in_memory=True)
    return DatasetDict(parts)


def finetune_model(
    foundation_model: LanguageModel, finetuning_prompts: DatasetDict, params: dict[str, Any]
) -> tuple[LanguageModel, list[dict[str, Any]]]:
    """Causal-LM fine-tuning with the HF Trainer (loss on the response only by default); optional
    LoRA adapters, merged into the weights afterwards so the result is a plain model directory."""
    tokenizer, context = foundation_model.tokenizer, foundation_model.context_length
    response_only = params.get("loss_on_response_only", True)
    train = tokenize_dataset(finetuning_prompts["train"], tokenizer, context, response_only)
    val = tokenize_dataset(finetuning_prompts["val"], tokenizer, context, response_only)
    language_model = foundation_model
    lora = params.get("lora")
    if lora:
        from peft import LoraConfig, get_peft_model

        language_model = LanguageModel(get_peft_model(foundation_model.model, LoraConfig(task_type="CAUSAL_LM", **lora)), tokenizer, foundation_model.source)
        language_model.model.print_trainable_parameters()
    arguments = training_arguments(params["training_arguments"], params["checkpoint_dir"])
    trained, log_history = train_causal_lm(
        language_model, train, val if val.num_rows else None, arguments, params.get("mlflow_prefix", "finetuning"),
        resume=params.get("resume", True), keep_checkpoints=params.get("keep_checkpoints", False),
        loss_average=params.get("loss_average", "token"),
    )
    if lora:
        trained = LanguageModel(trained.model.merge_and_unload(), tokenizer, foundation_model.source)
    return trained, log_history


def plot_finetuning_loss(finetuning_log: list[dict[str, Any]]) -> plt.Figure:
    """Train and eval loss against the step."""
    return plotting.loss_curve_plot(finetuning_log, "Fine-tuning")


def summarize_finetuning(finetuning_log: list[dict[str, Any]], finetuning_prompts: DatasetDict) -> dict[str, float]:
    """Losses, runtime, and how many samples each part had."""
    return {
        **summarize_history(finetuning_log),
        **{f"n_{part}_samples": float(finetuning_prompts[part].num_rows) for part in finetuning_prompts},
    }


