"""Posterior samples -> expression and statistics -> plots and scores."""

from kedro.pipeline import Pipeline, node, pipeline

from c2s_kedro.pipelines.perturbation_posterior import nodes


def create_pipeline(**kwargs) -> Pipeline:
    """Sample the posterior, turn it into expression, plot it, probe what the model reads, and score
    it against the real cells, the baselines and the truth."""
    return pipeline(
        [
            node(nodes.sample_perturbation_posterior,
                 ["perturbation_model", "perturbation_prompts", "perturbation.vocabulary", "params:perturbation"],
                 "posterior_samples", name="sample_perturbation_posterior"),
            node(nodes.posterior_to_expression,
                 ["posterior_samples", "perturbation.processed_adata", "perturbation.rank_fit"],
                 ["posterior_samples_expression", "posterior_statistics"], name="posterior_to_expression"),
            node(nodes.plot_posterior,
                 ["posterior_samples_expression", "perturbation.cell_sentences", "perturbation_split",
                  "perturbation.rank_fit", "params:perturbation"],
                 ["posterior_pca_plot", "posterior_umap_plot"], name="plot_posterior"),
            node(nodes.probe_input_sensitivity,
                 ["perturbation_model", "perturbation_prompts", "perturbation.cell_sentences", "perturbation.vocabulary",
                  "params:perturbation"],
                 ["perturbation_sensitivity", "perturbation_sensitivity_metrics"], name="probe_input_sensitivity"),
            node(nodes.evaluate_perturbation_predictions,
                 ["posterior_samples_expression", "perturbation.cell_sentences", "perturbation_split",
                  "perturbation.rank_fit", "perturbation_truth", "perturbation_sensitivity_metrics", "params:perturbation"],
                 ["perturbation_scores", "perturbation_summary", "perturbation_knockdown", "perturbation_posterior_metrics"],
                 name="evaluate_perturbation_predictions"),
            node(nodes.plot_target_presence, ["perturbation_knockdown", "params:perturbation"], "perturbation_knockdown_plot",
                 name="plot_target_presence"),
        ]
    )
