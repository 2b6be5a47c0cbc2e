"""Embedding nodes on tiny models: prompts fit the context, embeddings per cell, UMAP, metrics."""

from __future__ import annotations

import numpy as np
import pytest
from datasets import Dataset

from c2s_kedro.core.data.preprocessing import embed_expression, normalize_log10
from c2s_kedro.core.models.loading import build_gpt_neox, load_model
from c2s_kedro.core.models.tokenizer import build_gene_tokenizer
from c2s_kedro.core.prompts.formatting import load_templates, template_words
from c2s_kedro.pipelines.embedding import create_pipeline
from c2s_kedro.pipelines.embedding.nodes import (
    build_embedding_adata,
    build_embedding_prompts,
    embed_cells,
    plot_embedding_umaps,
    score_embeddings,
)
from tests.helpers import TRICKY_GENES, byte_level_bpe_tokenizer, load_parameters, make_counts_adata, params_entries, run_pipeline

GENES = TRICKY_GENES
ARCHITECTURE = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 128}


def _params(**changes) -> dict:
    return {**load_parameters("embedding")["embedding"], **changes}


@pytest.fixture(scope="module")
def processed():
    return embed_expression(normalize_log10(make_counts_adata()), n_comps=10, n_neighbors=10)


@pytest.fixture(scope="module")
def sentences(processed):
    genes = [g.upper() for g in processed.var_names]
    rng = np.random.default_rng(0)
    return Dataset.from_dict({
        "cell_name": list(processed.obs_names),
        "cell_sentence": [" ".join(rng.permutation(genes)[: 10 + i]) for i in range(processed.n_obs)],
        "cell_type": processed.obs["cell_type"].astype(str).tolist(),
        "organism": ["Homo sapiens"] * processed.n_obs,
    })


@pytest.fixture(scope="module")
def model(processed):
    tokenizer = build_gene_tokenizer([g.upper() for g in processed.var_names], template_words() + ["Homo sapiens"], model_max_length=64)
    return build_gpt_neox(tokenizer, {**ARCHITECTURE, "max_position_embeddings": 64}, seed=0)


def test_prompts_fit_the_context_and_use_the_fixed_template(sentences, model):
    prompts = build_embedding_prompts(sentences, model, _params(template_index=2))
    assert prompts["cell_name"] == sentences["cell_name"]
    template = load_templates("cell_type_prediction").inputs[2]
    head, tail = template.split("{num_genes}")[0], template.rsplit("{cell_sentence}", 1)[1]
    for prompt, kept, available in zip(prompts["prompt"], prompts["genes_kept"], prompts["genes_available"]):
        assert prompt.startswith(head) and prompt.endswith(tail)  # every cell gets template 2
        assert len(model.tokenizer(prompt, add_special_tokens=False)["input_ids"]) <= 64
        assert f" {kept} genes" in prompt and kept <= available
    assert prompts["genes_available"] == [min(10 + i, 40) for i in range(sentences.num_rows)]  # 40 genes in all
    assert min(prompts["genes_kept"]) == 10 and max(prompts["genes_kept"]) < max(prompts["genes_available"])  # long ones cut
    with pytest.raises(IndexError, match="template index 12 does not exist.*Change embedding.template_index"):
        build_embedding_prompts(sentences, model, _params(template_index=12))


def test_embeddings_have_one_row_per_prompt_and_do_not_depend_on_the_batch(sentences, model):
    prompts = build_embedding_prompts(sentences, model, _params())
    embeddings = embed_cells(prompts, model, _params(batch_size=7))
    assert embeddings.shape == (sentences.num_rows, ARCHITECTURE["hidden_size"]) and embeddings.dtype == np.float32
    alone = embed_cells({**prompts, "prompt": prompts["prompt"][5:6]}, model, _params(batch_size=1))[0]
    np.testing.assert_allclose(alone, embeddings[5], atol=1e-4)
    assert not np.allclose(embeddings[5], embeddings[6], atol=1e-3)  # different cells, different vectors


def _clustered_embeddings(processed, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    is_t = (processed.obs["cell_type"] == "T cell").to_numpy()
    return (rng.normal(size=(processed.n_obs, 8)) + 6.0 * is_t[:, None]).astype(np.float32)


def test_embedding_adata_holds_the_embedding_its_umap_and_the_expression_views(processed):
    names = list(processed.obs_names[::-1])  # any order of the cells
    prompts = {"cell_name": names, "genes_kept": list(range(len(names)))}
    embeddings = _clustered_embeddings(processed)
    cells = build_embedding_adata(processed, prompts, embeddings, _params(n_neighbors=8))
    assert list(cells.obs_names) == names and cells.obs["genes_in_prompt"].tolist() == prompts["genes_kept"]
    np.testing.assert_array_equal(cells.obsm["X_c2s"], embeddings)
    assert cells.obsm["X_umap_c2s"].shape == (len(names), 2) and np.isfinite(cells.obsm["X_umap_c2s"]).all()
    np.testing.assert_array_equal(cells.obsm["X_pca_expression"], processed[names].obsm["X_pca"])
    assert cells.uns["c2s"]["params"]["n_neighbors"] == 8 and "X_umap" not in cells.obsm
    # the two clusters of the embedding stay apart in its UMAP
    umap, is_t = cells.obsm["X_umap_c2s"], (cells.obs["cell_type"] == "T cell").to_numpy()
    gap = np.linalg.norm(umap[is_t].mean(axis=0) - umap[~is_t].mean(axis=0))
    assert gap > 3 * max(umap[is_t].std(axis=0).max(), umap[~is_t].std(axis=0).max())
    with pytest.raises(ValueError, match="not in the expression data"):
        build_embedding_adata(processed, {"cell_name": ["nobody"], "genes_kept": [1]}, embeddings[:1], _params())


def test_separable_labels_score_higher_than_shuffled_ones(processed):
    prompts = {"cell_name": list(processed.obs_names), "genes_kept": [10] * processed.n_obs}
    cells = build_embedding_adata(processed, prompts, _clustered_embeddings(processed), _params(n_neighbors=8))
    cells.obs["shuffled"] = np.random.default_rng(1).permutation(cells.obs["cell_type"].to_numpy())
    separable = score_embeddings(cells, _params(label_key="cell_type", batch_key=None))
    shuffled = score_embeddings(cells, _params(label_key="shuffled", batch_key=None))
    assert separable["c2s_silhouette_label"] > 0.5 > shuffled["c2s_silhouette_label"] + 0.4
    assert separable["c2s_knn_label_accuracy"] > 0.95 > shuffled["c2s_knn_label_accuracy"] + 0.2
    assert separable["pca_silhouette_label"] > shuffled["pca_silhouette_label"]  # expression PCA beside it
    assert separable["n_cells"] == processed.n_obs and separable["mean_genes_in_prompt"] == 10.0
    assert "c2s_silhouette_batch" not in separable
    with pytest.raises(KeyError, match="'annotation' not found.*Change embedding.label_key"):
        score_embeddings(cells, _params(label_key="annotation"))


def test_umap_plots_only_for_obs_columns_that_exist(processed):
    prompts = {"cell_name": list(processed.obs_names), "genes_kept": [10] * processed.n_obs}
    cells = build_embedding_adata(processed, prompts, _clustered_embeddings(processed), _params(n_neighbors=8))
    figures = plot_embedding_umaps(cells, _params(color_keys=["cell_type", "no_such_column"]))
    assert list(figures) == ["cell_type.png"]
    assert [ax.get_title() for ax in figures["cell_type.png"].axes[:2]] == ["expression (PCA)", "C2S embedding"]


def test_the_embedding_pipeline_runs_on_a_tiny_model(processed, sentences, model):
    parameters = {"embedding": _params(n_neighbors=8, knn_k=5)}
    catalog = run_pipeline(create_pipeline(), {
        "cell_sentences": sentences, "foundation_model": model, "processed_adata": processed, **params_entries(parameters),
    })
    cells = catalog.load("cell_embeddings")
    assert cells.obsm["X_c2s"].shape == (processed.n_obs, ARCHITECTURE["hidden_size"]) and "X_umap_c2s" in cells.obsm
    metrics = catalog.load("embedding_metrics")
    assert metrics["n_cells"] == processed.n_obs and metrics["embedding_dim"] == ARCHITECTURE["hidden_size"]
    assert set(catalog.load("embedding_umap_plots")) == {"cell_type.png", "tissue.png"}


def test_embedding_pipeline_nodes_work_with_a_bpe_model_of_short_context(tmp_path):
    """A hub-style model (byte-level BPE, several tokens per gene, short context) goes through the
    same embedding nodes; prompts are shortened to its context, never past it."""
    corpus = [" ".join(GENES)] + list(load_templates("cell_type_prediction").inputs)
    tokenizer = byte_level_bpe_tokenizer(corpus)  # no pad token, like Pythia
    architecture = {**ARCHITECTURE, "max_position_embeddings": 256}
    model = build_gpt_neox(tokenizer, architecture).model
    model.save_pretrained(tmp_path / "bpe_model")
    tokenizer.save_pretrained(tmp_path / "bpe_model")

    loaded = load_model(tmp_path / "bpe_model")
    assert loaded.tokenizer.pad_token is not None  # set by the loader
    per_gene = len(loaded.tokenizer(" " + " ".join(GENES[:50]), add_special_tokens=False)["input_ids"]) / 50
    assert per_gene > 1.5  # BPE spends several tokens per gene, unlike the gene-level tokenizer
    sentences = Dataset.from_dict({
        "cell_name": ["a", "b"],
        "cell_sentence": [" ".join(GENES[:5]), " ".join(GENES)],
        "organism": ["Homo sapiens", None],
    })
    prompts = build_embedding_prompts(sentences, loaded, _params(template_index=0))
    assert prompts["genes_kept"][0] == 5 and 0 < prompts["genes_kept"][1] < len(GENES)
    lengths = [len(loaded.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts["prompt"]]
    assert max(lengths) <= 256
    embeddings = embed_cells(prompts, loaded, _params(batch_size=2))
    assert embeddings.shape == (2, ARCHITECTURE["hidden_size"]) and np.isfinite(embeddings).all()


def test_embedding_prompts_and_pooling_follow_the_parameters(sentences, model, tmp_path):
    import json

    path = tmp_path / "prediction.json"
    path.write_text(json.dumps({"model_input": ["Quux {num_genes} genes: {cell_sentence}.\nKind:", "Zorp {cell_sentence}."],
                                "response": ["{cell_type}."]}))
    prompts = build_embedding_prompts(sentences, model, _params(prompt_templates={"cell_type_prediction": str(path)}, template_index=1))
    assert prompts["prompt"][0] == f"Zorp {sentences[0]['cell_sentence']}."
    assert all(p.startswith("Zorp ") for p in prompts["prompt"])
    with pytest.raises(IndexError, match="template index 2 does not exist.*Change embedding.template_index"):
        build_embedding_prompts(sentences, model, _params(prompt_templates={"cell_type_prediction": str(path)}, template_index=2))
    with pytest.raises(ValueError, match="nowhere.json does not exist.*Change embedding.prompt_templates"):
        build_embedding_prompts(sentences, model, _params(prompt_templates={"cell_type_prediction": str(tmp_path / "nowhere.json")}))
    assert load_parameters("embedding")["embedding"]["pooling"] == "mean"
    mean = embed_cells(prompts, model, _params())
    last = embed_cells(prompts, model, _params(pooling="last"))
    assert mean.shape == last.shape and np.abs(mean - last).max() > 1e-3
    with pytest.raises(ValueError, match="unknown pooling 'max'.*Change embedding.pooling"):
        embed_cells(prompts, model, _params(pooling="max"))


def test_cells_without_a_label_are_embedded_but_left_out_of_the_label_scores(processed, sentences, model, caplog):
    import pandas as pd

    unlabelled = processed.copy()
    cell_type = unlabelled.obs["cell_type"].astype(object)
    cell_type.iloc[::6] = np.nan
    cell_type.iloc[1] = ""  # an empty label is no label either
    unlabelled.obs["cell_type"] = pd.Categorical(cell_type)
    parameters = {"embedding": _params(n_neighbors=8, knn_k=5)}
    catalog = run_pipeline(create_pipeline(), {
        "cell_sentences": sentences, "foundation_model": model, "processed_adata": unlabelled, **params_entries(parameters),
    })
    assert catalog.load("cell_embeddings").n_obs == processed.n_obs  # every cell embedded
    metrics = catalog.load("embedding_metrics")
    assert metrics["n_cells"] == 60 and metrics["n_cells_without_label"] == 11 and metrics["n_scored_cells"] == 49
    assert "11 of 60 embedded cells have no 'cell_type' label: left out of the label scores" in caplog.text
