"""cell_generation: finetuned_model -> generated cells per type, their expression, comparison with real cells."""

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
                nodes.compare_generated_with_real,
                ["processed_adata", "generated_adata", "generated_cells", "params:cell_generation"],
                ["cell_generation_metrics", "cell_generation_plots"],
                name="compare_generated_with_real",
            ),
        ]
    )
