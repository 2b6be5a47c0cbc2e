import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from c2s_kedro.core.data.preprocessing import QCThresholds, embed_expression, normalize_log10, quality_control

NO_FILTERS = dict(
    min_genes_per_cell=None,
    max_genes_per_cell=None,
    min_cells_per_gene=None,
    min_counts_per_cell=None,
    max_counts_per_cell=None,
    max_pct_mito=None,
)


def _qc_stats(adata: ad.AnnData) -> dict[str, np.ndarray]:
    dense = adata.X.toarray().astype(np.float64)
    mito = np.asarray(adata.var_names.str.startswith("MT-"))
    totals = dense.sum(axis=1)
    return {
        "genes": (dense > 0).sum(axis=1),
        "counts": totals,
        "pct_mito": dense[:, mito].sum(axis=1) / totals * 100,
    }


# ---- quality_control ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, statistic, keeps",
    [
        ("min_genes_per_cell", "genes", np.greater_equal),
        ("max_genes_per_cell", "genes", np.less_equal),
        ("min_counts_per_cell", "counts", np.greater_equal),
        ("max_counts_per_cell", "counts", np.less_equal),
        ("max_pct_mito", "pct_mito", np.less_equal),
    ],
)
def test_each_cell_filter_removes_the_cells_beyond_its_threshold(counts_adata, name, statistic, keeps):
    values = _qc_stats(counts_adata)[statistic]
    threshold = float(np.median(values))
    kept = keeps(values, threshold)
    assert 0 < kept.sum() < counts_adata.n_obs
    filtered, counts = quality_control(counts_adata, QCThresholds(**{**NO_FILTERS, name: threshold}))
    assert list(filtered.obs_names) == list(counts_adata.obs_names[kept])
    assert counts[f"cells_removed_{name}"] == int((~kept).sum())
    assert counts["cells_before"] == counts_adata.n_obs
    assert counts["cells_after"] == int(kept.sum())
    assert counts["genes_before"] == counts["genes_after"] == counts_adata.n_vars
    assert not any(k.startswith("cells_removed_") and k != f"cells_removed_{name}" for k in counts)


def test_filters_combine_and_each_counts_only_cells_still_left(counts_adata):
    stats = _qc_stats(counts_adata)
    min_genes = float(np.quantile(stats["genes"], 0.3))
    max_pct = float(np.quantile(stats["pct_mito"], 0.7))
    thresholds = QCThresholds(**{**NO_FILTERS, "min_genes_per_cell": min_genes, "max_pct_mito": max_pct})
    filtered, counts = quality_control(counts_adata, thresholds)
    low_genes = stats["genes"] < min_genes
    high_mito = stats["pct_mito"] > max_pct
    assert counts["cells_removed_min_genes_per_cell"] == int(low_genes.sum())
    assert counts["cells_removed_max_pct_mito"] == int((high_mito & ~low_genes).sum())
    assert filtered.n_obs == counts["cells_after"] == int((~low_genes & ~high_mito).sum())


def test_a_mito_filter_that_matches_no_gene_says_so_and_names_the_prefix_the_names_use(counts_adata, caplog):
    thresholds = QCThresholds(**{**NO_FILTERS, "max_pct_mito": 5.0})
    assert quality_control(counts_adata, thresholds)[1]["n_mito_genes"] == 3
    assert "mito_prefix" not in caplog.text
    make_names = counts_adata.copy()  # R's make.names: MT-CO1 -> MT.CO1
    make_names.var_names = make_names.var_names.str.replace("MT-", "MT.")
    with caplog.at_level(logging.WARNING):
        filtered, counts = quality_control(make_names, thresholds)
    assert counts["n_mito_genes"] == 0 and counts["cells_removed_max_pct_mito"] == 0
    assert ("qc.max_pct_mito is 5.0, but 3 gene names that look mitochondrial do not start with qc.mito_prefix 'MT-' "
            "(e.g. MT.CO1): the mitochondrial filter does not count them. Set qc.mito_prefix to 'MT.'") in caplog.text
    caplog.clear()
    ids = counts_adata.copy()  # Ensembl IDs without symbols
    ids.var_names = [f"ENSG{i:011d}" for i in range(ids.n_vars)]
    with caplog.at_level(logging.WARNING):
        assert quality_control(ids, thresholds)[1]["n_mito_genes"] == 0
    assert "no gene name starts with qc.mito_prefix 'MT-': the mitochondrial filter removes no cell" in caplog.text
    assert "gene_symbol_column" in caplog.text


def test_gene_filter_counts_cells_after_cell_filters(counts_adata):
    filtered, counts = quality_control(counts_adata, QCThresholds(**{**NO_FILTERS, "min_cells_per_gene": 40}))
    cells_per_gene = (counts_adata.X.toarray() > 0).sum(axis=0)
    assert list(filtered.var_names) == list(counts_adata.var_names[cells_per_gene >= 40])
    assert 0 < counts["genes_after"] < counts["genes_before"]
    assert filtered.n_obs == counts_adata.n_obs


def test_qc_does_not_change_its_input(counts_adata):
    before = counts_adata.X.toarray()
    quality_control(counts_adata, QCThresholds(min_genes_per_cell=30, min_cells_per_gene=20))
    assert np.array_equal(counts_adata.X.toarray(), before)
    assert list(counts_adata.obs.columns) == ["cell_type", "tissue", "organism"]


def test_all_cells_removed_says_what_each_filter_removed(counts_adata):
    with pytest.raises(ValueError, match=r"relax the thresholds") as error:
        quality_control(counts_adata, QCThresholds(**{**NO_FILTERS, "min_genes_per_cell": 1000}))
    assert "all 60 cells" in str(error.value) and "min_genes_per_cell: -60" in str(error.value)
    assert "conf/" not in str(error.value)  # core says what is wrong; the node names the setting


def test_all_genes_removed_names_the_threshold(counts_adata):
    with pytest.raises(ValueError, match=r"min_cells_per_gene=1000.*lower min_cells_per_gene"):
        quality_control(counts_adata, QCThresholds(**{**NO_FILTERS, "min_cells_per_gene": 1000}))


@pytest.mark.parametrize("name", ["max_genes_per_cell", "max_counts_per_cell"])
def test_zero_upper_bound_removes_every_expressing_cell(counts_adata, name):
    with pytest.raises(ValueError, match=rf"{name}: -60"):
        quality_control(counts_adata, QCThresholds(**{**NO_FILTERS, name: 0}))


def test_cells_left_empty_by_the_gene_filter_are_removed(counts_adata, caplog):
    # One extra cell expresses only a gene no other cell has; min_cells_per_gene=2 drops the gene.
    dense = np.zeros((counts_adata.n_obs + 1, counts_adata.n_vars + 1), dtype=np.float32)
    dense[:-1, :-1] = counts_adata.X.toarray()
    dense[-1, -1] = 5
    obs = pd.concat([counts_adata.obs, counts_adata.obs.iloc[[0]].set_axis(["lonely"])])
    adata = ad.AnnData(
        X=sp.csr_matrix(dense), obs=obs, var=pd.DataFrame(index=[*counts_adata.var_names, "RARE"])
    )
    with caplog.at_level(logging.WARNING):
        filtered, counts = quality_control(adata, QCThresholds(**{**NO_FILTERS, "min_cells_per_gene": 2}))
    assert "lonely" not in filtered.obs_names and "RARE" not in filtered.var_names
    assert counts["cells_removed_empty_after_gene_filter"] == 1
    assert counts["cells_after"] == counts_adata.n_obs
    assert any("no expressed gene" in r.getMessage() for r in caplog.records)


# ---- normalize_log10 ---------------------------------------------------------------------------


@pytest.mark.parametrize("sparse", [True, False])
def test_normalize_log10_keeps_counts_and_is_exact(counts_adata, sparse):
    raw = counts_adata.X.toarray().astype(np.float64)
    adata = counts_adata if sparse else ad.AnnData(X=raw.astype(np.float32), obs=counts_adata.obs, var=counts_adata.var)
    normalized = normalize_log10(adata, target_sum=1e4)
    expected = np.log10(1.0 + raw / raw.sum(axis=1, keepdims=True) * 1e4)
    result = normalized.X.toarray() if sp.issparse(normalized.X) else normalized.X
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-6)
    counts = normalized.layers["counts"]
    assert np.array_equal(counts.toarray() if sp.issparse(counts) else counts, raw)
    assert normalized.uns["log1p"] == {"base": 10}
    # The input is left as it was.
    original = adata.X.toarray() if sp.issparse(adata.X) else adata.X
    assert np.array_equal(original, raw)
    assert "counts" not in adata.layers


def test_normalize_log10_without_target_uses_median_library_size(counts_adata):
    raw = counts_adata.X.toarray().astype(np.float64)
    totals = raw.sum(axis=1, keepdims=True)
    normalized = normalize_log10(counts_adata, target_sum=None)
    expected = np.log10(1.0 + raw / totals * np.median(totals))
    np.testing.assert_allclose(normalized.X.toarray(), expected, rtol=1e-5, atol=1e-6)


# ---- embed_expression --------------------------------------------------------------------------


@pytest.fixture
def normalized_adata(counts_adata):
    return normalize_log10(counts_adata)


def test_embed_expression_adds_pca_umap_and_neighbours(normalized_adata):
    embedded = embed_expression(normalized_adata, n_comps=10, n_neighbors=8, seed=0)
    n = normalized_adata.n_obs
    assert embedded.obsm["X_pca"].shape == (n, 10)
    assert embedded.obsm["X_umap"].shape == (n, 2)
    assert np.isfinite(embedded.obsm["X_umap"]).all()
    assert embedded.obsp["connectivities"].shape == (n, n)
    assert embedded.obsp["distances"].shape == (n, n)
    assert embedded.uns["neighbors"]["params"]["n_neighbors"] == 8
    # The two cell types have distinct markers: the kNN graph must keep them apart.
    rows, cols = embedded.obsp["connectivities"].nonzero()
    cell_type = embedded.obs["cell_type"].to_numpy()
    assert np.mean(cell_type[rows] == cell_type[cols]) > 0.9
    assert "X_pca" not in normalized_adata.obsm


def test_embed_expression_caps_components_and_neighbours_on_tiny_data(normalized_adata):
    tiny = normalized_adata[:12].copy()
    embedded = embed_expression(tiny, n_comps=50, n_neighbors=15, seed=0)
    assert embedded.obsm["X_pca"].shape == (12, 11)
    assert embedded.obsm["X_umap"].shape == (12, 2)
    assert embedded.uns["neighbors"]["params"]["n_neighbors"] == 11


def test_embed_expression_on_highly_variable_genes(normalized_adata):
    embedded = embed_expression(normalized_adata, n_comps=5, n_neighbors=8, n_top_genes=20, seed=0)
    assert int(embedded.var["highly_variable"].sum()) == 20
    # PCA loadings are zero for genes outside the selection.
    loadings = embedded.varm["PCs"]
    assert np.all(loadings[~embedded.var["highly_variable"].to_numpy()] == 0)
    assert embedded.obsm["X_pca"].shape == (normalized_adata.n_obs, 5)


def test_embed_expression_caps_components_by_highly_variable_genes(normalized_adata):
    embedded = embed_expression(normalized_adata, n_comps=50, n_neighbors=8, n_top_genes=20, seed=0)
    assert 1 <= embedded.obsm["X_pca"].shape[1] <= 20


def test_embed_expression_is_reproducible_with_the_seed(normalized_adata):
    first = embed_expression(normalized_adata, n_comps=5, n_neighbors=8, seed=3)
    second = embed_expression(normalized_adata, n_comps=5, n_neighbors=8, seed=3)
    np.testing.assert_allclose(first.obsm["X_umap"], second.obsm["X_umap"])


@pytest.mark.parametrize("max_pct_mito", [20.0, None])
def test_cells_without_counts_are_counted_as_empty_not_as_a_filter(counts_adata, max_pct_mito):
    dense = counts_adata.X.toarray()
    dense[[2, 7]] = 0
    adata = ad.AnnData(X=sp.csr_matrix(dense), obs=counts_adata.obs.copy(), var=counts_adata.var.copy())
    filtered, counts = quality_control(adata, QCThresholds(**{**NO_FILTERS, "max_pct_mito": max_pct_mito}))
    assert counts["cells_removed_no_counts"] == 2 and filtered.n_obs == counts_adata.n_obs - 2
    assert counts.get("cells_removed_max_pct_mito", 0) == 0  # 0/0 mito share is not a mito failure


class _ExactIndex:
    def compress_index(self):
        pass


def _exact_fit(self, X, compress_index=True):
    self._fitted, self.n_samples_fit, self.index_ = X, X.shape[0], _ExactIndex()
    return self


def _exact_transform_as_csr_array(self, X=None, y=None):
    """pynndescent 0.7's output for its own neighbour graph: a csr_array with the cell itself
    (distance 0) among its neighbours, found here exactly (no numba compilation)."""
    from sklearn.neighbors import NearestNeighbors

    n, k = self.n_samples_fit, self.n_neighbors
    distances, indices = NearestNeighbors(n_neighbors=k).fit(self._fitted).kneighbors(self._fitted)
    return sp.csr_array((distances.ravel().astype(np.float32), indices.ravel(), np.arange(0, n * k + 1, k)), shape=(n, n))


def test_embed_expression_past_the_approximate_knn_switch(normalized_adata, monkeypatch):
    """From 8,192 cells scanpy searches neighbours with pynndescent, whose csr_array output scanpy
    could not read ("'csr_array' object has no attribute 'getnnz'"). The same path at a tiny size:
    the switch lowered, pynndescent's search replaced by an exact one returning what it returns."""
    import pynndescent

    from c2s_kedro.core.data import preprocessing

    assert preprocessing._knn_transformer(preprocessing.APPROXIMATE_KNN_FROM_CELLS - 1, 15, 0) is None
    monkeypatch.setattr(preprocessing, "APPROXIMATE_KNN_FROM_CELLS", 10)
    monkeypatch.setattr(pynndescent.PyNNDescentTransformer, "fit", _exact_fit)
    monkeypatch.setattr(pynndescent.PyNNDescentTransformer, "transform", _exact_transform_as_csr_array)
    assert isinstance(preprocessing._knn_transformer(normalized_adata.n_obs, 8, 0), pynndescent.PyNNDescentTransformer)
    embedded = embed_expression(normalized_adata, n_comps=10, n_neighbors=8, seed=0)
    n = normalized_adata.n_obs
    assert embedded.obsm["X_umap"].shape == (n, 2)
    assert np.isfinite(embedded.obsm["X_umap"]).all()
    assert embedded.obsp["distances"].shape == (n, n)
    rows, cols = embedded.obsp["connectivities"].nonzero()
    cell_type = embedded.obs["cell_type"].to_numpy()
    assert np.mean(cell_type[rows] == cell_type[cols]) > 0.9


def test_quality_control_in_chunks_equals_scanpys_filters(counts_adata, monkeypatch):
    """Cells and genes are cut a chunk of rows at a time (never the screen twice in memory); the
    result is scanpy's: cells filtered, then filter_genes(min_cells) on the cells left."""
    import scanpy as sc

    from c2s_kedro.core.data import preprocessing

    thresholds = QCThresholds(**{**NO_FILTERS, "min_genes_per_cell": 27, "min_cells_per_gene": 30})
    monkeypatch.setattr(preprocessing, "_ROW_CHUNK", 7)
    filtered, counts = quality_control(counts_adata, thresholds)
    expected = counts_adata.copy()
    sc.pp.filter_cells(expected, min_genes=27)
    sc.pp.filter_genes(expected, min_cells=30)
    assert counts["genes_after"] == expected.n_vars < counts_adata.n_vars
    assert counts["cells_after"] == expected.n_obs < counts_adata.n_obs
    assert list(filtered.obs_names) == list(expected.obs_names)
    assert list(filtered.var_names) == list(expected.var_names)
    assert (filtered.X != expected.X).nnz == 0
    np.testing.assert_array_equal(filtered.var["n_cells"], expected.var["n_cells"])


def test_normalize_and_embed_leave_the_input_counts_untouched(counts_adata):
    before = counts_adata.X.copy()
    normalized = normalize_log10(counts_adata)
    assert (counts_adata.X != before).nnz == 0
    assert (normalized.layers["counts"] != before).nnz == 0
    assert (normalized.X != before).nnz > 0
    embedded = embed_expression(normalized, n_comps=5, n_neighbors=8, seed=0)
    assert embedded.X is normalized.X  # shared, not copied
    assert "X_pca" not in normalized.obsm


def test_quality_control_of_a_file_written_in_chunks(tmp_path):
    """write_atlas_h5ad appends to X on disk with a 64-bit indptr beside 32-bit indices; scanpy's
    QC metrics (scipy's eliminate_zeros) reject the mix unless QC aligns them."""
    from c2s_kedro.core.simulate.atlas import write_atlas_h5ad

    adata = ad.read_h5ad(write_atlas_h5ad(tmp_path / "atlas.h5ad", n_cells=300, n_genes=200, chunk_size=100, seed=1))
    assert adata.X.indptr.dtype != adata.X.indices.dtype
    filtered, counts = quality_control(adata, QCThresholds(**{**NO_FILTERS, "min_genes_per_cell": 5}))
    assert counts["cells_after"] == filtered.n_obs > 0
    assert filtered.X.indptr.dtype == filtered.X.indices.dtype


def test_normalization_in_chunks_of_cells_gives_scanpys_values(counts_adata, monkeypatch):
    import scanpy as sc

    from c2s_kedro.core.data import preprocessing

    monkeypatch.setattr(preprocessing, "_ROW_CHUNK", 7)
    for target_sum in (None, 1e4):
        expected = counts_adata.copy()
        sc.pp.normalize_total(expected, target_sum=target_sum)
        sc.pp.log1p(expected, base=10)
        normalized = normalize_log10(counts_adata, target_sum=target_sum)
        assert normalized.X.dtype == np.float32
        np.testing.assert_array_equal(normalized.X.toarray(), expected.X.toarray())


def test_qc_metrics_in_chunks_of_cells_are_scanpys(counts_adata, monkeypatch):
    """The per-cell and per-gene QC columns computed 7 cells at a time equal scanpy's on the whole
    matrix (what the filters read, and what processed_adata keeps in obs/var)."""
    import scanpy as sc

    from c2s_kedro.core.data import preprocessing

    adata = counts_adata.copy()
    adata.var_names = ["MT-A", "MT-B", *adata.var_names[2:]]  # two mitochondrial genes
    adata.var["mt"] = adata.var_names.str.startswith("MT-")
    expected = adata.copy()
    sc.pp.calculate_qc_metrics(expected, qc_vars=["mt"], percent_top=None, log1p=False, inplace=True)
    monkeypatch.setattr(preprocessing, "_ROW_CHUNK", 7)
    assert adata.n_obs > 7
    preprocessing._qc_metrics(adata)
    assert list(adata.obs.columns) == list(expected.obs.columns)
    assert list(adata.var.columns) == list(expected.var.columns)
    for frame, reference, before in ((adata.obs, expected.obs, counts_adata.obs), (adata.var, expected.var, counts_adata.var)):
        for column in set(reference.columns) - set(before.columns) - {"mt"}:
            np.testing.assert_allclose(frame[column].to_numpy(dtype=float), reference[column].to_numpy(dtype=float),
                                       rtol=1e-6, err_msg=column)


def test_normalization_without_a_counts_layer_shares_the_input_indices(counts_adata):
    """counts_layer None (the screen's default): the same values, no layer, the input's index
    arrays shared rather than copied, and the input left as it was."""
    before = counts_adata.X.copy()
    kept = normalize_log10(counts_adata)
    bare = normalize_log10(counts_adata, counts_layer=None)
    assert "counts" not in bare.layers and "counts" in kept.layers
    np.testing.assert_array_equal(bare.X.toarray(), kept.X.toarray())
    assert np.shares_memory(bare.X.indices, counts_adata.X.indices)
    assert not np.shares_memory(kept.X.indices, counts_adata.X.indices)
    assert (counts_adata.X != before).nnz == 0
