"""benchmarking: rank_fit, reconstructed_adata, agreement plots and metrics."""

from kedro.pipeline import Pipeline, node, pipeline

from c2s_kedro.pipelines.benchmarking import nodes


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(
                nodes.fit_rank_to_expression,
                ["processed_adata", "params:benchmarking"],
                ["rank_fit", "rank_expression_plot"],
                name="fit_rank_to_expression",
            ),
            node(
                nodes.reconstruct_adata,
                ["cell_sentences", "rank_fit", "processed_adata", "params:benchmarking"],
                "reconstructed_adata",
                name="reconstruct_adata",
            ),
            node(
                nodes.compare_reconstruction,
                ["processed_adata", "reconstructed_adata", "params:benchmarking"],
                ["reconstruction_agreement", "reconstruction_plot", "umap_comparison_plot"],
                name="compare_reconstruction",
            ),
            node(
                nodes.summarize_benchmark,
                ["rank_fit", "reconstruction_agreement"],
                "benchmarking_metrics",
                name="summarize_benchmark",
            ),
        ]
    )
