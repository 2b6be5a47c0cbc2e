"""Annotate new cells with the fine-tuned model: labels with probabilities, embeddings, a UMAP."""

from c2s_kedro.pipelines.annotation.pipeline import create_default_input_pipeline, create_pipeline

__all__ = ["create_default_input_pipeline", "create_pipeline"]
