"""QC, normalization (log base 10, as C2S does) and the PCA -> kNN -> UMAP embedding."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp

from c2s_kedro.core.errors import C2SValueError

logger = logging.getLogger(__name__)


@dataclass
class QCThresholds:
    """Cell and gene filters; ``None`` disables a bound."""

    min_genes_per_cell: int | None = 200
    max_genes_per_cell: int | None = None
    min_cells_per_gene: int | None = 3
    min_counts_per_cell: float | None = None
    max_counts_per_cell: float | None = None
    max_pct_mito: float | None = None
    mito_prefix: str = "MT-"


def quality_control(adata: ad.AnnData, thresholds: QCThresholds) -> tuple[ad.AnnData, dict[str, int]]:
    """Compute QC metrics, filter cells then genes, and count what each filter removed.

    Returns the filtered copy and counts (``cells_before``, ``cells_removed_<filter>``,
    ``cells_after``, ``genes_before``, ``genes_after``, ``n_mito_genes``: the genes ``mito_prefix``
    matches). Raises ``ValueError`` when no cell or no gene is left, naming the thresholds to relax.
    """
    adata = shallow_copy(adata)
    adata.X = _one_index_dtype(adata.X)
    adata.var["mt"] = adata.var_names.str.upper().str.startswith(thresholds.mito_prefix.upper())
    _qc_metrics(adata)
    counts = {"cells_before": adata.n_obs, "genes_before": adata.n_vars, "n_mito_genes": int(adata.var["mt"].sum())}
    if thresholds.max_pct_mito is not None:
        _warn_unmatched_mito_genes(adata.var_names, adata.var["mt"].to_numpy(), thresholds)
    obs = adata.obs
    filters = {  # name: (threshold, obs column, keep cells at least / at most the threshold)
        "min_genes_per_cell": (thresholds.min_genes_per_cell, "n_genes_by_counts", "min"),
        "max_genes_per_cell": (thresholds.max_genes_per_cell, "n_genes_by_counts", "max"),
        "min_counts_per_cell": (thresholds.min_counts_per_cell, "total_counts", "min"),
        "max_counts_per_cell": (thresholds.max_counts_per_cell, "total_counts", "max"),
        "max_pct_mito": (thresholds.max_pct_mito, "pct_counts_mt", "max"),
    }
    # A cell without counts has no mito share (0/0): count it as empty, not as removed by a filter.
    keep = obs["total_counts"].to_numpy() > 0
    if not keep.all():
        counts["cells_removed_no_counts"] = int(np.count_nonzero(~keep))
        logger.warning("%d cells have no counts at all and were removed", counts["cells_removed_no_counts"])
    for name, (threshold, column, bound) in filters.items():
        if threshold is None:
            continue
        values = obs[column].to_numpy()
        passes = values >= threshold if bound == "min" else values <= threshold
        counts[f"cells_removed_{name}"] = int(np.count_nonzero(keep & ~passes))
        keep &= passes
    if not keep.any():
        raise C2SValueError(f"QC removed all {adata.n_obs} cells ({_removed_summary(counts)}); relax the thresholds.")
    genes = np.ones(adata.n_vars, dtype=bool)
    if thresholds.min_cells_per_gene:
        # scanpy's filter_genes(min_cells): cells with a positive count per gene, kept as var["n_cells"]
        n_cells = _expressing_cells(adata.X, np.flatnonzero(keep))
        genes = n_cells >= thresholds.min_cells_per_gene
        adata.var["n_cells"] = n_cells
        logger.info("filtered out %d genes that are detected in less than %d cells",
                    int(np.count_nonzero(~genes)), thresholds.min_cells_per_gene)
    adata = _subset(adata, np.flatnonzero(keep), np.flatnonzero(genes))
    if adata.n_vars == 0:
        raise C2SValueError(
            f"QC removed every gene (min_cells_per_gene={thresholds.min_cells_per_gene} with "
            f"{adata.n_obs} cells left); lower min_cells_per_gene."
        )
    expressed = _expressed_genes(adata.X)
    n_empty = int(np.count_nonzero(expressed == 0))
    if n_empty:
        adata = adata[expressed > 0].copy()
        counts["cells_removed_empty_after_gene_filter"] = n_empty
        logger.warning("%d cells had no expressed gene left after gene filtering and were removed", n_empty)
        if adata.n_obs == 0:
            raise C2SValueError("no cell has an expressed gene left after QC; relax the thresholds")
    counts["cells_after"] = adata.n_obs
    counts["genes_after"] = adata.n_vars
    logger.info("QC: %s", _removed_summary(counts))
    return adata, counts


def _warn_unmatched_mito_genes(var_names: pd.Index, mito: np.ndarray, thresholds: QCThresholds) -> None:
    """The mito filter is set but its prefix misses genes that look mitochondrial (``MT.CO1``, R's
    make.names) or matches none: say so, naming the setting and the prefix the names seem to use."""
    names = pd.Series(var_names.astype(str))
    prefixes = names.str.extract(r"^([Mm][Tt][^A-Za-z0-9])", expand=False)
    missed = prefixes.notna().to_numpy() & ~mito
    if missed.any():
        prefix = prefixes[missed].mode()[0]
        logger.warning(
            "qc.max_pct_mito is %s, but %d gene names that look mitochondrial do not start with qc.mito_prefix '%s' "
            "(e.g. %s): the mitochondrial filter does not count them. Set qc.mito_prefix to '%s'",
            thresholds.max_pct_mito, int(missed.sum()), thresholds.mito_prefix, names[missed].iloc[0], prefix,
        )
    elif not mito.any():
        logger.warning(
            "qc.max_pct_mito is %s, but no gene name starts with qc.mito_prefix '%s': the mitochondrial filter removes "
            "no cell. Set qc.mito_prefix to the prefix of the mitochondrial genes, or, when the genes are Ensembl IDs, "
            "name the .var column of symbols (gene_symbol_column)", thresholds.max_pct_mito, thresholds.mito_prefix,
        )


def _qc_metrics(adata: ad.AnnData) -> None:
    """scanpy's ``calculate_qc_metrics`` (``mt`` genes, no top-gene shares, no log1p) into
    ``adata.obs`` / ``adata.var``, a chunk of cells at a time: on the whole matrix its temporaries
    are larger than the matrix (a 594M-value screen's QC rose by ~4 GB). Per-cell metrics are each
    chunk's; per-gene ones are sums over the chunks, the means and dropout shares derived from them
    as scanpy derives them."""
    if not isinstance(adata.X, sp.csr_matrix | sp.csr_array) or adata.n_obs <= _ROW_CHUNK:
        sc.pp.calculate_qc_metrics(adata, qc_vars=["mt"], percent_top=None, log1p=False, inplace=True)
        return
    obs_parts, n_cells, total = [], np.zeros(adata.n_vars, dtype=np.int64), np.zeros(adata.n_vars, dtype=np.float64)
    var = adata.var[["mt"]]
    for start in range(0, adata.n_obs, _ROW_CHUNK):
        chunk = ad.AnnData(adata.X[start : start + _ROW_CHUNK], var=var)
        obs, chunk_var = sc.pp.calculate_qc_metrics(chunk, qc_vars=["mt"], percent_top=None, log1p=False, inplace=False)
        obs_parts.append(obs)
        n_cells += chunk_var["n_cells_by_counts"].to_numpy(dtype=np.int64)
        total += chunk_var["total_counts"].to_numpy(dtype=np.float64)
    obs = pd.concat(obs_parts)
    obs.index = adata.obs_names
    for column in obs.columns:
        adata.obs[column] = obs[column].to_numpy()
    adata.var["n_cells_by_counts"] = n_cells
    adata.var["mean_counts"] = total / adata.n_obs
    adata.var["pct_dropout_by_counts"] = (1 - n_cells / adata.n_obs) * 100
    adata.var["total_counts"] = total


def shallow_copy(adata: ad.AnnData) -> ad.AnnData:
    """A new AnnData around the same matrices (``X``, layers, obsm, ...): annotations (obs, var,
    uns) are copied, the expression is not. For steps that add annotations or replace ``X``
    without writing into the matrices they were given; a screen's counts are GBs."""
    if adata.is_view:
        return adata.copy()
    return ad.AnnData(
        X=adata.X, obs=adata.obs.copy(), var=adata.var.copy(), uns=copy.deepcopy(dict(adata.uns)),
        obsm=dict(adata.obsm), varm=dict(adata.varm), obsp=dict(adata.obsp), varp=dict(adata.varp),
        layers=dict(adata.layers),
    )


def _one_index_dtype(matrix):
    """A CSR/CSC matrix whose ``indptr`` and ``indices`` share one integer type, around the same
    arrays. Files written in chunks (core.simulate.atlas) carry a 64-bit indptr next to 32-bit indices,
    which scipy's in-place routines (``eliminate_zeros``, called by scanpy's QC metrics) reject."""
    if not sp.issparse(matrix) or matrix.format not in ("csr", "csc") or matrix.indptr.dtype == matrix.indices.dtype:
        return matrix
    if matrix.nnz <= np.iinfo(np.int32).max and matrix.indices.dtype == np.int32:
        indptr = matrix.indptr.astype(np.int32)  # one entry per cell: cheap, the indices are not copied
    else:
        indptr = matrix.indptr
    return type(matrix)((matrix.data, matrix.indices, indptr), shape=matrix.shape, copy=False)


_ROW_CHUNK = 8192  # cells per step of the chunked QC passes


def _expressing_cells(matrix, rows: np.ndarray) -> np.ndarray:
    """Cells among ``rows`` with a positive value, per gene; a chunk of rows at a time."""
    total = np.zeros(matrix.shape[1], dtype=np.int64)
    for start in range(0, rows.size, _ROW_CHUNK):
        total += np.asarray((matrix[rows[start : start + _ROW_CHUNK]] > 0).sum(axis=0)).ravel()
    return total


def _expressed_genes(matrix) -> np.ndarray:
    """Genes with a positive value, per cell; a chunk of rows at a time."""
    return np.concatenate([
        np.asarray((matrix[start : start + _ROW_CHUNK] > 0).sum(axis=1)).ravel()
        for start in range(0, max(matrix.shape[0], 1), _ROW_CHUNK)
    ])


def _subset(adata: ad.AnnData, rows: np.ndarray, columns: np.ndarray) -> ad.AnnData:
    """``adata[rows, columns].copy()``, with a CSR ``X`` written straight into the result a chunk of
    rows at a time: scipy's two-step indexing holds the rows, then the rows and columns, next to
    the input (three screens' worth of counts at once)."""
    if not isinstance(adata.X, sp.csr_matrix | sp.csr_array):
        return adata[rows, columns].copy()
    matrix = adata.X
    annotations = ad.AnnData(obs=adata.obs, var=adata.var, uns=adata.uns, obsm=dict(adata.obsm), varm=dict(adata.varm),
                             obsp=dict(adata.obsp), varp=dict(adata.varp), layers=dict(adata.layers))
    result = annotations[rows, columns].copy()

    def pieces():
        for start in range(0, rows.size, _ROW_CHUNK):
            yield matrix[rows[start : start + _ROW_CHUNK]][:, columns]

    # Two passes (count, then fill) so that only the result and one chunk are held at a time.
    nnz = sum(piece.nnz for piece in pieces())
    wide = nnz > np.iinfo(np.int32).max
    data = np.empty(nnz, dtype=matrix.dtype)
    indices = np.empty(nnz, dtype=np.int64 if wide else matrix.indices.dtype)
    indptr = np.zeros(rows.size + 1, dtype=np.int64 if wide else matrix.indptr.dtype)
    offset, row = 0, 0
    for piece in pieces():
        data[offset : offset + piece.nnz] = piece.data
        indices[offset : offset + piece.nnz] = piece.indices
        indptr[row + 1 : row + piece.shape[0] + 1] = piece.indptr[1:] + offset
        offset += piece.nnz
        row += piece.shape[0]
    result.X = type(matrix)((data, indices, indptr), shape=(rows.size, columns.size))
    return result


def _removed_summary(counts: dict[str, int]) -> str:
    removed = ", ".join(f"{k.removeprefix('cells_removed_')}: -{v}" for k, v in counts.items() if k.startswith("cells_removed_"))
    return f"{counts['cells_before']} cells" + (f" ({removed})" if removed else "")


def normalize_log10(adata: ad.AnnData, target_sum: float | None = None, counts_layer: str | None = "counts") -> ad.AnnData:
    """Keep raw counts in ``layers[counts_layer]`` (``None``: not kept), ``normalize_total``
    (``None``: each cell scaled to the median library size, scanpy's default and the C2S
    tutorials'), then log10(1 + x).

    A CSR matrix is normalized a chunk of rows at a time into a new float32 matrix: scanpy's
    row scaling builds two float64 arrays as long as the matrix (a 594M-value screen peaked at
    14.7 GB). Each cell's scaling does not depend on the others, so the values are scanpy's.
    Without a counts layer the result shares the input's (never modified) index arrays instead
    of copying them: a screen's are GBs."""
    adata = shallow_copy(adata)
    # the counts layer is the input's matrix itself; normalization writes into a float32 copy
    counts = adata.X
    if counts_layer is not None:
        adata.layers[counts_layer] = counts
    if not isinstance(counts, sp.csr_matrix | sp.csr_array):
        adata.X = counts.astype(np.float32, copy=True)
        sc.pp.normalize_total(adata, target_sum=target_sum)
        sc.pp.log1p(adata, base=10)
        return adata
    if target_sum is None:  # scanpy's: the median of the cells' totals, over every cell
        target_sum = float(np.median(np.asarray(counts.sum(axis=1, dtype=np.float64)).ravel()))
    data = np.empty(counts.nnz, dtype=np.float32)
    for start in range(0, max(counts.shape[0], 1), _ROW_CHUNK):
        end = min(start + _ROW_CHUNK, counts.shape[0])
        chunk = ad.AnnData(counts[start:end].astype(np.float32))
        sc.pp.normalize_total(chunk, target_sum=target_sum)
        sc.pp.log1p(chunk, base=10)
        data[counts.indptr[start] : counts.indptr[end]] = chunk.X.data
    shared = counts_layer is None  # with the counts kept, X gets its own index arrays (as scanpy's copy)
    indices = counts.indices if shared else counts.indices.copy()
    indptr = counts.indptr if shared else counts.indptr.copy()
    adata.X = type(counts)((data, indices, indptr), shape=counts.shape, copy=False)
    adata.uns["log1p"] = chunk.uns["log1p"]  # what log1p records (its base), as on the whole matrix
    return adata


# scanpy.pp.neighbors searches exactly (sklearn, brute force) below this many cells and switches
# to approximate search (pynndescent) from it on (scanpy 1.11, euclidean metric).
APPROXIMATE_KNN_FROM_CELLS = 8192


def _knn_transformer(n_obs: int, n_neighbors: int, seed: int):
    """``None`` (scanpy's exact search) for small data; otherwise the approximate search scanpy
    would build (umap's defaults for the number of trees and iterations), returning a
    ``csr_matrix``.

    pynndescent 0.7 returns a scipy ``csr_array``, and scanpy 1.11 counts the neighbours per row
    with ``getnnz``, which sparse arrays do not have: every embedding of 8,192 cells or more failed
    with "'csr_array' object has no attribute 'getnnz'". pynndescent is imported here because its
    import takes seconds and small data never needs it."""
    if n_obs < APPROXIMATE_KNN_FROM_CELLS:
        return None
    from pynndescent import PyNNDescentTransformer

    class NNDescentCSRMatrix(PyNNDescentTransformer):
        # fit_transform goes through transform, so converting here covers both.
        def transform(self, X, y=None):
            return sp.csr_matrix(super().transform(X))

    return NNDescentCSRMatrix(
        n_neighbors=n_neighbors,
        metric="euclidean",
        random_state=seed,
        n_jobs=sc.settings.n_jobs,
        n_trees=min(64, 5 + round(n_obs**0.5 / 20.0)),
        n_iters=max(5, round(np.log2(n_obs))),
    )


def neighbors_umap(adata: ad.AnnData, use_rep: str, n_neighbors: int = 15, seed: int = 0, key_added: str | None = None) -> None:
    """kNN graph on ``obsm[use_rep]`` and a UMAP of it, in place: the one kNN -> UMAP step of the
    project. The UMAP lands in ``obsm["X_umap"]`` or ``obsm[f"X_umap_{key_added}"]``."""
    n_neighbors = min(n_neighbors, adata.n_obs - 1)
    sc.pp.neighbors(adata, use_rep=use_rep, n_neighbors=n_neighbors, random_state=seed, key_added=key_added,
                    transformer=_knn_transformer(adata.n_obs, n_neighbors, seed))
    sc.tl.umap(adata, random_state=seed, neighbors_key=key_added)
    if key_added:
        adata.obsm[f"X_umap_{key_added}"] = adata.obsm.pop("X_umap")


def embed_expression(
    adata: ad.AnnData,
    n_comps: int = 50,
    n_neighbors: int = 15,
    n_top_genes: int | None = None,
    seed: int = 0,
) -> ad.AnnData:
    """PCA (optionally on highly variable genes) -> kNN graph -> UMAP, stored in a copy of the
    AnnData's annotations (the expression matrices are shared, not copied)."""
    adata = shallow_copy(adata)
    use_hvg = False
    if n_top_genes:
        if n_top_genes >= adata.n_vars:
            logger.info("n_top_genes=%d >= %d genes: all genes used for PCA", n_top_genes, adata.n_vars)
        else:
            # The data is log10-normalized; seurat flavour expects log-data and compares genes
            # relative to each other, so the log base does not change which genes are chosen.
            sc.pp.highly_variable_genes(adata, n_top_genes=n_top_genes, flavor="seurat")
            use_hvg = True
    n_features = int(adata.var["highly_variable"].sum()) if use_hvg else adata.n_vars
    n_comps = max(1, min(n_comps, adata.n_obs - 1, n_features - 1))
    sc.pp.pca(adata, n_comps=n_comps, random_state=seed, mask_var="highly_variable" if use_hvg else None)
    neighbors_umap(adata, "X_pca", n_neighbors=n_neighbors, seed=seed)
    return adata
