"""perturbation_data: a Perturb-seq screen -> the atlas's processing, sentences and rank fit under
the ``perturbation`` namespace -> split by held-out perturbations -> control/perturbed pairs ->
prompts."""

from c2s_kedro.pipelines.perturbation_data.pipeline import create_pipeline

__all__ = ["create_pipeline"]
