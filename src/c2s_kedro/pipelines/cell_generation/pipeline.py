"""cell_generation: finetuned_model -> generated cells per type, their expression, comparison with real cells
(and with real test cells rebuilt from sentences of the same length: the ceiling)."""

from kedro.pipeline import Pipeline, node, pipeline

from c2s_kedro.pipelines.cell_generation import nodes


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(
                nodes.build_generation_prompts,
                ["cell_sentences", "data_split", "finetuned_model", "params:cell_generation"],
                "generation_prompts",
                name="build_generation_prompts",
            ),
            node(
                nodes.generate_cells,
                ["generation_prompts", "finetuned_model", "vocabulary", "params:cell_generation"],
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
