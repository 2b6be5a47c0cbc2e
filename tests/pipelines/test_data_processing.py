import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from c2s_kedro.core.preprocessing import normalize_log10
from c2s_kedro.pipelines.data_processing import create_pipeline
from c2s_kedro.pipelines.data_processing.nodes import (
    embed_normalized_cells,
    filter_cells_and_genes,
    normalize_counts,
    plot_expression_umaps,
    summarize_processing,
    validate_raw_adata,
)
from c2s_kedro.parameters import PARAMETER_NAMESPACE, ParameterError
from tests.helpers import load_parameters, params_entries, run_pipeline


def normalize_and_embed(adata, section):
    return embed_normalized_cells(normalize_counts(adata, section), section)


@pytest.fixture
def params():
    """The project's data_processing parameters, shrunk for 60 cells."""
    parameters = load_parameters("data_processing")
    section = parameters["data_processing"]
    section["qc"].update(min_genes_per_cell=10, min_cells_per_gene=3)
    section["embedding"].update(n_comps=10, n_neighbors=10)
    return parameters


# ---- validate_raw_adata ------------------------------------------------------------------------


def test_validate_accepts_counts_and_copies(counts_adata, params):
    validated = validate_raw_adata(counts_adata, params["data_processing"])
    assert validated is not counts_adata
    assert list(validated.var_names) == list(counts_adata.var_names)
    assert (validated.X != counts_adata.X).nnz == 0


def test_validate_names_a_missing_umap_color_key_and_the_setting(counts_adata, params):
    section = {**params["data_processing"], "umap_color_keys": ["cell_type", "louvain"]}
    with pytest.raises(KeyError) as error:
        validate_raw_adata(counts_adata, section)
    message = error.value.args[0]
    assert "'louvain'" in message
    assert "cell_type, tissue, organism" in message
    assert "data_processing.umap_color_keys" in message
    assert "in your environment (e.g. conf/local/parameters.yml)" in message
    assert "conf/base/parameters_data_processing.yml" in message


def test_a_namespaced_run_names_the_screens_setting_not_the_atlas(counts_adata, params):
    """The screen runs these nodes as perturbation.*: its errors name perturbation.data_processing."""
    qc = {**params["data_processing"]["qc"], "min_genes_per_cell": 10_000}
    token = PARAMETER_NAMESPACE.set("perturbation")
    try:
        with pytest.raises(ValueError) as error:
            filter_cells_and_genes(counts_adata, qc)
    finally:
        PARAMETER_NAMESPACE.reset(token)
    assert "QC removed all 60 cells" in str(error.value)
    assert "Change perturbation.data_processing.qc" in str(error.value)
    assert "conf/base/parameters_perturbation.yml" in str(error.value)


def test_nan_values_get_their_own_message_not_the_normalized_hint(counts_adata, params):
    broken = counts_adata.copy()
    broken.X.data[:3] = np.nan
    with pytest.raises(ValueError) as error:
        validate_raw_adata(broken, params["data_processing"])
    assert "3 NaN" in str(error.value) and "input_is_normalized" not in str(error.value)


def test_unknown_and_missing_parameters_are_refused_with_the_file(counts_adata, params):
    with pytest.raises(ParameterError, match=r"data_processing\.input_is_normalised.*conf/base/parameters_data_processing\.yml"):
        validate_raw_adata(counts_adata, {**params["data_processing"], "input_is_normalised": True})
    section = dict(params["data_processing"])
    del section["gene_symbol_column"]
    with pytest.raises(ParameterError, match=r"data_processing\.gene_symbol_column missing"):
        validate_raw_adata(counts_adata, section)


def test_validate_refuses_normalized_data_unless_declared(counts_adata, params):
    normalized = normalize_log10(counts_adata)
    with pytest.raises(ValueError, match="input_is_normalized"):
        validate_raw_adata(normalized, params["data_processing"])
    section = {**params["data_processing"], "input_is_normalized": True}
    validated = validate_raw_adata(normalized, section)
    assert (validated.X != normalized.X).nnz == 0


def test_validate_replaces_ensembl_ids_with_symbols_and_makes_them_unique(counts_adata, params):
    adata = counts_adata[:, :5].copy()
    ids = [f"ENSG{i:011d}" for i in range(1, 6)]
    symbols = ["CD3E", "MS4A1", "CD3E", "GAPDH", "CD3E"]
    adata.var = pd.DataFrame({"gene_name": symbols}, index=ids)
    validated = validate_raw_adata(adata, params["data_processing"])
    assert list(validated.var_names) == ["CD3E", "MS4A1", "CD3E-1", "GAPDH", "CD3E-2"]
    assert list(validated.var["gene_id"]) == ids
    assert list(adata.var_names) == ids  # the input is left as it was


def test_validate_reads_backed_data_into_memory(tmp_path, counts_adata, params):
    counts_adata.write_h5ad(tmp_path / "raw.h5ad")
    backed = ad.read_h5ad(tmp_path / "raw.h5ad", backed="r")
    try:
        validated = validate_raw_adata(backed, params["data_processing"])
    finally:
        backed.file.close()
    assert not validated.isbacked
    assert (validated.X != counts_adata.X).nnz == 0


# ---- the other nodes ---------------------------------------------------------------------------


def test_unknown_qc_setting_is_named(counts_adata, params):
    qc = {**params["data_processing"]["qc"], "min_gene_per_cell": 5}
    with pytest.raises(ValueError) as error:
        filter_cells_and_genes(counts_adata, qc)
    assert "data_processing.qc.min_gene_per_cell" in str(error.value)
    assert "min_genes_per_cell" in str(error.value)  # the known ones are listed


def test_filter_cells_and_genes_applies_the_parameters(counts_adata, params):
    qc = {**params["data_processing"]["qc"], "min_cells_per_gene": 40, "max_pct_mito": None}
    filtered, counts = filter_cells_and_genes(counts_adata, qc)
    cells_per_gene = (counts_adata.X.toarray() > 0).sum(axis=0)
    assert filtered.n_vars == counts["genes_after"] == int((cells_per_gene >= 40).sum())
    assert counts["cells_before"] == counts_adata.n_obs


def test_normalize_and_embed_keeps_counts(counts_adata, params):
    processed = normalize_and_embed(counts_adata, params["data_processing"])
    assert (processed.layers["counts"] != counts_adata.X).nnz == 0
    assert processed.uns["log1p"]["base"] == 10
    assert processed.obsm["X_umap"].shape == (counts_adata.n_obs, 2)
    assert processed.obsm["X_pca"].shape == (counts_adata.n_obs, 10)


def test_normalize_and_embed_leaves_declared_normalized_data_as_it_is(counts_adata, params):
    normalized = normalize_log10(counts_adata)
    del normalized.layers["counts"]
    section = {**params["data_processing"], "input_is_normalized": True}
    processed = normalize_and_embed(normalized, section)
    np.testing.assert_array_equal(processed.X.toarray(), normalized.X.toarray())
    assert "counts" not in processed.layers
    assert "X_umap" in processed.obsm


def test_plot_expression_umaps_one_figure_per_key(counts_adata, params):
    processed = normalize_and_embed(counts_adata, params["data_processing"])
    figures = plot_expression_umaps(processed, ["cell_type", "tissue"])
    assert set(figures) == {"cell_type.png", "tissue.png"}
    assert all(isinstance(figure, plt.Figure) for figure in figures.values())
    assert "cell_type" in figures["cell_type.png"].axes[0].get_title()
    legend = figures["cell_type.png"].axes[0].get_legend()
    assert sorted(t.get_text() for t in legend.get_texts()) == ["B cell", "T cell"]


def test_embed_false_skips_the_embedding_and_the_plot_says_so(counts_adata, params):
    """The screen's default: normalized cells without PCA/UMAP, one figure naming the setting."""
    section = {**params["data_processing"], "embed": False}
    processed = normalize_and_embed(counts_adata, section)
    assert "X_pca" not in processed.obsm and "X_umap" not in processed.obsm
    np.testing.assert_allclose(processed.X.toarray(), normalize_counts(counts_adata, section).X.toarray())
    figures = plot_expression_umaps(processed, ["cell_type"])
    assert list(figures) == ["not_embedded.png"]
    text = " ".join(t.get_text() for t in figures["not_embedded.png"].axes[0].texts)
    assert "data_processing.embed is false" in text
    assert summarize_processing({"cells_after": 60}, processed)["n_pcs"] == 0.0


def test_summarize_processing():
    adata = ad.AnnData(X=sp.csr_matrix((3, 2), dtype=np.float32))
    adata.obsm["X_pca"] = np.zeros((3, 7))
    summary = summarize_processing({"cells_before": 5, "cells_after": 3}, adata)
    assert summary == {"cells_before": 5.0, "cells_after": 3.0, "n_pcs": 7.0}
    assert all(isinstance(v, float) for v in summary.values())


# ---- the pipeline ------------------------------------------------------------------------------


def test_data_processing_pipeline_runs_on_memory_datasets(counts_adata, params):
    catalog = run_pipeline(create_pipeline(), {"raw_adata": counts_adata, **params_entries(params)})
    processed = catalog.load("processed_adata")
    assert (processed.layers["counts"] != processed.layers["counts"].astype(int)).nnz == 0
    assert processed.obsm["X_umap"].shape == (processed.n_obs, 2)
    assert processed.obsm["X_pca"].shape[1] == 10
    # median library size, then log10: each cell's normalized counts sum to the median total
    totals = np.asarray(processed.layers["counts"].sum(axis=1)).ravel()
    restored = np.asarray((np.power(10.0, processed.X.toarray()) - 1).sum(axis=1)).ravel()
    np.testing.assert_allclose(restored, np.median(totals), rtol=1e-3)
    assert set(catalog.load("expression_umap_plots")) == {"cell_type.png"}
    metrics = catalog.load("data_processing_metrics")
    assert metrics["cells_before"] == counts_adata.n_obs
    assert metrics["cells_after"] == processed.n_obs
    assert metrics["genes_after"] == processed.n_vars
    assert metrics["n_pcs"] == 10.0
    assert "cells_removed_max_pct_mito" in metrics
    assert all(isinstance(v, float) for v in metrics.values())
