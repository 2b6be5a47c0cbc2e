"""Causal-LM training on (model_input, response) pairs with the Hugging Face Trainer."""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from c2s_kedro.core.models import LanguageModel

logger = logging.getLogger(__name__)
IGNORE_INDEX = -100


def tokenize_pairs(batch: dict[str, list], tokenizer, loss_on_response_only: bool = True) -> dict[str, list]:
    """Token ids of ``model_input + " " + response + EOS`` with labels for the causal-LM loss.

    With ``loss_on_response_only`` the prompt's labels are ``-100`` so only the response (and the
    EOS that ends it) is learnt. Nothing is truncated here: formatters fit samples to the context
    (``C2SPromptFormatter(tokenizer=..., max_tokens=...)``) by dropping genes from the prompt's
    sentence, and ``tokenize_dataset`` drops any sample that still does not fit.
    """
    prompts = tokenizer(batch["model_input"], add_special_tokens=False)["input_ids"]
    responses = tokenizer([" " + r if r else r for r in batch["response"]], add_special_tokens=False)["input_ids"]
    input_ids, labels = [], []
    for prompt, response in zip(prompts, responses):
        input_ids.append(prompt + response + [tokenizer.eos_token_id])
        masked = [IGNORE_INDEX] * len(prompt) if loss_on_response_only else list(prompt)
        labels.append(masked + response + [tokenizer.eos_token_id])
    return {"input_ids": input_ids, "attention_mask": [[1] * len(i) for i in input_ids], "labels": labels}


def tokenize_dataset(dataset: Dataset, tokenizer, max_length: int, loss_on_response_only: bool = True) -> Dataset:
    """``tokenize_pairs`` over a formatted dataset (``datasets.map(batched=True)``); samples longer
    than ``max_length`` are dropped with a warning, never truncated (that could cut the answer)."""
    tokenized = dataset.map(
        tokenize_pairs,
        batched=True,
        fn_kwargs={"tokenizer": tokenizer, "loss_on_response_only": loss_on_response_only},
        remove_columns=dataset.column_names,
        load_from_cache_file=False,
        keep_in_memory=True,
        desc="tokenizing",
    )
    fits = tokenized.filter(lambda ids: [len(i) <= max_length for i in ids], input_columns="input_ids", batched=True, keep_in_memory=True)
    if fits.num_rows < tokenized.num_rows:
        logger.warning(
            "%d of %d samples exceed the model's context of %d tokens and were dropped; fit prompts to "
            "the context in the formatter (or lower top_k_genes)",
            tokenized.num_rows - fits.num_rows, tokenized.num_rows, max_length,
        )
    if fits.num_rows == 0 and tokenized.num_rows:
        raise ValueError(f"no sample fits the model's context of {max_length} tokens; lower top_k_genes")
    return fits


class MlflowStepLogger(TrainerCallback):
    """Logs every number the Trainer logs (loss, eval_loss, learning_rate, grad_norm, epoch) to the
    active MLflow run, with the global step, under ``prefix``."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def on_log(self, args, state, control, logs=None, **kwargs):
        import mlflow

        if not state.is_world_process_zero or mlflow.active_run() is None or not logs:
            return
        numbers = {
            f"{self.prefix}.{key}": float(value)
            for key, value in logs.items()
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        }
        if numbers:
            mlflow.log_metrics(numbers, step=state.global_step)


def training_arguments(settings: dict[str, Any], output_dir: str) -> TrainingArguments:
    """``TrainingArguments`` from a parameters dict; every key passes through unchanged."""
    # use_cpu without CUDA also lets torchrun on CPU train with DDP (gloo) instead of N copies
    settings = {"report_to": "none", "use_cpu": not torch.cuda.is_available(), **settings, "output_dir": output_dir}
    try:
        return TrainingArguments(**settings)
    except TypeError as error:
        raise ValueError(f"invalid training_arguments: {error}. See transformers.TrainingArguments for valid keys.") from error


def sample_mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Causal-LM cross-entropy averaged over each sample's labelled tokens, then over samples.

    The Trainer's default averages over all labelled tokens of a batch, so a sample with a long
    answer (a 200-gene sentence) outweighs one with a short answer (a cell type) a hundredfold;
    here every sample counts the same.
    """
    shifted_logits = logits[:, :-1, :].float()
    shifted_labels = labels[:, 1:].to(shifted_logits.device)
    per_token = torch.nn.functional.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]), shifted_labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="none",
    ).view(shifted_labels.shape)
    counted = (shifted_labels != IGNORE_INDEX).float()
    tokens = counted.sum(dim=1)
    has_tokens = tokens > 0
    per_sample = (per_token * counted).sum(dim=1)[has_tokens] / tokens[has_tokens]
    return per_sample.mean() if per_sample.numel() else per_token.sum() * 0.0


def train_causal_lm(
    language_model: LanguageModel,
    train_dataset: Dataset,
    eval_dataset: Dataset | None,
    arguments: TrainingArguments,
    mlflow_prefix: str,
    resume: bool = True,
    keep_checkpoints: bool = False,
    callbacks: list[TrainerCallback] | None = None,
    loss_average: str = "token",
) -> tuple[LanguageModel, list[dict[str, Any]]]:
    """Train with the HF ``Trainer``; resume from the last checkpoint in ``output_dir`` when one exists.

    Datasets hold ``input_ids``, ``attention_mask`` and ``labels``. ``loss_average="sample"``
    weighs every sample the same (``sample_mean_loss``) instead of every token. Returns the trained model (the
    best by eval loss when ``load_best_model_at_end`` is set) and the Trainer's log history.
    Checkpoints exist to survive an interruption: once training completes they are removed
    (unless ``keep_checkpoints``), so a later run with other settings starts fresh instead of
    resuming a finished run.
    """
    tokenizer = language_model.tokenizer
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, pad_to_multiple_of=8)
    if loss_average not in ("token", "sample"):
        raise ValueError(f"loss_average must be 'token' or 'sample', got '{loss_average}'")
    compute_loss = None
    if loss_average == "sample":
        steps = arguments.gradient_accumulation_steps

        def compute_loss(outputs, labels, num_items_in_batch=None):
            # The Trainer leaves gradient-accumulation scaling to a custom loss; evaluation (no grad) is not scaled.
            return sample_mean_loss(outputs.logits, labels) / (steps if torch.is_grad_enabled() else 1)

    trainer = Trainer(
        model=language_model.model,
        args=arguments,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        callbacks=[MlflowStepLogger(mlflow_prefix), *(callbacks or [])],
        compute_loss_func=compute_loss,
    )
    checkpoint = get_last_checkpoint(arguments.output_dir) if resume and Path(arguments.output_dir).is_dir() else None
    if checkpoint:
        logger.info("resuming training from %s", checkpoint)
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.accelerator.wait_for_everyone()  # under torchrun, every rank has finished with the checkpoints
    if not keep_checkpoints and trainer.is_world_process_zero():
        for finished in Path(arguments.output_dir).glob("checkpoint-*"):
            shutil.rmtree(finished, ignore_errors=True)
    model = trainer.model
    model.eval()
    return LanguageModel(model=model, tokenizer=tokenizer, source=language_model.source), list(trainer.state.log_history)


def loss_history(log_history: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Train and eval loss per step from a Trainer log history."""
    history: dict[str, list[float]] = {"train_step": [], "train_loss": [], "eval_step": [], "eval_loss": []}
    for entry in log_history:
        if "loss" in entry:
            history["train_step"].append(float(entry["step"]))
            history["train_loss"].append(float(entry["loss"]))
        if "eval_loss" in entry:
            history["eval_step"].append(float(entry["step"]))
            history["eval_loss"].append(float(entry["eval_loss"]))
    return history


def summarize_history(log_history: list[dict[str, Any]]) -> dict[str, float]:
    """First, last and best losses of a training run."""
    history = loss_history(log_history)
    summary: dict[str, float] = {}
    if history["train_loss"]:
        summary["train_loss_first"] = history["train_loss"][0]
        summary["train_loss_last"] = history["train_loss"][-1]
    if history["eval_loss"]:
        summary["eval_loss_first"] = history["eval_loss"][0]
        summary["eval_loss_last"] = history["eval_loss"][-1]
        summary["eval_loss_best"] = float(np.min(history["eval_loss"]))
    final = next((e for e in reversed(log_history) if "train_runtime" in e), None)
    if final:
        summary["train_runtime_s"] = float(final["train_runtime"])
        summary["global_step"] = float(final.get("step", 0))
    return summary
