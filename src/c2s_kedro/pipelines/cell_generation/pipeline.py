"""cell_generation: finetuned_model -> generation-only training -> generation_model -> generated cells per type, their expression, comparison with real cells
(and with real test cells rebuilt from sentences of the same length: the ceiling)."""

from kedro.pipeline import Pipeline, node, pipeline

from c2s_kedro.pipelines.cell_generation import nodes


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(
                nodes.train_generation_model,
                ["finetuned_model", "finetuning_prompts", "params:finetuning", "params:cell_generation"],
                ["generation_model", "generation_training_log"],
                name="train_generation_model",
            ),
            node(
                nodes.plot_generation_training_loss,
                "generation_training_log",
                "generation_training_loss_plot",
                name="plot_generation_training_loss",
            ),
            node(
                nodes.build_generation_prompts,
                ["cell_sentences", "data_split", "generation_model", "params:cell_generation"],
                "generation_prompts",
                name="build_generation_prompts",
            ),
            node(
                nodes.generate_cells,
                ["generation_prompts", "generation_model", "vocabulary", "params:cell_generation"],
                "generated_cells",
                name="generate_cells",
            ),
            node(
                nodes.reconstruct_generated_cells,
                ["generated_cells", "rank_fit", "processed_adata"],
                "generated_adata",
                name="reconstruct_generated_cells",
            ),
            node(
                nodes.reconstruct_real_test_cells,
                ["cell_sentences", "data_split", "generation_prompts", "rank_fit", "processed_adata", "params:cell_generation"],
                "reconstructed_real_adata",
                name="reconstruct_real_test_cells",
            ),
            node(
                nodes.compare_generated_with_real,
                ["processed_adata", "generated_adata", "generated_cells", "reconstructed_real_adata", "data_split",
                 "params:cell_generation"],
                ["cell_generation_metrics", "cell_generation_plots"],
                name="compare_generated_with_real",
            ),
        ]
    )
