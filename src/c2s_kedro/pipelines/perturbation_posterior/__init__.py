"""perturbation_posterior: sample the fine-tuned model's posterior over responses for the held-out
perturbations, turn it into expression, plot it and score it against the held-out cells and the
baselines."""

from c2s_kedro.pipelines.perturbation_posterior.pipeline import create_pipeline

__all__ = ["create_pipeline"]
