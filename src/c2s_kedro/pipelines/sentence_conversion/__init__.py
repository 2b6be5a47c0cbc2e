"""processed h5ad -> Arrow dataset of cell sentences + vocabulary (+ the atlas's split)."""

from c2s_kedro.pipelines.sentence_conversion.pipeline import create_conversion_pipeline, create_pipeline

__all__ = ["create_conversion_pipeline", "create_pipeline"]
