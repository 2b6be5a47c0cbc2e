"""sentence_conversion: processed_adata -> cell_sentences + vocabulary."""

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
            node(
                nodes.summarize_sentences,
                ["cell_sentences", "vocabulary"],
                "sentence_conversion_metrics",
                name="summarize_sentences",
            ),
        ]
    )
