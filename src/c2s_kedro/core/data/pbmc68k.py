"""The project's offline default dataset: the 700 PBMCs that ship inside the scanpy wheel."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

logger = logging.getLogger(__name__)


def pbmc68k_counts() -> ad.AnnData:
    """Integer counts of scanpy's ``pbmc68k_reduced`` (700 human PBMCs, 765 genes, 10 cell types).

    ``.raw.X`` of that file holds log1p(counts / library size * scale). ``expm1`` of it divided
    by the cell's smallest non-zero value (one count) and rounded gives the counts back; the
    largest deviation from an integer is logged. Labels: ``obs['cell_type']`` (from
    ``bulk_labels``), ``obs['organism']``, ``obs['tissue']``.
    """
    import scanpy as sc

    source = sc.datasets.pbmc68k_reduced()
    scaled = sp.csr_matrix(source.raw.X, dtype=np.float64)
    scaled.data = np.expm1(scaled.data)
    scaled.eliminate_zeros()
    smallest = np.minimum.reduceat(scaled.data, scaled.indptr[:-1])
    per_entry = np.repeat(smallest, np.diff(scaled.indptr))
    ratios = scaled.data / per_entry
    counts = np.rint(ratios)
    logger.info(
        "pbmc68k_reduced: counts recovered (largest deviation from an integer: %.3f)",
        float(np.abs(ratios - counts).max()),
    )
    matrix = sp.csr_matrix((counts.astype(np.float32), scaled.indices, scaled.indptr), shape=scaled.shape)
    obs = pd.DataFrame(
        {
            "cell_type": source.obs["bulk_labels"].astype(str).astype("category").to_numpy(),
            "organism": pd.Categorical(["Homo sapiens"] * source.n_obs),
            "tissue": pd.Categorical(["peripheral blood"] * source.n_obs),
        },
        index=source.obs_names.astype(str),
    )
    var = pd.DataFrame(index=source.raw.var_names.astype(str))
    return ad.AnnData(X=matrix, obs=obs, var=var, uns={"source": "scanpy.datasets.pbmc68k_reduced"})
