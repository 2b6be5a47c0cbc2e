"""Nodes of the embedding pipeline (workflow notes section 2): they read the settings once and call core."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any


# each core module loads when a node first uses it (c2s_kedro/core/__init__.py): every run imports every
# pipeline's nodes (the registry composes each pipeline with its upstream) and pays only for what its nodes use
from c2s_kedro import core
from c2s_kedro.parameters import read_parameters, setting_hint
from c2s_kedro.parameters.inference import EmbeddingPipelineParameters

if TYPE_CHECKING:
    import anndata as ad
    import matplotlib.pyplot as plt
    import numpy as np
    from datasets import Dataset

    from c2s_kedro.core.models.loading import LanguageModel

logger = logging.getLogger(__name__)


def build_embedding_prompts(cell_sentences: Dataset, foundation_model: LanguageModel, params: dict[str, Any]) -> dict[str, Any]:
    """The cell-type-prediction prompt of every cell, without the answer, fitted to the model's context.

    Genes beyond the model's context are dropped from the end of the sentence (logged); the
    template is fixed (``template_index``) so that embeddings are reproducible; it is one of
    ours or of the ``prompt_templates`` file.
    """
    settings = read_parameters(EmbeddingPipelineParameters, params, "embedding")
    organism_column = settings.organism_column
    with setting_hint("embedding.prompt_templates"):
        templates = core.prompts.formatting.task_templates("cell_type_prediction", core.prompts.formatting.read_template_files(settings.prompt_templates))
    with setting_hint("embedding.template_index", IndexError):
        prompts, kept, available = core.prompts.formatting.cell_type_prediction_prompts(
            cell_sentences["cell_sentence"],
            cell_sentences[organism_column] if organism_column in cell_sentences.column_names else None,
            foundation_model.tokenizer,
            foundation_model.context_length,
            template_index=settings.template_index,
            top_k_genes=settings.top_k_genes,
            default_organism=settings.default_organism,
            templates=templates,
        )
    return {"cell_name": list(cell_sentences["cell_name"]), "prompt": prompts, "genes_kept": kept, "genes_available": available}


def embed_cells(embedding_prompts: dict[str, Any], foundation_model: LanguageModel, params: dict[str, Any]) -> np.ndarray:
    """The last hidden layer of each prompt pooled by ``pooling`` (cells x hidden size)."""
    settings = read_parameters(EmbeddingPipelineParameters, params, "embedding")
    with setting_hint("embedding.pooling"):
        return core.models.inference.embed_prompts(foundation_model, embedding_prompts["prompt"], batch_size=settings.batch_size,
                             pooling=settings.pooling)


def build_embedding_adata(
    processed_adata: ad.AnnData, embedding_prompts: dict[str, Any], embeddings: np.ndarray, params: dict[str, Any]
) -> ad.AnnData:
    """The cells with ``obsm['X_c2s']``, a kNN graph and UMAP on it (``obsm['X_umap_c2s']``, no PCA),
    and the expression PCA/UMAP kept beside it for comparison."""
    settings = read_parameters(EmbeddingPipelineParameters, params, "embedding")
    return core.tasks.embedding.embedding_adata(
        processed_adata, embedding_prompts["cell_name"], embeddings, embedding_prompts["genes_kept"],
        n_neighbors=settings.n_neighbors, seed=settings.seed,
    )


def plot_embedding_umaps(cell_embeddings: ad.AnnData, params: dict[str, Any]) -> dict[str, plt.Figure]:
    """Per obs key: the expression UMAP next to the C2S-embedding UMAP."""
    settings = read_parameters(EmbeddingPipelineParameters, params, "embedding")
    keys = [k for k in settings.color_keys if k in cell_embeddings.obs.columns]
    skipped = sorted(set(settings.color_keys) - set(keys))
    if skipped:
        logger.info("no obs column %s: those UMAP plots are skipped", skipped)
    figures = {}
    for key in keys:
        panels = [("C2S embedding", cell_embeddings.obsm["X_umap_c2s"])]
        if "X_umap_expression" in cell_embeddings.obsm:
            panels.insert(0, ("expression (PCA)", cell_embeddings.obsm["X_umap_expression"]))
        figures[f"{key}.png"] = core.plotting.umap_side_by_side(panels, cell_embeddings.obs[key], f"UMAP coloured by {key}")
    return figures


def score_embeddings(cell_embeddings: ad.AnnData, params: dict[str, Any]) -> dict[str, float]:
    """Silhouette by label and by batch, kNN label accuracy: C2S embedding and expression PCA side by side."""
    settings = read_parameters(EmbeddingPipelineParameters, params, "embedding")
    with setting_hint("embedding.label_key"):
        return core.tasks.evaluation.embedding_scores(cell_embeddings, settings.label_key, settings.batch_key, k=settings.knn_k, seed=settings.seed)
