"""How much expression survives the rank conversion: fit, reconstruction, UMAP agreement."""

from c2s_kedro.pipelines.benchmarking.pipeline import create_pipeline, create_rank_fit_pipeline

__all__ = ["create_pipeline", "create_rank_fit_pipeline"]
