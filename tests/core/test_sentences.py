import logging
import os

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import scipy.sparse as sp
from datasets import Dataset, Features, Value

from c2s_kedro.core.sentences.conversion import (
    cell_sentences_from_adata,
    concatenate_sentence_datasets,
    has_label,
    select_cells,
)
from c2s_kedro.core.sentences.rank_fit import RankFit, fit_rank_expression, reconstruct_expression


def _adata(matrix, gene_names=None, obs=None) -> ad.AnnData:
    n_obs, n_vars = matrix.shape
    genes = gene_names or [f"G{i:02d}" for i in range(n_vars)]
    obs = obs if obs is not None else pd.DataFrame(index=[f"c{i}" for i in range(n_obs)])
    return ad.AnnData(X=matrix, obs=obs, var=pd.DataFrame(index=genes))


def _column(dataset: Dataset, name: str) -> list:
    return dataset.data.column(name).to_pylist()


def _sentences(result) -> list[str]:
    return _column(result.sentences, "cell_sentence")


def _tied_matrix(seed=0, n_cells=50, n_genes=30) -> np.ndarray:
    """Values from a small set (many ties within a cell) plus some unique floats; 50% zeros."""
    rng = np.random.default_rng(seed)
    values = rng.choice(np.array([0.5, 1.0, 1.75, 2.25], dtype=np.float32), size=(n_cells, n_genes))
    unique = rng.random((n_cells, n_genes)).astype(np.float32) * 3
    matrix = np.where(rng.random((n_cells, n_genes)) < 0.3, unique, values)
    matrix[rng.random((n_cells, n_genes)) < 0.5] = 0
    return matrix.astype(np.float32)


# ---- ranking -----------------------------------------------------------------------------------


def test_sentences_list_expressed_genes_by_descending_value():
    dense = _tied_matrix()
    adata = _adata(sp.csr_matrix(dense))
    index = {name: i for i, name in enumerate(adata.var_names)}
    result = cell_sentences_from_adata(adata, seed=5, chunk_size=16)
    sentences = _sentences(result)
    assert len(sentences) == adata.n_obs
    for row, sentence in zip(dense, sentences):
        genes = np.array([index[word] for word in sentence.split(" ")]) if sentence else np.array([], int)
        values = row[genes]
        assert np.all(np.diff(values) <= 0), "values along a sentence must not increase"
        assert np.array_equal(values, np.sort(row[row > 0])[::-1])
        # Reference: a plain argsort; the set of genes at each distinct value must coincide.
        reference = np.argsort(-row, kind="stable")[: np.count_nonzero(row)]
        for value in np.unique(row[row > 0]):
            assert set(genes[values == value]) == set(reference[row[reference] == value])


def _reversed_rows(matrix: sp.csr_matrix) -> sp.csr_matrix:
    """The same values with each row's entries stored in reverse order (unsorted indices)."""
    indices, data = matrix.indices.copy(), matrix.data.copy()
    for row in range(matrix.shape[0]):
        start, end = matrix.indptr[row], matrix.indptr[row + 1]
        indices[start:end], data[start:end] = indices[start:end][::-1], data[start:end][::-1]
    return sp.csr_matrix((data, indices, matrix.indptr.copy()), shape=matrix.shape)


def test_the_same_values_give_the_same_sentences_however_they_are_stored():
    dense = _tied_matrix(n_cells=40, n_genes=60)  # many ties: their order came from the storage order
    csr = sp.csr_matrix(dense)
    reversed_rows = _reversed_rows(csr)
    shuffled = csr.copy()
    rng = np.random.default_rng(1)
    for row in range(shuffled.shape[0]):  # each row's entries in a random order
        start, end = shuffled.indptr[row], shuffled.indptr[row + 1]
        order = rng.permutation(end - start) + start
        shuffled.indices[start:end], shuffled.data[start:end] = shuffled.indices[order], shuffled.data[order]
    shuffled.has_sorted_indices = False
    expected = _sentences(cell_sentences_from_adata(_adata(csr), seed=4, chunk_size=16))
    for stored in (reversed_rows, shuffled, sp.csc_matrix(dense), dense, dense.astype(np.float64)):
        before = stored.copy()
        assert _sentences(cell_sentences_from_adata(_adata(stored), seed=4, chunk_size=16)) == expected
        if sp.issparse(stored):  # the caller's matrix is not sorted in place
            assert np.array_equal(stored.indices, before.indices)
    assert not reversed_rows.has_sorted_indices


def test_same_seed_same_sentences_and_other_seed_reorders_ties():
    adata = _adata(sp.csr_matrix(np.ones((30, 50), dtype=np.float32)))
    first = _sentences(cell_sentences_from_adata(adata, seed=11))
    again = _sentences(cell_sentences_from_adata(adata, seed=11))
    other = _sentences(cell_sentences_from_adata(adata, seed=12))
    assert first == again
    assert first != other
    var_order = " ".join(adata.var_names)
    # Ties are shuffled per cell, not left in var order nor in one fixed order for every cell.
    assert sum(sentence == var_order for sentence in first) == 0
    assert len(set(first)) == len(first)
    assert all(sorted(s.split(" ")) == sorted(adata.var_names) for s in first + other)


def test_chunking_does_not_change_sentences_without_ties():
    rng = np.random.default_rng(1)
    dense = rng.random((23, 17)).astype(np.float32)
    dense[dense < 0.4] = 0
    adata = _adata(sp.csr_matrix(dense))
    small_chunks = _sentences(cell_sentences_from_adata(adata, chunk_size=5))
    one_chunk = _sentences(cell_sentences_from_adata(adata, chunk_size=1000))
    assert small_chunks == one_chunk
    expected = [
        " ".join(adata.var_names[np.argsort(-row)[: np.count_nonzero(row)]]) for row in dense
    ]
    assert small_chunks == expected


def test_float64_values_closer_than_float32_precision_keep_their_order():
    values = 1.0 + np.arange(8) * 1e-9  # distinct in float64, equal in float32
    row = np.random.default_rng(0).permutation(values)
    adata = _adata(sp.csr_matrix(row[None, :].astype(np.float64)))
    expected = " ".join(adata.var_names[np.argsort(-row)])
    for seed in range(5):
        assert _sentences(cell_sentences_from_adata(adata, seed=seed)) == [expected]


# ---- zeros, empty cells, bad values ------------------------------------------------------------


def test_stored_zeros_never_appear_and_empty_cells_are_counted(caplog):
    # Row 0: G1=2, G0 and G3 stored as explicit zeros; row 1: nothing stored; row 2: only an
    # explicit zero; row 3: G2=1, G0=3.
    data = np.array([0.0, 2.0, 0.0, 0.0, 3.0, 1.0], dtype=np.float32)
    indices = np.array([0, 1, 3, 2, 0, 2])
    indptr = np.array([0, 3, 3, 4, 6])
    matrix = sp.csr_matrix((data, indices, indptr), shape=(4, 4))
    assert matrix.nnz == 6
    adata = _adata(matrix)
    with caplog.at_level(logging.WARNING):
        result = cell_sentences_from_adata(adata)
    assert _sentences(result) == ["G01", "", "", "G00 G02"]
    assert result.n_empty_cells == 2
    assert result.vocabulary == {"G00": 1, "G01": 1, "G02": 1, "G03": 0}
    assert any("2 of 4 cells" in record.getMessage() for record in caplog.records)


def test_no_warning_without_empty_cells(caplog):
    adata = _adata(sp.csr_matrix(np.ones((3, 2), dtype=np.float32)))
    with caplog.at_level(logging.WARNING):
        result = cell_sentences_from_adata(adata)
    assert result.n_empty_cells == 0
    assert not [r for r in caplog.records if "empty cell sentence" in r.getMessage()]


@pytest.mark.parametrize("bad", [-0.5, np.nan])
@pytest.mark.parametrize("sparse", [True, False])
def test_negative_or_nan_values_are_refused_as_scaled_data(bad, sparse):
    dense = np.ones((4, 3), dtype=np.float32)
    dense[2, 1] = bad
    adata = _adata(sp.csr_matrix(dense) if sparse else dense)
    with pytest.raises(ValueError, match="scaled data"):
        cell_sentences_from_adata(adata)


# ---- names, vocabulary, labels -----------------------------------------------------------------


def test_gene_names_upper_cased_and_vocabulary_counts_cells_in_var_order():
    dense = np.array(
        [[0, 1, 2, 0], [3, 0, 1, 0], [1, 1, 1, 0], [0, 0, 5, 0], [2, 0, 0, 0]], dtype=np.float32
    )
    names = ["cd3e", "Ms4a1", "GAPDH", "mt-co1"]
    result = cell_sentences_from_adata(_adata(sp.csr_matrix(dense), gene_names=names))
    assert list(result.vocabulary) == ["CD3E", "MS4A1", "GAPDH", "MT-CO1"]
    assert list(result.vocabulary.values()) == (dense > 0).sum(axis=0).tolist()
    words = {word for sentence in _sentences(result) for word in sentence.split()}
    assert words == {"CD3E", "MS4A1", "GAPDH"}
    assert _sentences(result)[3] == "GAPDH"


def test_names_equal_once_upper_cased_are_one_word_per_gene(caplog):
    dense = np.array([[1, 0, 1], [2, 2, 0], [0, 1, 0]], dtype=np.float32)
    names = ["Cd3e", "CD3E", "X"]
    with caplog.at_level(logging.WARNING):
        result = cell_sentences_from_adata(_adata(sp.csr_matrix(dense), gene_names=names))
    assert result.vocabulary == {"CD3E": 2, "CD3E-1": 2, "X": 1}
    sentences = _sentences(result)
    assert sorted(sentences[1].split()) == ["CD3E", "CD3E-1"]  # never "CD3E CD3E"
    assert all(len(s.split()) == len(set(s.split())) for s in sentences)
    assert "1 gene names coincide with another once upper-cased: each is its own word with a numeric suffix" in caplog.text
    # reconstruction reads the words with the same mapping: each gene back in its own column
    fit = RankFit(slope=-1.0, intercept=2.0, r2=1, pearson_r=1, spearman_r=1, n_cells=1, n_points=1, log_rank_cutoff=3)
    matrix, n_unknown = reconstruct_expression(sentences, names, fit)
    assert n_unknown == 0 and np.array_equal(matrix.toarray() > 0, dense > 0)


def test_label_columns_copied_as_strings():
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(["T", "B", "T"]),
            "batch": [1, 2, 3],
            "donor": ["d1", np.nan, "d3"],
        },
        index=["a", "b", "c"],
    )
    adata = _adata(sp.csr_matrix(np.ones((3, 2), dtype=np.float32)), obs=obs)
    result = cell_sentences_from_adata(adata, label_columns=["cell_type", "batch", "donor"])
    dataset = result.sentences
    assert dataset.column_names == ["cell_name", "cell_sentence", "cell_type", "batch", "donor"]
    assert _column(dataset, "cell_name") == ["a", "b", "c"]
    assert _column(dataset, "cell_type") == ["T", "B", "T"]
    assert _column(dataset, "batch") == ["1", "2", "3"]
    assert _column(dataset, "donor") == ["d1", None, "d3"]
    assert all(dataset.features[c] == Value("string") for c in ["cell_type", "batch", "donor"])


def test_has_label_is_false_for_every_form_a_missing_label_takes():
    values = ["T cell", None, np.nan, pd.NA, "", "  ", "nan", "NaN", "None", "<NA>", "Unassigned", "unassigned ",
              "B cell", "Nancy", 0, "Unassigned B cell"]
    assert has_label(values).tolist() == [True] + [False] * 11 + [True, True, True, True]
    categorical = pd.Series(pd.Categorical(["T", None, "nan", "B"]))  # "nan": a str() of a missing value saved as a category
    assert has_label(categorical).tolist() == [True, False, False, True]
    assert has_label(pd.Series([1.5, np.nan])).tolist() == [True, False]


def test_missing_labels_are_stored_as_nulls_never_as_the_text_of_a_missing_value(caplog):
    # as real files hold them: NaN in a categorical, and the strings a str() of a missing value makes
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(["T", None, "nan", "B", "T"]),
            "donor": ["d1", "", "None", np.nan, "d2"],
        },
        index=list("abcde"),
    )
    adata = _adata(sp.csr_matrix(np.ones((5, 2), dtype=np.float32)), obs=obs)
    with caplog.at_level(logging.WARNING):
        dataset = cell_sentences_from_adata(adata, label_columns=["cell_type", "donor"]).sentences
    assert _column(dataset, "cell_type") == ["T", None, None, "B", "T"]
    assert _column(dataset, "donor") == ["d1", None, None, None, "d2"]
    assert len(_column(dataset, "cell_sentence")) == 5 and all(_column(dataset, "cell_sentence"))  # every cell converted
    assert "2 of 5 cells have no 'cell_type' label" in caplog.text and "3 of 5 cells have no 'donor' label" in caplog.text


def test_labels_spelled_several_ways_are_one_label_in_the_sentences(caplog):
    # as concatenated downloads write them: a trailing space, another letter case
    cell_type = ["CD14+ Monocyte"] * 4 + ["CD14+ Monocyte "] * 2 + ["cd14+ monocyte"] * 3 + [" B cell", "b cell", None]
    obs = pd.DataFrame({"cell_type": pd.Categorical(cell_type)}, index=[f"c{i}" for i in range(12)])
    adata = _adata(sp.csr_matrix(np.ones((12, 2), dtype=np.float32)), obs=obs)
    with caplog.at_level(logging.WARNING):
        result = cell_sentences_from_adata(adata, label_columns=["cell_type"])
    assert _column(result.sentences, "cell_type") == ["CD14+ Monocyte"] * 9 + ["B cell", "B cell", None]
    # 3 cells respelled from 'cd14+ monocyte', 1 from 'b cell' (a tie with 'B cell': sort order); 3 stripped
    assert result.label_spellings == {"n_cells_label_stripped[cell_type]": 3.0, "n_cells_relabelled[cell_type]": 4.0}
    assert "3 cells' 'cell_type' labels had surrounding whitespace: removed" in caplog.text
    assert ("'cell_type' labels equal apart from letter case, whitespace or a trailing period made one (the spelling most cells have): "
            "'b cell' -> 'B cell'; 'cd14+ monocyte' -> 'CD14+ Monocyte'; 4 cells relabelled") in caplog.text


def test_a_tab_a_non_breaking_space_or_another_unicode_form_inside_a_label_is_the_same_label():
    # "Müller glia" typed precomposed and as u + combining diaeresis print the same; a tab inside a
    # label was one unknown token to the gene-level tokenizer, so two such labels could never be told apart
    cell_type = ["M\u00fcller glia"] * 3 + ["Mu\u0308ller glia"] * 2 + ["CD19+\tB"] * 2 + ["CD8+\u00a0Cytotoxic  T"] * 2
    obs = pd.DataFrame({"cell_type": cell_type}, index=[f"c{i}" for i in range(9)])
    adata = _adata(sp.csr_matrix(np.ones((9, 2), dtype=np.float32)), obs=obs)
    result = cell_sentences_from_adata(adata, label_columns=["cell_type"])
    assert _column(result.sentences, "cell_type") == ["M\u00fcller glia"] * 5 + ["CD19+ B"] * 2 + ["CD8+ Cytotoxic T"] * 2
    assert result.label_spellings["n_cells_label_stripped[cell_type]"] == 6.0


def test_a_label_ending_in_a_period_is_one_label_with_its_periodless_spelling_and_answers_name_it():
    from c2s_kedro.core.models.inference import match_answer

    obs = pd.DataFrame({"cell_type": ["Fibroblasts"] * 3 + ["Fibroblasts."] * 2 + ["Mono."] * 2},
                       index=[f"c{i}" for i in range(7)])
    result = cell_sentences_from_adata(_adata(sp.csr_matrix(np.ones((7, 2), dtype=np.float32)), obs=obs), label_columns=["cell_type"])
    assert _column(result.sentences, "cell_type") == ["Fibroblasts"] * 5 + ["Mono."] * 2
    # a model answers a label followed by the period that ends every answer
    assert match_answer(" Mono..", ["Mono.", "T cell"]) == "Mono." and match_answer(" T cell.", ["Mono.", "T cell"]) == "T cell"
    assert match_answer("Mono.", ["Mono.", "T cell"]) == "Mono."  # an answer that stopped before its period


def test_unassigned_is_no_label(caplog):
    # Azimuth and data portals write "Unassigned" for cells they could not label: the annotation's own answer
    obs = pd.DataFrame({"cell_type": pd.Categorical(["T", "Unassigned", "unassigned", "B"])}, index=list("abcd"))
    adata = _adata(sp.csr_matrix(np.ones((4, 2), dtype=np.float32)), obs=obs)
    with caplog.at_level(logging.WARNING):
        result = cell_sentences_from_adata(adata, label_columns=["cell_type"])
    assert _column(result.sentences, "cell_type") == ["T", None, None, "B"]
    assert "2 of 4 cells have no 'cell_type' label (missing, empty, or the text 'nan', 'None', 'NaT', '<NA>' or 'Unassigned')" in caplog.text


def test_select_cells_by_unique_name_and_refuses_a_name_of_several_rows():
    cells = Dataset.from_dict({"cell_name": ["a", "b", "c", "d"], "cell_sentence": ["X", "Y", "Z", "W"]})
    assert select_cells(cells, ["d", "b", "zz"])["cell_name"] == ["b", "d"]  # dataset order
    repeated = Dataset.from_dict({"cell_name": ["a", "b", "a"], "cell_sentence": ["X train", "Y", "X test"]})
    assert select_cells(repeated, ["b"])["cell_sentence"] == ["Y"]
    with pytest.raises(ValueError, match=r"1 cell names occur more than once in the cell sentences \(e\.g\. a\)"):
        select_cells(repeated, ["a"])


def test_missing_label_column_names_it_and_the_available_ones():
    obs = pd.DataFrame({"cell_type": ["T", "B"], "tissue": ["x", "y"]}, index=["a", "b"])
    adata = _adata(sp.csr_matrix(np.ones((2, 2), dtype=np.float32)), obs=obs)
    with pytest.raises(KeyError) as error:
        cell_sentences_from_adata(adata, label_columns=["cell_type", "sex"])
    message = error.value.args[0]
    assert "'sex'" in message
    assert "cell_type" in message and "tissue" in message


def test_label_column_named_cell_sentence_is_refused():
    obs = pd.DataFrame({"cell_sentence": ["x", "y"]}, index=["a", "b"])
    adata = _adata(sp.csr_matrix(np.ones((2, 2), dtype=np.float32)), obs=obs)
    with pytest.raises(ValueError, match="cell_sentence"):
        cell_sentences_from_adata(adata, label_columns=["cell_sentence"])


# ---- storage variants --------------------------------------------------------------------------


@pytest.mark.parametrize("sparse", [True, False])
def test_backed_h5ad_converts_like_in_memory(tmp_path, counts_adata, sparse):
    if not sparse:
        counts_adata.X = counts_adata.X.toarray()
    path = tmp_path / "cells.h5ad"
    counts_adata.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    try:
        assert backed.isbacked
        kwargs = dict(label_columns=["cell_type", "tissue"], seed=3, chunk_size=7)
        from_disk = cell_sentences_from_adata(backed, **kwargs)
        in_memory = cell_sentences_from_adata(counts_adata, **kwargs)
    finally:
        backed.file.close()
    assert from_disk.sentences.to_dict() == in_memory.sentences.to_dict()
    assert from_disk.vocabulary == in_memory.vocabulary
    assert from_disk.sentences.num_rows == counts_adata.n_obs


def test_dense_matrix_converts_like_sparse(counts_adata):
    dense = counts_adata.copy()
    dense.X = counts_adata.X.toarray()
    kwargs = dict(label_columns=["cell_type"], seed=9, chunk_size=13)
    from_dense = cell_sentences_from_adata(dense, **kwargs)
    from_sparse = cell_sentences_from_adata(counts_adata, **kwargs)
    assert from_dense.sentences.to_dict() == from_sparse.sentences.to_dict()
    assert from_dense.vocabulary == from_sparse.vocabulary


def test_layer_is_ranked_instead_of_x_and_missing_layer_is_named():
    adata = _adata(sp.csr_matrix(np.array([[1, 2]], dtype=np.float32)))
    adata.layers["other"] = sp.csr_matrix(np.array([[2, 1]], dtype=np.float32))
    assert _sentences(cell_sentences_from_adata(adata)) == ["G01 G00"]
    assert _sentences(cell_sentences_from_adata(adata, layer="other")) == ["G00 G01"]
    with pytest.raises(KeyError, match="'absent'"):
        cell_sentences_from_adata(adata, layer="absent")


# ---- concatenation -----------------------------------------------------------------------------


def _string_dataset(columns: dict[str, list]) -> Dataset:
    return Dataset.from_dict(columns, features=Features({c: Value("string") for c in columns}))


def test_concatenate_merges_vocabularies_and_tags_sources():
    first = _string_dataset({"cell_name": ["a1", "a2"], "cell_sentence": ["X Y", "Y"], "cell_type": ["T", "B"]})
    second = _string_dataset(
        {"cell_name": ["b1"], "cell_sentence": ["Z Y"], "cell_type": ["NK"], "tissue": ["lung"]}
    )
    dataset, vocabulary = concatenate_sentence_datasets(
        [("first", first, {"X": 1, "Y": 2}), ("second", second, {"Y": 1, "Z": 1, "W": 0})]
    )
    assert vocabulary == {"X": 1, "Y": 3, "Z": 1, "W": 0}
    assert list(vocabulary) == ["X", "Y", "Z", "W"]
    assert dataset.num_rows == 3
    assert _column(dataset, "source_dataset") == ["first", "first", "second"]
    assert _column(dataset, "cell_name") == ["a1", "a2", "b1"]
    assert _column(dataset, "tissue") == [None, None, "lung"]
    assert _column(dataset, "cell_type") == ["T", "B", "NK"]


def test_concatenate_refuses_nothing():
    with pytest.raises(ValueError):
        concatenate_sentence_datasets([])


# ---- rank fit and reconstruction ---------------------------------------------------------------


def test_fit_rank_expression_recovers_exact_line_and_ignores_points_beyond_cutoff():
    ranks = np.tile(np.arange(100), 3)
    log_rank = np.log10(1.0 + ranks)
    expression = 2.5 - 0.8 * log_rank
    beyond = log_rank >= 1.5
    expression[beyond] = 7.0  # would wreck the fit if used
    fit = fit_rank_expression(log_rank, expression, n_cells=3, log_rank_cutoff=1.5)
    assert fit.slope == pytest.approx(-0.8)
    assert fit.intercept == pytest.approx(2.5)
    # R2, Pearson and Spearman are over every point, as the reference reports them: the points
    # beyond the cut-off are off the line, so the scores are below a perfect fit
    predicted = 2.5 - 0.8 * log_rank
    r2 = 1 - ((expression - predicted) ** 2).sum() / ((expression - expression.mean()) ** 2).sum()
    assert fit.r2 == pytest.approx(r2) and fit.r2 < 0.5
    assert fit.pearson_r == pytest.approx(float(np.corrcoef(log_rank, expression)[0, 1]))
    inside = fit_rank_expression(log_rank[~beyond], expression[~beyond], n_cells=3, log_rank_cutoff=1.5)
    assert inside.r2 == pytest.approx(1.0) and inside.pearson_r == pytest.approx(-1.0) and inside.spearman_r == pytest.approx(-1.0)
    # log10(1 + r) < 1.5 for r = 0..30: 31 points per cell.
    assert fit.n_points == 3 * 31
    assert fit.n_cells == 3
    assert fit.log_rank_cutoff == 1.5


@pytest.mark.parametrize(
    "log_rank, expression",
    [
        (np.array([0.0, 0.3]), np.array([1.0, 0.5])),  # two points
        (np.zeros(10), np.ones(10)),  # a single distinct rank
        (np.array([3.0, 3.5, 4.0, 4.2]), np.ones(4)),  # nothing below the cut-off
    ],
)
def test_fit_rank_expression_refuses_too_few_points(log_rank, expression):
    with pytest.raises(ValueError, match="too few"):
        fit_rank_expression(log_rank, expression, n_cells=1, log_rank_cutoff=3.0)


def _fit(slope=-1.0, intercept=3.0) -> RankFit:
    return RankFit(slope, intercept, 1.0, -1.0, -1.0, 1, 10, 3.0)


def _at(position, slope=-1.0, intercept=3.0) -> float:
    return intercept + slope * np.log10(1.0 + position)


def test_reconstruct_expression_from_hand_made_sentences():
    genes = ["a", "b", "c", "d", "e"]  # sentences hold upper-case names
    sentences = ["C A E", "B", "", "A X B A"]
    matrix, n_unknown = reconstruct_expression(sentences, genes, _fit())
    expected = np.zeros((4, 5))
    expected[0, [2, 0, 4]] = [_at(0), _at(1), _at(2)]
    expected[1, 1] = _at(0)
    # Row 3: A first at 0 (its repeat at 3 ignored); X unknown, skipped; B keeps position 2.
    expected[3, 0] = _at(0)
    expected[3, 1] = _at(2)
    assert matrix.shape == (4, 5)
    np.testing.assert_allclose(matrix.toarray(), expected, rtol=1e-6)
    assert n_unknown == 1


def test_reconstruct_top_k_sentence_gives_zeros_beyond_k():
    genes = [f"g{i}" for i in range(6)]
    full = "G5 G3 G1 G0 G2 G4"
    truncated = " ".join(full.split()[:2])
    matrix, n_unknown = reconstruct_expression([full, truncated], genes, _fit(slope=-0.5))
    rebuilt = matrix.toarray()
    assert n_unknown == 0
    assert np.all(rebuilt[0] > 0)
    np.testing.assert_allclose(rebuilt[1, [5, 3]], [_at(0, -0.5), _at(1, -0.5)], rtol=1e-6)
    assert np.all(rebuilt[1, [0, 1, 2, 4]] == 0)


def test_reconstruct_cuts_each_sentence_to_its_own_top_k_across_batches(monkeypatch):
    import c2s_kedro.core.sentences.rank_fit as sentences_module

    monkeypatch.setattr(sentences_module, "RECONSTRUCTION_BATCH", 2)  # the cut follows each batch's sentences
    genes = [f"g{i}" for i in range(6)]
    sentences = ["G5 G3 G1 G0 G2 G4", "G0 G1 G2", "G4 G2 G0 G1", "G3 G2", None]
    kept = [2, 3, 1, 0, 4]
    matrix, _ = reconstruct_expression(sentences, genes, _fit(slope=-0.5), top_k=kept)
    cut = [" ".join((s or "").split()[:k]) for s, k in zip(sentences, kept)]
    expected, _ = reconstruct_expression(cut, genes, _fit(slope=-0.5))
    np.testing.assert_allclose(matrix.toarray(), expected.toarray(), rtol=1e-6)
    assert (matrix.getnnz(axis=1) == [2, 3, 1, 0, 0]).all()
    with pytest.raises(ValueError, match="2 values of top_k for 5 sentences"):
        reconstruct_expression(sentences, genes, _fit(), top_k=[1, 2])


def test_reconstruct_accepts_arrow_column_and_null_sentence():
    column = pa.chunked_array([pa.array(["B A", None], pa.string())])
    matrix, n_unknown = reconstruct_expression(column, ["A", "B"], _fit())
    np.testing.assert_allclose(matrix.toarray(), [[_at(1), _at(0)], [0, 0]], rtol=1e-6)
    assert n_unknown == 0


def test_rank_fit_prediction_is_floored_at_zero():
    # 0.5 - log10(1 + 9) = -0.5: expression cannot be negative.
    matrix, _ = reconstruct_expression([" ".join(f"G{i}" for i in range(10))], [f"G{i}" for i in range(10)], _fit(intercept=0.5))
    rebuilt = matrix.toarray()[0]
    assert rebuilt[0] == pytest.approx(0.5)
    assert rebuilt[9] == 0.0
    assert np.all(rebuilt >= 0)


@pytest.mark.parametrize("longest", [3, 15, 16, 40])
def test_sentences_are_exact_for_short_and_long_gene_names(longest):
    """Names are copied a 64-bit word at a time; every name length must come out exact."""
    import anndata as ad
    import scipy.sparse as sp

    from c2s_kedro.core.sentences.conversion import cell_sentences_from_adata

    rng = np.random.default_rng(longest)
    n_cells, n_genes = 37, 23
    names = [("G" * int(rng.integers(1, longest + 1)))[:-1] + f"{i}"[-1] + chr(65 + i % 26) for i in range(n_genes)]
    names = [f"{name}{i}" for i, name in enumerate(names)]
    dense = rng.integers(0, 4, size=(n_cells, n_genes)).astype(np.float32) * rng.random((n_cells, 1)).astype(np.float32)
    adata = ad.AnnData(sp.csr_matrix(dense))
    adata.var_names = names
    result = cell_sentences_from_adata(adata, seed=3)
    for row, sentence in zip(dense, result.sentences["cell_sentence"]):
        words = sentence.split(" ") if sentence else []
        expressed = {names[g].upper(): row[g] for g in np.flatnonzero(row)}
        assert sorted(words) == sorted(expressed)
        values = [expressed[w] for w in words]
        assert values == sorted(values, reverse=True)


def test_reconstruct_expression_in_batches_of_sentences_equals_one_pass(monkeypatch):
    from c2s_kedro.core.sentences import rank_fit as module

    rng = np.random.default_rng(0)
    genes = [f"G{i}" for i in range(40)]
    texts = [" ".join(rng.choice(genes + ["NOT_A_GENE"], size=rng.integers(0, 30))) for _ in range(50)] + [""]
    whole, unknown = reconstruct_expression(texts, genes, _fit(), top_k=12)
    monkeypatch.setattr(module, "RECONSTRUCTION_BATCH", 7)
    batched, batched_unknown = reconstruct_expression(texts, genes, _fit(), top_k=12)
    assert batched.shape == whole.shape == (51, 40) and (batched != whole).nnz == 0
    assert batched_unknown == unknown > 0


def test_the_default_cache_directory_is_removed_when_the_process_ends(tmp_path):
    """Without ``cache_dir`` the Arrow files go to a new temporary directory: it exists while the
    dataset is in use and is gone once the process has ended (it used to stay in /tmp for good)."""
    import subprocess
    import sys

    code = (
        "import os, numpy as np, anndata as ad, scipy.sparse as sp\n"
        "from c2s_kedro.core.sentences.conversion import cell_sentences_from_adata\n"
        "adata = ad.AnnData(sp.csr_matrix(np.array([[1.0, 2.0, 0.0], [0.0, 3.0, 1.0]], dtype=np.float32)))\n"
        "result = cell_sentences_from_adata(adata)\n"
        "directory = os.path.dirname(result.sentences.cache_files[0]['filename'])\n"
        "assert os.path.isdir(directory) and result.sentences['cell_sentence'] == ['1 0', '1 2']\n"
        "print(directory)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TMPDIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    directory = done.stdout.strip().splitlines()[-1]
    assert directory.startswith(str(tmp_path)) and not os.path.exists(directory)


def test_rank_points_of_a_view_are_those_of_its_copy():
    """The rank fit samples cells of split parts (a view): the sampled rows are read from the view
    without materializing all of it, with the same points as from a copy."""
    from c2s_kedro.core.sentences.rank_fit import rank_expression_points

    rng = np.random.default_rng(0)
    adata = ad.AnnData(sp.random(60, 25, density=0.3, random_state=1, format="csr", dtype=np.float32))
    view = adata[rng.permutation(60)[:40]]
    assert view.is_view
    for got, expected in zip(rank_expression_points(view, 10, seed=3), rank_expression_points(view.copy(), 10, seed=3)):
        np.testing.assert_array_equal(got, expected)
