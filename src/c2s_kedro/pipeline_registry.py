"""Project pipelines.

A pipeline needed twice is one modular pipeline instantiated under a namespace: the screen goes
through the atlas's processing, sentence and rank-fit pipelines as ``perturbation.*``, and the
zero-shot evaluation is the evaluation's prediction part as ``zero_shot.*`` with the foundation
model.

Each registered pipeline is its own nodes (``own_pipelines``) with every node upstream of them, so
it runs alone on a fresh clone. The project's ``kedro run`` (c2s_kedro.cli) runs of that upstream
only what is missing (c2s_kedro.upstream); the pipeline's own nodes always run.
"""

from kedro.pipeline import Pipeline, pipeline

from c2s_kedro.pipelines import (
    annotation,
    benchmarking,
    cell_generation,
    data_processing,
    embedding,
    evaluation,
    finetuning,
    perturbation_data,
    perturbation_finetuning,
    perturbation_posterior,
    pretraining,
    sentence_conversion,
)

SCREEN = "perturbation"
ZERO_SHOT = "zero_shot"


def _screen_data() -> Pipeline:
    """The screen in one ``perturbation`` namespace: its checks, the atlas's processing, sentence
    conversion and rank fit (``perturbation.processed_adata``, ``.cell_sentences``, ``.vocabulary``,
    ``.rank_fit``; settings ``perturbation.data_processing`` etc.), then its split."""
    screen = (
        perturbation_data.create_pipeline()
        + data_processing.create_pipeline()
        + sentence_conversion.create_conversion_pipeline()
        + benchmarking.create_rank_fit_pipeline()
    )
    exposed = ["perturbation_truth", "perturbation_data_metrics"]
    return pipeline(
        screen, namespace=SCREEN, inputs={"perturbseq_raw"},
        outputs={"data_split": "perturbation_split", **{name: name for name in exposed}},
        parameters={"params:perturbation": "params:perturbation"},
    )


def _zero_shot() -> Pipeline:
    """The evaluation's prediction part with the foundation model, outputs as ``zero_shot.*``."""
    shared = {"cell_sentences", "data_split", "baseline_predictions", "vocabulary", "rank_fit"}
    return evaluation.create_baseline_pipeline() + pipeline(
        evaluation.create_prediction_pipeline(plot_baseline=False), namespace=ZERO_SHOT,
        inputs={"finetuned_model": "foundation_model", **{name: name for name in shared}},
        parameters={"params:evaluation": "params:evaluation"},
    )


def own_pipelines() -> dict[str, Pipeline]:
    """Each pipeline by name, its own nodes only."""
    return {
        "data_processing": data_processing.create_pipeline(),
        "sentence_conversion": sentence_conversion.create_pipeline(),
        "benchmarking": benchmarking.create_pipeline(),
        "pretraining": pretraining.create_pipeline(),
        "embedding": embedding.create_pipeline(),
        "finetuning": finetuning.create_pipeline(),
        # what the fine-tuned model does: cell-type prediction (two ways and a baseline) and generated cells
        "evaluation": evaluation.create_pipeline() + cell_generation.create_pipeline(),
        "cell_type_evaluation": evaluation.create_pipeline(),
        "zero_shot_annotation": _zero_shot(),
        "cell_generation": cell_generation.create_pipeline(),
        "perturbation_data": _screen_data(),
        "perturbation_finetuning": perturbation_finetuning.create_pipeline(),
        "perturbation_posterior": perturbation_posterior.create_pipeline(),
        # annotation_input writes the default annotation_raw_adata (the test split's counts); a run of
        # annotation alone produces it first when it is missing, unless your environment defines it
        "annotation_input": annotation.create_default_input_pipeline(),
        "annotation": annotation.create_pipeline(),
    }


def register_pipelines() -> dict[str, Pipeline]:
    """Each pipeline with its upstream; the default ``kedro run`` runs them all in order."""
    own = own_pipelines()
    project = sum(own.values(), Pipeline([]))
    pipelines = {name: project.to_nodes(*(n.name for n in nodes.nodes)) for name, nodes in own.items()}
    pipelines["__default__"] = project
    return pipelines
