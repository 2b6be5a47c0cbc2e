"""Nodes of the perturbation_posterior pipeline (workflow notes section 11): they read the
settings once and wire core.tasks.perturbation (posterior, diagnostics, evaluation) and
core.prompts.perturbation."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pandas as pd

# each core module loads when a node first uses it (c2s_kedro/core/__init__.py): every run imports every
# pipeline's nodes (the registry composes each pipeline with its upstream) and pays only for what its nodes use
from c2s_kedro.core.errors import C2SKeyError
from c2s_kedro import core
from c2s_kedro.parameters import setting_hint
from c2s_kedro.parameters.perturbation import SECTION, PerturbationParameters, perturbation_settings

if TYPE_CHECKING:
    import anndata as ad
    import matplotlib.pyplot as plt
    from datasets import Dataset, DatasetDict

    from c2s_kedro.core.models.loading import LanguageModel


def _part_cells(cell_sentences: Dataset, split: dict[str, Any], part: str, genes: list[str], rank_fit: dict[str, Any],
                 settings: PerturbationParameters) -> ad.AnnData:
    """The perturbed and control cells of ``part`` in the model's space (top-k sentences); both
    test sets (``test``, ``test_seen``) have the test controls."""
    controls = split["control_test" if part == "test_seen" else f"control_{part}"]
    with setting_hint(f"{SECTION}.sentence_conversion.label_columns", KeyError):  # the perturbation column
        return core.tasks.perturbation.evaluation.sentence_space_cells(
            cell_sentences, list(split[part]) + list(controls), settings.columns().perturbation, genes,
            core.sentences.rank_fit.RankFit.from_dict(rank_fit), settings.top_k_genes, f"real-{part}",
        )


def sample_perturbation_posterior(
    perturbation_model: LanguageModel, perturbation_prompts: DatasetDict, vocabulary: dict[str, int],
    params: dict[str, Any],
) -> pd.DataFrame:
    """``n_samples`` constrained samples at each temperature, one prefill per prompt, for the
    posterior prompts: the held-out perturbations chosen by ``posterior.perturbations`` (all by
    default), the seen ones chosen by ``posterior.seen_perturbations``, and the control label, each
    on the same ``prompts_per_perturbation`` test control cells."""
    settings = perturbation_settings(params)
    posterior = settings.posterior
    with setting_hint(f"{SECTION}.posterior"):
        if "posterior" not in perturbation_prompts:
            raise C2SKeyError("perturbation_prompts has no 'posterior' part (made before the control-label prompts existed); "
                           "run perturbation_data again to rebuild the prompts")
        return core.tasks.perturbation.posterior.sample_test_posterior(
            perturbation_model, perturbation_prompts["posterior"], list(vocabulary), n_samples=posterior.n_samples,
            temperatures=posterior.temperatures, seed=posterior.seed, batch_size=posterior.batch_size,
            perturbations=posterior.perturbations, seen_perturbations=posterior.seen_perturbations,
            min_genes=posterior.min_genes, columns=settings.columns(),
        )


def posterior_to_expression(
    posterior_samples: pd.DataFrame, processed_adata: ad.AnnData, rank_fit: dict[str, Any],
) -> tuple[ad.AnnData, ad.AnnData]:
    """Each sample as expression (rank -> expression fit; a gene absent from a sample is 0) and,
    per perturbation and temperature, the posterior mean, variance and the share of samples that
    contain each gene. The caveat about absent genes is in ``.uns['caveat']`` of both."""
    return core.tasks.perturbation.posterior.posterior_expression(posterior_samples, list(processed_adata.var_names), core.sentences.rank_fit.RankFit.from_dict(rank_fit))


def plot_posterior(
    posterior_samples_expression: ad.AnnData, cell_sentences: Dataset, perturbation_split: dict[str, Any],
    rank_fit: dict[str, Any], params: dict[str, Any],
) -> tuple[plt.Figure, plt.Figure]:
    """PCA and UMAP of the posterior samples coloured by temperature, with the real control and
    real perturbed cells of each held-out perturbation in the same space (one panel each; the
    control label's panel holds the model's own "no perturbation" samples)."""
    settings = perturbation_settings(params)
    columns = settings.columns()
    genes = list(posterior_samples_expression.var_names)
    real = _part_cells(cell_sentences, perturbation_split, "test", genes, rank_fit, settings)
    heldout = posterior_samples_expression.obs["evaluation"].astype(str).isin(["heldout", "control"]).to_numpy()
    with setting_hint(f"{SECTION}.evaluation.max_plot_panels"):
        embedding = core.tasks.perturbation.evaluation.posterior_embedding(
            posterior_samples_expression[heldout], real, columns.perturbation, columns.control_label,
            max_perturbations=settings.evaluation.max_plot_panels, seed=settings.seed,
        )
    return core.plotting.posterior_embedding_plots(embedding, columns.control_label)


def probe_input_sensitivity(
    perturbation_model: LanguageModel, perturbation_prompts: DatasetDict, cell_sentences: Dataset,
    vocabulary: dict[str, int], params: dict[str, Any],
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Teacher-forced likelihood of real responses of both test sets when the perturbation's
    name, or the control cell, is swapped (``core.tasks.perturbation.diagnostics.input_sensitivity``):
    ~0 for a model that does not read that input; the shift of the target's own token is read for
    targets among the screen's genes (``vocabulary``) only. Returns the per-pair table (``evaluation``
    column) and the flat metrics (the held-out set's as ``sensitivity.*``, the seen set's as
    ``seen.sensitivity.*``)."""
    settings = perturbation_settings(params)
    columns = settings.columns()
    sentences = core.tasks.perturbation.pairs.top_k_sentences(cell_sentences, settings.top_k_genes)
    tables, metrics = [], {}
    for evaluation, part in core.prompts.perturbation.EVALUATIONS.items():
        if part not in perturbation_prompts:
            continue
        tested = perturbation_prompts[part].select_columns(["perturbation", "control_cell", "perturbed_cell"]).to_pandas()
        pairs = core.prompts.perturbation.paired_sentences(tested, sentences)
        formatter = core.prompts.perturbation.PerturbationPromptFormatter(
            top_k_genes=settings.top_k_genes, control_top_k_genes=settings.control_top_k_genes,
            template=settings.prompt_template, seed=settings.pairing.seed, tokenizer=perturbation_model.tokenizer,
            max_tokens=perturbation_model.context_length, columns=columns,
        )
        with setting_hint(f"{SECTION}.evaluation.sensitivity_pairs"):
            found, table = core.tasks.perturbation.diagnostics.input_sensitivity(
                perturbation_model, pairs, formatter, columns.control_label, n_pairs=settings.evaluation.sensitivity_pairs,
                seed=settings.seed, genes=list(vocabulary),
            )
        prefix = "" if evaluation == "heldout" else f"{evaluation}."
        metrics.update({prefix + name: value for name, value in found.items()})
        tables.append(table.assign(evaluation=evaluation))
    return pd.concat(tables, ignore_index=True), metrics


def evaluate_perturbation_predictions(
    posterior_samples_expression: ad.AnnData, cell_sentences: Dataset, perturbation_split: dict[str, Any],
    rank_fit: dict[str, Any], perturbation_truth: pd.DataFrame, sensitivity_metrics: dict[str, float],
    params: dict[str, Any],
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict[str, float]]:
    """The model (one method per temperature) and the baselines scored on the same perturbations,
    all in the space of top-k cell sentences turned back into expression, for each evaluation the
    samples hold: the held-out perturbations (metrics as they are named) and the seen ones with
    held-out cells (``seen.`` before each name). Each evaluation's samples are scored with the
    control-label samples on the same control cells (the model's own "no perturbation" answer).
    Returns the scores, their summary and the on-target knockdown table (each with an
    ``evaluation`` column) and the flat metrics, the input-sensitivity probe's among them."""
    settings = perturbation_settings(params)
    columns = settings.columns()
    evaluation_settings = settings.evaluation
    genes = list(posterior_samples_expression.var_names)
    train = _part_cells(cell_sentences, perturbation_split, "train", genes, rank_fit, settings)
    sampled = posterior_samples_expression.obs["evaluation"].astype(str)
    scores, summaries, knockdowns = [], [], []
    metrics = dict(sensitivity_metrics)
    for evaluation, part in core.prompts.perturbation.EVALUATIONS.items():
        if part not in perturbation_split or not (sampled == evaluation).any():
            continue
        real = _part_cells(cell_sentences, perturbation_split, part, genes, rank_fit, settings)
        samples = posterior_samples_expression[sampled.isin([evaluation, "control"]).to_numpy()]
        with setting_hint(f"{SECTION}.evaluation"):
            scored = core.tasks.perturbation.evaluation.evaluate_posterior(
                samples, real, train, columns.perturbation, columns.control_label,
                truth=perturbation_truth, top_n_de=evaluation_settings.top_n_de, interval=evaluation_settings.interval,
                baseline_pca_components=evaluation_settings.baseline_pca_components, seed=settings.seed,
                top_k_genes=settings.top_k_genes, combination_separator=settings.combination_separator,
            )
        prefix = "" if evaluation == "heldout" else f"{evaluation}."
        metrics.update({prefix + name: value for name, value in scored.metrics.items()})
        scores.append(scored.scores.assign(evaluation=evaluation))
        summaries.append(scored.summary.assign(evaluation=evaluation))
        knockdowns.append(scored.knockdown.assign(evaluation=evaluation))
    return (pd.concat(scores, ignore_index=True), pd.concat(summaries, ignore_index=True),
            pd.concat(knockdowns, ignore_index=True), metrics)


def plot_target_presence(perturbation_knockdown: pd.DataFrame, params: dict[str, Any]) -> plt.Figure:
    """On-target presence per perturbation at the lowest temperature: control cells, real perturbed
    cells, the model's samples naming the perturbation, and its samples naming the control label
    on the same control cells."""
    table, first = core.tasks.perturbation.evaluation.lowest_temperature_knockdown(perturbation_knockdown)
    series = {"control_target_presence": "control cells", "real_target_presence": "real perturbed cells",
              "model_target_presence": f"model, perturbation named ({first})",
              "reference_target_presence": "model, control label named"}
    return core.plotting.target_presence_plot(table, series, "On-target knockdown: the target among a cell's top genes")
