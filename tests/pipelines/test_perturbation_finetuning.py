"""The perturbation_finetuning pipeline on a few control -> perturbed pairs with a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict

from c2s_kedro.core.models import training
from c2s_kedro.core.models.loading import build_gpt_neox
from c2s_kedro.core.models.tokenizer import build_gene_tokenizer
from c2s_kedro.core.prompts.formatting import PERTURBATION_TASK
from c2s_kedro.core.prompts.formatting import template_words
from c2s_kedro.pipelines.perturbation_finetuning import create_pipeline
from c2s_kedro.pipelines.perturbation_finetuning.nodes import finetune_perturbation_model
from tests.helpers import load_parameters, params_entries, run_pipeline

GENES = [f"GENE{i}" for i in range(80)]
ARCHITECTURE = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 128,
                "max_position_embeddings": 96}


@pytest.fixture(scope="module")
def tokenizer():
    return build_gene_tokenizer(GENES + ["KLF1", "NON-TARGETING"], template_words((PERTURBATION_TASK,)), model_max_length=96)


@pytest.fixture()
def prompts() -> DatasetDict:
    """Pairs as format_perturbation_prompts writes them: short answers (a few genes) and long ones."""
    rng = np.random.default_rng(0)

    def part(n: int, extra: bool = False) -> Dataset:
        rows = {
            "sample_type": [PERTURBATION_TASK] * n,
            "model_input": [f"Control cell: {' '.join(rng.permutation(GENES)[:10])}. Perturbation: KLF1. Perturbed cell:"
                            for _ in range(n)],
            "response": [" ".join(rng.permutation(GENES)[: 2 + 20 * (i % 3)]) + "." for i in range(n)],
            "perturbation": ["KLF1"] * n,
        }
        if extra:
            rows["max_new_tokens"] = [40] * n
        return Dataset.from_dict(rows)

    return DatasetDict({"train": part(12), "val": part(3), "test": part(2, extra=True)})


def _params(tmp_path, **finetuning) -> dict:
    params = load_parameters("perturbation")["perturbation"]
    params["finetuning"].update(
        checkpoint_dir=str(tmp_path / "checkpoints"),
        training_arguments={"max_steps": 3, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4,
                            "learning_rate": 1e-2, "logging_steps": 1, "eval_strategy": "steps", "eval_steps": 3,
                            "save_strategy": "no", "use_cpu": True},
        **finetuning,
    )
    return params


@pytest.fixture()
def sample_mean_calls(monkeypatch) -> list[bool]:
    """Whether each call of the sample-mean loss was a training one (gradients on)."""
    calls, original = [], training.sample_mean_loss

    def counting(logits, labels):
        calls.append(torch.is_grad_enabled())
        return original(logits, labels)

    monkeypatch.setattr(training, "sample_mean_loss", counting)
    return calls


def test_the_perturbation_finetuning_averages_the_loss_per_sample_as_its_yaml_says(
    tokenizer, prompts, tmp_path, sample_mean_calls
):
    """It used the token average whatever the parameters said; now loss_average is passed on."""
    assert load_parameters("perturbation")["perturbation"]["finetuning"]["loss_average"] == "sample"
    model, history = finetune_perturbation_model(build_gpt_neox(tokenizer, ARCHITECTURE), prompts, _params(tmp_path))
    assert sample_mean_calls.count(True) == 3  # every training batch
    assert sample_mean_calls.count(False) == 1  # the evaluation at step 3 (3 val pairs, one batch)
    assert [e["step"] for e in history if "loss" in e] == [1, 2, 3]
    sample_mean_calls.clear()
    finetune_perturbation_model(build_gpt_neox(tokenizer, ARCHITECTURE), prompts,
                                _params(tmp_path, loss_average="token"))
    assert sample_mean_calls == []


def test_settings_errors_name_the_perturbation_finetuning_section(tokenizer, prompts, tmp_path):
    params = _params(tmp_path, loss_average="per_gene")
    with pytest.raises(ValueError, match="unknown loss average 'per_gene'.*Change perturbation.finetuning in.*"
                                         "parameters_perturbation.yml"):
        finetune_perturbation_model(build_gpt_neox(tokenizer, ARCHITECTURE), prompts, params)
    params = _params(tmp_path)
    params["finetuning"]["loss_averaging"] = "sample"
    with pytest.raises(ValueError, match="perturbation.finetuning.loss_averaging"):
        finetune_perturbation_model(build_gpt_neox(tokenizer, ARCHITECTURE), prompts, params)


def test_the_pipeline_trains_the_base_model_and_plots_its_losses(tokenizer, prompts, tmp_path):
    base = build_gpt_neox(tokenizer, ARCHITECTURE)
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    inputs = {"perturbation_base_model": base, "perturbation_prompts": prompts,
              **params_entries({"perturbation": _params(tmp_path)})}
    catalog = run_pipeline(create_pipeline().from_nodes("finetune_perturbation_model"), inputs)
    model = catalog.load("perturbation_model")
    assert any(not torch.equal(before[k], v) for k, v in model.model.state_dict().items())
    log = catalog.load("perturbation_finetuning_log")
    assert [e["step"] for e in log if "eval_loss" in e] == [3]
    figure = catalog.load("perturbation_loss_plot")
    assert list(figure.axes[0].get_lines()[0].get_xdata()) == [1.0, 2.0, 3.0]
    assert figure.axes[0].get_title() == "Perturbation-response fine-tuning"
    assert {n.name for n in create_pipeline().nodes} == {"initialize_perturbation_model", "format_perturbation_prompts",
                                                        "finetune_perturbation_model", "plot_perturbation_loss"}
