"""Nodes of the annotation pipeline: they read the settings once and call core.tasks.annotation."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

# each core module loads when a node first uses it (c2s_kedro/core/__init__.py): every run imports every
# pipeline's nodes (the registry composes each pipeline with its upstream) and pays only for what its nodes use
from c2s_kedro import core
from c2s_kedro.parameters import read_parameters, setting_hint, settings_file_hint
from c2s_kedro.parameters.annotation import AnnotationParameters
from c2s_kedro.parameters.inference import EmbeddingPipelineParameters

if TYPE_CHECKING:
    import anndata as ad
    import matplotlib.pyplot as plt
    import pandas as pd

    from c2s_kedro.core.models.loading import LanguageModel

SECTION = "annotation"
MIN_CELLS_FOR_UMAP = 3  # a kNN graph needs at least two neighbours per cell

logger = logging.getLogger(__name__)


def select_test_cells(raw_adata: ad.AnnData, data_split: dict[str, Any]) -> ad.AnnData:
    """The raw counts of the test split's cells: the default ``annotation_raw_adata``, cells no
    model saw in training, so a fresh clone can annotate something offline."""
    return core.data.validation.cells_by_unique_name(raw_adata, data_split["test"])


def read_annotator(finetuned_model: LanguageModel) -> dict[str, Any]:
    """The model's annotator record (labels, genes, the training's processing); a model not
    fine-tuned here, or not for cell-type prediction, is refused."""
    core.models.training.require_task(finetuned_model, "cell_type_prediction")
    return core.tasks.annotation.annotator_record(finetuned_model).to_dict()


def prepare_annotation_cells(
    annotation_raw_adata: ad.AnnData, annotator: dict[str, Any], params: dict[str, Any]
) -> tuple[ad.AnnData, dict[str, Any]]:
    """The new cells checked, QC-filtered and normalized as the model's training cells were."""
    settings = read_parameters(AnnotationParameters, params, SECTION)
    record = core.tasks.annotation.AnnotatorRecord.from_dict(annotator)
    with (
        setting_hint(f"{SECTION}.input_is_normalized to true if .X already holds log-normalized values,", core.data.validation.NotCountsError),
        setting_hint(f"{SECTION}.gene_symbol_column", KeyError),
        settings_file_hint(SECTION, core.data.validation.InputError),
    ):
        return core.tasks.annotation.prepare_cells(
            annotation_raw_adata, record, settings.input_is_normalized, settings.gene_symbol_column,
            counts_source=settings.counts_source, accept_non_integer_counts=settings.accept_non_integer_counts,
        )


def build_annotation_sentences(annotation_cells: ad.AnnData, annotator: dict[str, Any]) -> dict[str, Any]:
    """Each cell's sentence over the genes the model knows; unknown genes dropped and counted."""
    with setting_hint(f"{SECTION}.gene_symbol_column"):
        return core.tasks.annotation.known_gene_sentences(annotation_cells, core.tasks.annotation.AnnotatorRecord.from_dict(annotator)).to_dict()


def label_annotation_cells(
    annotation_sentences: dict[str, Any], annotation_cells: ad.AnnData, finetuned_model: LanguageModel,
    annotator: dict[str, Any], params: dict[str, Any],
) -> pd.DataFrame:
    """Label scoring of every cell with the model's label set: best label (or Unassigned below
    ``min_probability``), its probability and every label's."""
    settings = read_parameters(AnnotationParameters, params, SECTION)
    record = core.tasks.annotation.AnnotatorRecord.from_dict(annotator)
    sentences = core.tasks.annotation.KnownGeneSentences(**annotation_sentences)
    with setting_hint(f"{SECTION}.template_index", IndexError):
        prompts = core.tasks.annotation.labelling_prompts(sentences, core.tasks.annotation.organisms_of(annotation_cells, record.organism_column), finetuned_model,
                                    record, settings.template_index, settings.seed, settings.default_organism)
    with setting_hint(f"{SECTION}.min_probability"):
        return core.tasks.annotation.label_cells(finetuned_model, prompts, sentences, record.labels, settings.min_probability, settings.batch_size)


def embed_annotation_cells(
    annotation_sentences: dict[str, Any], annotation_cells: ad.AnnData, foundation_model: LanguageModel, params: dict[str, Any]
) -> np.ndarray:
    """Embeddings of the new cells by the foundation model, prompted and pooled as the embedding
    pipeline's (``embedding`` settings), so they compare with ``cell_embeddings``."""
    settings = read_parameters(EmbeddingPipelineParameters, params, "embedding")
    with setting_hint("embedding.prompt_templates"):
        templates = core.prompts.formatting.task_templates("cell_type_prediction", core.prompts.formatting.read_template_files(settings.prompt_templates))
    with setting_hint("embedding.template_index", IndexError):
        prompts, _, _ = core.prompts.formatting.cell_type_prediction_prompts(
            annotation_sentences["sentences"], core.tasks.annotation.organisms_of(annotation_cells, settings.organism_column),
            foundation_model.tokenizer, foundation_model.context_length, template_index=settings.template_index,
            top_k_genes=settings.top_k_genes, default_organism=settings.default_organism, templates=templates,
        )
    with setting_hint("embedding.pooling"):
        return core.models.inference.embed_prompts(foundation_model, prompts, batch_size=settings.batch_size, pooling=settings.pooling)


def build_annotated_adata(
    annotation_cells: ad.AnnData, annotation_labels: pd.DataFrame, annotation_sentences: dict[str, Any],
    annotation_embeddings: np.ndarray, annotator: dict[str, Any], embedding_params: dict[str, Any],
) -> ad.AnnData:
    """The processed new cells with their labels, confidences, label probabilities, the
    foundation model's embedding (``obsm['X_c2s']``) and a UMAP of it (``obsm['X_umap_c2s']``)."""
    settings = read_parameters(EmbeddingPipelineParameters, embedding_params, "embedding")
    record = core.tasks.annotation.AnnotatorRecord.from_dict(annotator)
    adata = core.tasks.annotation.annotated_cells(annotation_cells, annotation_labels, core.tasks.annotation.KnownGeneSentences(**annotation_sentences),
                            record.labels, record.genes)
    adata.obsm["X_c2s"] = np.asarray(annotation_embeddings, dtype=np.float32)
    if adata.n_obs >= MIN_CELLS_FOR_UMAP:
        core.data.preprocessing.neighbors_umap(adata, "X_c2s", n_neighbors=settings.n_neighbors, seed=settings.seed, key_added="c2s")
    else:
        logger.warning("%d cells: too few for a kNN graph and UMAP of the embedding", adata.n_obs)
    return adata


def tabulate_predictions(annotation_labels: pd.DataFrame, annotation_qc: dict[str, Any]) -> pd.DataFrame:
    """cell, label, confidence and one probability column per label, for every input cell (those
    QC removed are Unassigned without probabilities)."""
    return core.tasks.annotation.prediction_table(annotation_labels, annotation_qc["input_cells"])


def plot_annotation_umap(annotated_adata: ad.AnnData) -> plt.Figure:
    """The UMAP of the C2S embedding coloured by the predicted cell type (an empty figure saying
    so when there were too few cells for one)."""
    if "X_umap_c2s" not in annotated_adata.obsm:
        return core.plotting.message_figure(f"{annotated_adata.n_obs} cells: too few for a UMAP", width_inches=5)
    return core.plotting.umap_plot(annotated_adata, "c2s_cell_type", basis="X_umap_c2s", title="C2S annotation (UMAP of the embedding)")


def summarize_annotation(
    annotated_adata: ad.AnnData, annotation_qc: dict[str, Any], annotation_sentences: dict[str, Any],
    annotator: dict[str, Any], params: dict[str, Any],
) -> dict[str, float]:
    """Cells annotated, share unassigned, cells per label, genes matched and, when the cells carry
    the label column, accuracy and macro-F1."""
    settings = read_parameters(AnnotationParameters, params, SECTION)
    record = core.tasks.annotation.AnnotatorRecord.from_dict(annotator)
    return core.tasks.annotation.annotation_metrics(annotated_adata, annotation_qc, core.tasks.annotation.KnownGeneSentences(**annotation_sentences), len(record.genes),
                              settings.label_column or record.label_column)
