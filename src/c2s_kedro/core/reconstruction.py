"""How much of the expression survives the rank conversion: sentences turned back into
expression with the rank fit, and the agreement of the original and rebuilt data."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
from scipy import stats

from c2s_kedro.core.errors import C2SKeyError, C2SValueError
from c2s_kedro.core.evaluation import cluster_agreement, knn_overlap
from c2s_kedro.core.sentences import RankFit, fit_rank_expression, rank_expression_points, reconstruct_expression

logger = logging.getLogger(__name__)


def cells_of_parts(adata: ad.AnnData, split: dict[str, Sequence[str]], parts: Sequence[str] | None) -> ad.AnnData:
    """The cells listed in ``parts`` of ``split`` (in that order), or every cell when ``parts`` is None."""
    if not parts:
        return adata
    unknown = [part for part in parts if part not in split]
    if unknown:
        raise C2SKeyError(f"split part(s) {unknown} not in the split; it has {', '.join(split)}.")
    return adata[[name for part in parts for name in split[part]]]


def fit_rank_on_cells(
    adata: ad.AnnData, n_cells: int, seed: int, log_rank_cutoff: float, layer: str | None = None,
) -> tuple[RankFit, np.ndarray, np.ndarray]:
    """The rank -> expression fit on ``n_cells`` cells sampled from ``adata``; also returns the
    sampled points (log10(1 + rank), expression) for the plot."""
    _, log_rank, expression = rank_expression_points(adata, n_cells=n_cells, seed=seed, layer=layer)
    fit = fit_rank_expression(log_rank, expression, n_cells=min(n_cells, adata.n_obs), log_rank_cutoff=log_rank_cutoff)
    logger.info("rank fit: expression = %.4f %+.4f * log10(1 + rank), R2 = %.3f", fit.intercept, fit.slope, fit.r2)
    return fit, log_rank, expression


def reconstructed_adata(cell_names: Sequence[str], sentences, processed_adata: ad.AnnData, rank_fit: RankFit) -> ad.AnnData:
    """The cells of ``cell_names`` with expression rebuilt from their ``sentences`` over the genes
    of ``processed_adata`` (``.obs`` copied; the fit and the number of skipped words in ``.uns``)."""
    missing = set(cell_names) - set(processed_adata.obs_names)
    if missing:
        raise C2SValueError(
            f"{len(missing)} cells of the sentences are not in the processed data (e.g. {sorted(missing)[:3]}); "
            "re-run sentence_conversion on the current processed_adata"
        )
    matrix, n_unknown = reconstruct_expression(sentences, processed_adata.var_names, rank_fit)
    if n_unknown:
        logger.warning("%d words of the sentences are not genes of the processed data and were skipped", n_unknown)
    return ad.AnnData(
        X=matrix, obs=processed_adata.obs.loc[list(cell_names)].copy(), var=processed_adata.var[[]].copy(),
        uns={"rank_fit": rank_fit.to_dict(), "n_unknown_words": int(n_unknown)},
    )


def expressed_pairs(original: ad.AnnData, reconstructed: ad.AnnData, n_cells: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(original, rebuilt) values of every expressed gene of ``n_cells`` sampled cells."""
    rng = np.random.default_rng(seed)
    cells = np.sort(rng.choice(original.n_obs, size=min(n_cells, original.n_obs), replace=False))
    a = sp.csr_matrix(original[cells].X)
    b = sp.csr_matrix(reconstructed[original.obs_names[cells]].X)
    rows, cols = a.nonzero()
    return np.asarray(a[rows, cols]).ravel(), np.asarray(b[rows, cols]).ravel()


def leiden_labels(adata: ad.AnnData, resolution: float, seed: int) -> np.ndarray:
    """Leiden clusters on the kNN graph already in ``adata`` (the data is not changed). Leiden
    writes its labels into the AnnData it is given: that is one holding only the graph, not a copy
    of ``adata`` (its matrices and layers are GBs for an atlas)."""
    neighbors = adata.uns.get("neighbors")
    if neighbors is None or neighbors.get("connectivities_key", "connectivities") not in adata.obsp:
        raise C2SKeyError("no kNN graph in the data (uns['neighbors'], obsp['connectivities']): embed it first (embed_expression)")
    key = neighbors.get("connectivities_key", "connectivities")
    graph = ad.AnnData(obs=pd.DataFrame(index=adata.obs_names.astype(str)), obsp={key: adata.obsp[key]},
                       uns={"neighbors": dict(neighbors)})
    sc.tl.leiden(graph, resolution=resolution, flavor="igraph", n_iterations=2, directed=False, random_state=seed)
    return graph.obs["leiden"].to_numpy()


def reconstruction_agreement(
    original: ad.AnnData, reconstructed: ad.AnnData, n_cells: int, leiden_resolution: float, knn_k: int, seed: int,
    label_key: str | None = None,
) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Expression correlation over expressed genes, Leiden ARI between the two, kNN overlap in PCA,
    and with ``label_key`` the ARI of each clustering with the labels. Both need PCA and a kNN
    graph (``embed_expression``). Returns the metrics and the (original, rebuilt) value pairs."""
    if "X_pca" not in original.obsm:
        raise C2SKeyError(
            "the processed data has no PCA and kNN graph (data_processing.embed is false): set data_processing.embed "
            "to true and re-run data_processing before benchmarking"
        )
    reconstructed = reconstructed[original.obs_names]
    values, rebuilt = expressed_pairs(original, reconstructed, n_cells, seed)
    clusterings = [leiden_labels(adata, leiden_resolution, seed) for adata in (original, reconstructed)]
    metrics = {
        "reconstruction_pearson_r": float(stats.pearsonr(values, rebuilt).statistic),
        "reconstruction_spearman_r": float(stats.spearmanr(values, rebuilt).statistic),
        "leiden_ari_original_vs_reconstructed": cluster_agreement(*clusterings),
        "n_leiden_clusters_original": float(len(set(clusterings[0]))),
        "n_leiden_clusters_reconstructed": float(len(set(clusterings[1]))),
        "knn_overlap_pca": knn_overlap(original.obsm["X_pca"], reconstructed.obsm["X_pca"], k=knn_k),
    }
    if label_key:
        metrics["leiden_ari_original_vs_label"] = cluster_agreement(clusterings[0], original.obs[label_key])
        metrics["leiden_ari_reconstructed_vs_label"] = cluster_agreement(clusterings[1], original.obs[label_key])
    return metrics, values, rebuilt
