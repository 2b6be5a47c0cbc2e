"""data_processing: raw counts -> processed_adata. A modular pipeline: the screen runs it under
the ``perturbation`` namespace (pipeline_registry.py)."""

from kedro.pipeline import Pipeline, node, pipeline

from c2s_kedro.pipelines.data_processing import nodes


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(nodes.validate_raw_adata, ["raw_adata", "params:data_processing"], "validated_adata", name="validate_raw_adata"),
            node(
                nodes.filter_cells_and_genes,
                ["validated_adata", "params:data_processing.qc"],
                ["qc_adata", "qc_counts"],
                name="filter_cells_and_genes",
            ),
            node(nodes.normalize_counts, ["qc_adata", "params:data_processing"], "normalized_adata", name="normalize_counts"),
            node(nodes.embed_normalized_cells, ["normalized_adata", "params:data_processing"], "processed_adata", name="embed_normalized_cells"),
            node(
                nodes.plot_expression_umaps,
                ["processed_adata", "params:data_processing.umap_color_keys"],
                "expression_umap_plots",
                name="plot_expression_umaps",
            ),
            node(nodes.summarize_processing, ["qc_counts", "processed_adata"], "data_processing_metrics", name="summarize_processing"),
        ]
    )
