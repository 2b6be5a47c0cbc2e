"""Nodes of the benchmarking pipeline (workflow notes sections 1.2-1.3)."""

from __future__ import annotations

import logging
from typing import Any

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import scanpy as sc
import scipy.sparse as sp
from datasets import Dataset
from scipy import stats

from c2s_kedro.core import plotting
from c2s_kedro.core.evaluation import cluster_agreement, knn_overlap
from c2s_kedro.core.preprocessing import embed_expression
from c2s_kedro.core.sentences import (
    CELL_NAME,
    CELL_SENTENCE,
    RankFit,
    fit_rank_expression,
    rank_expression_points,
    reconstruct_expression,
)
from c2s_kedro.core.validation import require_obs_columns
from c2s_kedro.parameters import read_parameters, setting_hint
from c2s_kedro.parameters.atlas import BenchmarkingParameters, RankFitParameters, as_kwargs

logger = logging.getLogger(__name__)


def fit_rank_to_expression(
    processed_adata: ad.AnnData, data_split: dict[str, Any], params: dict[str, Any]
) -> tuple[dict[str, float], plt.Figure]:
    """Fit expression ~ log10(1 + rank) on a sample of cells (of the split parts ``fit_on``, or of
    every cell); return the fit and its plot."""
    settings = read_parameters(RankFitParameters, params, "benchmarking.rank_fit")
    cells = processed_adata
    if settings.fit_on:
        with setting_hint("benchmarking.rank_fit.fit_on"):
            unknown = [part for part in settings.fit_on if part not in data_split]
            if unknown:
                raise KeyError(f"split part(s) {unknown} not in the split; it has {', '.join(data_split)}.")
        cells = processed_adata[[name for part in settings.fit_on for name in data_split[part]]]
    _, log_rank, expression = rank_expression_points(cells, n_cells=settings.n_cells, seed=settings.seed, layer=settings.layer)
    with setting_hint("benchmarking.rank_fit.n_cells"):
        fit = fit_rank_expression(log_rank, expression, n_cells=min(settings.n_cells, cells.n_obs), log_rank_cutoff=settings.log_rank_cutoff)
    logger.info("rank fit: expression = %.4f %+.4f * log10(1 + rank), R2 = %.3f", fit.intercept, fit.slope, fit.r2)
    figure = plotting.rank_expression_plot(log_rank, expression, fit.slope, fit.intercept, fit.log_rank_cutoff, fit.r2)
    return fit.to_dict(), figure


def reconstruct_adata(
    cell_sentences: Dataset, rank_fit: dict[str, float], processed_adata: ad.AnnData, params: dict[str, Any]
) -> ad.AnnData:
    """Expression rebuilt from the sentences with the rank fit, embedded like the original."""
    settings = read_parameters(BenchmarkingParameters, params, "benchmarking")
    table = cell_sentences.select_columns([CELL_NAME, CELL_SENTENCE]).with_format("arrow")[:]
    names = table.column(CELL_NAME).to_pylist()
    missing = set(names) - set(processed_adata.obs_names)
    if missing:
        raise ValueError(
            f"{len(missing)} cells of cell_sentences are not in processed_adata (e.g. {sorted(missing)[:3]}); "
            "re-run sentence_conversion on the current processed_adata"
        )
    fit = RankFit.from_dict(rank_fit)
    matrix, n_unknown = reconstruct_expression(table.column(CELL_SENTENCE), processed_adata.var_names, fit)
    if n_unknown:
        logger.warning("%d words of the sentences are not genes of processed_adata and were skipped", n_unknown)
    reconstructed = ad.AnnData(
        X=matrix, obs=processed_adata.obs.loc[names].copy(), var=processed_adata.var[[]].copy(),
        uns={"rank_fit": fit.to_dict(), "n_unknown_words": int(n_unknown)},
    )
    return embed_expression(reconstructed, **as_kwargs(settings.embedding))


def _expressed_pairs(original: ad.AnnData, reconstructed: ad.AnnData, n_cells: int, seed: int):
    rng = np.random.default_rng(seed)
    cells = np.sort(rng.choice(original.n_obs, size=min(n_cells, original.n_obs), replace=False))
    a = sp.csr_matrix(original[cells].X)
    b = sp.csr_matrix(reconstructed[original.obs_names[cells]].X)
    rows, cols = a.nonzero()
    return np.asarray(a[rows, cols]).ravel(), np.asarray(b[rows, cols]).ravel()


def compare_reconstruction(
    processed_adata: ad.AnnData, reconstructed_adata: ad.AnnData, params: dict[str, Any]
) -> tuple[dict[str, float], plt.Figure, plt.Figure]:
    """Agreement of original and reconstructed data: expression correlation, Leiden ARI, kNN overlap.

    Returns the metrics, the reconstructed-vs-original scatter and the side-by-side UMAPs.
    """
    settings = read_parameters(BenchmarkingParameters, params, "benchmarking")
    label, seed = settings.label_key, settings.seed
    if label:
        with setting_hint("benchmarking.label_key"):
            require_obs_columns(processed_adata, [label])
    original = processed_adata
    reconstructed = reconstructed_adata[original.obs_names]
    values, rebuilt = _expressed_pairs(original, reconstructed, settings.n_cells, seed)
    pearson = float(stats.pearsonr(values, rebuilt).statistic)
    spearman = float(stats.spearmanr(values, rebuilt).statistic)

    clusterings = []
    for adata in (original, reconstructed):
        copy = adata.copy()
        sc.tl.leiden(copy, resolution=settings.leiden_resolution, flavor="igraph", n_iterations=2, directed=False, random_state=seed)
        clusterings.append(copy.obs["leiden"].to_numpy())
    metrics = {
        "reconstruction_pearson_r": pearson,
        "reconstruction_spearman_r": spearman,
        "leiden_ari_original_vs_reconstructed": cluster_agreement(*clusterings),
        "n_leiden_clusters_original": float(len(set(clusterings[0]))),
        "n_leiden_clusters_reconstructed": float(len(set(clusterings[1]))),
        "knn_overlap_pca": knn_overlap(original.obsm["X_pca"], reconstructed.obsm["X_pca"], k=settings.knn_k),
    }
    if label:
        metrics["leiden_ari_original_vs_label"] = cluster_agreement(clusterings[0], original.obs[label])
        metrics["leiden_ari_reconstructed_vs_label"] = cluster_agreement(clusterings[1], original.obs[label])
    scatter = plotting.reconstruction_plot(values, rebuilt, pearson)
    umaps = plotting.umap_side_by_side(
        [("original expression", original.obsm["X_umap"]), ("reconstructed from cell sentences", reconstructed.obsm["X_umap"])],
        original.obs[label] if label else None,
        f"UMAP agreement: Leiden ARI {metrics['leiden_ari_original_vs_reconstructed']:.2f}, "
        f"{settings.knn_k}-NN overlap {metrics['knn_overlap_pca']:.2f}",
    )
    return metrics, scatter, umaps


def summarize_benchmark(rank_fit: dict[str, float], comparison: dict[str, float]) -> dict[str, float]:
    """The rank fit and the reconstruction agreement in one flat dict."""
    return {**{f"rank_fit_{k}": float(v) for k, v in rank_fit.items()}, **comparison}
