"""evaluation: test-split cell-type predictions of the fine-tuned model (two ways) and a
logistic-regression baseline. The prediction part is a modular pipeline: zero_shot_annotation runs
it under the ``zero_shot`` namespace with the foundation model (pipeline_registry.py)."""

from kedro.pipeline import Pipeline, node, pipeline

from c2s_kedro.pipelines.evaluation import nodes


def create_baseline_pipeline(**kwargs) -> Pipeline:
    """Logistic regression on the expression of the train cells, applied to the test cells."""
    return pipeline([
        node(nodes.predict_by_baseline, ["processed_adata", "data_split", "params:evaluation"], "baseline_predictions",
             name="predict_by_baseline"),
    ])


def create_prediction_pipeline(plot_baseline: bool = True, **kwargs) -> Pipeline:
    """``finetuned_model`` on the test cells: generated answers, label scoring, scores beside the
    baselines (logistic regression on the expression, and on what the prompts' sentences carry).
    ``plot_baseline`` False: the expression baseline's confusion matrix is drawn by the evaluation
    that shares its predictions, not again."""
    return pipeline([
        node(nodes.build_evaluation_prompts, ["cell_sentences", "data_split", "finetuned_model", "params:evaluation"],
             "evaluation_prompts", name="build_evaluation_prompts"),
        node(nodes.predict_by_generation, ["evaluation_prompts", "finetuned_model", "params:evaluation"],
             "generation_predictions", name="predict_by_generation"),
        node(nodes.predict_by_label_scoring, ["evaluation_prompts", "finetuned_model", "params:evaluation"],
             "label_scoring_predictions", name="predict_by_label_scoring"),
        node(nodes.predict_by_sentence_baseline,
             ["cell_sentences", "data_split", "evaluation_prompts", "vocabulary", "rank_fit", "params:evaluation"],
             "sentence_baseline_predictions", name="predict_by_sentence_baseline"),
        node(nodes.score_predictions if plot_baseline else nodes.score_beside_shared_baseline,
             ["generation_predictions", "label_scoring_predictions", "baseline_predictions", "sentence_baseline_predictions",
              "evaluation_prompts"],
             ["evaluation_metrics", "per_class_scores", "confusion_matrices", "cell_type_predictions"],
             name="score_predictions"),
    ])


def create_pipeline(**kwargs) -> Pipeline:
    return create_baseline_pipeline() + create_prediction_pipeline()
