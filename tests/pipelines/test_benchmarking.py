import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from datasets import Dataset

from c2s_kedro.core.data.preprocessing import embed_expression, normalize_log10
from c2s_kedro.core.sentences.conversion import cell_sentences_from_adata
from c2s_kedro.core.sentences.rank_fit import cluster_agreement
from c2s_kedro.core.sentences.rank_fit import leiden_labels
from c2s_kedro.pipelines.benchmarking import create_pipeline
from c2s_kedro.pipelines.benchmarking.nodes import (
    compare_reconstruction,
    fit_rank_to_expression,
    reconstruct_adata,
    summarize_benchmark,
)
from tests.helpers import load_parameters, params_entries, run_pipeline

SLOPE, INTERCEPT = -0.5, 2.0
EMBEDDING = {"n_top_genes": None, "n_comps": 10, "n_neighbors": 8, "seed": 0}


@pytest.fixture
def params():
    """The project's benchmarking parameters, shrunk for small data."""
    parameters = load_parameters("benchmarking")
    parameters["benchmarking"].update(n_cells=300, embedding=dict(EMBEDDING))
    parameters["benchmarking"]["rank_fit"].update(n_cells=300)
    return parameters


def fit(adata, params, split=None, **changes):
    return fit_rank_to_expression(adata, split or {}, {**params["benchmarking"]["rank_fit"], **changes})


@pytest.fixture(scope="module")
def line_adata() -> ad.AnnData:
    """40 cells x 60 genes whose expression is exactly INTERCEPT + SLOPE * log10(1 + rank), genes
    in a random order per cell, 20 to 59 genes expressed per cell, two groups of cells."""
    rng = np.random.default_rng(2)
    n_cells, n_genes = 40, 60
    dense = np.zeros((n_cells, n_genes), dtype=np.float32)
    for cell in range(n_cells):
        n_expressed = rng.integers(20, n_genes)
        # The first 30 genes lead in group A, the last 30 in group B.
        lead = np.arange(30) if cell < n_cells // 2 else np.arange(30, 60)
        order = np.concatenate([rng.permutation(lead), rng.permutation(np.setdiff1d(np.arange(n_genes), lead))])
        dense[cell, order[:n_expressed]] = INTERCEPT + SLOPE * np.log10(1.0 + np.arange(n_expressed))
    obs = pd.DataFrame(
        {"cell_type": np.where(np.arange(n_cells) < n_cells // 2, "A", "B")},
        index=[f"cell_{i}" for i in range(n_cells)],
    )
    adata = ad.AnnData(X=sp.csr_matrix(dense), obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)]))
    return embed_expression(adata, **EMBEDDING)


@pytest.fixture(scope="module")
def line_sentences(line_adata) -> Dataset:
    return cell_sentences_from_adata(line_adata, label_columns=["cell_type"]).sentences


# ---- nodes -------------------------------------------------------------------------------------


def test_fit_rank_to_expression_recovers_the_line(line_adata, params):
    rank_fit, figure = fit(line_adata, params)
    assert rank_fit["slope"] == pytest.approx(SLOPE, abs=1e-5)
    assert rank_fit["intercept"] == pytest.approx(INTERCEPT, abs=1e-5)
    assert rank_fit["r2"] == pytest.approx(1.0, abs=1e-6)
    assert rank_fit["n_cells"] == line_adata.n_obs  # n_cells 300 capped at 40
    assert rank_fit["n_points"] == line_adata.X.nnz
    assert figure.axes[0].get_xlabel() == "log10(1 + rank)"
    fitted_line = figure.axes[0].get_lines()[0]
    np.testing.assert_allclose(fitted_line.get_ydata(), INTERCEPT + SLOPE * fitted_line.get_xdata(), atol=1e-4)


def test_fit_rank_to_expression_samples_n_cells(line_adata, params):
    rank_fit, _ = fit(line_adata, params, n_cells=10)
    assert rank_fit["n_cells"] == 10
    assert rank_fit["n_points"] < line_adata.X.nnz


def test_fit_rank_to_expression_on_the_cells_of_split_parts(line_adata, params):
    split = {"train": list(line_adata.obs_names[:8]), "extra": list(line_adata.obs_names[30:32]), "test": list(line_adata.obs_names[8:])}
    rank_fit, _ = fit(line_adata, params, split, fit_on=["train", "extra"])
    assert rank_fit["n_cells"] == 10
    assert rank_fit["n_points"] == line_adata[split["train"] + split["extra"]].X.nnz
    with pytest.raises(KeyError, match=r"\['valid'\].*Change benchmarking.rank_fit.fit_on"):
        fit(line_adata, params, split, fit_on=["valid"])


def test_fit_rank_to_expression_names_a_missing_layer(line_adata, params):
    with pytest.raises(KeyError, match="not_a_layer"):
        fit(line_adata, params, layer="not_a_layer")


def test_reconstruct_adata_rebuilds_exact_data(line_adata, line_sentences, params):
    rank_fit, _ = fit(line_adata, params)
    reconstructed = reconstruct_adata(line_sentences, rank_fit, line_adata, params["benchmarking"])
    assert list(reconstructed.obs_names) == list(line_adata.obs_names)
    assert list(reconstructed.var_names) == list(line_adata.var_names)
    np.testing.assert_allclose(reconstructed.X.toarray(), line_adata.X.toarray(), atol=1e-4)
    assert reconstructed.obsm["X_umap"].shape == (line_adata.n_obs, 2)
    assert reconstructed.uns["n_unknown_words"] == 0
    assert reconstructed.uns["rank_fit"]["slope"] == rank_fit["slope"]
    assert list(reconstructed.obs["cell_type"]) == list(line_adata.obs["cell_type"])


def test_reconstruct_adata_follows_a_selected_dataset(line_adata, line_sentences, params):
    rank_fit, _ = fit(line_adata, params)
    reversed_sentences = line_sentences.select(range(line_sentences.num_rows - 1, -1, -1))
    reconstructed = reconstruct_adata(reversed_sentences, rank_fit, line_adata, params["benchmarking"])
    assert list(reconstructed.obs_names) == list(line_adata.obs_names[::-1])
    np.testing.assert_allclose(reconstructed.X.toarray(), line_adata.X.toarray()[::-1], atol=1e-4)


def test_reconstruct_adata_counts_unknown_words(line_adata, line_sentences, params):
    rank_fit, _ = fit(line_adata, params)
    sentences = line_sentences.map(lambda row: {"cell_sentence": "NOTAGENE " + row["cell_sentence"]})
    reconstructed = reconstruct_adata(sentences, rank_fit, line_adata, params["benchmarking"])
    assert reconstructed.uns["n_unknown_words"] == line_adata.n_obs


def test_reconstruct_adata_refuses_cells_missing_from_the_data(line_adata, line_sentences, params):
    rank_fit, _ = fit(line_adata, params)
    with pytest.raises(ValueError, match="sentence_conversion"):
        reconstruct_adata(line_sentences, rank_fit, line_adata[5:].copy(), params["benchmarking"])


def test_compare_identical_data_agrees_perfectly(line_adata, params):
    metrics, scatter, umaps = compare_reconstruction(line_adata, line_adata.copy(), params["benchmarking"])
    assert metrics["reconstruction_pearson_r"] == pytest.approx(1.0)
    assert metrics["reconstruction_spearman_r"] == pytest.approx(1.0)
    assert metrics["leiden_ari_original_vs_reconstructed"] == pytest.approx(1.0)
    assert metrics["knn_overlap_pca"] == pytest.approx(1.0)
    assert metrics["n_leiden_clusters_original"] == metrics["n_leiden_clusters_reconstructed"] >= 1
    assert metrics["leiden_ari_original_vs_label"] == metrics["leiden_ari_reconstructed_vs_label"]
    points = scatter.axes[0].collections[0].get_offsets()
    np.testing.assert_allclose(points[:, 0], points[:, 1])  # every point on the diagonal
    assert len(umaps.axes) >= 2 and "original" in umaps.axes[0].get_title()


def test_compare_names_a_missing_label_key_and_the_setting(line_adata, params):
    with pytest.raises(KeyError) as error:
        compare_reconstruction(line_adata, line_adata, {**params["benchmarking"], "label_key": "louvain"})
    message = error.value.args[0]
    assert "'louvain'" in message
    assert "benchmarking.label_key" in message


def test_cells_without_a_label_are_no_cluster_of_the_label_agreement(line_adata, params, caplog):
    holes = line_adata.copy()
    cell_type = holes.obs["cell_type"].astype(object)
    cell_type.iloc[::4] = np.nan  # before, NaN was a cluster of its own and lowered the ARI
    holes.obs["cell_type"] = pd.Categorical(cell_type)
    metrics, _, _ = compare_reconstruction(holes, holes.copy(), params["benchmarking"])
    whole, _, _ = compare_reconstruction(line_adata, line_adata.copy(), params["benchmarking"])
    assert metrics["n_cells_without_label"] == 10 and metrics["n_scored_cells"] == 40
    labelled = cell_type.notna().to_numpy()
    clusters = leiden_labels(line_adata, params["benchmarking"]["leiden_resolution"], params["benchmarking"]["seed"])
    assert metrics["leiden_ari_original_vs_label"] == pytest.approx(
        cluster_agreement(clusters[labelled], cell_type[labelled].to_numpy()))
    assert whole["n_cells_without_label"] == 0 and "scored on 40 cells" not in caplog.text


def test_compare_without_label_key(line_adata, params):
    metrics, _, _ = compare_reconstruction(line_adata, line_adata, {**params["benchmarking"], "label_key": None})
    assert "leiden_ari_original_vs_label" not in metrics


def test_summarize_benchmark():
    summary = summarize_benchmark({"slope": -0.5, "n_cells": 3}, {"knn_overlap_pca": 0.25})
    assert summary == {"rank_fit_slope": -0.5, "rank_fit_n_cells": 3.0, "knn_overlap_pca": 0.25}
    assert isinstance(summary["rank_fit_n_cells"], float)


# ---- the pipeline on the PBMC data -------------------------------------------------------------


@pytest.fixture(scope="module")
def pbmc_processed(pbmc_counts) -> ad.AnnData:
    return embed_expression(normalize_log10(pbmc_counts), **EMBEDDING)


def test_benchmarking_pipeline_on_pbmc(pbmc_processed, params):
    sentences = cell_sentences_from_adata(pbmc_processed, label_columns=["cell_type"], seed=1234).sentences
    inputs = {"processed_adata": pbmc_processed, "cell_sentences": sentences, "data_split": {}, **params_entries(params)}
    catalog = run_pipeline(create_pipeline(), inputs)
    metrics = catalog.load("benchmarking_metrics")
    assert set(metrics) == {
        *(f"rank_fit_{k}" for k in ["slope", "intercept", "r2", "pearson_r", "spearman_r", "n_cells", "n_points", "log_rank_cutoff"]),
        "reconstruction_pearson_r",
        "reconstruction_spearman_r",
        "leiden_ari_original_vs_reconstructed",
        "n_leiden_clusters_original",
        "n_leiden_clusters_reconstructed",
        "knn_overlap_pca",
        "leiden_ari_original_vs_label",
        "leiden_ari_reconstructed_vs_label",
        "n_cells_without_label",
        "n_scored_cells",
    }
    assert metrics["n_cells_without_label"] == 0 and metrics["n_scored_cells"] == pbmc_processed.n_obs
    assert metrics["rank_fit_r2"] > 0.5
    assert metrics["rank_fit_slope"] < 0 < metrics["rank_fit_intercept"]
    assert metrics["rank_fit_n_cells"] == 300
    assert metrics["reconstruction_pearson_r"] > 0.5
    # the sentences keep the structure of the data: clusters agree with the labels and each other
    assert metrics["leiden_ari_original_vs_label"] > 0.2
    assert metrics["leiden_ari_reconstructed_vs_label"] > 0.1
    assert metrics["leiden_ari_original_vs_reconstructed"] > 0.4
    assert 0.4 < metrics["knn_overlap_pca"] < 1
    assert metrics["n_leiden_clusters_original"] >= 2
    reconstructed = catalog.load("reconstructed_adata")
    assert reconstructed.shape == pbmc_processed.shape
    assert reconstructed.obsm["X_umap"].shape == (pbmc_processed.n_obs, 2)
    assert catalog.load("rank_fit")["slope"] == metrics["rank_fit_slope"]
    for plot in ["rank_expression_plot", "reconstruction_plot", "umap_comparison_plot"]:
        assert catalog.load(plot).axes[0].collections  # points drawn


def test_leiden_labels_are_those_of_the_whole_data_and_leave_it_unchanged(line_adata):
    """Leiden runs on an AnnData of the graph only (not a copy of the matrices): same labels."""
    import scanpy as sc

    from c2s_kedro.core.sentences.rank_fit import leiden_labels

    whole = line_adata.copy()
    sc.tl.leiden(whole, resolution=1.0, flavor="igraph", n_iterations=2, directed=False, random_state=0)
    labels = leiden_labels(line_adata, 1.0, 0)
    np.testing.assert_array_equal(labels, whole.obs["leiden"].to_numpy())
    assert "leiden" not in line_adata.obs


def test_compare_refuses_data_processed_without_embedding(line_adata, params):
    bare = ad.AnnData(line_adata.X, obs=line_adata.obs)
    with pytest.raises(KeyError, match=r"data_processing.embed is false\): set data_processing.embed to true"):
        compare_reconstruction(bare, line_adata, params["benchmarking"])
