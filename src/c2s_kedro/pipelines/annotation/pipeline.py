"""annotation: a new raw-count h5ad (annotation_raw_adata) -> the fine-tuned model's labels with
probabilities, the foundation model's embedding, a UMAP, metrics."""

from kedro.pipeline import Pipeline, node, pipeline

from c2s_kedro.pipelines.annotation import nodes


def create_default_input_pipeline(**kwargs) -> Pipeline:
    """The default ``annotation_raw_adata``: the raw counts of the test split's cells. Not part of
    ``annotation`` itself, so a user's own ``annotation_raw_adata`` is read, never written."""
    return pipeline([
        node(nodes.select_test_cells, ["raw_adata", "data_split"], "annotation_raw_adata", name="select_test_cells"),
    ])


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline([
        node(nodes.read_annotator, "finetuned_model", "annotator", name="read_annotator"),
        node(nodes.prepare_annotation_cells, ["annotation_raw_adata", "annotator", "params:annotation"],
             ["annotation_cells", "annotation_qc"], name="prepare_annotation_cells"),
        node(nodes.build_annotation_sentences, ["annotation_cells", "annotator"], "annotation_sentences",
             name="build_annotation_sentences"),
        node(nodes.label_annotation_cells,
             ["annotation_sentences", "annotation_cells", "finetuned_model", "annotator", "params:annotation"],
             "annotation_labels", name="label_annotation_cells"),
        node(nodes.embed_annotation_cells, ["annotation_sentences", "annotation_cells", "foundation_model", "params:embedding"],
             "annotation_embeddings", name="embed_annotation_cells"),
        node(nodes.build_annotated_adata,
             ["annotation_cells", "annotation_labels", "annotation_sentences", "annotation_embeddings", "annotator",
              "params:embedding"],
             "annotated_adata", name="build_annotated_adata"),
        node(nodes.tabulate_predictions, ["annotation_labels", "annotation_qc"], "annotation_predictions",
             name="tabulate_predictions"),
        node(nodes.plot_annotation_umap, "annotated_adata", "annotation_umap_plot", name="plot_annotation_umap"),
        node(nodes.summarize_annotation,
             ["annotated_adata", "annotation_qc", "annotation_sentences", "annotator", "params:annotation"],
             "annotation_metrics", name="summarize_annotation"),
    ])
