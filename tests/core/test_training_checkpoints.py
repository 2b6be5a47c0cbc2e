"""Checkpoints read back whole: GPT-NeoX's output head, saved under its hub name ``embed_out``,
is restored on resume and with the best model at the end (transformers 5's Trainer skipped it)."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file

from c2s_kedro.core.models.loading import build_gpt_neox
from c2s_kedro.core.models.tokenizer import build_gene_tokenizer
from c2s_kedro.core.models.training import tokenize_dataset, train_causal_lm, training_arguments
from c2s_kedro.core.prompts.formatting import C2SPromptFormatter, template_words
from tests.helpers import tiny_cell_sentences

GENES = [f"GENE{i}" for i in range(120)]
ARCHITECTURE = {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64,
                "max_position_embeddings": 96}


def _data():
    tokenizer = build_gene_tokenizer(GENES, template_words() + ["T cell", "B cell", "Homo sapiens", "blood"], model_max_length=96)
    formatted = C2SPromptFormatter(task="cell_type_prediction", tokenizer=tokenizer, max_tokens=96).format_dataset(
        tiny_cell_sentences(GENES, n_cells=8))
    return tokenizer, tokenize_dataset(formatted, tokenizer, max_length=96)


def test_the_best_model_at_the_end_has_the_best_checkpoints_output_head(tmp_path, caplog):
    tokenizer, data = _data()
    model = build_gpt_neox(tokenizer, ARCHITECTURE)
    assert model.model.lm_head.weight.data_ptr() != model.model.gpt_neox.embed_in.weight.data_ptr()  # not tied
    arguments = training_arguments({
        "max_steps": 4, "per_device_train_batch_size": 4, "learning_rate": 5e-2, "logging_steps": 1, "eval_strategy": "steps",
        "eval_steps": 1, "save_strategy": "steps", "save_steps": 1, "load_best_model_at_end": True,
        "metric_for_best_model": "eval_loss", "use_cpu": True}, str(tmp_path / "checkpoints"))
    with caplog.at_level(logging.WARNING):
        trained, history = train_causal_lm(model, data, data, arguments, "test", keep_checkpoints=True)
    assert "missing keys" not in caplog.text and "unexpected keys" not in caplog.text
    best = min((e for e in history if "eval_loss" in e), key=lambda e: e["eval_loss"])["step"]
    saved = load_file(str(tmp_path / "checkpoints" / f"checkpoint-{best}" / "model.safetensors"))
    assert "embed_out.weight" in saved  # the hub name, as save_pretrained writes it
    assert torch.equal(trained.model.lm_head.weight.detach(), saved["embed_out.weight"])
    assert torch.equal(trained.model.gpt_neox.embed_in.weight.detach(), saved["gpt_neox.embed_in.weight"])


def test_a_resumed_training_starts_from_the_checkpoints_output_head(tmp_path):
    tokenizer, data = _data()
    settings = {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 0.0, "logging_steps": 1,
                "save_strategy": "steps", "save_steps": 2, "use_cpu": True}
    first = build_gpt_neox(tokenizer, ARCHITECTURE)
    with torch.no_grad():
        first.model.lm_head.weight.fill_(0.25)  # a head that differs from any fresh model's
    train_causal_lm(first, data, None, training_arguments({**settings, "max_steps": 2}, str(tmp_path / "checkpoints")),
                    "test", keep_checkpoints=True)
    fresh = build_gpt_neox(tokenizer, ARCHITECTURE)
    resumed, _ = train_causal_lm(fresh, data, None, training_arguments(settings, str(tmp_path / "checkpoints")), "test")
    assert torch.all(resumed.model.lm_head.weight == 0.25)  # learning rate 0: the checkpoint's head, not the fresh one


def _mixed_task_run(tmp_path, **training_arguments):
    """A model, prompts of two tasks for 8 cells, and the settings of a short fine-tuning of them."""
    from datasets import concatenate_datasets

    from c2s_kedro.core.models.training import TrainingSettings

    tokenizer, _ = _data()
    cells = tiny_cell_sentences(GENES, n_cells=8)
    prompts = concatenate_datasets([
        C2SPromptFormatter(task=task, tokenizer=tokenizer, max_tokens=96).format_dataset(cells)
        for task in ("cell_type_prediction", "cell_type_generation")])
    settings = TrainingSettings(
        training_arguments={"save_strategy": "no", "use_cpu": True, **training_arguments},
        checkpoint_dir=str(tmp_path / "checkpoints"), loss_on_response_only=True, loss_average="sample", mlflow_prefix="test")
    return build_gpt_neox(tokenizer, ARCHITECTURE), prompts, settings


def test_a_mixed_task_eval_set_also_logs_each_tasks_loss(tmp_path):
    from datasets import DatasetDict

    from c2s_kedro.core.models.training import finetune

    model, prompts, settings = _mixed_task_run(tmp_path, max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
                                               logging_steps=1, eval_strategy="steps", eval_steps=2)
    evaluated_samples = []
    model.model.register_forward_hook(lambda module, args, kwargs, output: None if module.training else
                                evaluated_samples.append(len(kwargs["input_ids"])), with_kwargs=True)
    _, history = finetune(model, DatasetDict(train=prompts, val=prompts), settings)
    evaluated = {key for entry in history for key in entry if key.startswith("eval_") and key.endswith("_loss")}
    assert evaluated == {"eval_loss", "eval_cell_type_prediction_loss", "eval_cell_type_generation_loss"}
    losses = {key: entry[key] for entry in history for key in entry if key in evaluated}
    assert losses["eval_cell_type_prediction_loss"] != losses["eval_cell_type_generation_loss"]
    # every val sample once, and the whole set's loss is the tasks' weighted by their samples (8 each)
    assert sum(evaluated_samples) == prompts.num_rows
    halves = (losses["eval_cell_type_prediction_loss"] + losses["eval_cell_type_generation_loss"]) / 2
    assert losses["eval_loss"] == pytest.approx(halves, rel=1e-6)


def test_a_mixed_task_training_set_logs_each_tasks_training_loss_and_the_plot_draws_it(tmp_path):
    from datasets import DatasetDict

    from c2s_kedro.core.models.training import finetune, loss_history
    from c2s_kedro.core.plotting import loss_curve_plot

    model, prompts, settings = _mixed_task_run(tmp_path, max_steps=4, per_device_train_batch_size=16, learning_rate=0.0,
                                               logging_steps=2)
    _, history = finetune(model, DatasetDict(train=prompts), settings)
    logged = [entry for entry in history if "loss" in entry]
    assert len(logged) == 2 and all({"loss_cell_type_prediction", "loss_cell_type_generation"} <= set(e) for e in logged)
    # learning rate 0: every step sees the same weights, so each batch (all 16 samples) has the same loss, and the
    # overall per-sample mean is the mean of the two tasks' means (8 samples each)
    for entry in logged:
        assert entry["loss"] == pytest.approx((entry["loss_cell_type_prediction"] + entry["loss_cell_type_generation"]) / 2,
                                              rel=1e-3)
    curves = loss_history(history)
    assert curves["train_step_cell_type_prediction"] == curves["train_step"] == [2.0, 4.0]
    labels = [line.get_label() for line in loss_curve_plot(history, "t").axes[0].lines]
    assert labels == ["train loss (all tasks)", "train loss: cell_type_generation", "train loss: cell_type_prediction"]
