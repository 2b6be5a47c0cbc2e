"""Generated cells against real cells: expression from ranks, per-type means, classifiers, one UMAP."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from c2s_kedro.core.data.preprocessing import normalize_log10
from c2s_kedro.core.sentences.rank_fit import RankFit
from c2s_kedro.core.tasks.cell_generation import (
    comparison_figures,
    compare_generated_with_real,
    real_cells_as_generated,
    reconstruct_generated_cells,
)


@pytest.fixture(scope="module")
def real():
    from tests.helpers import make_counts_adata

    return normalize_log10(make_counts_adata())


def _generated(real: ad.AnnData, cells: list[str], types: list[str]) -> tuple[ad.AnnData, pd.DataFrame]:
    """Real cells posing as generated ones, with the given types."""
    stats = pd.DataFrame({"cell_type": types, "n_genes": 20, "n_non_genes_dropped": 1, "n_repeats_merged": 0},
                         index=[f"generated_{i}" for i in range(len(cells))])
    return ad.AnnData(X=sp.csr_matrix(real[cells].X), obs=stats.copy(), var=pd.DataFrame(index=real.var_names)), stats


def test_copies_of_real_cells_match_their_types_and_cannot_be_told_apart(real):
    generated, stats = _generated(real, list(real.obs_names), real.obs["cell_type"].astype(str).tolist())
    metrics, comparison = compare_generated_with_real(real, generated, stats, "cell_type", n_neighbors=10)
    assert metrics["mean_per_type_correlation_of_mean_expression"] == pytest.approx(1.0)
    assert metrics["real_classifier_accuracy_on_generated_types"] == 1.0
    assert metrics["real_vs_generated_classifier_accuracy"] < 0.6  # identical cells: a coin toss at best
    assert metrics["n_generated_cells"] == real.n_obs and metrics["share_non_gene_words"] == pytest.approx(1 / 21)
    assert comparison.types == ["B cell", "T cell"] and comparison.coordinates.shape == (2 * real.n_obs, 2)
    is_t = (real.obs["cell_type"] == "T cell").to_numpy()
    np.testing.assert_allclose(comparison.real_means[1], np.asarray(real.X[is_t].mean(axis=0)).ravel(), rtol=1e-5)
    np.testing.assert_allclose(comparison.real_means, comparison.generated_means, rtol=1e-6)
    # PCA on the real cells, the copies projected into it: each copy lands on its original
    np.testing.assert_allclose(comparison.coordinates[: real.n_obs], comparison.coordinates[real.n_obs :], atol=1.0)


def test_cells_of_the_wrong_type_and_noise_are_told_apart(real):
    is_t = (real.obs["cell_type"] == "T cell").to_numpy()
    swapped, stats = _generated(real, list(real.obs_names), np.where(is_t, "B cell", "T cell").tolist())
    metrics, _ = compare_generated_with_real(real, swapped, stats, "cell_type", n_neighbors=10)
    assert metrics["real_classifier_accuracy_on_generated_types"] == 0.0
    # the markers of the other type: each type's mean expression is anti-correlated with the real one
    assert metrics["mean_expression_correlation[T cell]"] < 0 and metrics["mean_expression_correlation[B cell]"] < 0
    noise = ad.AnnData(X=sp.csr_matrix(np.random.default_rng(0).exponential(2.0, size=(30, real.n_vars)).astype(np.float32)),
                       obs=stats.iloc[:30].copy(), var=pd.DataFrame(index=real.var_names))
    metrics, comparison = compare_generated_with_real(real, noise, stats.iloc[:30], "cell_type", n_neighbors=10)
    assert metrics["real_vs_generated_classifier_accuracy"] > 0.95
    assert set(comparison_figures(comparison, n_heatmap_genes=5)) == {"umap_by_cell_type.png", "umap_by_origin.png", "mean_expression_heatmap.png"}
    with pytest.raises(KeyError, match="'annotation' not found in the real cells"):
        compare_generated_with_real(real, noise, stats.iloc[:30], "annotation")


def test_generated_expression_follows_the_rank_fit(real):
    rank_fit = RankFit(slope=-1.0, intercept=2.0, r2=1.0, pearson_r=-1.0, spearman_r=-1.0, n_cells=1, n_points=1, log_rank_cutoff=3.0)
    genes = [g.upper() for g in real.var_names]
    cells = pd.DataFrame({"cell_type": ["T cell", "B cell"], "cell_sentence": [f"{genes[3]} {genes[0]}", genes[5]],
                          "n_genes": [2, 1], "n_non_genes_dropped": [0, 2], "n_repeats_merged": [1, 0]}, index=["generated_0", "generated_1"])
    generated = reconstruct_generated_cells(cells, real.var_names, rank_fit)
    assert list(generated.var_names) == list(real.var_names) and list(generated.obs_names) == ["generated_0", "generated_1"]
    assert generated.obs.columns.tolist() == ["cell_type", "n_genes", "n_non_genes_dropped", "n_repeats_merged"]
    dense = generated.X.toarray()
    assert dense[0, 3] == pytest.approx(2.0) and dense[0, 0] == pytest.approx(2.0 - np.log10(2.0))  # ranks 0 and 1
    assert dense[1, 5] == pytest.approx(2.0) and np.count_nonzero(dense) == 3


def _sentences(adata: ad.AnnData) -> list[str]:
    """Each cell's expressed genes by descending expression (ties in gene order)."""
    names = np.array([g.upper() for g in adata.var_names])
    return [" ".join(names[np.argsort(-row, kind="stable")][: np.count_nonzero(row)]) for row in adata.X.toarray()]


RANK_FIT = RankFit(slope=-1.0, intercept=2.0, r2=1.0, pearson_r=-1.0, spearman_r=-1.0, n_cells=1, n_points=1, log_rank_cutoff=3.0)


def test_real_test_cells_rebuilt_like_generated_ones_are_the_ceiling_of_the_type_accuracy(real):
    names, types, sentences = list(real.obs_names), real.obs["cell_type"].astype(str).tolist(), _sentences(real)
    train, test = names[::2], list(range(1, len(names), 2))
    asked = {"T cell": 8, "B cell": 10}
    rebuilt = real_cells_as_generated([sentences[i] for i in test], [types[i] for i in test], [names[i] for i in test],
                                      asked, real.var_names, RANK_FIT)
    assert list(rebuilt.obs_names) == [names[i] for i in test] and list(rebuilt.var_names) == list(real.var_names)
    counts = np.diff(rebuilt.X.indptr)
    assert (counts == np.where(rebuilt.obs["cell_type"] == "T cell", 8, 10)).all()  # each cut to its type's k
    generated, stats = _generated(real, list(real.obs_names), types)
    metrics, _ = compare_generated_with_real(real, generated, stats, "cell_type", n_neighbors=10,
                                             train_cells=train, reconstructed_real=rebuilt)
    # the markers lead every sentence: the classifier of real train cells names every rebuilt cell
    assert metrics["real_classifier_accuracy_on_reconstructed_real"] == 1.0
    assert metrics["n_reconstructed_real_cells"] == len(test)
    # the same cells under the other type's name: the ceiling says so
    swapped = rebuilt.copy()
    swapped.obs["cell_type"] = np.where(rebuilt.obs["cell_type"] == "T cell", "B cell", "T cell")
    metrics, _ = compare_generated_with_real(real, generated, stats, "cell_type", n_neighbors=10,
                                             train_cells=train, reconstructed_real=swapped)
    assert metrics["real_classifier_accuracy_on_reconstructed_real"] == 0.0


def test_the_ceiling_leaves_out_types_not_asked_for_and_refuses_cells_the_classifier_saw(real):
    names, types, sentences = list(real.obs_names), real.obs["cell_type"].astype(str).tolist(), _sentences(real)
    rebuilt = real_cells_as_generated(sentences, types, names, {"T cell": 5}, real.var_names, RANK_FIT)
    assert set(rebuilt.obs["cell_type"]) == {"T cell"} and rebuilt.n_obs == types.count("T cell")
    generated, stats = _generated(real, names, types)
    with pytest.raises(ValueError, match="among the cells the classifier was trained on"):
        compare_generated_with_real(real, generated, stats, "cell_type", n_neighbors=10, reconstructed_real=rebuilt)


def test_real_cells_without_a_label_are_no_type_of_the_comparison(real, caplog):
    names, sentences = list(real.obs_names), _sentences(real)
    types = real.obs["cell_type"].astype(str).tolist()
    unlabelled = real.copy()
    holes = np.array(types, dtype=object)
    holes[30::3] = np.nan  # a third of the B cells have no label: before, "nan" was a class the real-type classifier could name
    unlabelled.obs["cell_type"] = pd.Categorical(holes)
    generated, stats = _generated(real, names, types)
    metrics, comparison = compare_generated_with_real(unlabelled, generated, stats, "cell_type", n_neighbors=10)
    assert metrics["n_real_cells_without_label"] == 10
    assert metrics["real_classifier_accuracy_on_generated_types"] == 1.0
    assert comparison.types == ["B cell", "T cell"]
    # the rebuilt real test cells: the unlabelled ones are left out, and so few cells say so
    test = list(range(1, len(names), 2))
    rebuilt = real_cells_as_generated([sentences[i] for i in test], [holes[i] for i in test], [names[i] for i in test],
                                      {"T cell": 8, "B cell": 10}, real.var_names, RANK_FIT)
    assert rebuilt.n_obs == 30 - 5 and set(rebuilt.obs["cell_type"]) == {"T cell", "B cell"}
    metrics, _ = compare_generated_with_real(unlabelled, generated, stats, "cell_type", n_neighbors=10,
                                             train_cells=names[::2], reconstructed_real=rebuilt)
    assert metrics["n_scored_cells"] == 25 and "scored on 25 cells" not in caplog.text
    few = rebuilt[:5].copy()
    metrics, _ = compare_generated_with_real(unlabelled, generated, stats, "cell_type", n_neighbors=10,
                                             train_cells=names[::2], reconstructed_real=few)
    assert metrics["n_scored_cells"] == 5
    assert "the real test cells rebuilt as generated cells are scored on 5 cells, fewer than 20" in caplog.text
