"""Nodes of the embedding pipeline (workflow notes section 2)."""

from __future__ import annotations

import logging
from typing import Any

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import scanpy as sc
from datasets import Dataset

from c2s_kedro.core import plotting
from c2s_kedro.core.evaluation import embedding_quality
from c2s_kedro.core.inference import embed_prompts
from c2s_kedro.core.models import LanguageModel
from c2s_kedro.core.prompts import cell_type_prediction_prompts
from c2s_kedro.core.validation import require_obs_columns

logger = logging.getLogger(__name__)
SETTINGS = "conf/base/parameters_embedding.yml"


def build_embedding_prompts(cell_sentences: Dataset, foundation_model: LanguageModel, params: dict[str, Any]) -> dict[str, Any]:
    """The cell-type-prediction prompt of every cell, without the answer, fitted to the model's context.

    Genes beyond the model's context are dropped from the end of the sentence (logged); the
    template is fixed (``template_index``) so that embeddings are reproducible.
    """
    organism_column = params.get("organism_column", "organism")
    prompts, kept, available = cell_type_prediction_prompts(
        cell_sentences["cell_sentence"],
        cell_sentences[organism_column] if organism_column in cell_sentences.column_names else None,
        foundation_model.tokenizer,
        foundation_model.context_length,
        template_index=params.get("template_index", 0),
        top_k_genes=params.get("top_k_genes"),
        default_organism=params.get("default_organism", "Homo sapiens"),
    )
    return {"cell_name": list(cell_sentences["cell_name"]), "prompt": prompts, "genes_kept": kept, "genes_available": available}


def embed_cells(embedding_prompts: dict[str, Any], foundation_model: LanguageModel, params: dict[str, Any]) -> np.ndarray:
    """Mean-pooled last hidden layer of each prompt (cells x hidden size)."""
    return embed_prompts(foundation_model, embedding_prompts["prompt"], batch_size=params.get("batch_size", 16))


def build_embedding_adata(
    processed_adata: ad.AnnData, embedding_prompts: dict[str, Any], embeddings: np.ndarray, params: dict[str, Any]
) -> ad.AnnData:
    """The cells with ``obsm['X_c2s']``, a kNN graph and UMAP on it (no PCA), and the expression
    PCA/UMAP kept beside it for comparison."""
    names = embedding_prompts["cell_name"]
    missing = [n for n in names if n not in processed_adata.obs_names]
    if missing:
        raise ValueError(
            f"{len(missing)} embedded cells are not in processed_adata (e.g. {missing[:3]}); re-run "
            "sentence_conversion on the current processed_adata"
        )
    source = processed_adata[names]
    adata = ad.AnnData(obs=source.obs.copy(), obsm={"X_c2s": embeddings.astype(np.float32)})
    for key in ("X_pca", "X_umap"):
        if key in source.obsm:
            adata.obsm[f"{key}_expression"] = np.asarray(source.obsm[key])
    adata.obs["genes_in_prompt"] = embedding_prompts["genes_kept"]
    sc.pp.neighbors(adata, use_rep="X_c2s", n_neighbors=min(params.get("n_neighbors", 15), adata.n_obs - 1), random_state=params.get("seed", 0))
    sc.tl.umap(adata, random_state=params.get("seed", 0))
    adata.obsm["X_umap_c2s"] = adata.obsm.pop("X_umap")
    return adata


def plot_embedding_umaps(cell_embeddings: ad.AnnData, params: dict[str, Any]) -> dict[str, plt.Figure]:
    """Per obs key: the expression UMAP next to the C2S-embedding UMAP."""
    keys = [k for k in params["color_keys"] if k in cell_embeddings.obs.columns]
    skipped = sorted(set(params["color_keys"]) - set(keys))
    if skipped:
        logger.info("no obs column %s: those UMAP plots are skipped", skipped)
    figures = {}
    for key in keys:
        panels = [("C2S embedding", cell_embeddings.obsm["X_umap_c2s"])]
        if "X_umap_expression" in cell_embeddings.obsm:
            panels.insert(0, ("expression (PCA)", cell_embeddings.obsm["X_umap_expression"]))
        figures[f"{key}.png"] = plotting.umap_side_by_side(panels, cell_embeddings.obs[key], f"UMAP coloured by {key}")
    return figures


def score_embeddings(cell_embeddings: ad.AnnData, params: dict[str, Any]) -> dict[str, float]:
    """Silhouette by label and by batch, kNN label accuracy: C2S embedding and expression PCA side by side."""
    label, batch = params.get("label_key"), params.get("batch_key")
    require_obs_columns(cell_embeddings, [label], setting=f"embedding.label_key in {SETTINGS}")
    if batch and batch not in cell_embeddings.obs.columns:
        logger.info("no obs column '%s': batch metrics skipped", batch)
        batch = None
    metrics: dict[str, float] = {"n_cells": float(cell_embeddings.n_obs), "embedding_dim": float(cell_embeddings.obsm["X_c2s"].shape[1])}
    representations = {"c2s": cell_embeddings.obsm["X_c2s"]}
    if "X_pca_expression" in cell_embeddings.obsm:
        representations["pca"] = cell_embeddings.obsm["X_pca_expression"]
    for name, matrix in representations.items():
        scores = embedding_quality(
            matrix, cell_embeddings.obs[label].astype(str).to_numpy(),
            cell_embeddings.obs[batch].astype(str).to_numpy() if batch else None,
            k=params.get("knn_k", 15), seed=params.get("seed", 0),
        )
        metrics.update({f"{name}_{key}": value for key, value in scores.items()})
    metrics["mean_genes_in_prompt"] = float(cell_embeddings.obs["genes_in_prompt"].mean())
    return metrics
