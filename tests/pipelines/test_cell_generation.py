"""cell_generation nodes on a tiny random model: prompts fit, constrained output, comparison numbers."""

from __future__ import annotations

import numpy as np
import pytest
from datasets import Dataset

from c2s_kedro.core.models import build_gpt_neox
from c2s_kedro.core.preprocessing import normalize_log10
from c2s_kedro.core.prompts import template_words
from c2s_kedro.core.tokenizer import build_gene_tokenizer
from c2s_kedro.pipelines.cell_generation.nodes import (
    build_generation_prompts,
    compare_generated_with_real,
    generate_cells,
    reconstruct_generated_cells,
)
from tests.helpers import make_counts_adata


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


def test_generated_cells_are_vocabulary_genes_without_repeats_within_the_context(setting):
    adata, cells, model, split, vocabulary = setting
    params = {"label_column": "cell_type", "n_cells_per_type": 4, "seed": 1, "temperature": 1.5}
    prompts = build_generation_prompts(cells, split, model, params)
    for prompt in prompts["prompt"]:
        assert len(model.tokenizer(prompt)["input_ids"]) + prompts["max_new_tokens"] <= 64
    generated = generate_cells(prompts, model, vocabulary, params)
    assert len(generated) == 4 * len(set(cells["cell_type"]))
    for sentence in generated["cell_sentence"]:
        words = sentence.split()
        assert words and set(words) <= set(vocabulary) and len(words) == len(set(words))
    assert generated["n_non_genes_dropped"].sum() == 0 and generated["n_repeats_merged"].sum() == 0

    rank_fit = {"slope": -0.5, "intercept": 2.0, "r2": 1.0, "pearson_r": -1.0, "spearman_r": -1.0,
                "n_cells": 1, "n_points": 1, "log_rank_cutoff": 3.0}
    generated_adata = reconstruct_generated_cells(generated, rank_fit, adata)
    assert generated_adata.shape == (len(generated), adata.n_vars)
    metrics, figures = compare_generated_with_real(adata, generated_adata, generated, {"label_column": "cell_type", "n_heatmap_genes": 10})
    assert 0.0 <= metrics["real_vs_generated_classifier_accuracy"] <= 1.0
    assert set(figures) == {"umap_by_cell_type.png", "umap_by_origin.png", "mean_expression_heatmap.png"}


def test_missing_label_column_names_the_setting(setting):
    _, cells, model, split, _ = setting
    with pytest.raises(KeyError, match="cell_generation.label_column 'annotation'"):
        build_generation_prompts(cells, split, model, {"label_column": "annotation", "n_cells_per_type": 1})
