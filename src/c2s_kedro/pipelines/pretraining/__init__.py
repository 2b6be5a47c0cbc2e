"""The offline foundation model: a small GPT-NeoX trained here from scratch on cell sentences."""

from c2s_kedro.pipelines.pretraining.pipeline import create_pipeline

__all__ = ["create_pipeline"]
