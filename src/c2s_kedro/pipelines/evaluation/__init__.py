"""Cell-type annotation of the test cells, two ways, against a baseline (workflow notes sections 4 and 6)."""

from c2s_kedro.pipelines.evaluation.pipeline import create_pipeline, create_zero_shot_pipeline

__all__ = ["create_pipeline", "create_zero_shot_pipeline"]
