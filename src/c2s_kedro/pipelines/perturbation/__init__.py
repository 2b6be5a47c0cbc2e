"""Perturbation-response prediction with a posterior over responses."""

from c2s_kedro.pipelines.perturbation.pipeline import (
    create_data_pipeline,
    create_finetuning_pipeline,
    create_posterior_pipeline,
)

__all__ = ["create_data_pipeline", "create_finetuning_pipeline", "create_posterior_pipeline"]
