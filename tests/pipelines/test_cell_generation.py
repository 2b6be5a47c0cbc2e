"""cell_generation nodes on a tiny random model: prompts fit, constrained output, comparison numbers."""

from __future__ import annotations

import numpy as np
import pytest
from datasets import Dataset, DatasetDict

from c2s_kedro.core.data.preprocessing import normalize_log10
from c2s_kedro.core.models.loading import build_gpt_neox
from c2s_kedro.core.models.tokenizer import build_gene_tokenizer
from c2s_kedro.core.prompts.formatting import template_words
from c2s_kedro.pipelines.cell_generation.nodes import (
    build_generation_prompts,
    compare_generated_with_real,
    generate_cells,
    reconstruct_generated_cells,
    reconstruct_real_test_cells,
    train_generation_model,
)
from tests.helpers import load_parameters, make_counts_adata


def _params(**changes) -> dict:
    return {**load_parameters("cell_generation")["cell_generation"], **changes}


@pytest.fixture(scope="module")
def setting():
    adata = normalize_log10(make_counts_adata())
    genes = [g.upper() for g in adata.var_names]
    rng = np.random.default_rng(0)
    cells = Dataset.from_dict({
        "cell_name": list(adata.obs_names),
        "cell_sentence": [" ".join(rng.permutation(genes)[:30]) for _ in range(adata.n_obs)],
        "cell_type": adata.obs["cell_type"].astype(str).tolist(),
    })
    labels = sorted(set(cells["cell_type"]))
    tokenizer = build_gene_tokenizer(genes, template_words() + labels + ["Homo sapiens"], model_max_length=64)
    model = build_gpt_neox(tokenizer, {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "max_position_embeddings": 64})
    split = {"train": list(adata.obs_names[:40]), "val": [], "test": list(adata.obs_names[40:])}
    return adata, cells, model, split, {g: 1 for g in genes}


RANK_FIT = {"slope": -0.5, "intercept": 2.0, "r2": 1.0, "pearson_r": -1.0, "spearman_r": -1.0,
            "n_cells": 1, "n_points": 1, "log_rank_cutoff": 3.0}


def test_generated_cells_are_vocabulary_genes_without_repeats_within_the_context(setting):
    adata, cells, model, split, vocabulary = setting
    params = _params(n_cells_per_type=4, seed=1, temperature=1.5)
    prompts = build_generation_prompts(cells, split, model, params)
    for prompt in prompts["prompt"]:
        assert len(model.tokenizer(prompt)["input_ids"]) + prompts["max_new_tokens"] <= 64
    generated = generate_cells(prompts, model, vocabulary, params)
    assert len(generated) == 4 * len(set(cells["cell_type"]))
    for sentence in generated["cell_sentence"]:
        words = sentence.split()
        assert words and set(words) <= set(vocabulary) and len(words) == len(set(words))
    assert generated["n_non_genes_dropped"].sum() == 0 and generated["n_repeats_merged"].sum() == 0
    assert generated["cell_type"].tolist() == prompts["cell_type"]

    generated_adata = reconstruct_generated_cells(generated, RANK_FIT, adata)
    assert generated_adata.shape == (len(generated), adata.n_vars)
    rebuilt = reconstruct_real_test_cells(cells, split, prompts, RANK_FIT, adata, params)
    assert list(rebuilt.obs_names) == split["test"] and list(rebuilt.var_names) == list(adata.var_names)
    asked = dict(zip(prompts["cell_type"], prompts["genes_requested"]))
    assert (np.diff(rebuilt.X.indptr) == [asked[t] for t in rebuilt.obs["cell_type"]]).all()
    metrics, figures = compare_generated_with_real(adata, generated_adata, generated, rebuilt, split,
                                                   _params(n_heatmap_genes=10, n_neighbors=10))
    assert 0.0 <= metrics["real_classifier_accuracy_on_reconstructed_real"] <= 1.0
    assert metrics["n_reconstructed_real_cells"] == len(split["test"])
    assert metrics["n_generated_cells"] == len(generated)
    assert metrics["mean_genes_per_generated_cell"] == generated["n_genes"].mean() and metrics["share_non_gene_words"] == 0.0
    assert {f"mean_expression_correlation[{t}]" for t in set(generated["cell_type"])} < set(metrics)
    assert set(figures) == {"umap_by_cell_type.png", "umap_by_origin.png", "mean_expression_heatmap.png"}


def test_prompts_ask_for_the_median_number_of_genes_or_what_fits(setting):
    _, cells, model, split, _ = setting
    prompts = build_generation_prompts(cells, split, model, _params(n_cells_per_type=2))
    assert prompts["cell_type"] == ["B cell", "B cell", "T cell", "T cell"]
    assert prompts["genes_requested"] == [30] * 4  # every train cell has 30 genes, and they fit
    genes = sorted(set(" ".join(cells["cell_sentence"]).split()))
    tokenizer = build_gene_tokenizer(genes, template_words() + ["B cell", "T cell", "Homo sapiens"], model_max_length=48)
    short = build_gpt_neox(tokenizer, {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "max_position_embeddings": 48})
    prompts = build_generation_prompts(cells, split, short, _params(n_cells_per_type=2))
    # 30 genes do not fit a context of 48 with the prompt: fewer are asked for, and the answer fits
    for prompt, requested in zip(prompts["prompt"], prompts["genes_requested"]):
        assert 0 < requested < 30 and f" {requested} most" in prompt
        assert len(tokenizer(prompt)["input_ids"]) + requested + 2 <= 48  # genes, ".", EOS
    assert prompts["max_new_tokens"] >= max(prompts["genes_requested"]) + 2


def test_unconstrained_output_is_cleaned_and_counted(setting):
    _, cells, model, split, vocabulary = setting
    params = _params(n_cells_per_type=3, constrained=False, temperature=1.5, seed=2)
    generated = generate_cells(build_generation_prompts(cells, split, model, params), model, vocabulary, params)
    for row in generated.itertuples():
        words = row.cell_sentence.split()
        assert set(words) <= set(vocabulary) and len(words) == len(set(words)) and row.n_genes == len(words)
        assert row.n_non_genes_dropped == sum(w.rstrip(".") not in vocabulary for w in row.raw_text.split() if w.rstrip("."))
    assert generated["n_non_genes_dropped"].sum() > 0  # a random model writes other words too


def test_a_missing_label_column_or_template_names_the_setting(setting):
    _, cells, model, split, _ = setting
    with pytest.raises(IndexError, match=r"template index 10 does not exist.*Change cell_generation\.template_index"):
        build_generation_prompts(cells, split, model, _params(template_index=10))
    with pytest.raises(KeyError, match=r"'annotation' not in the cell-sentence dataset.*Change cell_generation\.label_column"):
        build_generation_prompts(cells, split, model, _params(label_column="annotation", n_cells_per_type=1))


def test_generation_prompts_use_the_template_file(setting, tmp_path):
    import json

    adata, cells, model, split, vocabulary = setting
    path = tmp_path / "generation.json"
    path.write_text(json.dumps({"model_input": ["Blorb {num_genes} {cell_type}:"], "response": ["{cell_sentence}."]}))
    prompts = build_generation_prompts(cells, split, model, _params(n_cells_per_type=2, prompt_templates={"cell_type_generation": str(path)}))
    assert prompts["prompt"] == [f"Blorb {k} {t}:" for k, t in zip(prompts["genes_requested"], prompts["cell_type"])]
    path.write_text(json.dumps({"model_input": ["Blorb {num_genes}:"], "response": ["{cell_sentence}."]}))
    with pytest.raises(ValueError, match=r"model_input\[0\] lacks \{cell_type\}.*Change cell_generation.prompt_templates"):
        build_generation_prompts(cells, split, model, _params(prompt_templates={"cell_type_generation": str(path)}))


def _finetuning_params(tmp_path) -> dict:
    params = load_parameters("finetuning")["finetuning"]
    arguments = {**params["training_arguments"], "per_device_train_batch_size": 4, "logging_steps": 1,
                 "eval_steps": 5, "save_steps": 5, "warmup_steps": 0, "max_steps": 1}
    return {**params, "checkpoint_dir": str(tmp_path / "ft"), "training_arguments": arguments}


def _prompts(n: int) -> DatasetDict:
    def part(k: int) -> Dataset:
        kinds = ["cell_type_generation", "cell_type_prediction"] * k
        return Dataset.from_dict({"sample_type": kinds, "model_input": ["Generate a T cell:"] * (2 * k),
                                  "response": ["GENE1 GENE2 GENE3", "T cell."] * k})
    return DatasetDict({"train": part(n), "val": part(2), "test": part(1)})


def _own_model(setting):
    """A model of the fixture's shape of its own: training changes weights in place."""
    tokenizer = setting[2].tokenizer
    return build_gpt_neox(tokenizer, {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "max_position_embeddings": 64})


def test_generation_training_trains_generation_prompts_for_its_epochs_and_keeps_finetuned_model(setting, tmp_path):
    model = _own_model(setting)
    model.model.config.c2s_trained_tasks = ["cell_type_generation", "cell_type_prediction"]
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    params = _params(training={"epochs": 2, "checkpoint_dir": str(tmp_path / "gen"), "mlflow_prefix": "generation_training"})
    trained, log = train_generation_model(model, _prompts(8), _finetuning_params(tmp_path), params)
    # 8 generation prompts of 16 at batch 4 for 2 epochs: 4 steps, not the fine-tuning's max_steps (1)
    assert max(row.get("step", 0) for row in log) == 4
    assert trained.model.config.c2s_trained_tasks == ["cell_type_generation"]
    assert any("eval_loss" in row for row in log)
    changed = any(not np.array_equal(before[k].numpy(), v.detach().numpy()) for k, v in trained.model.state_dict().items())
    assert changed
    # 0 epochs: the fine-tuned model itself, untrained
    same, empty = train_generation_model(model, _prompts(8), _finetuning_params(tmp_path),
                                         _params(training={**params["training"], "epochs": 0}))
    assert same is model and empty == []


def test_generation_training_refuses_prompts_or_models_without_generation(setting, tmp_path):
    model = _own_model(setting)
    params = _params(training={"epochs": 1, "checkpoint_dir": str(tmp_path / "gen"), "mlflow_prefix": "generation_training"})
    prediction_only = DatasetDict({part: ds.filter(lambda t: t == "cell_type_prediction", input_columns="sample_type")
                                   for part, ds in _prompts(4).items()})
    model.model.config.c2s_trained_tasks = ["cell_type_generation", "cell_type_prediction"]
    with pytest.raises(ValueError, match="no cell_type_generation train prompts.*Change finetuning.tasks"):
        train_generation_model(model, prediction_only, _finetuning_params(tmp_path), params)
    with pytest.raises(ValueError, match=r"cell_generation.training.epochs must be at least 0, got -1"):
        train_generation_model(model, _prompts(4), _finetuning_params(tmp_path), _params(training={**params["training"], "epochs": -1}))
    model.model.config.c2s_trained_tasks = ["cell_type_prediction"]
    with pytest.raises(ValueError, match="finetuning.tasks"):
        train_generation_model(model, _prompts(4), _finetuning_params(tmp_path), params)


def test_cells_without_a_label_ask_for_no_cell_and_are_no_real_type(setting):
    adata, cells, model, split, _ = setting
    holes = ["nan" if i % 5 == 0 else (None if i % 7 == 0 else t) for i, t in enumerate(cells["cell_type"])]
    unlabelled = cells.remove_columns("cell_type").add_column("cell_type", holes)
    prompts = build_generation_prompts(unlabelled, split, model, _params(n_cells_per_type=2))
    assert sorted(set(prompts["cell_type"])) == ["B cell", "T cell"]  # no "a None cell", no "a nan cell"
    assert not any("None" in p or "nan" in p for p in prompts["prompt"])
    rebuilt = reconstruct_real_test_cells(unlabelled, split, prompts, RANK_FIT, adata, _params())
    kept = [name for name, label in zip(cells["cell_name"], holes) if name in split["test"] and label not in (None, "nan")]
    assert list(rebuilt.obs_names) == kept
