"""perturbation_data -> perturbation_finetuning -> perturbation_posterior.

Each runs alone: missing upstream outputs are produced first (hooks.py), so
``kedro run --pipeline=perturbation_posterior`` on a fresh clone simulates the screen, fine-tunes
and samples; a second run only samples and scores again.
"""

from kedro.pipeline import Pipeline, node, pipeline

from c2s_kedro.pipelines.perturbation import nodes


def create_data_pipeline(**kwargs) -> Pipeline:
    """Screen -> QC -> sentences -> split -> base model -> prompts."""
    return pipeline(
        [
            node(nodes.prepare_screen, ["perturbseq_raw", "params:perturbation"],
                 ["perturbseq_processed", "perturbation_qc_metrics", "perturbation_truth"], name="prepare_screen"),
            node(nodes.screen_sentences, ["perturbseq_processed", "params:perturbation"],
                 ["perturbseq_sentences", "perturbseq_vocabulary"], name="screen_sentences"),
            node(nodes.split_perturbation_screen, ["perturbseq_processed", "params:perturbation"], "perturbation_split",
                 name="split_perturbation_screen"),
            node(nodes.fit_screen_rank_expression, ["perturbseq_processed", "perturbation_split", "params:perturbation"],
                 "perturbation_rank_fit", name="fit_screen_rank_expression"),
            node(nodes.initialize_perturbation_model, ["perturbseq_vocabulary", "params:perturbation"],
                 "perturbation_base_model", name="initialize_perturbation_model"),
            node(nodes.format_perturbation_prompts,
                 ["perturbseq_sentences", "perturbation_split", "perturbation_base_model", "params:perturbation"],
                 "perturbation_prompts", name="format_perturbation_prompts"),
        ]
    )


def create_finetuning_pipeline(**kwargs) -> Pipeline:
    """Fine-tune the base model to translate control cells into perturbed cells."""
    return pipeline(
        [
            node(nodes.finetune_perturbation_model, ["perturbation_base_model", "perturbation_prompts", "params:perturbation"],
                 ["perturbation_model", "perturbation_finetuning_log"], name="finetune_perturbation_model"),
            node(nodes.plot_perturbation_loss, "perturbation_finetuning_log", "perturbation_loss_plot",
                 name="plot_perturbation_loss"),
        ]
    )


def create_posterior_pipeline(**kwargs) -> Pipeline:
    """Sample the posterior, turn it into expression, plot it and score it against the truth."""
    return pipeline(
        [
            node(nodes.sample_perturbation_posterior,
                 ["perturbation_model", "perturbation_prompts", "perturbseq_vocabulary", "params:perturbation"],
                 "posterior_samples", name="sample_perturbation_posterior"),
            node(nodes.posterior_to_expression,
                 ["posterior_samples", "perturbseq_processed", "perturbation_rank_fit", "params:perturbation"],
                 ["posterior_samples_expression", "posterior_statistics"], name="posterior_to_expression"),
            node(nodes.plot_posterior,
                 ["posterior_samples_expression", "perturbseq_sentences", "perturbation_split", "perturbation_rank_fit",
                  "params:perturbation"],
                 ["posterior_pca_plot", "posterior_umap_plot"], name="plot_posterior"),
            node(nodes.evaluate_perturbation_predictions,
                 ["posterior_samples_expression", "perturbseq_sentences", "perturbation_split", "perturbation_rank_fit",
                  "perturbation_truth", "params:perturbation"],
                 ["perturbation_scores", "perturbation_summary", "perturbation_metrics"],
                 name="evaluate_perturbation_predictions"),
        ]
    )
