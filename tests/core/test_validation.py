import dataclasses
import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from c2s_kedro.core.data.preprocessing import normalize_log10
from c2s_kedro.core.data.validation import (
    LOG_VALUES_BELOW,
    InputError,
    InputReport,
    NotCountsError,
    check_raw_counts,
    describe_values,
    input_check_metrics,
    make_gene_names_unique,
    require_obs_columns,
    tidy_gene_names,
    use_gene_symbols,
    validate_input,
)

ENSEMBL_IDS = ["ENSG00000141510", "ENSG00000012048", "ENSG00000146648", "ENSG00000157764.13"]
SYMBOLS = ["TP53", "BRCA1", "EGFR", "BRAF"]


def _adata(dense, var=None) -> ad.AnnData:
    dense = np.asarray(dense, dtype=np.float32)
    var = var if var is not None else pd.DataFrame(index=[f"G{i}" for i in range(dense.shape[1])])
    return ad.AnnData(X=sp.csr_matrix(dense), var=var)


# ---- check_raw_counts --------------------------------------------------------------------------


@pytest.mark.parametrize("sparse", [True, False])
def test_counts_pass(counts_adata, sparse):
    adata = counts_adata if sparse else ad.AnnData(X=counts_adata.X.toarray())
    check_raw_counts(adata)  # raises on failure


def test_integer_dtype_counts_pass():
    check_raw_counts(ad.AnnData(X=sp.csr_matrix(np.array([[0, 3], [7, 1]], dtype=np.int64))))


@pytest.mark.parametrize(
    "bad, found",
    [(-1.0, "1 negative values"), (np.nan, "1 NaN"), (np.inf, "1 NaN or infinite"), (0.37, "1 non-integer values")],
)
@pytest.mark.parametrize("sparse", [True, False])
def test_non_counts_are_refused_saying_what_was_found(bad, found, sparse):
    dense = np.array([[1, 2, 0], [0, 4, 5]], dtype=np.float32)
    dense[1, 1] = bad
    adata = ad.AnnData(X=sp.csr_matrix(dense) if sparse else dense)
    with pytest.raises(ValueError) as error:
        check_raw_counts(adata)
    message = str(error.value)
    assert found in message
    # negative or fractional values look normalized (the node offers input_is_normalized); NaN is damage
    assert isinstance(error.value, NotCountsError) == np.isfinite(bad)
    if not np.isfinite(bad):
        assert "save the h5ad again" in message


def test_log_normalized_data_is_refused(counts_adata):
    adata = counts_adata.copy()
    adata.X.data = np.log1p(adata.X.data)
    with pytest.raises(ValueError, match="non-integer"):
        check_raw_counts(adata)


def test_counts_are_checked_a_chunk_at_a_time(monkeypatch):
    """Chunks of 4 stored values: the counts of every chunk add up, the minimum and the example
    come from the chunk that holds them, and a NaN in a late chunk still wins over the rest."""
    import c2s_kedro.core.data.validation as validation

    monkeypatch.setattr(validation, "_VALUE_CHUNK", 4)
    values = np.arange(1, 13, dtype=np.float32)  # 12 stored values: 3 chunks
    values[[1, 9]] = [-2.0, -7.0]
    with pytest.raises(NotCountsError, match=r"2 negative values \(min -7\)"):
        check_raw_counts(ad.AnnData(X=sp.csr_matrix(values[None, :])))
    values = np.arange(1, 13, dtype=np.float32)
    values[[6, 10]] = [0.25, 3.5]
    with pytest.raises(NotCountsError, match=r"2 non-integer values \(e.g. 0.25\)"):
        check_raw_counts(ad.AnnData(X=sp.csr_matrix(values[None, :])))
    values[11] = np.nan
    with pytest.raises(ValueError, match="1 NaN"):
        check_raw_counts(ad.AnnData(X=sp.csr_matrix(values[None, :])))


def test_checks_the_named_layer():
    adata = _adata([[1, 2]])
    adata.layers["normalized"] = sp.csr_matrix(np.array([[0.5, 1.5]], dtype=np.float32))
    check_raw_counts(adata)
    with pytest.raises(ValueError, match="non-integer"):
        check_raw_counts(adata, layer="normalized")


# ---- gene symbols ------------------------------------------------------------------------------


def _ensembl_adata(var_columns: dict) -> ad.AnnData:
    var = pd.DataFrame(var_columns, index=ENSEMBL_IDS)
    return _adata(np.ones((2, 4)), var=var)


def test_gene_name_column_is_detected_and_ids_kept():
    adata = use_gene_symbols(_ensembl_adata({"gene_name": SYMBOLS}))
    assert list(adata.var_names) == SYMBOLS
    assert list(adata.var["gene_id"]) == ENSEMBL_IDS


def test_explicit_symbol_column_is_used():
    adata = _ensembl_adata({"hgnc": SYMBOLS, "gene_name": ["w", "x", "y", "z"]})
    adata = use_gene_symbols(adata, symbol_column="hgnc")
    assert list(adata.var_names) == SYMBOLS
    assert list(adata.var["gene_id"]) == ENSEMBL_IDS


def test_genes_without_symbol_keep_their_id():
    adata = use_gene_symbols(_ensembl_adata({"gene_name": ["TP53", "", np.nan, "BRAF"]}))
    assert list(adata.var_names) == ["TP53", ENSEMBL_IDS[1], ENSEMBL_IDS[2], "BRAF"]
    blank = use_gene_symbols(_ensembl_adata({"gene_name": ["TP53", "  ", " ", " BRAF "]}))  # blank is no symbol
    assert list(blank.var_names) == ["TP53", ENSEMBL_IDS[1], ENSEMBL_IDS[2], "BRAF"]


def test_a_symbol_column_without_one_symbol_warns_like_a_missing_one(caplog):
    with caplog.at_level(logging.WARNING):
        adata = use_gene_symbols(_ensembl_adata({"gene_symbols": [np.nan, "", " ", np.nan]}))
    assert list(adata.var_names) == ENSEMBL_IDS
    assert ".var['gene_symbols'] holds no gene symbol" in caplog.text and "gene_symbol_column" in caplog.text


def test_warns_when_ids_have_no_symbol_column(caplog):
    adata = _ensembl_adata({"biotype": ["protein_coding"] * 4})
    with caplog.at_level(logging.WARNING):
        result = use_gene_symbols(adata)
    assert list(result.var_names) == ENSEMBL_IDS
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("Ensembl" in m and "gene_symbol_column" in m for m in warnings)


def test_symbol_names_are_left_alone(caplog):
    adata = _adata(np.ones((1, 2)), var=pd.DataFrame({"gene_name": ["x", "y"]}, index=["CD3E", "MS4A1"]))
    with caplog.at_level(logging.WARNING):
        result = use_gene_symbols(adata)
    assert list(result.var_names) == ["CD3E", "MS4A1"]
    assert "gene_id" not in result.var
    assert not caplog.records


def test_explicit_symbol_column_that_does_not_exist_raises():
    with pytest.raises(KeyError) as error:
        use_gene_symbols(_ensembl_adata({"gene_name": SYMBOLS}), symbol_column="symbols_v2")
    message = error.value.args[0]
    assert "'symbols_v2'" in message
    assert "gene_name" in message
    assert "conf/" not in message


# ---- unique names, obs columns -----------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
def test_duplicated_gene_names_get_suffixes(caplog):
    adata = _adata(np.ones((1, 4)), var=pd.DataFrame(index=["A", "B", "A", "A"]))
    with caplog.at_level(logging.WARNING):
        result = make_gene_names_unique(adata)
    assert list(result.var_names) == ["A", "B", "A-1", "A-2"]
    assert result.var_names.is_unique
    assert any("2 duplicated gene names" in r.getMessage() for r in caplog.records)


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
def test_gene_names_differing_only_in_case_become_two_words_and_are_counted(counts_adata, caplog):
    adata = counts_adata.copy()
    adata.var_names = ["HES4", "Hes4", "HES4", *adata.var_names[3:]]
    with caplog.at_level(logging.WARNING):
        validated, report = validate_input(adata)
    assert list(validated.var_names[:3]) == ["HES4", "Hes4-1", "HES4-2"]
    assert (report.duplicated_gene_names, report.gene_names_differing_only_in_case) == (2, 1)
    assert input_check_metrics(validated)["gene_names_differing_only_in_case"] == 1.0
    assert "2 duplicated gene names made unique with numeric suffixes (1 of them differ from another only in letter case" in caplog.text
    from c2s_kedro.core.sentences.conversion import vocabulary_names

    assert list(vocabulary_names(validated.var_names[:3])) == ["HES4", "HES4-1", "HES4-2"]


def test_unique_gene_names_unchanged(caplog):
    adata = _adata(np.ones((1, 2)), var=pd.DataFrame(index=["A", "B"]))
    with caplog.at_level(logging.WARNING):
        assert list(make_gene_names_unique(adata).var_names) == ["A", "B"]
    assert not caplog.records


def test_require_obs_columns_names_missing_and_available(counts_adata):
    require_obs_columns(counts_adata, ["cell_type", "tissue"])
    with pytest.raises(KeyError) as error:
        require_obs_columns(counts_adata, ["cell_type", "sex", "donor"])
    message = error.value.args[0]
    assert "'sex'" in message and "'donor'" in message
    assert "'cell_type'" not in message.split("available")[0]
    assert message.endswith("available: cell_type, tissue, organism.")


# ---- describe_values: what a matrix holds ------------------------------------------------------


def test_describe_values_tells_counts_from_corrected_counts_and_normalized_values(counts_adata):
    counts = counts_adata.X
    assert describe_values(counts).kind == "counts"
    corrected = counts * 6.0
    corrected.data *= np.random.default_rng(0).uniform(0.6, 1.0, corrected.nnz).astype(np.float32)
    assert describe_values(corrected).kind == "corrected_counts"
    log_normalized = normalize_log10(counts_adata).X
    assert describe_values(log_normalized).kind == "normalized"
    # normalize_total without the log: large values, but every cell has the same total
    totals = np.asarray(corrected.sum(axis=1)).ravel()
    scaled_to_one_size = sp.csr_matrix(corrected.multiply(1e4 / totals[:, None]))
    assert describe_values(scaled_to_one_size).maximum > LOG_VALUES_BELOW
    assert describe_values(scaled_to_one_size).kind == "normalized"
    assert describe_values(log_normalized.toarray() - 1.0).kind == "scaled"
    damaged = counts.copy()
    damaged.data[0] = np.nan
    assert describe_values(damaged).kind == "damaged"


# ---- validate_input: the door ------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Observation names are not unique")
def test_the_door_leaves_its_input_as_it_was_and_shares_the_counts(counts_adata):
    adata = counts_adata.copy()
    adata.var_names = ["A B", *adata.var_names[1:]]
    adata.obs_names = ["c", *adata.obs_names[1:-1], "c"]
    before = (list(adata.var_names), list(adata.obs_names))
    validated, report = validate_input(adata)
    assert (list(adata.var_names), list(adata.obs_names)) == before
    assert validated.X is adata.X
    assert report == InputReport("X", 0, 0, 1, 0, 1)
    assert validated.uns["input_checks"] == dataclasses.asdict(report) and "input_checks" not in adata.uns
    assert input_check_metrics(validated) == {"non_integer_count_values": 0.0, "genes_only_in_raw": 0.0,
                                              "gene_names_with_whitespace": 1.0, "duplicated_gene_names": 0.0,
                                              "duplicated_cell_names": 1.0, "gene_names_differing_only_in_case": 0.0,
                                              "features_not_gene_expression": 0.0, "genes_not_in_raw": 0.0}
    assert input_check_metrics(counts_adata) == {}


def test_the_door_reads_backed_files_and_its_report_survives_the_h5ad(tmp_path, counts_adata):
    cellxgene = normalize_log10(counts_adata, counts_layer=None)
    cellxgene.raw = counts_adata
    cellxgene.write_h5ad(tmp_path / "raw.h5ad")
    backed = ad.read_h5ad(tmp_path / "raw.h5ad", backed="r")
    try:
        validated, report = validate_input(backed)
    finally:
        backed.file.close()
    assert report.counts_source == "raw" and (validated.X != counts_adata.X).nnz == 0
    validated.write_h5ad(tmp_path / "validated.h5ad")
    assert input_check_metrics(ad.read_h5ad(tmp_path / "validated.h5ad")) == report.metrics()


def test_the_door_names_the_settings_of_the_caller(counts_adata):
    normalized = normalize_log10(counts_adata, counts_layer=None)
    with pytest.raises(NotCountsError, match=r"set annotation\.counts_source to where they are"):
        validate_input(normalized, setting_prefix="annotation")
    with pytest.raises(InputError, match=r"annotation\.input_is_normalized is true, so \.X is used as it is, but "
                                         r"annotation\.counts_source is 'raw'"):
        validate_input(normalized, input_is_normalized=True, counts_source="raw", setting_prefix="annotation")


def test_nan_in_the_matrix_the_counts_come_from_is_refused_as_damage(counts_adata):
    adata = normalize_log10(counts_adata, counts_layer=None)
    adata.raw = counts_adata
    validate_input(adata)  # X is log-normalized, the counts are in .raw
    damaged = adata.raw.to_adata()
    damaged.X.data[:2] = np.nan
    adata.raw = damaged
    with pytest.raises(NotCountsError, match=r"\.raw\.X: NaN values"):  # auto finds no usable counts
        validate_input(adata)
    with pytest.raises(ValueError, match=r"\.raw\.X holds 2 NaN or infinite values"):
        validate_input(adata, counts_source="raw")


# ---- gene names as words of a sentence ---------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
def test_tidy_gene_names_makes_symbols_one_word_and_unique(caplog):
    var = pd.DataFrame({"gene_name": ["HES4 variant", "TP53", "HES4\tvariant", "BRAF"]}, index=ENSEMBL_IDS)
    with caplog.at_level(logging.WARNING):
        adata, n_whitespace, n_repeated, _ = tidy_gene_names(_adata(np.ones((1, 4)), var=var))
    assert list(adata.var_names) == ["HES4_variant", "TP53", "HES4_variant-1", "BRAF"]
    assert (n_whitespace, n_repeated) == (2, 1)
    assert "2 gene names held whitespace and were made one word of a cell sentence with '_' (e.g. 'HES4 variant' -> 'HES4_variant')" in caplog.text


# ---- the annotation path: new cells pass the same door ------------------------------------------


def _annotator_record(genes):
    from c2s_kedro.core.tasks.annotation import AnnotatorRecord

    qc = {"min_genes_per_cell": 5, "max_genes_per_cell": None, "min_cells_per_gene": 3, "min_counts_per_cell": None,
          "max_counts_per_cell": None, "max_pct_mito": None, "mito_prefix": "MT-"}
    return AnnotatorRecord(label_column="cell_type", labels=["B cell", "T cell"], genes=sorted(genes), qc=qc,
                           target_sum=None, sentence_layer=None, sentence_seed=1234, top_k_genes=None,
                           organism_column="organism", templates=["{cell_sentence}"])


@pytest.mark.filterwarnings("ignore:Observation names are not unique")
def test_cells_to_annotate_pass_the_door_the_training_cells_passed(counts_adata):
    """A CELLxGENE-style file with a gene name holding a space and repeated barcodes: the cells are
    processed from their counts, the gene matches the model's (training) name for it, and every
    cell keeps its own row."""
    from c2s_kedro.core.sentences.conversion import vocabulary_names
    from c2s_kedro.core.tasks.annotation import known_gene_sentences, prepare_cells

    training, _ = validate_input(_with_spaced_gene(counts_adata))
    record = _annotator_record(vocabulary_names(training.var_names))
    assert "HES4_VARIANT" in record.genes

    expected, _ = prepare_cells(_with_spaced_gene(counts_adata), record)
    new_cells = _with_spaced_gene(counts_adata)
    new_cells.obs_names = [*new_cells.obs_names[:-1], new_cells.obs_names[0]]  # a barcode repeated
    cellxgene = normalize_log10(new_cells, counts_layer=None)
    cellxgene.raw = new_cells
    cells, qc = prepare_cells(cellxgene, record)
    assert qc["input_cells"] == [*counts_adata.obs_names[:-1], f"{counts_adata.obs_names[0]}-1"]
    assert cells.uns["input_checks"]["counts_source"] == "raw"
    np.testing.assert_allclose(cells.X.toarray(), expected.X.toarray(), rtol=1e-6)
    sentences = known_gene_sentences(cells, record)
    assert sentences.n_genes_known == sentences.n_genes == counts_adata.n_vars
    assert any("HES4_VARIANT" in s.split() for s in sentences.sentences)
    assert not any("VARIANT" in s.split() for s in sentences.sentences)
    with pytest.raises(InputError, match=r"Set annotation\.accept_non_integer_counts to true"):
        corrected = new_cells.copy()
        corrected.X = corrected.X * 6.5
        prepare_cells(corrected, record)


def _with_spaced_gene(counts):
    adata = counts.copy()
    adata.var_names = [*adata.var_names[:-1], "HES4 variant"]
    return adata


# ---- features that are not genes, genes only .raw has ------------------------------------------


def test_antibody_features_are_dropped_and_counted_and_a_file_without_genes_is_refused(counts_adata, caplog):
    adata = counts_adata.copy()
    adata.var["feature_types"] = ["Antibody Capture"] * 3 + ["Gene Expression"] * (adata.n_vars - 3)
    with caplog.at_level(logging.WARNING):
        validated, report = validate_input(adata)
    assert validated.n_vars == adata.n_vars - 3 and list(validated.var_names) == list(adata.var_names[3:])
    assert report.features_not_gene_expression == 3
    assert input_check_metrics(validated)["features_not_gene_expression"] == 3.0
    assert "3 features that .var['feature_types'] does not mark 'Gene Expression' dropped (Antibody Capture: 3)" in caplog.text
    peaks = counts_adata.copy()
    peaks.var["feature_type"] = ["Peaks"] * 4 + ["Antibody Capture"] * (peaks.n_vars - 4)
    with pytest.raises(InputError, match=r"\.var\['feature_type'\] marks none of the .* features 'Gene Expression' \(Antibody Capture"):
        validate_input(peaks)
    biotypes = counts_adata.copy()  # a column of that name in another vocabulary is left alone
    biotypes.var["feature_type"] = ["protein_coding", "lncRNA"] * (biotypes.n_vars // 2) + ["protein_coding"] * (biotypes.n_vars % 2)
    assert validate_input(biotypes)[0].n_vars == counts_adata.n_vars


def test_ercc_spike_ins_are_dropped_and_counted_even_where_10x_marks_them_gene_expression(counts_adata, caplog):
    adata = counts_adata.copy()
    names = list(adata.var_names)
    names[:2] = ["ERCC-00002", "ERCC-00130"]
    adata.var_names = names
    adata.var["feature_types"] = "Gene Expression"
    with caplog.at_level(logging.WARNING):
        validated, report = validate_input(adata)
    assert list(validated.var_names) == names[2:] and report.features_not_gene_expression == 2
    assert "2 ERCC spike-in controls dropped (e.g. ERCC-00002)" in caplog.text


def test_counts_of_more_genes_in_raw_are_pointed_out_and_genes_raw_lacks_are_counted(counts_adata, caplog):
    variable_genes = counts_adata[:, :10].copy()  # .X subset to some genes, .raw with the counts of all
    variable_genes.raw = counts_adata
    with caplog.at_level(logging.WARNING):
        validated, report = validate_input(variable_genes, setting_prefix="annotation")
    assert report.counts_source == "X" and validated.n_vars == 10
    assert (f".raw holds counts of {counts_adata.n_vars - 10} more genes than .X (10); set annotation.counts_source: raw "
            "to use them") in caplog.text
    caplog.clear()
    normalized = normalize_log10(counts_adata, counts_layer=None)  # log-normalized .X, counts of half the genes in .raw
    normalized.raw = counts_adata[:, ::2].copy()
    with caplog.at_level(logging.WARNING):
        validated, report = validate_input(normalized)
    n_dropped = counts_adata.n_vars - counts_adata[:, ::2].n_vars
    assert report.counts_source == "raw" and report.genes_not_in_raw == n_dropped
    assert f"{n_dropped} of .X's {counts_adata.n_vars} genes are not in .raw and are dropped" in caplog.text


def test_float16_counts_above_2048_are_pointed_out(counts_adata, caplog):
    adata = counts_adata.copy()
    dense = adata.X.toarray().astype(np.float16)
    dense[0, 0] = 4001  # stored as 4000
    adata.X = dense
    with caplog.at_level(logging.WARNING):
        validate_input(adata)
    assert "stored as float16, which rounds integers above 2048: 1 values are above it" in caplog.text
