"""evaluation: test-split cell-type predictions of the fine-tuned model (two ways) and a baseline;
zero_shot_annotation: the same with the foundation model."""

from kedro.pipeline import Pipeline, node, pipeline

from c2s_kedro.pipelines.evaluation import nodes


def _annotation(model: str, prefix: str) -> Pipeline:
    return pipeline(
        [
            node(
                nodes.build_evaluation_prompts,
                ["cell_sentences", "data_split", model, "params:evaluation"],
                f"{prefix}evaluation_prompts",
                name=f"{prefix}build_evaluation_prompts",
            ),
            node(
                nodes.predict_by_generation,
                [f"{prefix}evaluation_prompts", model, "params:evaluation"],
                f"{prefix}generation_predictions",
                name=f"{prefix}predict_by_generation",
            ),
            node(
                nodes.predict_by_label_scoring,
                [f"{prefix}evaluation_prompts", model, "params:evaluation"],
                f"{prefix}label_scoring_predictions",
                name=f"{prefix}predict_by_label_scoring",
            ),
            node(
                nodes.score_predictions,
                [f"{prefix}generation_predictions", f"{prefix}label_scoring_predictions", "baseline_predictions", f"{prefix}evaluation_prompts"],
                [f"{prefix}evaluation_metrics", f"{prefix}per_class_scores", f"{prefix}confusion_matrices", f"{prefix}cell_type_predictions"],
                name=f"{prefix}score_predictions",
            ),
        ]
    )


def _baseline() -> Pipeline:
    return pipeline(
        [
            node(
                nodes.predict_by_baseline,
                ["processed_adata", "data_split", "params:evaluation"],
                "baseline_predictions",
                name="predict_by_baseline",
            )
        ]
    )


def create_pipeline(**kwargs) -> Pipeline:
    return _baseline() + _annotation("finetuned_model", "")


def create_zero_shot_pipeline(**kwargs) -> Pipeline:
    return _baseline() + _annotation("foundation_model", "zero_shot_")
