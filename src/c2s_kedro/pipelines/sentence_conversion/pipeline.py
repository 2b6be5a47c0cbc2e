"""sentence_conversion: processed_adata -> cell_sentences + vocabulary + data_split."""

from kedro.pipeline import Pipeline, node, pipeline

from c2s_kedro.pipelines.sentence_conversion import nodes


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(
                nodes.convert_to_cell_sentences,
                ["processed_adata", "params:sentence_conversion"],
                ["cell_sentences", "vocabulary"],
                name="convert_to_cell_sentences",
            ),
            node(nodes.split_dataset, ["cell_sentences", "params:sentence_conversion.split"], "data_split", name="split_cells"),
            node(
                nodes.summarize_sentences,
                ["cell_sentences", "vocabulary"],
                "sentence_conversion_metrics",
                name="summarize_sentences",
            ),
        ]
    )
