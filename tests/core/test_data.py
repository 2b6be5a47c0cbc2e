import numpy as np
import scanpy as sc
import scipy.sparse as sp


def test_pbmc_counts_are_integer_csr_with_labels(pbmc_counts):
    assert pbmc_counts.shape == (700, 765)
    assert sp.issparse(pbmc_counts.X) and pbmc_counts.X.format == "csr"
    data = pbmc_counts.X.data
    assert data.dtype == np.float32
    assert np.all(data >= 1) and np.array_equal(data, np.round(data))
    assert list(pbmc_counts.obs.columns) == ["cell_type", "organism", "tissue"]
    assert pbmc_counts.obs["cell_type"].nunique() == 10
    assert set(pbmc_counts.obs["organism"]) == {"Homo sapiens"}
    assert pbmc_counts.var_names.is_unique


def test_pbmc_counts_reproduce_the_shipped_normalized_values(pbmc_counts):
    # The shipped .raw.X is log1p(counts * per-cell factor): expm1 of it over the recovered counts
    # must be one constant per cell, and the same genes must be expressed.
    source = sc.datasets.pbmc68k_reduced()
    shipped = sp.csr_matrix(source.raw.X, dtype=np.float64)
    shipped.eliminate_zeros()
    counts = pbmc_counts.X
    assert list(pbmc_counts.obs_names) == list(source.obs_names)
    assert np.array_equal(shipped.indptr, counts.indptr) and np.array_equal(shipped.indices, counts.indices)
    factors = np.expm1(shipped.data) / counts.data
    per_cell = np.split(factors, counts.indptr[1:-1])
    spread = max(np.ptp(f) / f.mean() for f in per_cell if f.size)
    assert spread < 0.01
