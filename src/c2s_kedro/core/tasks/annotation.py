"""Cell-type annotation of new cells with a model fine-tuned here (workflow notes sections 3-6).

A fine-tuned model carries an *annotator record* in its config.json (``c2s_annotator``): the
label set it learnt, the genes its training prompts held, and the settings its training cells
were processed and prompted with (QC thresholds, normalization, sentence tie-break seed, top-k
genes, the cell-type-prediction templates). New cells are processed with those settings, turned
into sentences over the genes the model knows and labelled by label scoring
(``inference.predict_labels``), so the annotation reads the cells the way training did.

One difference from training is deliberate: QC's gene filter (``min_cells_per_gene``) depends on
the batch of cells it sees, so it is replaced by the model's genes; every other QC filter is per
cell and applies as in training. The annotation pipeline's nodes and the MLflow model
(``annotator_model.C2SAnnotator``) call the same functions here.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow.compute as pc
import scipy.sparse as sp
from datasets import Dataset
from sklearn.metrics import accuracy_score, f1_score

from c2s_kedro.core.errors import C2SError, C2SKeyError, C2SValueError
from c2s_kedro.core.data.preprocessing import QCThresholds, normalize_log10, quality_control
from c2s_kedro.core.data.validation import input_check_metrics, validate_input
from c2s_kedro.core.models.inference import predict_labels
from c2s_kedro.core.models.loading import LanguageModel
from c2s_kedro.core.prompts.formatting import PromptTemplates, cell_type_prediction_prompts, label_answer_room
from c2s_kedro.core.sentences.conversion import (
    CELL_SENTENCE,
    cell_sentences_from_adata,
    has_label,
    label_key,
    select_cells,
    vocabulary_names,
)
from c2s_kedro.core.tasks.evaluation import report_scored_cells

logger = logging.getLogger(__name__)

RECORD_KEY = "c2s_annotator"  # the model config attribute (saved in config.json)
UNASSIGNED = "Unassigned"
TABLE_COLUMNS = ("label", "confidence")  # then one probability column per label, named by the label


class AnnotatorRecordError(C2SError, ValueError):
    """The model carries no annotator record (it was not fine-tuned here) or no label set."""


@dataclass(frozen=True)
class AnnotatorRecord:
    """What a model fine-tuned here learnt from, as far as annotating new cells needs it."""

    label_column: str
    labels: list[str]
    genes: list[str]  # upper-cased, as in cell sentences
    qc: dict[str, Any]  # QCThresholds of the training cells
    target_sum: float | None
    sentence_layer: str | None
    sentence_seed: int
    top_k_genes: int | None
    organism_column: str
    templates: list[str]  # the cell-type-prediction input templates the model was trained on

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> AnnotatorRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(names - set(values))
        if missing:
            raise AnnotatorRecordError(
                f"the model's annotator record lacks {', '.join(missing)}: it was written by another version of this "
                "project. Fine-tune the model again (kedro run --pipeline=finetuning)"
            )
        return cls(**{name: values[name] for name in names})


def training_labels(cell_sentences: Dataset, train_cells: Sequence[str], label_column: str) -> list[str]:
    """The labels of the train cells, sorted: the label set a model fine-tuned on them knows (cells
    without a label, ``has_label``, add none)."""
    if label_column not in cell_sentences.column_names:
        raise C2SKeyError(f"'{label_column}' is not a column of the cell sentences; available: {', '.join(cell_sentences.column_names)}")
    values = select_cells(cell_sentences, train_cells)[label_column]
    return sorted({str(v) for v, present in zip(values, has_label(values)) if present})


def require_labels_to_tell_apart(labels: Sequence[str], label_column: str) -> None:
    """Refuse a cell-type prediction task whose training cells carry fewer than two labels: nothing
    to tell apart (and the evaluation's classifiers refuse one class after the whole fine-tuning)."""
    if len(labels) < 2:
        found = f"only the label {labels[0]!r}" if labels else "no label"
        raise C2SValueError(
            f"the training cells carry {found} in '{label_column}': cell-type prediction needs at least two labels to "
            "tell apart. Choose another label column (finetuning.label_column), or train for cell_type_generation only "
            "(finetuning.tasks)."
        )


def training_genes(cell_sentences: Dataset, train_cells: Sequence[str], top_k_genes: int | None = None) -> list[str]:
    """Every gene among the first ``top_k_genes`` of a train cell's sentence (all genes when None),
    sorted: the genes the model's training prompts held."""
    sentences = select_cells(cell_sentences, train_cells).select_columns([CELL_SENTENCE]).with_format("arrow")[:].column(CELL_SENTENCE)
    words = pc.split_pattern(pc.fill_null(sentences, ""), " ", max_splits=None)
    if top_k_genes is not None:
        words = pc.list_slice(words, 0, top_k_genes)
    genes = pc.unique(pc.list_flatten(words)).to_pylist()
    return sorted(g for g in genes if g)


def record_annotator(language_model: LanguageModel, record: AnnotatorRecord) -> LanguageModel:
    """Store ``record`` in the model's config (written to config.json by ``save_pretrained``)."""
    setattr(language_model.model.config, RECORD_KEY, record.to_dict())
    return language_model


def annotator_record(language_model: LanguageModel) -> AnnotatorRecord:
    """The model's annotator record; a model without one, or with an empty label set, is refused."""
    values = getattr(language_model.model.config, RECORD_KEY, None)
    if not values:
        raise AnnotatorRecordError(
            f"the model {language_model.source or ''} has no label set ('{RECORD_KEY}' in its config.json): only a model "
            "fine-tuned by this project's finetuning pipeline records the labels, genes and processing it learnt. "
            "Fine-tune it first (kedro run --pipeline=finetuning, with foundation_model pointing at it)"
        )
    record = AnnotatorRecord.from_dict(values)
    if not record.labels:
        raise AnnotatorRecordError(
            f"the model's label set is empty: no train cell had a '{record.label_column}' label. Fine-tune it on "
            "labelled cells (finetuning.label_column)"
        )
    return record


def prepare_cells(
    raw_adata: ad.AnnData, record: AnnotatorRecord, input_is_normalized: bool = False, gene_symbol_column: str | None = None,
    counts_source: str = "auto", accept_non_integer_counts: bool = False,
) -> tuple[ad.AnnData, dict[str, Any]]:
    """The training's checks, QC and normalization applied to new cells.

    The cells pass the door the training cells passed (``validate_input``: where the counts are,
    declarations the data contradict, gene names made sentence words as in training, cell names
    made unique; errors name the ``annotation`` settings), then the training's per-cell QC filters
    (no gene filter: the model's genes decide which genes count), then ``normalize_total`` with the
    training's ``target_sum`` and log10. Returns the processed cells and the QC counts with the
    cells' names after the door (``input_cells``, in input order).
    """
    adata, _ = validate_input(
        raw_adata, counts_source=counts_source, accept_non_integer_counts=accept_non_integer_counts,
        input_is_normalized=input_is_normalized, gene_symbol_column=gene_symbol_column, setting_prefix="annotation",
    )
    input_cells = [str(name) for name in adata.obs_names]
    thresholds = QCThresholds(**{**record.qc, "min_cells_per_gene": None})
    adata, counts = quality_control(adata, thresholds)
    if not input_is_normalized:
        adata = normalize_log10(adata, target_sum=record.target_sum)
    return adata, {**counts, "input_cells": input_cells}


@dataclass
class KnownGeneSentences:
    """Cell sentences over the genes a model knows, and how many genes matched."""

    cell_names: list[str]
    sentences: list[str]
    genes_matched: list[int]  # known genes each cell expresses
    n_genes: int  # genes of the data
    n_genes_known: int  # of those, genes the model knows

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def known_gene_sentences(adata: ad.AnnData, record: AnnotatorRecord) -> KnownGeneSentences:
    """Each cell's sentence over the genes of ``record`` (others dropped and counted), with the
    training's tie-break seed and layer. A cell that expresses no known gene gets an empty
    sentence (logged); data sharing no gene with the model is an error."""
    names = vocabulary_names(adata.var_names)
    known = np.isin(names, np.asarray(record.genes, dtype=str))
    if not known.any():
        raise C2SValueError(
            f"none of the {adata.n_vars} genes of the data is known to the model ({len(record.genes)} genes, e.g. "
            f"{', '.join(record.genes[:5])}); the data's genes are e.g. {', '.join(names[:5])}. Cell sentences need gene "
            "symbols of the model's organism: when the var names are Ensembl IDs, name the .var column of symbols"
        )
    logger.info("%d of the data's %d genes are known to the model (%d dropped)", int(known.sum()), adata.n_vars, int((~known).sum()))
    result = cell_sentences_from_adata(adata[:, known], layer=record.sentence_layer, seed=record.sentence_seed)
    sentences = [s or "" for s in result.sentences[CELL_SENTENCE]]
    matched = [len(s.split()) for s in sentences]
    empty = sum(n == 0 for n in matched)
    if empty:
        logger.warning("%d of %d cells express no gene the model knows: they are %s", empty, len(sentences), UNASSIGNED)
    return KnownGeneSentences(list(result.sentences["cell_name"]), sentences, matched, adata.n_vars, int(known.sum()))


def organisms_of(adata: ad.AnnData, column: str) -> list[str | None] | None:
    """The cells' organism from ``obs[column]`` when there is one (None otherwise); a cell without
    one (``has_label``) gets None, which prompts read as the default organism, never "nan"."""
    if column not in adata.obs.columns:
        return None
    values = adata.obs[column]
    return [str(v) if present else None for v, present in zip(values, has_label(values))]


def labelling_prompts(
    sentences: KnownGeneSentences,
    organisms: Sequence[str | None] | None,
    language_model: LanguageModel,
    record: AnnotatorRecord,
    template_index: int | None = 0,
    seed: int = 0,
    default_organism: str = "Homo sapiens",
) -> list[str]:
    """The cell-type-prediction prompt of each cell, with the model's templates and top-k genes,
    fitted to the context with room for the longest label answer (the evaluation's prompt path)."""
    templates = PromptTemplates("cell_type_prediction", tuple(record.templates), ("{cell_type}.",), "the model's annotator record")
    room = label_answer_room(language_model.tokenizer, record.labels, 0)
    prompts, _, _ = cell_type_prediction_prompts(
        sentences.sentences, organisms, language_model.tokenizer, language_model.context_length - room,
        template_index=template_index, top_k_genes=record.top_k_genes, seed=seed, default_organism=default_organism,
        templates=templates,
    )
    return prompts


def label_cells(
    language_model: LanguageModel,
    prompts: Sequence[str],
    sentences: KnownGeneSentences,
    labels: Sequence[str],
    min_probability: float,
    batch_size: int = 8,
) -> pd.DataFrame:
    """Label scoring of every cell that expresses a known gene: ``label`` (the most likely one, or
    ``Unassigned`` when its probability is below ``min_probability``), ``confidence`` (that
    probability) and the probability of each label; cells without a known gene are
    ``Unassigned`` with no probabilities. Indexed by cell name."""
    labels = [str(label) for label in labels]
    clashing = sorted(set(labels) & set(TABLE_COLUMNS))
    if clashing:
        raise C2SValueError(f"labels {clashing} coincide with the table's own columns {list(TABLE_COLUMNS)}; rename them")
    if not 0.0 <= min_probability <= 1.0:
        raise C2SValueError(f"min_probability must be between 0 and 1, got {min_probability}")
    scored = np.flatnonzero(np.asarray(sentences.genes_matched) > 0)
    probabilities = np.full((len(prompts), len(labels)), np.nan)
    if scored.size:
        _, probabilities[scored] = predict_labels(language_model, [prompts[i] for i in scored], labels, batch_size=batch_size)
    best = np.nan_to_num(probabilities, nan=-1.0).argmax(axis=1)
    confidence = probabilities[np.arange(len(prompts)), best]
    assigned = confidence >= min_probability  # False for NaN
    table = pd.DataFrame({
        "label": np.where(assigned, np.asarray(labels, dtype=object)[best], UNASSIGNED),
        "confidence": confidence,
    }, index=pd.Index(sentences.cell_names, name="cell"))
    return pd.concat([table, pd.DataFrame(probabilities, columns=labels, index=table.index)], axis=1)


def prediction_table(labelled: pd.DataFrame, input_cells: Sequence[str]) -> pd.DataFrame:
    """``labelled`` over every input cell in input order, the cell name as column ``cell``: cells
    QC removed are ``Unassigned`` with no confidence or probabilities."""
    table = labelled.reindex(pd.Index([str(c) for c in input_cells], name="cell"))
    table["label"] = table["label"].fillna(UNASSIGNED)
    return table.reset_index()


def annotate_counts(
    language_model: LanguageModel,
    raw_adata: ad.AnnData,
    min_probability: float,
    input_is_normalized: bool = False,
    gene_symbol_column: str | None = None,
    template_index: int | None = 0,
    seed: int = 0,
    default_organism: str = "Homo sapiens",
    batch_size: int = 8,
    counts_source: str = "auto",
    accept_non_integer_counts: bool = False,
) -> pd.DataFrame:
    """``prediction_table`` of new cells (raw counts) in one call, the steps of the annotation pipeline in its
    order: ``prepare_cells``, ``known_gene_sentences``, ``labelling_prompts``, ``label_cells``."""
    record = annotator_record(language_model)
    processed, counts = prepare_cells(raw_adata, record, input_is_normalized, gene_symbol_column, counts_source,
                                      accept_non_integer_counts)
    sentences = known_gene_sentences(processed, record)
    prompts = labelling_prompts(sentences, organisms_of(processed, record.organism_column), language_model, record,
                                template_index, seed, default_organism)
    labelled = label_cells(language_model, prompts, sentences, record.labels, min_probability, batch_size)
    return prediction_table(labelled, counts["input_cells"])


def counts_adata(table: pd.DataFrame) -> ad.AnnData:
    """A cells x genes table of counts (gene symbols as columns) as a sparse AnnData."""
    values = table.to_numpy(dtype=np.float32, na_value=0.0) if len(table.columns) else np.zeros((len(table), 0), np.float32)
    return ad.AnnData(
        X=sp.csr_matrix(values), obs=pd.DataFrame(index=[str(i) for i in table.index]),
        var=pd.DataFrame(index=[str(c) for c in table.columns]),
    )


def annotated_cells(
    processed: ad.AnnData, labelled: pd.DataFrame, sentences: KnownGeneSentences, labels: Sequence[str], genes: Sequence[str]
) -> ad.AnnData:
    """The processed cells with the annotation: ``obs['c2s_cell_type']`` (categorical),
    ``obs['c2s_confidence']``, ``obs['c2s_genes_matched']``, ``obsm['c2s_label_probabilities']``
    (label order in ``uns['c2s_labels']``) and ``var['c2s_known_gene']``."""
    adata = processed.copy()
    rows = labelled.loc[[str(c) for c in adata.obs_names]]
    labels = [str(label) for label in labels]
    # a record written before has_label read "Unassigned" as no label may hold it among its labels
    adata.obs["c2s_cell_type"] = pd.Categorical(rows["label"].to_numpy(), categories=list(dict.fromkeys([*labels, UNASSIGNED])))
    adata.obs["c2s_confidence"] = rows["confidence"].to_numpy(dtype=float)
    adata.obs["c2s_genes_matched"] = pd.Series(dict(zip(sentences.cell_names, sentences.genes_matched))).loc[rows.index].to_numpy()
    adata.obsm["c2s_label_probabilities"] = rows[labels].to_numpy(dtype=np.float32)
    adata.uns["c2s_labels"] = labels
    adata.var["c2s_known_gene"] = np.isin(vocabulary_names(adata.var_names), np.asarray(genes, dtype=str))
    return adata


def annotation_metrics(
    annotated: ad.AnnData, counts: Mapping[str, Any], sentences: KnownGeneSentences, n_model_genes: int,
    label_column: str | None = None,
) -> dict[str, float]:
    """Cells in, removed by QC, annotated (given a label), share ``Unassigned`` (of the cells past
    QC), cells per label, genes matched to the model's vocabulary and, when ``label_column`` is an
    obs column, accuracy and macro-F1 against it over the cells that have a label (``has_label``;
    ``Unassigned`` counts as wrong), with ``n_cells_without_label`` and ``n_scored_cells``. A known
    label is read as the model's label it equals by ``label_key`` ("DENDRITIC " is "Dendritic"); cells
    whose label is none of the model's are counted (``n_cells_label_unknown_to_model``), named in a
    warning, and can only be wrong."""
    predicted = annotated.obs["c2s_cell_type"].astype(str)
    n_after = annotated.n_obs
    metrics: dict[str, float] = {
        "n_cells": float(len(counts["input_cells"])),
        **{key: float(value) for key, value in counts.items() if key.startswith("cells_removed_")},
        "n_cells_after_qc": float(n_after),
        "n_cells_without_known_gene": float(sum(n == 0 for n in sentences.genes_matched)),
        "n_cells_annotated": float((predicted != UNASSIGNED).sum()),
        "share_unassigned": float((predicted == UNASSIGNED).mean()) if n_after else 0.0,
        "n_genes": float(sentences.n_genes),
        "n_genes_matched": float(sentences.n_genes_known),
        "share_model_genes_matched": float(sentences.n_genes_known / n_model_genes) if n_model_genes else 0.0,
        "mean_genes_matched_per_cell": float(np.mean(sentences.genes_matched)) if sentences.genes_matched else 0.0,
        **input_check_metrics(annotated),
    }
    for label in [*annotated.uns["c2s_labels"], UNASSIGNED]:
        metrics[f"n_cells_{label}"] = float((predicted == label).sum())  # made MLflow-safe where it is logged
    if label_column and label_column in annotated.obs.columns:
        labelled = has_label(annotated.obs[label_column])
        metrics["n_cells_without_label"] = float((~labelled).sum())
        if not labelled.all():
            logger.warning("%d of %d annotated cells have no '%s' label: left out of the accuracy", int((~labelled).sum()),
                           n_after, label_column)
        metrics.update(report_scored_cells(int(labelled.sum()), "the annotation is"))
        truth = annotated.obs[label_column][labelled].astype(str).str.strip()
        model_labels = {label_key(label): str(label) for label in annotated.uns["c2s_labels"]}
        keys = truth.map(label_key)
        known = keys.isin(list(model_labels)).to_numpy()
        metrics["n_cells_label_unknown_to_model"] = float((~known).sum())
        if not known.all():
            logger.warning("%d of %d scored cells have a '%s' label the model does not know (%s): they can only be wrong; "
                           "the model's labels are %s", int((~known).sum()), int(labelled.sum()), label_column,
                           ", ".join(map(repr, sorted(set(truth[~known])))), ", ".join(map(repr, model_labels.values())))
        if labelled.any():
            truth, guessed = keys.map(model_labels).fillna(truth), predicted[labelled]  # the model's spelling
            metrics["accuracy"] = float(accuracy_score(truth, guessed))
            metrics["macro_f1"] = float(f1_score(truth, guessed, labels=sorted(set(truth)), average="macro", zero_division=0))
    return metrics

