"""Cell-type prediction on the test split: generation, label scoring, and a baseline."""

from c2s_kedro.pipelines.evaluation.pipeline import create_baseline_pipeline, create_pipeline, create_prediction_pipeline

__all__ = ["create_baseline_pipeline", "create_pipeline", "create_prediction_pipeline"]
