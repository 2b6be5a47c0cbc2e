"""Project pipelines."""

from kedro.pipeline import Pipeline

from c2s_kedro.pipelines import (
    benchmarking,
    cell_generation,
    data_processing,
    embedding,
    evaluation,
    finetuning,
    perturbation,
    pretraining,
    sentence_conversion,
)


def register_pipelines() -> dict[str, Pipeline]:
    """Each pipeline runs alone (missing upstream outputs are produced first, see hooks.py); the
    default ``kedro run`` runs them all in order."""
    pipelines = {
        "data_processing": data_processing.create_pipeline(),
        "sentence_conversion": sentence_conversion.create_pipeline(),
        "benchmarking": benchmarking.create_pipeline(),
        "pretraining": pretraining.create_pipeline(),
        "embedding": embedding.create_pipeline(),
        "finetuning": finetuning.create_pipeline(),
        # what the fine-tuned model does: cell-type prediction (two ways and a baseline) and generated cells
        "evaluation": evaluation.create_pipeline() + cell_generation.create_pipeline(),
        "cell_type_evaluation": evaluation.create_pipeline(),
        "zero_shot_annotation": evaluation.create_zero_shot_pipeline(),
        "cell_generation": cell_generation.create_pipeline(),
        "perturbation_data": perturbation.create_data_pipeline(),
        "perturbation_finetuning": perturbation.create_finetuning_pipeline(),
        "perturbation_posterior": perturbation.create_posterior_pipeline(),
    }
    pipelines["__default__"] = sum(pipelines.values(), Pipeline([]))
    return pipelines
