"""sentence_conversion: processed_adata -> cell_sentences + vocabulary, and the atlas's data_split.
The conversion part is a modular pipeline: the screen runs it under the ``perturbation`` namespace
(its split is by perturbation, made in perturbation_data)."""

from kedro.pipeline import Pipeline, node, pipeline

from c2s_kedro.pipelines.sentence_conversion import nodes


def create_conversion_pipeline(**kwargs) -> Pipeline:
    """processed_adata -> cell_sentences, vocabulary and their metrics."""
    return pipeline(
        [
            node(
                nodes.convert_to_cell_sentences,
                ["processed_adata", "params:sentence_conversion"],
                ["cell_sentences", "vocabulary", "label_spellings"],
                name="convert_to_cell_sentences",
            ),
            node(
                nodes.summarize_sentences,
                ["cell_sentences", "vocabulary", "label_spellings"],
                "sentence_conversion_metrics",
                name="summarize_sentences",
            ),
        ]
    )


def create_pipeline(**kwargs) -> Pipeline:
    return create_conversion_pipeline() + pipeline(
        [node(nodes.split_dataset, ["cell_sentences", "params:data_split"], "data_split", name="split_cells")]
    )
