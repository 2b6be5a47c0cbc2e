"""Causal-LM training on (model_input, response) pairs with the Hugging Face Trainer.

``finetune`` is the one training routine: both fine-tuning pipelines and the pretraining pipeline
call it with their prompts and a ``TrainingSettings``. The prompts it learns from are built by
``prompts.training_sets``: ``prompt_formatters`` + ``format_split_prompts`` for fine-tuning,
``pretraining_corpus`` for pretraining.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, DatasetDict
from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from c2s_kedro.core.errors import C2SError, C2SValueError
from c2s_kedro.core.models.loading import LanguageModel
from c2s_kedro.core.prompts.training_sets import task_prompts
from c2s_kedro.core.tracking import log_metrics, note_resumed_run, record_training_run

logger = logging.getLogger(__name__)
IGNORE_INDEX = -100
LOSS_AVERAGES = ("token", "sample")


class TrainingSettingsError(C2SError, ValueError):
    """A training setting the Trainer, LoRA or the loss refuses."""


@dataclass(frozen=True)
class TrainingSettings:
    """How one training run goes.

    ``training_arguments`` are ``transformers.TrainingArguments`` keys (``output_dir`` is
    ``checkpoint_dir``). ``loss_on_response_only`` masks the prompt's labels; ``loss_average`` is
    ``sample`` (every sample weighs the same) or ``token`` (the Trainer's default). ``lora`` holds
    ``peft.LoraConfig`` keys (None: every weight is trained). ``resume`` continues from the last
    checkpoint in ``checkpoint_dir``; checkpoints are removed once training completes unless
    ``keep_checkpoints``. ``processes`` above 1 trains in that many processes on this machine, one
    per GPU (``core.models.launch``: DDP, or FSDP with ``fsdp`` in the training arguments).
    """

    training_arguments: dict[str, Any]
    checkpoint_dir: str
    loss_on_response_only: bool
    loss_average: str
    mlflow_prefix: str
    lora: dict[str, Any] | None = None
    resume: bool = True
    keep_checkpoints: bool = False
    processes: int = 1


TASK_INDEX = "task_index"  # a training set's column: the sample's task, for each task's loss curve


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
        remove_columns=[column for column in dataset.column_names if column != TASK_INDEX],
        load_from_cache_file=False,
        keep_in_memory=True,
        desc="tokenizing",
    )
    fits = tokenized.filter(lambda ids: [len(i) <= max_length for i in ids], input_columns="input_ids", batched=True, keep_in_memory=True)
    if fits.num_rows < tokenized.num_rows:
        logger.warning(
            "%d of %d samples exceed the model's context of %d tokens and were dropped; fit prompts to "
            "the context in the formatter (or keep fewer genes per sentence)",
            tokenized.num_rows - fits.num_rows, tokenized.num_rows, max_length,
        )
    if fits.num_rows == 0 and tokenized.num_rows:
        raise C2SValueError(
            f"no sample fits the model's context of {max_length} tokens; keep fewer genes per sentence or use a model "
            "with a longer context"
        )
    return fits


class MlflowStepLogger(TrainerCallback):
    """Logs every number the Trainer logs (loss, eval_loss, learning_rate, grad_norm, epoch) to the
    active MLflow run (or ``run``: ``core.tracking.log_metrics``), with the global step, in the chart
    section ``prefix`` (``finetuning/loss``)."""

    def __init__(self, prefix: str, run: Mapping[str, str] | None = None):
        self.prefix, self.run = prefix, run

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        numbers = {key: float(value) for key, value in logs.items() if isinstance(value, int | float) and not isinstance(value, bool)}
        log_metrics(numbers, step=state.global_step, section=self.prefix, run=self.run)


def _model_names(model, checkpoint_keys) -> dict[str, str]:
    """Checkpoint weight names -> the model's own, by transformers' renaming on load."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    return {key: rename_source_key(key, renamings, converters)[0] for key in checkpoint_keys}


class C2STrainer(Trainer):
    """``Trainer`` that also evaluates each task of a mixed-task eval set on its own, and whose
    checkpoint loads (resuming, the best model at the end) read every weight.

    Per task: with several tasks the training loss alternates between them (batches are grouped
    by length, so most batches hold one task; a short cell-type answer and a 200-gene sentence
    have very different losses), so ``eval_<task>_loss`` is logged next to ``eval_loss`` at every
    evaluation (``task_eval_datasets``, which must split the eval set); ``eval_loss``, by which the
    best model is chosen, is their mean weighted by samples.

    ``save_pretrained`` writes weights under their hub names (GPT-NeoX's output head as
    ``embed_out``, which transformers 5 calls ``lm_head``), but the Trainer loads a checkpoint
    with the model's names, so it skipped the head ("missing keys in the checkpoint model loaded:
    ['lm_head.weight']") and kept the last step's head (or the base model's, on resume). The
    renamed weights are loaded too, and only keys still missing are reported.
    """

    task_eval_datasets: dict[str, Dataset] = {}
    task_names: list[str] = []  # the tasks behind a training set's TASK_INDEX column

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Each task's training loss, as its own curve: batches grouped by length hold one task each,
        # so the overall loss alternates between a cell-type answer's and a sentence's and reads as
        # broken training. Measured on the samples this process trains on, at no extra forward pass.
        tasks = inputs.pop(TASK_INDEX, None)
        if tasks is None or not model.training or not self.task_names:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        with torch.no_grad():
            per_sample, _ = _per_sample_losses(outputs.logits.detach(), labels)
        sums = getattr(self, "_task_losses", None)
        if sums is None:
            sums = self._task_losses = {}
        for task, value in zip(tasks.tolist(), per_sample.tolist()):
            if value == value:  # NaN: a sample without a labelled token
                total, count = sums.get(task, (0.0, 0))
                sums[task] = (total + value, count + 1)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        sums = getattr(self, "_task_losses", None)
        if "loss" in logs and sums:
            for task, (total, count) in sorted(sums.items()):
                logs[f"loss_{self.task_names[task]}"] = round(total / count, 4)
            sums.clear()
        super().log(logs, start_time)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        if eval_dataset is not None or metric_key_prefix != "eval" or len(self.task_eval_datasets) < 2:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        # Each task on its own, and the whole set's loss from theirs, weighted by their samples:
        # every sample is evaluated once, not once in the whole set and again in its task (the
        # same number with per-sample loss averaging; an evaluation over a 36,000-gene vocabulary
        # costs minutes)
        metrics, sizes = {}, {}
        for task, subset in self.task_eval_datasets.items():
            metrics.update(super().evaluate(subset, ignore_keys, f"eval_{task}"))
            sizes[task] = len(subset)
        total, runtime = sum(sizes.values()), sum(metrics[f"eval_{task}_runtime"] for task in sizes)
        whole = {
            "eval_loss": sum(metrics[f"eval_{task}_loss"] * n for task, n in sizes.items()) / total,
            "eval_runtime": round(runtime, 4),
            "eval_samples_per_second": round(total / runtime, 3) if runtime else float("nan"),
        }
        self.log(whole)
        metrics.update(whole)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _issue_warnings_after_load(self, load_result) -> None:
        if not hasattr(load_result, "_replace"):
            return super()._issue_warnings_after_load(load_result)
        names = _model_names(self.model, load_result.unexpected_keys)
        renamed = {key for key in load_result.unexpected_keys if names[key] in load_result.missing_keys}
        super()._issue_warnings_after_load(load_result._replace(
            missing_keys=[k for k in load_result.missing_keys if k not in {names[r] for r in renamed}],
            unexpected_keys=[k for k in load_result.unexpected_keys if k not in renamed],
        ))

    def _load_renamed(self, model, checkpoint: str | None) -> None:
        weights = Path(checkpoint or "") / "model.safetensors"
        if not weights.is_file():  # sharded, FSDP or adapter-only checkpoints: the Trainer's own load
            return
        from safetensors.torch import load_file

        state = load_file(str(weights), device="cpu")
        names, own = _model_names(model, state), model.state_dict()
        renamed = {names[key]: value for key, value in state.items() if names[key] != key and names[key] in own and key not in own}
        if renamed:
            model.load_state_dict(renamed, strict=False)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_renamed(self.accelerator.unwrap_model(model if model is not None else self.model), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        super()._load_best_model()
        self._load_renamed(self.model, self.state.best_model_checkpoint)


def training_arguments(settings: dict[str, Any], output_dir: str) -> TrainingArguments:
    """``TrainingArguments`` from a dict of its keys; every key passes through unchanged."""
    # use_cpu without CUDA also lets several CPU processes train with DDP (gloo) instead of N copies. Every
    # weight of a causal LM takes part in its loss, so DDP need not search the graph for unused ones
    # each step (the Trainer's default for a model without gradient checkpointing)
    settings = {"report_to": "none", "use_cpu": not torch.cuda.is_available(), "ddp_find_unused_parameters": False,
                **settings, "output_dir": output_dir}
    try:
        return TrainingArguments(**settings)
    except (TypeError, ValueError) as error:
        raise TrainingSettingsError(
            f"transformers.TrainingArguments refused the training arguments: {error}. See its documentation for valid keys."
        ) from error


def sample_mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Causal-LM cross-entropy averaged over each sample's labelled tokens, then over samples.

    The Trainer's default averages over all labelled tokens of a batch, so a sample with a long
    answer (a 200-gene sentence) outweighs one with a short answer (a cell type) a hundredfold;
    here every sample counts the same. Only the labelled positions are upcast and go through the
    softmax: with the loss on a few answer tokens after a 700-token prompt, float32 copies of every
    position's logits (8 x 700 x 50k for Pythia-410m) took GBs for positions that count for nothing.
    """
    per_sample, picked = _per_sample_losses(logits, labels)
    per_sample = per_sample[~per_sample.isnan()]
    return per_sample.mean() if per_sample.numel() else picked.sum() * 0.0


def _per_sample_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's cross-entropy averaged over its labelled tokens (NaN for a sample without
    one), and the labelled positions' logits (float32)."""
    shifted_labels = labels[:, 1:].to(logits.device)
    rows, positions = (shifted_labels != IGNORE_INDEX).nonzero(as_tuple=True)
    picked = logits[:, :-1][rows, positions].float()
    per_token = torch.nn.functional.cross_entropy(picked, shifted_labels[rows, positions], reduction="none")
    tokens = torch.bincount(rows, minlength=labels.shape[0])
    sums = torch.zeros(labels.shape[0], dtype=per_token.dtype, device=logits.device).index_add(0, rows, per_token)
    return sums / tokens, picked


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
    task_eval_datasets: dict[str, Dataset] | None = None,
    task_names: list[str] | None = None,
    mlflow_run: Mapping[str, str] | None = None,
    save_to: str | None = None,
) -> tuple[LanguageModel, list[dict[str, Any]]]:
    """Train with the HF ``Trainer``; resume from the last checkpoint in ``output_dir`` when one exists.
    In a training process started by ``core.models.launch``: steps are logged to ``mlflow_run`` and the
    trained model is written to ``save_to`` by ``Trainer.save_model`` (under FSDP with
    ``FULL_STATE_DICT``, gathered from every process).
    ``task_eval_datasets`` (task -> its part of the eval set) are evaluated on their own as well;
    a ``TASK_INDEX`` column of ``train_dataset`` (positions in ``task_names``) logs each task's
    training loss as ``loss_<task>`` beside ``loss``.

    Datasets hold ``input_ids``, ``attention_mask`` and ``labels``. ``loss_average="sample"``
    weighs every sample the same (``sample_mean_loss``) instead of every token; with gradient
    accumulation each micro-batch's mean counts for its share of the optimizer step (exact when
    micro-batches are equally full, i.e. all but an epoch's last one). Returns the trained model (the
    best by eval loss when ``load_best_model_at_end`` is set) and the Trainer's log history.
    Checkpoints exist to survive an interruption: once training completes they are removed
    (unless ``keep_checkpoints``), so a later run with other settings starts fresh instead of
    resuming a finished run.
    """
    tokenizer = language_model.tokenizer
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, pad_to_multiple_of=8)
    if loss_average not in LOSS_AVERAGES:
        raise TrainingSettingsError(f"unknown loss average '{loss_average}'; use one of {', '.join(LOSS_AVERAGES)}")
    compute_loss = None
    if loss_average == "sample":

        def compute_loss(outputs, labels, num_items_in_batch=None):
            # The Trainer leaves gradient-accumulation scaling to a custom loss: divide by the
            # micro-batches of this optimizer step (fewer in an epoch's last step than
            # gradient_accumulation_steps). Evaluation (no grad) is not scaled.
            if not torch.is_grad_enabled():
                return sample_mean_loss(outputs.logits, labels)
            steps = getattr(trainer, "current_gradient_accumulation_steps", arguments.gradient_accumulation_steps)
            return sample_mean_loss(outputs.logits, labels) / steps

    trainer = C2STrainer(
        model=language_model.model,
        args=arguments,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        callbacks=[MlflowStepLogger(mlflow_prefix, mlflow_run), *(callbacks or [])],
        compute_loss_func=compute_loss,
    )
    trainer.task_eval_datasets = dict(task_eval_datasets or {})
    if task_names and TASK_INDEX in train_dataset.column_names:
        trainer.task_names = list(task_names)
        arguments.remove_unused_columns = False  # the datasets hold only the model's inputs and the task index
    checkpoint = get_last_checkpoint(arguments.output_dir) if resume and Path(arguments.output_dir).is_dir() else None
    if checkpoint:
        previous_run = note_resumed_run(arguments.output_dir)
        logger.info("resuming training from %s%s", checkpoint, f" (checkpoints of MLflow run {previous_run})" if previous_run else "")
    if trainer.is_world_process_zero():
        record_training_run(arguments.output_dir)
    trainer.train(resume_from_checkpoint=checkpoint)
    if save_to is not None:
        trainer.save_model(save_to)  # every process takes part: FSDP gathers the full weights on the first
        if trainer.is_world_process_zero():
            tokenizer.save_pretrained(save_to)
    trainer.accelerator.wait_for_everyone()  # every process has finished with the checkpoints
    if not keep_checkpoints and trainer.is_world_process_zero():
        for finished in Path(arguments.output_dir).glob("checkpoint-*"):
            shutil.rmtree(finished, ignore_errors=True)
    model = trainer.model
    model.eval()
    return LanguageModel(model=model, tokenizer=tokenizer, source=language_model.source), list(trainer.state.log_history)


def _with_lora(language_model: LanguageModel, lora: dict[str, Any]) -> LanguageModel:
    from peft import LoraConfig, get_peft_model

    try:
        config = LoraConfig(task_type="CAUSAL_LM", **lora)
    except (TypeError, ValueError) as error:
        raise TrainingSettingsError(f"peft.LoraConfig refused the LoRA settings {lora}: {error}") from error
    adapted = get_peft_model(language_model.model, config)
    trainable, total = adapted.get_nb_trainable_parameters()
    logger.info("LoRA: %s of %s parameters trainable (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return LanguageModel(adapted, language_model.tokenizer, language_model.source)


def finetune(
    language_model: LanguageModel,
    prompts: DatasetDict,
    settings: TrainingSettings,
    callbacks: list[TrainerCallback] | None = None,
    mlflow_run: Mapping[str, str] | None = None,
    save_to: str | None = None,
) -> tuple[LanguageModel, list[dict[str, Any]]]:
    """Train ``language_model`` on the ``train`` prompts (``model_input`` -> ``response``) and
    evaluate on ``val`` (when present and not empty); other parts (``test``) are not read.

    Prompts are tokenized with labels masked as ``settings.loss_on_response_only`` says and must
    fit the model's context (a sample that does not is dropped with a warning). With
    ``settings.lora`` only LoRA adapters are trained and then merged into the weights, so the
    result is a plain model that ``save_pretrained`` writes as any other. Pretraining from fresh
    weights is the same call with the loss on every token. ``settings.processes`` above 1 trains in
    that many processes (``core.models.launch``); ``mlflow_run`` and ``save_to`` are what such a process is
    given (``train_causal_lm``). Returns the trained model and the Trainer's log history.
    """
    if settings.processes > 1:
        if callbacks:
            raise TrainingSettingsError("callbacks cannot be handed to training processes; train with processes: 1")
        from c2s_kedro.core.models.launch import finetune_in_processes

        trained, log_history = finetune_in_processes(language_model, prompts, settings)
        return _with_trained_tasks(trained, prompts), log_history
    arguments = training_arguments(settings.training_arguments, settings.checkpoint_dir)
    tokenizer, context = language_model.tokenizer, language_model.context_length
    train_prompts, train_tasks = prompts["train"], None
    if "sample_type" in train_prompts.column_names and len(set(train_prompts["sample_type"])) > 1:
        train_tasks = sorted(set(train_prompts["sample_type"]))
        positions = {task: i for i, task in enumerate(train_tasks)}
        train_prompts = train_prompts.add_column(TASK_INDEX, [positions[t] for t in train_prompts["sample_type"]])
    train = tokenize_dataset(train_prompts, tokenizer, context, settings.loss_on_response_only)
    val = None
    if "val" in prompts and prompts["val"].num_rows:
        val = tokenize_dataset(prompts["val"], tokenizer, context, settings.loss_on_response_only)
    per_task = {}
    if val is not None and val.num_rows and "sample_type" in prompts["val"].column_names:
        tasks = sorted(set(prompts["val"]["sample_type"]))
        if len(tasks) > 1:  # eval_<task>_loss next to eval_loss (C2STrainer)
            per_task = {task: tokenize_dataset(task_prompts(prompts, task, parts=("val",))["val"],
                                               tokenizer, context, settings.loss_on_response_only) for task in tasks}
    trainable = _with_lora(language_model, settings.lora) if settings.lora else language_model
    trained, log_history = train_causal_lm(
        trainable, train, val if val is not None and val.num_rows else None, arguments, settings.mlflow_prefix,
        resume=settings.resume, keep_checkpoints=settings.keep_checkpoints, callbacks=callbacks,
        loss_average=settings.loss_average, task_eval_datasets=per_task, task_names=train_tasks,
        mlflow_run=mlflow_run, save_to=save_to,
    )
    if settings.lora and save_to is None:  # a training process wrote the adapters; core.models.launch merges them
        trained = LanguageModel(trained.model.merge_and_unload(), tokenizer, language_model.source)
    return _with_trained_tasks(trained, prompts), log_history


def _with_trained_tasks(trained: LanguageModel, prompts: DatasetDict) -> LanguageModel:
    if "sample_type" in prompts["train"].column_names:
        # saved in config.json: what a later pipeline may ask of this model (cell generation checks it)
        trained.model.config.c2s_trained_tasks = sorted(set(prompts["train"]["sample_type"]))
    return trained


def trained_tasks(language_model: LanguageModel) -> list[str] | None:
    """The prompt tasks a model was fine-tuned on here (None for a model from elsewhere)."""
    return getattr(language_model.model.config, "c2s_trained_tasks", None)


def require_task(language_model: LanguageModel, task: str) -> None:
    """Refuse to ask a model fine-tuned here for a task it was not trained on."""
    tasks = trained_tasks(language_model)
    if tasks is not None and task not in tasks:
        raise C2SValueError(
            f"the model was fine-tuned for {', '.join(tasks)} only, not for {task}: its output would be "
            f"noise. Fine-tune it with {task} among the tasks, or run only the pipelines its tasks serve "
            "(e.g. cell_type_evaluation instead of evaluation)."
        )


def loss_history(log_history: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Train and eval loss per step from a Trainer log history, and each task's training loss
    (``train_step_<task>``, ``train_loss_<task>``) where the training set mixed tasks."""
    history: dict[str, list[float]] = {"train_step": [], "train_loss": [], "eval_step": [], "eval_loss": []}
    for entry in log_history:
        if "loss" in entry:
            history["train_step"].append(float(entry["step"]))
            history["train_loss"].append(float(entry["loss"]))
        for key, value in entry.items():  # each task's training loss (C2STrainer), when tasks are mixed
            if key.startswith("loss_"):
                history.setdefault(f"train_step_{key[5:]}", []).append(float(entry["step"]))
                history.setdefault(f"train_loss_{key[5:]}", []).append(float(value))
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
