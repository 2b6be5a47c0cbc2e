"""The rank -> expression fit and its inverse: expression fitted on log10(1 + rank), cell
sentences turned back into expression with that fit, and how much of the expression survives the
rank conversion (the agreement of the original and rebuilt data)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import scanpy as sc
import scipy.sparse as sp
from scipy import stats
from sklearn.metrics import adjusted_rand_score
from sklearn.neighbors import NearestNeighbors

from c2s_kedro.core.errors import C2SKeyError, C2SValueError
from c2s_kedro.core.sentences.conversion import expressed_entries, has_label, rank_genes, vocabulary_names

logger = logging.getLogger(__name__)


@dataclass
class RankFit:
    """Linear fit of normalized expression on log10(1 + rank) (rank 0-based)."""

    slope: float
    intercept: float
    r2: float
    pearson_r: float
    spearman_r: float
    n_cells: int
    n_points: int
    log_rank_cutoff: float

    def to_dict(self) -> dict[str, float | int]:
        """Plain numbers for a JSON file (the ``rank_fit`` catalog entry)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RankFit:
        """The fit saved by ``to_dict`` (JSON turns nothing into the wrong type, but a hand-edited
        file may give counts as floats)."""
        missing = [f.name for f in fields(cls) if f.name not in values]
        if missing:
            raise C2SValueError(f"rank fit lacks {missing}; re-run the rank fit (benchmarking) to rebuild it")
        return cls(**{f.name: (int(values[f.name]) if f.type in ("int", int) else float(values[f.name])) for f in fields(cls)})

    def predict(self, rank: np.ndarray) -> np.ndarray:
        """Expression expected at 0-based ``rank`` (floored at 0: expression is non-negative)."""
        return np.maximum(self.intercept + self.slope * np.log10(1.0 + np.asarray(rank)), 0.0)


def rank_expression_points(
    adata: ad.AnnData, n_cells: int, seed: int = 0, layer: str | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample cells and return ``(cell_indices, log10(1 + rank), expression)`` of their
    expressed genes."""
    rng = np.random.default_rng(seed)
    n = min(n_cells, adata.n_obs)
    cells = np.sort(rng.choice(adata.n_obs, size=n, replace=False))
    # the sampled cells first: a view's whole .X would be materialized (a screen's training part: GBs)
    sampled = adata[cells]
    chunk = sampled.X if layer is None else sampled.layers[layer]
    chunk = expressed_entries(sp.csr_matrix(chunk) if not sp.issparse(chunk) else chunk.tocsr(), 0)
    gene_indices, offsets = rank_genes(chunk, seed)
    counts = np.diff(offsets)
    ranks = np.arange(gene_indices.size) - np.repeat(offsets[:-1], counts)
    rows = np.repeat(np.arange(n), counts)
    values = np.asarray(chunk[rows, gene_indices]).ravel()
    return cells, np.log10(1.0 + ranks), values


def fit_rank_expression(
    log_rank: np.ndarray, expression: np.ndarray, n_cells: int, log_rank_cutoff: float = 3.0
) -> RankFit:
    """Least-squares fit of expression on log10(1 + rank) over the points with log rank below
    ``log_rank_cutoff``; R², Pearson and Spearman are reported over every point given (every
    expressed gene of the sampled cells), as the reference's benchmark does."""
    from scipy import stats
    from sklearn.linear_model import LinearRegression
    from sklearn.metrics import r2_score

    keep = log_rank < log_rank_cutoff
    x, y = log_rank[keep], expression[keep]
    if x.size < 3 or np.unique(x).size < 2:
        raise C2SValueError(
            f"only {x.size} expressed (gene, cell) points below log10 rank {log_rank_cutoff}: "
            "too few to fit; sample more cells or check the data"
        )
    model = LinearRegression().fit(x[:, None], y)
    return RankFit(
        slope=float(model.coef_[0]),
        intercept=float(model.intercept_),
        r2=float(r2_score(expression, model.predict(log_rank[:, None]))),
        pearson_r=float(stats.pearsonr(log_rank, expression).statistic),
        spearman_r=float(stats.spearmanr(log_rank, expression).statistic),
        n_cells=int(n_cells),
        n_points=int(x.size),
        log_rank_cutoff=float(log_rank_cutoff),
    )


def reconstruct_expression(
    sentences: Sequence[str] | pa.Array, gene_names: Sequence[str], rank_fit: RankFit,
    top_k: int | Sequence[int] | None = None,
) -> tuple[sp.csr_matrix, int]:
    """Expression matrix (cells x ``gene_names``) predicted from each gene's position.

    A gene absent from a sentence gets 0, so a sentence cut to its top-k genes yields zeros
    beyond k; ``top_k`` cuts each sentence to its first ``top_k`` words here (one number for all,
    or one per sentence). Words that are not
    in ``gene_names`` are skipped; a gene repeated in one sentence keeps its first position.
    Returns the matrix and the number of skipped words (within the first ``top_k``).
    """
    array = sentences if isinstance(sentences, pa.Array | pa.ChunkedArray) else pa.array(list(sentences), pa.string())
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if top_k is not None and not np.isscalar(top_k):
        top_k = np.asarray(top_k, dtype=np.int64)
        if top_k.shape != (len(array),):
            raise C2SValueError(f"{top_k.size} values of top_k for {len(array)} sentences: give one per sentence, or one number")
    if len(array) > RECONSTRUCTION_BATCH:
        # a batch of sentences at a time: the word-level arrays (several int64 per word) of a
        # 30,000-cell atlas's whole sentences took ~6 GB; each row's values do not depend on the others
        parts = [_reconstruct_batch(array.slice(start, RECONSTRUCTION_BATCH), gene_names, rank_fit,
                                    top_k if top_k is None or np.isscalar(top_k) else top_k[start : start + RECONSTRUCTION_BATCH])
                 for start in range(0, len(array), RECONSTRUCTION_BATCH)]
        return sp.vstack([matrix for matrix, _ in parts], format="csr"), sum(n for _, n in parts)
    return _reconstruct_batch(array, gene_names, rank_fit, top_k)


RECONSTRUCTION_BATCH = 4096  # sentences rebuilt at once by reconstruct_expression


def _reconstruct_batch(array: pa.Array, gene_names: Sequence[str], rank_fit: RankFit,
                       top_k: int | np.ndarray | None) -> tuple[sp.csr_matrix, int]:
    array = pc.fill_null(array, "")
    words = pc.split_pattern(array, " ")
    flat = pc.list_flatten(words)
    lengths = pc.list_value_length(words).to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = np.zeros(len(array) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    positions = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
    rows = np.repeat(np.arange(len(array)), lengths)
    upper = vocabulary_names(gene_names)
    genes = pc.index_in(flat, value_set=pa.array(upper, pa.string())).to_numpy(zero_copy_only=False)
    non_empty = pc.not_equal(flat, "").to_numpy(zero_copy_only=False)
    known = ~np.isnan(genes.astype(float)) if genes.dtype == object else ~np.isnan(genes)
    if top_k is not None:
        within = positions < (top_k if np.isscalar(top_k) else top_k[rows])
        known, non_empty = known & within, non_empty & within
    n_unknown = int(np.count_nonzero(non_empty & ~known))
    keep = known & non_empty
    rows, positions = rows[keep], positions[keep]
    genes = np.asarray(genes[keep], dtype=np.int64)
    # First occurrence of each (cell, gene): np.unique reports the first index of each key.
    _, first = np.unique(rows * len(upper) + genes, return_index=True)
    rows, positions, genes = rows[first], positions[first], genes[first]
    values = rank_fit.predict(positions).astype(np.float32)
    matrix = sp.csr_matrix((values, (rows, genes)), shape=(len(array), len(upper)))
    matrix.eliminate_zeros()
    return matrix, n_unknown


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


def knn_overlap(a: np.ndarray, b: np.ndarray, k: int = 15) -> float:
    """Mean share of each cell's k nearest neighbours in ``a`` that are also among its k in ``b``."""
    k = min(k, len(a) - 1)
    if k < 1:
        raise C2SValueError("kNN overlap needs at least two cells")
    neighbours_a = NearestNeighbors(n_neighbors=k + 1).fit(a).kneighbors(a, return_distance=False)[:, 1:]
    neighbours_b = NearestNeighbors(n_neighbors=k + 1).fit(b).kneighbors(b, return_distance=False)[:, 1:]
    shared = (neighbours_a[:, :, None] == neighbours_b[:, None, :]).any(axis=2).sum(axis=1)
    return float(shared.mean() / k)


def cluster_agreement(labels_a, labels_b) -> float:
    """Adjusted Rand index between two clusterings of the same cells, over the cells labelled in
    both (``has_label``: cells without a label are no cluster of their own)."""
    both = has_label(labels_a) & has_label(labels_b)
    return float(adjusted_rand_score(np.asarray(labels_a, dtype=object)[both].astype(str),
                                     np.asarray(labels_b, dtype=object)[both].astype(str)))
