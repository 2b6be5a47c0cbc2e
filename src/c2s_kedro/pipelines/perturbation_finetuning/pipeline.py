"""perturbation_finetuning: the screen's vocabulary -> perturbation_base_model (the offline default,
left out where your environment sets it); the screen's sentences and split -> perturbation_prompts
in the base model's tokens; both -> perturbation_model, loss curves."""

from kedro.pipeline import Pipeline, node, pipeline

from c2s_kedro.pipelines.perturbation_finetuning import nodes


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(
                nodes.initialize_perturbation_model,
                ["perturbation.vocabulary", "perturbation_split", "params:perturbation"],
                "perturbation_base_model",
                name="initialize_perturbation_model",
            ),
            node(
                nodes.format_perturbation_prompts,
                ["perturbation.cell_sentences", "perturbation_split", "perturbation_base_model", "params:perturbation"],
                "perturbation_prompts",
                name="format_perturbation_prompts",
            ),
            node(
                nodes.finetune_perturbation_model,
                ["perturbation_base_model", "perturbation_prompts", "params:perturbation"],
                ["perturbation_model", "perturbation_finetuning_log"],
                name="finetune_perturbation_model",
            ),
            node(
                nodes.plot_perturbation_loss,
                "perturbation_finetuning_log",
                "perturbation_loss_plot",
                name="plot_perturbation_loss",
            ),
        ]
    )
