"""Fine-tune a C2S model on prompts built from the cell sentences (workflow notes sections 3 and 7)."""

from c2s_kedro.pipelines.finetuning.pipeline import create_pipeline

__all__ = ["create_pipeline"]
