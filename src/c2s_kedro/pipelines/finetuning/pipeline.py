"""finetuning: cell_sentences + data_split + foundation_model -> finetuned_model, loss curves."""

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
                ["finetuned_model", "finetuning_log"],
                name="finetune_model",
            ),
            node(nodes.plot_finetuning_loss, "finetuning_log", "finetuning_loss_plot", name="plot_finetuning_loss"),
            node(
                nodes.summarize_finetuning,
                ["finetuning_log", "finetuning_prompts"],
                "finetuning_metrics",
                name="summarize_finetuning",
            ),
        ]
    )
