"""perturbation_data's own nodes: the screen's checks before the atlas's processing, then its split,
pairs and prompts. pipeline_registry.py runs them with the atlas's modular pipelines (processing,
sentences, rank fit) in one ``perturbation`` namespace, so the names here are the atlas's
(``processed_adata``, ``cell_sentences``, ``vocabulary``, ``data_split``) and become
``perturbation.processed_adata`` etc.; the split and the truth are exposed as ``perturbation_split``
and ``perturbation_truth``."""

from kedro.pipeline import Pipeline, node, pipeline

from c2s_kedro.pipelines.perturbation_data import nodes


def create_pipeline(**kwargs) -> Pipeline:
    """Screen -> checks -> raw_adata; processed_adata -> split."""
    return pipeline([
        node(nodes.check_screen_layout, ["perturbseq_raw", "params:perturbation"], ["raw_adata", "perturbation_truth"],
             name="check_screen_layout"),
        node(nodes.split_perturbation_screen, ["processed_adata", "params:perturbation"], "data_split",
             name="split_perturbation_screen"),
        node(nodes.summarize_screen, "data_split", "perturbation_data_metrics", name="summarize_screen"),
    ])
