"""perturbation_finetuning: perturbation_base_model + perturbation_prompts -> perturbation_model, loss curves."""

from kedro.pipeline import Pipeline, node, pipeline

from c2s_kedro.pipelines.perturbation_finetuning import nodes


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
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
