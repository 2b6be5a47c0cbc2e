"""Generate cells of each type with the fine-tuned model and compare them with real cells (notes section 5)."""

from c2s_kedro.pipelines.cell_generation.pipeline import create_pipeline

__all__ = ["create_pipeline"]
