"""Cell embeddings from a C2S language model, compared with PCA of the expression."""

from c2s_kedro.pipelines.embedding.pipeline import create_pipeline

__all__ = ["create_pipeline"]
