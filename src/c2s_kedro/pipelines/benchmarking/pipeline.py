"""benchmarking: rank_fit, reconstructed_adata, agreement plots and metrics. The rank-fit part is a
modular pipeline: the screen runs it under the ``perturbation`` namespace."""

from kedro.pipeline import Pipeline, node, pipeline

from c2s_kedro.pipelines.benchmarking import nodes


def create_rank_fit_pipeline(**kwargs) -> Pipeline:
    """processed_adata (cells of data_split parts, if set) -> rank_fit and its plot."""
    return pipeline(
        [
            node(
                nodes.fit_rank_to_expression,
                ["processed_adata", "data_split", "params:benchmarking.rank_fit"],
                ["rank_fit", "rank_expression_plot"],
                name="fit_rank_to_expression",
            ),
        ]
    )


def create_pipeline(**kwargs) -> Pipeline:
    return create_rank_fit_pipeline() + pipeline(
        [
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
