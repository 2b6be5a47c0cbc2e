import logging

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from c2s_kedro.core.data.preprocessing import normalize_log10
from c2s_kedro.core.data.validation import InputError, NotCountsError
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
    normalized = normalize_log10(counts_adata, counts_layer=None)  # no counts anywhere
    with pytest.raises(NotCountsError) as error:
        validate_raw_adata(normalized, params["data_processing"])
    message = str(error.value)
    assert "non-integer values" in message and "this looks normalized" in message
    assert "none were found (no .raw and no layers)" in message
    assert "data_processing.counts_source" in message
    assert "Change data_processing.input_is_normalized to true" in message
    assert "conf/base/parameters_data_processing.yml" in message
    section = {**params["data_processing"], "input_is_normalized": True}
    validated = validate_raw_adata(normalized, section)
    assert (validated.X != normalized.X).nnz == 0
    assert validated.uns["input_checks"]["counts_source"] == "normalized X"


# ---- where the counts are ----------------------------------------------------------------------


def _processed(adata, params, **changes):
    """processed_adata and the metrics of the pipeline run on ``adata`` (no embedding: faster)."""
    parameters = {"data_processing": {**params["data_processing"], "embed": False, **changes}}
    catalog = run_pipeline(create_pipeline(), {"raw_adata": adata, **params_entries(parameters)})
    return catalog.load("processed_adata"), catalog.load("data_processing_metrics")


def _cellxgene_style(counts, where):
    """X log-normalized (CELLxGENE's convention), the counts in .raw.X (with 2 genes more than X: X
    was subset) or in layers["counts"]."""
    normalized = normalize_log10(counts, counts_layer=None)
    if where == "raw":
        adata = normalized[:, 2:].copy()
        adata.raw = counts
    else:
        adata = normalized
        adata.layers["counts"] = counts.X
    return adata


@pytest.mark.parametrize("where, read_from", [("raw", ".raw.X"), ("counts", "layers['counts']")])
def test_a_cellxgene_style_file_is_processed_from_its_counts(counts_adata, params, caplog, where, read_from):
    """auto finds the counts next to a log-normalized X and gives what the plain counts give."""
    expected, _ = _processed(counts_adata, params)
    with caplog.at_level(logging.INFO):
        processed, metrics = _processed(_cellxgene_style(counts_adata, where), params)
    assert f"raw counts read from {read_from}" in caplog.text and "this looks normalized" in caplog.text
    assert list(processed.var_names) == list(expected.var_names)  # .raw's genes, the 2 that X lacked included
    assert list(processed.obs_names) == list(expected.obs_names)
    np.testing.assert_allclose(processed.X.toarray(), expected.X.toarray(), rtol=1e-6)
    assert (processed.layers["counts"] != expected.layers["counts"]).nnz == 0
    assert processed.uns["input_checks"]["counts_source"] == ("raw" if where == "raw" else "counts")
    assert metrics["genes_only_in_raw"] == (2.0 if where == "raw" else 0.0)
    if where == "raw":
        assert "the genes are .raw's: 40, 2 of them not among .X's 38" in caplog.text


def test_raw_counts_keep_the_symbol_column_of_x(counts_adata, params):
    """gene_symbol_column names a column of .var; .raw.var often lacks it."""
    ids = [f"ENSG{i:011d}" for i in range(counts_adata.n_vars)]
    counts = counts_adata.copy()
    counts.var = pd.DataFrame(index=ids)
    adata = normalize_log10(counts, counts_layer=None)
    adata.var["feature_name"] = list(counts_adata.var_names)
    adata.raw = counts
    validated = validate_raw_adata(adata, {**params["data_processing"], "gene_symbol_column": "feature_name"})
    assert list(validated.var_names) == list(counts_adata.var_names)
    assert (validated.X != counts_adata.X).nnz == 0


def test_a_counts_source_names_where_the_counts_are(counts_adata, params):
    adata = _cellxgene_style(counts_adata, "raw")
    with pytest.raises(NotCountsError) as error:
        validate_raw_adata(adata, {**params["data_processing"], "counts_source": "X"})
    assert ".X (data_processing.counts_source) holds" in str(error.value)
    assert ".raw.X holds them: set data_processing.counts_source to 'raw'" in str(error.value)
    validated = validate_raw_adata(adata, {**params["data_processing"], "counts_source": "raw"})
    assert (validated.X != counts_adata.X).nnz == 0
    with pytest.raises(InputError) as error:
        validate_raw_adata(adata, {**params["data_processing"], "counts_source": "spliced"})
    message = str(error.value)
    assert "data_processing.counts_source is 'spliced', but the data has no layers['spliced'] (it has: .X, .raw.X)" in message
    assert "conf/base/parameters_data_processing.yml" in message


def test_no_counts_anywhere_says_what_each_matrix_holds(counts_adata, params):
    adata = normalize_log10(counts_adata, counts_layer=None)
    adata.layers["scaled"] = adata.X.toarray() - 1.0
    with pytest.raises(NotCountsError, match=r"none were found \(layers\['scaled'\]: scaled values\)"):
        validate_raw_adata(adata, params["data_processing"])


# ---- ambient-corrected counts and declarations -------------------------------------------------


def _corrected(counts):
    """Ambient-corrected counts as CellBender or SoupX write them: non-negative, non-integer, and of
    a real file's size (a gene with over a hundred molecules in some cell)."""
    corrected = counts.copy()
    corrected.X = corrected.X * 6.0
    corrected.X.data *= np.random.default_rng(0).uniform(0.6, 1.0, corrected.X.nnz).astype(np.float32)
    return corrected


def test_ambient_corrected_counts_name_the_setting_that_accepts_them_never_normalized(counts_adata, params):
    corrected = _corrected(counts_adata)
    with pytest.raises(InputError) as error:
        validate_raw_adata(corrected, params["data_processing"])
    message = str(error.value)
    assert "non-integer values" in message and "ambient-corrected counts" in message
    assert "Set data_processing.accept_non_integer_counts to true" in message
    assert "input_is_normalized" not in message
    assert "conf/base/parameters_data_processing.yml" in message
    with pytest.raises(InputError) as error:  # and declaring them normalized is refused too
        validate_raw_adata(corrected, {**params["data_processing"], "input_is_normalized": True})
    message = str(error.value)
    assert "data_processing.input_is_normalized is true, but .X holds" in message
    assert "set data_processing.input_is_normalized to false and data_processing.accept_non_integer_counts to true" in message


def test_accepted_ambient_corrected_counts_are_qc_filtered_and_normalized_as_counts(counts_adata, params, caplog):
    corrected = _corrected(counts_adata)
    with caplog.at_level(logging.WARNING):
        processed, metrics = _processed(corrected, params, accept_non_integer_counts=True)
    assert "non-integer values of .X taken as counts (data_processing.accept_non_integer_counts)" in caplog.text
    assert metrics["non_integer_count_values"] == float(corrected.X.nnz)
    kept = corrected[processed.obs_names, processed.var_names]
    np.testing.assert_allclose(processed.layers["counts"].toarray(), kept.X.toarray())
    np.testing.assert_allclose(processed.X.toarray(), normalize_log10(kept).X.toarray(), rtol=1e-5)


def test_ambient_corrected_x_next_to_integer_counts_asks_which(counts_adata, params):
    corrected = _corrected(counts_adata)
    corrected.layers["counts"] = counts_adata.X
    with pytest.raises(InputError) as error:
        validate_raw_adata(corrected, params["data_processing"])
    assert ("data_processing.accept_non_integer_counts to true to QC-filter and normalize them as counts, or "
            "data_processing.counts_source to 'counts' for the integer counts in layers['counts']") in str(error.value)


def test_counts_declared_normalized_are_refused(counts_adata, params):
    with pytest.raises(InputError) as error:
        validate_raw_adata(counts_adata, {**params["data_processing"], "input_is_normalized": True})
    message = str(error.value)
    assert "data_processing.input_is_normalized is true, but .X holds non-negative integers" in message
    assert "set data_processing.input_is_normalized to false" in message
    assert "accept_non_integer_counts" not in message
    assert "conf/base/parameters_data_processing.yml" in message


def test_the_screen_names_its_own_settings(counts_adata, params):
    token = PARAMETER_NAMESPACE.set("perturbation")
    try:
        with pytest.raises(InputError) as error:
            validate_raw_adata(_corrected(counts_adata), params["data_processing"])
    finally:
        PARAMETER_NAMESPACE.reset(token)
    assert "Set perturbation.data_processing.accept_non_integer_counts to true" in str(error.value)
    assert "conf/base/parameters_perturbation.yml" in str(error.value)


# ---- names -------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Observation names are not unique", "ignore:Variable names are not unique")
def test_names_are_made_usable_at_the_door_and_counted(counts_adata, params, caplog):
    """Gene names with whitespace become one word (then unique); repeated cell names (two 10x lanes
    concatenated) become unique as anndata makes them."""
    adata = ad.concat([counts_adata, counts_adata])  # the same barcodes twice
    names = list(adata.var_names)
    names[5], names[6], names[7] = "HES4 variant", " NEWGENE", "NEWGENE"
    adata.var_names = names
    with caplog.at_level(logging.WARNING):
        processed, metrics = _processed(adata, params)
    assert "HES4_variant" in processed.var_names and "HES4 variant" not in processed.var_names
    assert {"NEWGENE", "NEWGENE-1"} <= set(processed.var_names)
    assert not any(" " in name for name in processed.var_names)
    assert processed.obs_names.is_unique and "cell_0-1" in processed.obs_names
    assert "2 gene names held whitespace" in caplog.text
    assert f"{counts_adata.n_obs} repeated cell names made unique" in caplog.text
    assert metrics["gene_names_with_whitespace"] == 2.0
    assert metrics["duplicated_gene_names"] == 1.0
    assert metrics["duplicated_cell_names"] == float(counts_adata.n_obs)


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
    assert {key: metrics[key] for key in ("gene_names_with_whitespace", "duplicated_gene_names", "duplicated_cell_names",
                                          "genes_only_in_raw", "non_integer_count_values")} == dict.fromkeys(
        ("gene_names_with_whitespace", "duplicated_gene_names", "duplicated_cell_names", "genes_only_in_raw",
         "non_integer_count_values"), 0.0)
    assert processed.uns["input_checks"]["counts_source"] == "X"
    assert all(isinstance(v, float) for v in metrics.values())
