"""The annotation nodes and pipeline on tiny data and a tiny model, the annotator record that
finetuning writes, and the bad inputs a user can hit."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from c2s_kedro.core.data.validation import NotCountsError
from c2s_kedro.core.models.loading import build_gpt_neox
from c2s_kedro.core.models.tokenizer import build_gene_tokenizer
from c2s_kedro.core.prompts.formatting import load_templates, template_words
from c2s_kedro.core.sentences.conversion import cell_sentences_from_adata
from c2s_kedro.core.tasks.annotation import (
    UNASSIGNED,
    AnnotatorRecord,
    AnnotatorRecordError,
    KnownGeneSentences,
    annotate_counts,
    annotated_cells,
    annotation_metrics,
    annotator_record,
    counts_adata,
    known_gene_sentences,
    prepare_cells,
    record_annotator,
)
from c2s_kedro.pipelines.annotation import create_default_input_pipeline, create_pipeline
from c2s_kedro.pipelines.annotation.nodes import label_annotation_cells, prepare_annotation_cells, read_annotator
from c2s_kedro.pipelines.finetuning.nodes import record_annotator_metadata
from tests.helpers import load_parameters, make_counts_adata, params_entries, run_pipeline, tiny_cell_sentences

LABELS = ["B cell", "T cell"]
ARCHITECTURE = {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "max_position_embeddings": 160}


def _params(**changes) -> dict:
    return {**load_parameters("annotation")["annotation"], **changes}


def _record(genes, **changes) -> AnnotatorRecord:
    qc = {**load_parameters("data_processing")["data_processing"]["qc"], "min_genes_per_cell": 5}
    values = dict(label_column="cell_type", labels=LABELS, genes=sorted(genes), qc=qc, target_sum=None, sentence_layer=None,
                  sentence_seed=1234, top_k_genes=None, organism_column="organism",
                  templates=list(load_templates("cell_type_prediction").inputs))
    return AnnotatorRecord(**{**values, **changes})


@pytest.fixture(scope="module")
def counts():
    return make_counts_adata(n_cells=24, n_genes=40)


@pytest.fixture(scope="module")
def model(counts):
    """A tiny model that knows every gene of ``counts`` but the last five (GENE20..GENE24)."""
    genes = list(counts.var_names)
    tokenizer = build_gene_tokenizer(genes, template_words() + LABELS + ["Homo sapiens"], model_max_length=160)
    return record_annotator(build_gpt_neox(tokenizer, ARCHITECTURE), _record(genes[:-5]))


def test_cells_are_processed_as_training_and_sentences_keep_known_genes_only(counts, model):
    record = annotator_record(model)
    cells, qc = prepare_cells(counts, record)
    assert qc["input_cells"] == list(counts.obs_names) and "counts" in cells.layers
    assert cells.n_vars == counts.n_vars  # no gene filter: the model's genes decide
    sentences = known_gene_sentences(cells, record)
    assert sentences.n_genes == 40 and sentences.n_genes_known == 35
    assert not {"GENE20", "GENE24"} & {g for s in sentences.sentences for g in s.split()}
    # the training's conversion (seed, ties) over the same genes gives the same sentences
    expected = cell_sentences_from_adata(cells[:, :-5], seed=record.sentence_seed).sentences["cell_sentence"]
    assert sentences.sentences == expected
    assert sentences.genes_matched == [len(s.split()) for s in expected]


def test_a_cell_without_a_known_gene_is_reported_unassigned_not_a_crash(counts, model):
    adata = counts.copy()
    dense = adata.X.toarray()
    dense[0, :] = 0
    dense[0, -5:] = 5  # only genes the model does not know (and enough genes for QC)
    dense[0, 3:8] = 0
    adata.X = sp.csr_matrix(dense)
    table = annotate_counts(model, adata, min_probability=0.0, batch_size=4)
    first = table.iloc[0]
    assert first["label"] == UNASSIGNED and np.isnan(first["confidence"]) and first[LABELS].isna().all()
    rest = table.iloc[1:]
    assert set(rest["label"]) <= set(LABELS) and np.allclose(rest[LABELS].sum(axis=1), 1.0)
    assert (rest["confidence"] == rest[LABELS].max(axis=1)).all()


def test_below_min_probability_a_cell_is_unassigned(counts, model):
    table = annotate_counts(model, counts, min_probability=0.0, batch_size=4)
    threshold = float(table["confidence"].median())
    strict = annotate_counts(model, counts, min_probability=threshold, batch_size=4)
    below = table["confidence"] < threshold
    assert below.any() and (~below).any()
    assert (strict.loc[below, "label"] == UNASSIGNED).all()
    assert (strict.loc[~below, "label"] == table.loc[~below, "label"]).all()
    assert np.allclose(strict[LABELS], table[LABELS])


def test_cells_qc_removes_are_unassigned_rows_of_the_table(counts, model):
    table = annotate_counts(model, counts, min_probability=0.0, batch_size=4)
    strict_qc = record_annotator(build_gpt_neox(model.tokenizer, ARCHITECTURE), _record(
        list(counts.var_names), qc={**annotator_record(model).qc, "min_genes_per_cell": 29}))
    genes_per_cell = np.asarray((counts.X > 0).sum(axis=1)).ravel()
    filtered = annotate_counts(strict_qc, counts, min_probability=0.0, batch_size=4)
    assert filtered["cell"].tolist() == table["cell"].tolist() == list(counts.obs_names)
    removed = genes_per_cell < 29
    assert removed.any() and (~removed).any()
    assert (filtered.loc[removed, "label"] == UNASSIGNED).all() and filtered.loc[removed, "confidence"].isna().all()
    assert filtered.loc[~removed, "confidence"].notna().all()


def test_normalized_input_is_refused_naming_the_setting_that_accepts_it(counts, model):
    normalized = counts.copy()
    normalized.X = np.log1p(normalized.X.toarray() / 3.0)
    annotator = read_annotator(model)
    with pytest.raises(NotCountsError, match=r"non-integer.*Change annotation\.input_is_normalized to true"):
        prepare_annotation_cells(normalized, annotator, _params())
    cells, _ = prepare_annotation_cells(normalized, annotator, _params(input_is_normalized=True))
    assert np.allclose(cells.X, normalized.X)  # used as it is


def test_no_gene_in_common_with_the_model_is_a_clear_error(counts, model):
    renamed = counts.copy()
    renamed.var_names = [f"OTHER{i}" for i in range(renamed.n_vars)]
    with pytest.raises(ValueError, match=r"none of the 40 genes of the data is known to the model.*annotation\.gene_symbol_column"):
        run_pipeline(create_pipeline(), _inputs(renamed, model))


def test_a_model_without_a_label_set_is_refused(counts, model):
    plain = build_gpt_neox(model.tokenizer, ARCHITECTURE)
    with pytest.raises(AnnotatorRecordError, match=r"no label set.*kedro run --pipeline=finetuning"):
        read_annotator(plain)
    empty = record_annotator(build_gpt_neox(model.tokenizer, ARCHITECTURE), _record(list(counts.var_names), labels=[]))
    with pytest.raises(AnnotatorRecordError, match="label set is empty"):
        read_annotator(empty)
    generation_only = build_gpt_neox(model.tokenizer, ARCHITECTURE)
    generation_only.model.config.c2s_trained_tasks = ["cell_type_generation"]
    with pytest.raises(ValueError, match="not for cell_type_prediction"):
        read_annotator(record_annotator(generation_only, _record(list(counts.var_names))))


def test_a_template_index_the_model_lacks_names_the_setting(counts, model):
    annotator = read_annotator(model)
    cells, _ = prepare_annotation_cells(counts, annotator, _params())
    sentences = known_gene_sentences(cells, annotator_record(model)).to_dict()
    with pytest.raises(IndexError, match=r"template index 99 does not exist.*Change annotation\.template_index"):
        label_annotation_cells(sentences, cells, model, annotator, _params(template_index=99))


def _inputs(raw: ad.AnnData, model, **changes) -> dict:
    parameters = {"annotation": _params(batch_size=4, **changes), "embedding": load_parameters("embedding")["embedding"]}
    return {"annotation_raw_adata": raw, "finetuned_model": model, "foundation_model": model, **params_entries(parameters)}


def test_the_pipeline_annotates_embeds_and_scores_against_known_labels(counts, model):
    catalog = run_pipeline(create_pipeline(), _inputs(counts, model, min_probability=0.0))
    annotated = catalog.load("annotated_adata")
    predictions = catalog.load("annotation_predictions")
    assert list(predictions.columns) == ["cell", "label", "confidence", *LABELS]
    assert predictions["cell"].tolist() == list(counts.obs_names)
    assert annotated.uns["c2s_labels"] == LABELS and annotated.obsm["c2s_label_probabilities"].shape == (24, 2)
    assert annotated.obsm["X_c2s"].shape == (24, 32) and annotated.obsm["X_umap_c2s"].shape == (24, 2)
    assert annotated.obs["c2s_cell_type"].astype(str).tolist() == predictions["label"].tolist()
    assert np.allclose(annotated.obs["c2s_confidence"], predictions["confidence"])
    assert annotated.var["c2s_known_gene"].sum() == 35
    # the MLflow model's one call gives the same numbers as the pipeline's nodes
    direct = annotate_counts(model, counts, min_probability=0.0, batch_size=4)
    pd.testing.assert_frame_equal(direct, predictions)
    metrics = catalog.load("annotation_metrics")
    truth = counts.obs["cell_type"].astype(str).to_numpy()
    assert metrics["accuracy"] == pytest.approx(float(np.mean(predictions["label"].to_numpy() == truth)))
    assert metrics["n_cells"] == 24 and metrics["n_genes_matched"] == 35 and metrics["n_cells_annotated"] == 24
    assert metrics["n_cells_B cell"] + metrics["n_cells_T cell"] == 24 and metrics["share_unassigned"] == 0.0
    assert catalog.load("annotation_umap_plot").axes[0].get_title().startswith("C2S annotation")


def test_another_gene_set_without_labels(counts, model):
    other = counts[:, 5:].copy()  # no MT- genes, fewer TMARK genes, two genes the model never saw
    other.var_names = [*other.var_names[:-2], "NEWGENE1", "NEWGENE2"]
    other.obs = pd.DataFrame(index=[f"new_{i}" for i in range(other.n_obs)])
    catalog = run_pipeline(create_pipeline(), _inputs(other, model, min_probability=0.99))
    metrics = catalog.load("annotation_metrics")
    assert "accuracy" not in metrics and metrics["n_genes"] == 35 and metrics["n_genes_matched"] == 30
    predictions = catalog.load("annotation_predictions")
    assert predictions["cell"].tolist() == list(other.obs_names)
    assert metrics["share_unassigned"] == pytest.approx(float((predictions["label"] == UNASSIGNED).mean()))


def test_the_default_input_is_the_test_splits_raw_counts(counts):
    split = {"train": list(counts.obs_names[:16]), "val": [], "test": list(counts.obs_names[20:])}
    catalog = run_pipeline(create_default_input_pipeline(), {"raw_adata": counts, "data_split": split})
    default = catalog.load("annotation_raw_adata")
    assert list(default.obs_names) == split["test"]
    assert (default.X != counts[split["test"]].X).nnz == 0


def test_finetuning_records_the_label_set_genes_and_processing(counts, model):
    cells = tiny_cell_sentences([f"GENE{i}" for i in range(60)])
    split = {"train": [f"c{i}" for i in range(8)], "val": ["c8"], "test": ["c9"]}
    finetuning = {**load_parameters("finetuning")["finetuning"], "top_k_genes": 10}
    processing = load_parameters("data_processing")["data_processing"]
    conversion = load_parameters("sentence_conversion")["sentence_conversion"]
    trained = build_gpt_neox(model.tokenizer, ARCHITECTURE)
    saved, in_memory = record_annotator_metadata(trained, cells, split, finetuning, processing, conversion)
    record = annotator_record(saved)
    assert in_memory is saved and record.labels == LABELS and record.label_column == "cell_type"
    first_ten = {g for s in cells.select(range(8))["cell_sentence"] for g in s.split()[:10]}
    assert set(record.genes) == first_ten
    assert record.qc == processing["qc"] and record.sentence_seed == conversion["seed"] and record.top_k_genes == 10
    assert counts_adata(pd.DataFrame({"A": [1, 0]}, index=["x", "y"])).obs_names.tolist() == ["x", "y"]


def test_a_users_annotation_input_is_never_overwritten_by_the_default_writer(counts, tmp_path):
    from kedro.io import DataCatalog, MemoryDataset

    from kedro.runner import SequentialRunner

    from c2s_kedro.datasets import H5adDataset
    from c2s_kedro.upstream import EntryMatcher, check_user_entries, plan

    def run(user: list[str]) -> None:  # what the project's `kedro run` does
        planned = plan(project, project, catalog, EntryMatcher(user), "local")
        check_user_entries(planned, [n.name for n in project.nodes], catalog, EntryMatcher(user), "local")
        SequentialRunner().run(planned, catalog)

    users = tmp_path / "mine.h5ad"
    counts[:3].write_h5ad(users)
    split = {"train": [], "val": [], "test": list(counts.obs_names[20:])}
    project = create_default_input_pipeline()
    catalog = DataCatalog(datasets={
        "raw_adata": MemoryDataset(counts, copy_mode="assign"), "data_split": MemoryDataset(split),
        "annotation_raw_adata": H5adDataset(filepath=str(users)),
    })
    before = users.stat().st_mtime_ns
    run(["annotation_raw_adata"])
    assert users.stat().st_mtime_ns == before and ad.read_h5ad(users).n_obs == 3
    run([])  # the project's own entry: written
    assert ad.read_h5ad(users).n_obs == 4


def test_the_same_counts_get_the_same_labels_however_they_are_stored(counts, model):
    matrix = counts.X.tocsr()
    indices, data = matrix.indices.copy(), matrix.data.copy()
    for row in range(matrix.shape[0]):  # each row's entries stored in reverse order
        start, end = matrix.indptr[row], matrix.indptr[row + 1]
        indices[start:end], data[start:end] = indices[start:end][::-1], data[start:end][::-1]
    reversed_storage = counts.copy()
    reversed_storage.X = sp.csr_matrix((data, indices, matrix.indptr.copy()), shape=matrix.shape)
    assert not reversed_storage.X.has_sorted_indices
    pd.testing.assert_frame_equal(annotate_counts(model, reversed_storage, min_probability=0.0, batch_size=4),
                                  annotate_counts(model, counts, min_probability=0.0, batch_size=4))


def test_cells_without_a_known_label_are_annotated_but_scored_against_none(counts, model, caplog):
    cells = counts.copy()
    cell_type = cells.obs["cell_type"].astype(object)
    cell_type.iloc[[0, 5, 13]] = np.nan
    cell_type.iloc[20] = "nan"  # a missing label written out as text
    cells.obs["cell_type"] = pd.Categorical(cell_type)
    cells.obs["organism"] = pd.Categorical([np.nan] + ["Homo sapiens"] * 23)  # prompts read the default, never "nan"
    catalog = run_pipeline(create_pipeline(), _inputs(cells, model, min_probability=0.0))
    metrics, predictions = catalog.load("annotation_metrics"), catalog.load("annotation_predictions")
    assert len(predictions) == 24 and (predictions["label"] != UNASSIGNED).all()  # every cell annotated
    assert metrics["n_cells_without_label"] == 4 and metrics["n_scored_cells"] == 20
    labelled = cell_type.notna().to_numpy() & (cell_type != "nan").to_numpy()
    truth = cell_type[labelled].astype(str).to_numpy()
    assert metrics["accuracy"] == pytest.approx(float(np.mean(predictions["label"].to_numpy()[labelled] == truth)))
    assert "4 of 24 annotated cells have no 'cell_type' label: left out of the accuracy" in caplog.text
    assert "fewer than 20" not in caplog.text
    few = run_pipeline(create_pipeline(), _inputs(cells[:8].copy(), model, min_probability=0.0)).load("annotation_metrics")
    assert few["n_scored_cells"] == 6 and "the annotation is scored on 6 cells, fewer than 20" in caplog.text


def test_the_label_set_a_model_records_holds_no_missing_label(model):
    cells = tiny_cell_sentences([f"GENE{i}" for i in range(60)])
    cells = cells.remove_columns("cell_type").add_column("cell_type", ["T cell", None, "nan", "B cell", "", "None"] * 2)
    split = {"train": [f"c{i}" for i in range(8)], "val": ["c8"], "test": ["c9"]}
    finetuning = load_parameters("finetuning")["finetuning"]
    processing = load_parameters("data_processing")["data_processing"]
    conversion = load_parameters("sentence_conversion")["sentence_conversion"]
    saved, _ = record_annotator_metadata(build_gpt_neox(model.tokenizer, ARCHITECTURE), cells, split, finetuning, processing, conversion)
    assert annotator_record(saved).labels == LABELS


def _annotated(predicted, truth, labels=LABELS) -> ad.AnnData:
    names = [f"c{i}" for i in range(len(predicted))]
    obs = pd.DataFrame({"c2s_cell_type": pd.Categorical(predicted, categories=[*labels, UNASSIGNED]), "cell_type": truth},
                       index=names)
    return ad.AnnData(obs=obs, uns={"c2s_labels": list(labels)})


def test_known_labels_in_another_case_or_spacing_are_scored_as_the_models_labels(caplog):
    annotated = _annotated(["B cell", "T cell", "T cell", "B cell", "B cell"], ["B CELL ", "t cell", "T  cell", "b cell", "Dendritic"])
    sentences = KnownGeneSentences(list(annotated.obs_names), ["GENE1"] * 5, [1] * 5, 10, 10)
    metrics = annotation_metrics(annotated, {"input_cells": list(annotated.obs_names)}, sentences, 10, "cell_type")
    assert metrics["accuracy"] == pytest.approx(0.8)  # 0.0 when "B CELL " was not "B cell"
    assert metrics["n_cells_label_unknown_to_model"] == 1
    assert ("1 of 5 scored cells have a 'cell_type' label the model does not know ('Dendritic'): they can only be wrong; "
            "the model's labels are 'B cell', 'T cell'") in caplog.text


def test_a_label_set_holding_unassigned_gives_a_table_not_a_crash():
    # a record written before "Unassigned" was no label: the annotation's own answer among the labels
    labels = ["B cell", UNASSIGNED]
    processed = ad.AnnData(sp.csr_matrix(np.ones((2, 2), dtype=np.float32)), obs=pd.DataFrame(index=["a", "b"]),
                           var=pd.DataFrame(index=["GENE1", "GENE2"]))
    labelled = pd.DataFrame({"label": ["B cell", UNASSIGNED], "confidence": [0.9, 0.2], "B cell": [0.9, 0.2],
                             UNASSIGNED: [0.1, 0.8]}, index=pd.Index(["a", "b"], name="cell"))
    sentences = KnownGeneSentences(["a", "b"], ["GENE1", "GENE2"], [1, 1], 2, 2)
    annotated = annotated_cells(processed, labelled, sentences, labels, ["GENE1", "GENE2"])
    assert annotated.obs["c2s_cell_type"].astype(str).tolist() == ["B cell", UNASSIGNED]


def test_a_training_label_unassigned_is_no_label_of_the_model():
    from c2s_kedro.core.tasks.annotation import training_labels

    cells = tiny_cell_sentences([f"GENE{i}" for i in range(60)])
    cells = cells.remove_columns("cell_type").add_column("cell_type", ["T cell", "Unassigned", "unassigned", "B cell"] * 3)
    assert training_labels(cells, [f"c{i}" for i in range(8)], "cell_type") == LABELS
