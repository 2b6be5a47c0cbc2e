"""embedding: foundation_model + cell_sentences -> cell_embeddings, UMAPs, metrics vs PCA."""

from kedro.pipeline import Pipeline, node, pipeline

from c2s_kedro.pipelines.embedding import nodes


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(
                nodes.build_embedding_prompts,
                ["cell_sentences", "foundation_model", "params:embedding"],
                "embedding_prompts",
                name="build_embedding_prompts",
            ),
            node(nodes.embed_cells, ["embedding_prompts", "foundation_model", "params:embedding"], "cell_embedding_array", name="embed_cells"),
            node(
                nodes.build_embedding_adata,
                ["processed_adata", "embedding_prompts", "cell_embedding_array", "params:embedding"],
                "cell_embeddings",
                name="build_embedding_adata",
            ),
            node(nodes.plot_embedding_umaps, ["cell_embeddings", "params:embedding"], "embedding_umap_plots", name="plot_embedding_umaps"),
            node(nodes.score_embeddings, ["cell_embeddings", "params:embedding"], "embedding_metrics", name="score_embeddings"),
        ]
    )
