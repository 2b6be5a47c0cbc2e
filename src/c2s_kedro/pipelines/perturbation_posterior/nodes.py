"""Nodes of the perturbation_posterior pipeline (workflow notes section 11): they read the
settings once and wire core.perturbation and core.perturbation_evaluation."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any


# each core module loads when a node first uses it (c2s_kedro/core/__init__.py): every run imports every
# pipeline's nodes (c2s_kedro.runner looks up producers of missing inputs) and pays only for what its nodes use
from c2s_kedro import core
from c2s_kedro.parameters import read_parameters, setting_hint
from c2s_kedro.parameters.perturbation import PerturbationParameters

if TYPE_CHECKING:
    import anndata as ad
    import matplotlib.pyplot as plt
    import pandas as pd
    from datasets import Dataset, DatasetDict

    from c2s_kedro.core.models import LanguageModel

SECTION = "perturbation"


def _settings(params: dict[str, Any]) -> PerturbationParameters:
    return read_parameters(PerturbationParameters, params, SECTION)


def _part_cells(cell_sentences: Dataset, split: dict[str, Any], part: str, genes: list[str], rank_fit: dict[str, Any],
                 settings: PerturbationParameters) -> ad.AnnData:
    """The perturbed and control cells of ``part`` in the model's space (top-k sentences)."""
    with setting_hint(f"{SECTION}.sentence_conversion.label_columns", KeyError):  # the perturbation column
        return core.perturbation_evaluation.sentence_space_cells(
            cell_sentences, list(split[part]) + list(split[f"control_{part}"]), settings.columns().perturbation, genes,
            core.sentences.RankFit.from_dict(rank_fit), settings.top_k_genes, f"real-{part}",
        )


def sample_perturbation_posterior(
    perturbation_model: LanguageModel, perturbation_prompts: DatasetDict, vocabulary: dict[str, int],
    params: dict[str, Any],
) -> pd.DataFrame:
    """For ``prompts_per_perturbation`` test prompts of each held-out perturbation chosen by
    ``posterior.perturbations`` (all by default): ``n_samples`` constrained samples at each
    temperature, one prefill per prompt."""
    posterior = _settings(params).posterior
    with setting_hint(f"{SECTION}.posterior"):
        return core.perturbation.sample_test_posterior(
            perturbation_model, perturbation_prompts["test"], list(vocabulary),
            prompts_per_perturbation=posterior.prompts_per_perturbation, n_samples=posterior.n_samples,
            temperatures=posterior.temperatures, seed=posterior.seed, batch_size=posterior.batch_size,
            perturbations=posterior.perturbations, min_genes=posterior.min_genes,
        )


def posterior_to_expression(
    posterior_samples: pd.DataFrame, processed_adata: ad.AnnData, rank_fit: dict[str, Any],
) -> tuple[ad.AnnData, ad.AnnData]:
    """Each sample as expression (rank -> expression fit; a gene absent from a sample is 0) and,
    per perturbation and temperature, the posterior mean, variance and the share of samples that
    contain each gene. The caveat about absent genes is in ``.uns['caveat']`` of both."""
    return core.perturbation.posterior_expression(posterior_samples, list(processed_adata.var_names), core.sentences.RankFit.from_dict(rank_fit))


def plot_posterior(
    posterior_samples_expression: ad.AnnData, cell_sentences: Dataset, perturbation_split: dict[str, Any],
    rank_fit: dict[str, Any], params: dict[str, Any],
) -> tuple[plt.Figure, plt.Figure]:
    """PCA and UMAP of the posterior samples coloured by temperature, with the real control and
    real perturbed cells of each held-out perturbation in the same space (one panel each)."""
    settings = _settings(params)
    columns = settings.columns()
    genes = list(posterior_samples_expression.var_names)
    real = _part_cells(cell_sentences, perturbation_split, "test", genes, rank_fit, settings)
    with setting_hint(f"{SECTION}.evaluation.max_plot_panels"):
        embedding = core.perturbation_evaluation.posterior_embedding(
            posterior_samples_expression, real, columns.perturbation, columns.control_label,
            max_perturbations=settings.evaluation.max_plot_panels, seed=settings.seed,
        )
    return core.plotting.posterior_embedding_plots(embedding, columns.control_label)


def evaluate_perturbation_predictions(
    posterior_samples_expression: ad.AnnData, cell_sentences: Dataset, perturbation_split: dict[str, Any],
    rank_fit: dict[str, Any], perturbation_truth: pd.DataFrame, params: dict[str, Any],
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, float]]:
    """The model (one method per temperature) and the baselines scored on the same held-out
    perturbations, all in the space of top-k cell sentences turned back into expression: the
    scores, their summary and the flat metrics (the on-target knockdown diagnostics among them as
    ``knockdown.*``; their per-perturbation table is ``evaluate_posterior``'s ``knockdown``)."""
    settings = _settings(params)
    columns = settings.columns()
    evaluation = settings.evaluation
    genes = list(posterior_samples_expression.var_names)
    real = _part_cells(cell_sentences, perturbation_split, "test", genes, rank_fit, settings)
    train = _part_cells(cell_sentences, perturbation_split, "train", genes, rank_fit, settings)
    with setting_hint(f"{SECTION}.evaluation"):
        scored = core.perturbation_evaluation.evaluate_posterior(
            posterior_samples_expression, real, train, columns.perturbation, columns.control_label,
            truth=perturbation_truth, top_n_de=evaluation.top_n_de, interval=evaluation.interval,
            baseline_pca_components=evaluation.baseline_pca_components, seed=settings.seed,
            top_k_genes=settings.top_k_genes,
        )
    return scored.scores, scored.summary, scored.metrics
