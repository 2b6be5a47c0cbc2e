import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from c2s_kedro.core.simulate.atlas import MITOCHONDRIAL_GENES, simulate_atlas, write_atlas_h5ad

OBS_COLUMNS = ["cell_type", "tissue", "batch_condition", "organism", "sex"]


@pytest.fixture(scope="module")
def atlas():
    return simulate_atlas(n_cells=2500, n_genes=600, n_cell_types=4, n_tissues=2, seed=3)


def test_same_seed_gives_same_matrix_and_other_seed_differs():
    first = simulate_atlas(n_cells=300, n_genes=200, seed=7)
    second = simulate_atlas(n_cells=300, n_genes=200, seed=7)
    other = simulate_atlas(n_cells=300, n_genes=200, seed=8)
    assert (first.X != second.X).nnz == 0
    assert first.obs.equals(second.obs)
    assert list(first.var_names) == list(second.var_names)
    assert (first.X != other.X).nnz > 0


def test_counts_are_non_negative_integers_in_csr(atlas):
    assert sp.issparse(atlas.X) and atlas.X.format == "csr"
    data = atlas.X.data
    assert data.size > 0
    assert (data > 0).all()
    np.testing.assert_array_equal(data, np.round(data))


def test_obs_columns_and_unique_names(atlas):
    assert list(atlas.obs.columns) == OBS_COLUMNS
    assert set(atlas.obs["organism"]) == {"Homo sapiens"}
    assert atlas.obs["tissue"].nunique() == 2
    assert atlas.obs["batch_condition"].nunique() == 2
    assert set(atlas.obs["sex"]) <= {"female", "male"}
    # One sex per donor.
    assert (atlas.obs.groupby("batch_condition", observed=True)["sex"].nunique() == 1).all()
    assert atlas.obs_names.is_unique
    assert atlas.var_names.is_unique


def test_mitochondrial_genes_present_and_expressed(atlas):
    mito = atlas.var_names.str.startswith("MT-")
    assert set(atlas.var_names[mito]) == set(MITOCHONDRIAL_GENES)
    totals = np.asarray(atlas.X.sum(axis=1)).ravel()
    mito_fraction = np.asarray(atlas.X[:, mito].sum(axis=1)).ravel() / totals
    assert 0.01 < np.median(mito_fraction) < 0.15


def test_library_sizes_spread(atlas):
    totals = np.asarray(atlas.X.sum(axis=1)).ravel()
    assert np.percentile(totals, 90) / np.percentile(totals, 10) > 2


def test_each_cell_type_up_regulates_its_markers(atlas):
    markers = atlas.uns["simulation"]["marker_genes"]
    cell_types = atlas.obs["cell_type"].to_numpy()
    normalized = sp.diags(1e4 / np.asarray(atlas.X.sum(axis=1)).ravel()) @ atlas.X
    for cell_type, genes in markers.items():
        in_type = cell_types == cell_type
        if in_type.sum() < 10:
            continue
        columns = atlas.var_names.get_indexer(genes)
        block = normalized[:, columns]
        inside = np.asarray(block[in_type].mean(axis=0)).ravel()
        outside = np.asarray(block[~in_type].mean(axis=0)).ravel()
        assert inside.mean() > 3 * outside.mean(), cell_type
        assert (inside > outside).mean() > 0.9, cell_type


@pytest.mark.parametrize("target", [100, 400])
def test_expressed_genes_per_cell_near_target(target):
    adata = simulate_atlas(n_cells=1000, n_genes=3000, expressed_genes_per_cell=target, seed=1)
    expressed = np.diff(adata.X.indptr)
    assert abs(expressed.mean() - target) < 0.15 * target


def test_unreachable_target_is_refused():
    with pytest.raises(ValueError, match="expressed_genes_per_cell"):
        simulate_atlas(n_cells=10, n_genes=100, expressed_genes_per_cell=100)


def test_write_atlas_h5ad_round_trips(tmp_path):
    arguments = dict(n_cells=5000, n_genes=300, n_cell_types=3, expressed_genes_per_cell=80, seed=5)
    path = write_atlas_h5ad(tmp_path / "atlas.h5ad", chunk_size=2048, **arguments)
    in_memory = simulate_atlas(**arguments)

    loaded = ad.read_h5ad(path)
    assert loaded.shape == (5000, 300)
    assert (loaded.X != in_memory.X).nnz == 0
    assert loaded.obs.equals(in_memory.obs)
    assert list(loaded.var_names) == list(in_memory.var_names)

    backed = ad.read_h5ad(path, backed="r")
    try:
        assert backed.shape == (5000, 300)
        rows = backed.X[4000:4100]
        assert (sp.csr_matrix(rows) != in_memory.X[4000:4100]).nnz == 0
        assert list(backed.obs["cell_type"].iloc[4000:4100]) == list(
            in_memory.obs["cell_type"].iloc[4000:4100]
        )
    finally:
        backed.file.close()
