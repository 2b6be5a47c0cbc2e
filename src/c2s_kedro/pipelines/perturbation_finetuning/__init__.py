"""Fine-tune the perturbation base model to translate control cells into perturbed cells."""

from c2s_kedro.pipelines.perturbation_finetuning.pipeline import create_pipeline

__all__ = ["create_pipeline"]
