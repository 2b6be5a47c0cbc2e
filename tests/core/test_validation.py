import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from c2s_kedro.core.validation import (
    NotCountsError,
    check_raw_counts,
    make_gene_names_unique,
    require_obs_columns,
    use_gene_symbols,
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
    import c2s_kedro.core.validation as validation

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
