"""processed h5ad -> Arrow dataset of cell sentences + vocabulary."""

from c2s_kedro.pipelines.sentence_conversion.pipeline import create_pipeline

__all__ = ["create_pipeline"]
