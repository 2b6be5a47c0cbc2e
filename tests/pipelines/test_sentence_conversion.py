import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from datasets import Dataset

from c2s_kedro.core.data.preprocessing import normalize_log10
from c2s_kedro.pipelines.sentence_conversion import create_pipeline
from c2s_kedro.pipelines.sentence_conversion.nodes import convert_to_cell_sentences, split_dataset, summarize_sentences
from tests.helpers import load_parameters, params_entries, run_pipeline


def _column(dataset: Dataset, name: str) -> list:
    return dataset.data.column(name).to_pylist()


@pytest.fixture
def params():
    return load_parameters("sentence_conversion")


@pytest.fixture
def processed(counts_adata):
    return normalize_log10(counts_adata)


def test_convert_one_adata(processed, params):
    sentences, vocabulary, _ = convert_to_cell_sentences(processed, params["sentence_conversion"])
    assert sentences.column_names == ["cell_name", "cell_sentence", "cell_type", "tissue", "organism"]
    assert _column(sentences, "cell_name") == list(processed.obs_names)
    assert _column(sentences, "cell_type") == list(processed.obs["cell_type"].astype(str))
    expressed = (processed.X.toarray() > 0).sum(axis=0)
    assert vocabulary == dict(zip(processed.var_names.str.upper(), expressed.tolist()))
    lengths = [len(s.split()) for s in _column(sentences, "cell_sentence")]
    assert lengths == (processed.X.toarray() > 0).sum(axis=1).tolist()


def test_convert_names_a_missing_label_column_and_the_setting(processed, params):
    section = {**params["sentence_conversion"], "label_columns": ["cell_type", "batch_condition"]}
    with pytest.raises(KeyError) as error:
        convert_to_cell_sentences(processed, section)
    message = error.value.args[0]
    assert "'batch_condition'" in message
    assert "sentence_conversion.label_columns" in message
    assert "conf/base/parameters_sentence_conversion.yml" in message


def test_convert_a_partitioned_dict_concatenates_and_merges_vocabularies(processed, params):
    # As a PartitionedDataset gives them: a dict of loaders, here in non-sorted order, with
    # partly different genes.
    second = processed[:10, 5:].copy()
    second.obs_names = [f"other_{i}" for i in range(second.n_obs)]
    first = processed[:20].copy()
    parts = {"part_b": lambda: second, "part_a": first}
    sentences, vocabulary, _ = convert_to_cell_sentences(parts, params["sentence_conversion"])
    assert sentences.num_rows == 30
    assert _column(sentences, "source_dataset") == ["part_a"] * 20 + ["part_b"] * 10
    assert _column(sentences, "cell_name") == list(first.obs_names) + list(second.obs_names)
    assert "cell_type" in sentences.column_names
    expected: dict[str, int] = {}
    for adata in (first, second):
        for gene, count in zip(adata.var_names.str.upper(), (adata.X.toarray() > 0).sum(axis=0)):
            expected[gene] = expected.get(gene, 0) + int(count)
    assert vocabulary == expected
    assert list(vocabulary) == list(first.var_names.str.upper())


def test_summarize_sentences():
    dataset = Dataset.from_dict({"cell_name": ["a", "b", "c", "d"], "cell_sentence": ["A B C", "", "B", "C A"]})
    summary = summarize_sentences(dataset, {"A": 2, "B": 2, "C": 2, "D": 0})
    assert summary == {
        "n_cells": 4.0,
        "n_genes_in_vocabulary": 4.0,
        "n_genes_expressed_somewhere": 3.0,
        "mean_genes_per_sentence": 1.5,
        "median_genes_per_sentence": 1.5,
        "n_empty_sentences": 1.0,
    }
    assert summarize_sentences(dataset, {"A": 2}, {"n_cells_relabelled[cell_type]": 3})["n_cells_relabelled[cell_type]"] == 3.0


def test_summarize_sentences_of_a_filtered_dataset():
    dataset = Dataset.from_dict({"cell_name": ["a", "b", "c"], "cell_sentence": ["A B", "", "C"]})
    non_empty = dataset.filter(lambda row: row["cell_sentence"] != "")
    summary = summarize_sentences(non_empty, {"A": 1, "B": 1, "C": 1})
    assert summary["n_cells"] == 2.0
    assert summary["n_empty_sentences"] == 0.0
    assert summary["mean_genes_per_sentence"] == 1.5


def test_sentence_conversion_pipeline_runs_on_memory_datasets(processed, params):
    # One empty cell, to be counted in the metrics.
    dense = processed.X.toarray()
    dense[3] = 0
    processed.X = sp.csr_matrix(dense)
    params["sentence_conversion"]["chunk_size"] = 16
    catalog = run_pipeline(create_pipeline(), {"processed_adata": processed, **params_entries(params)})
    sentences = catalog.load("cell_sentences")
    vocabulary = catalog.load("vocabulary")
    metrics = catalog.load("sentence_conversion_metrics")
    assert sentences.column_names == ["cell_name", "cell_sentence", "cell_type", "tissue", "organism"]
    assert sentences.num_rows == processed.n_obs
    assert _column(sentences, "cell_sentence")[3] == ""
    assert _column(sentences, "organism") == ["Homo sapiens"] * processed.n_obs
    assert list(vocabulary) == list(processed.var_names.str.upper())
    genes_per_cell = (dense > 0).sum(axis=1)
    assert metrics["n_cells"] == processed.n_obs
    assert metrics["n_empty_sentences"] == 1.0
    assert metrics["mean_genes_per_sentence"] == pytest.approx(genes_per_cell.mean())
    assert metrics["median_genes_per_sentence"] == pytest.approx(float(np.median(genes_per_cell)))
    assert metrics["n_genes_in_vocabulary"] == processed.n_vars


def _two_lanes(counts_adata):
    """Two samples concatenated as 10x lanes give them: the same barcodes in both."""
    import anndata as ad

    first, second = counts_adata[:30].copy(), counts_adata[30:].copy()
    second.obs_names = first.obs_names  # barcodes repeat across lanes
    return ad.concat([first, second])


def test_repeated_cell_names_made_unique_never_put_a_training_cell_in_the_test_part(counts_adata, params):
    from c2s_kedro.core.sentences.conversion import select_cells
    from c2s_kedro.pipelines.annotation.nodes import select_test_cells
    from c2s_kedro.pipelines.data_processing.nodes import validate_raw_adata

    raw = _two_lanes(counts_adata)
    assert not raw.obs_names.is_unique
    processed = validate_raw_adata(raw.copy(), load_parameters("data_processing")["data_processing"])
    assert processed.n_obs == 60 and processed.obs_names.is_unique
    catalog = run_pipeline(create_pipeline(), {"processed_adata": normalize_log10(processed), **params_entries(params)})
    split, sentences = catalog.load("data_split"), catalog.load("cell_sentences")
    parts = [set(split[part]) for part in ("train", "val", "test")]
    assert sum(map(len, parts)) == 60 and len(set.union(*parts)) == 60  # every cell in exactly one part
    assert not parts[0] & parts[2] and not parts[1] & parts[2]
    assert select_cells(sentences, split["test"])["cell_name"] == split["test"]  # one row per test name
    # the annotation's default input: the raw file's cells, its names still repeated, picked as the split means
    annotation_input = select_test_cells(raw, split)
    assert list(annotation_input.obs_names) == split["test"]
    rows = processed.obs_names.get_indexer(split["test"])
    assert (annotation_input.X != raw.X[rows]).nnz == 0  # the test cells' own counts, not their namesakes'


def test_a_split_of_repeated_names_is_refused_with_what_to_do(counts_adata, params):
    sentences, _, _ = convert_to_cell_sentences(normalize_log10(_two_lanes(counts_adata)), params["sentence_conversion"])
    with pytest.raises(ValueError, match=r"30 cell names occur more than once.*obs_names_make_unique"):
        split_dataset(sentences, params["data_split"])


def test_missing_labels_are_counted_in_the_metrics(processed, params, caplog):
    cell_type = processed.obs["cell_type"].astype(object)
    cell_type.iloc[:6] = np.nan
    cell_type.iloc[6:8] = "nan"  # what a str() of a missing value leaves in a file
    processed.obs["cell_type"] = pd.Categorical(cell_type)
    catalog = run_pipeline(create_pipeline(), {"processed_adata": processed, **params_entries(params)})
    metrics = catalog.load("sentence_conversion_metrics")
    assert metrics["n_cells_without_label[cell_type]"] == 8 and metrics["n_cells_without_label[tissue]"] == 0
    assert catalog.load("cell_sentences")["cell_type"][:9] == [None] * 8 + ["T cell"]
    assert "8 of 60 cells have no 'cell_type' label" in caplog.text
    assert "cannot honour its fractions" not in caplog.text  # 60 cells split 48/6/6 as asked


def test_a_label_spelled_several_ways_is_one_stratum_and_counted_in_the_metrics(processed, params):
    cell_type = processed.obs["cell_type"].astype(str).to_numpy(dtype=object)
    first = cell_type[0]
    rows = np.flatnonzero(cell_type == first)
    cell_type[rows[:3]] = first.upper() + " "  # another letter case and a trailing space
    processed.obs["cell_type"] = pd.Categorical(cell_type)
    catalog = run_pipeline(create_pipeline(), {"processed_adata": processed, **params_entries(params)})
    metrics = catalog.load("sentence_conversion_metrics")
    assert metrics["n_cells_relabelled[cell_type]"] == 3 and metrics["n_cells_label_stripped[cell_type]"] == 3
    labels = catalog.load("cell_sentences")["cell_type"]
    assert set(labels) == set(processed.obs["cell_type"].astype(str)) - {first.upper() + " "}
    assert sum(label == first for label in labels) == rows.size


def test_a_split_too_small_for_its_fractions_is_reported(params, caplog):
    # 12 cells of three types through fine-tuning's split: 6/3/3 instead of about 10/1/1
    cells = Dataset.from_dict({"cell_name": [f"c{i}" for i in range(12)], "cell_sentence": ["A B"] * 12,
                               "cell_type": ["T cell", "B cell", "NK"] * 4})
    split = split_dataset(cells, params["data_split"])
    assert [len(split[part]) for part in ("train", "val", "test")] == [6, 3, 3]
    assert "the split of 12 cells cannot honour its fractions: 0.8/0.1/0.1 asked, 6/3/3 made" in caplog.text
    assert "data_split.fractions" in caplog.text
    assert "the test part holds 3 cells, fewer than 20" in caplog.text
