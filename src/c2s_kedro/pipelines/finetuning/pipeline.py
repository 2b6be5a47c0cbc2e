"""finetuning: cell_sentences + data_split + foundation_model -> finetuned_model (with the label set, genes and
processing it learnt, for annotation), loss curves, and the annotator as the MLflow model c2s_annotator."""

from kedro.pipeline import Pipeline, node, pipeline

from c2s_kedro.pipelines.finetuning import nodes


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(
                nodes.format_finetuning_prompts,
                ["cell_sentences", "data_split", "foundation_model", "params:finetuning"],
                "finetuning_prompts",
                name="format_finetuning_prompts",
            ),
            node(
                nodes.finetune_model,
                ["foundation_model", "finetuning_prompts", "params:finetuning"],
                ["trained_model", "finetuning_log"],
                name="finetune_model",
            ),
            node(
                nodes.record_annotator_metadata,
                ["trained_model", "cell_sentences", "data_split", "params:finetuning", "params:data_processing",
                 "params:sentence_conversion"],
                ["finetuned_model", "recorded_model"],
                name="record_annotator_metadata",
            ),
            node(nodes.log_annotator_model, ["recorded_model", "params:annotation"], "annotator_mlflow_model",
                 name="log_annotator_model"),
            node(nodes.plot_finetuning_loss, "finetuning_log", "finetuning_loss_plot", name="plot_finetuning_loss"),
            node(
                nodes.summarize_finetuning,
                ["finetuning_log", "finetuning_prompts", "cell_sentences", "data_split", "params:finetuning"],
                "finetuning_metrics",
                name="summarize_finetuning",
            ),
        ]
    )
