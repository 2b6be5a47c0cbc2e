"""Nodes of the perturbation pipelines (workflow notes sections 10-11)."""

from __future__ import annotations

import logging
import os
from typing import Any

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from datasets import Dataset, DatasetDict

from c2s_kedro.core import plotting
from c2s_kedro.core.models import LanguageModel, build_gpt_neox
from c2s_kedro.core.perturbation import (
    MISSING_GENE_CAVEAT,
    PERTURBATION_TASK,
    PerturbationPromptFormatter,
    ScreenColumns,
    check_screen,
    pair_with_controls,
    paired_sentences,
    posterior_statistics,
    response_token_budget,
    sample_posterior,
    split_screen,
)
from c2s_kedro.core.perturbation_evaluation import baseline_predictions, labelled_cells, score_methods, summarize_scores
from c2s_kedro.core.preprocessing import QCThresholds, normalize_log10, quality_control
from c2s_kedro.core.prompts import template_words
from c2s_kedro.core.sentences import RankFit, cell_sentences_from_adata, fit_rank_expression, rank_expression_points, reconstruct_expression
from c2s_kedro.core.tokenizer import build_gene_tokenizer
from c2s_kedro.core.validation import check_raw_counts, make_gene_names_unique, use_gene_symbols
from c2s_kedro.pipelines.finetuning.nodes import finetune_model

logger = logging.getLogger(__name__)
SETTINGS = "conf/base/parameters_perturbation.yml (perturbation.*)"
TRUTH_KEY = "perturbation_truth_log2fc"


def _columns(params: dict[str, Any]) -> ScreenColumns:
    return ScreenColumns(
        perturbation=params["perturbation_column"],
        control_label=str(params["control_label"]),
        batch=params.get("batch_column"),
        gene_symbol=params.get("gene_symbol_column"),
    )


def prepare_screen(perturbseq_raw: ad.AnnData, params: dict[str, Any]) -> tuple[ad.AnnData, dict[str, float], pd.DataFrame]:
    """Check the screen's columns, use gene symbols, QC (the user's filters, cells removed by each
    logged), then normalize and log10 as in data_processing. Also returns the simulator's truth
    (genes x perturbations, expected log2 fold change; empty for a real screen)."""
    columns = _columns(params)
    check_screen(perturbseq_raw, columns, SETTINGS)
    try:
        check_raw_counts(perturbseq_raw)
    except ValueError as error:
        raise ValueError(
            f"perturbseq_raw: {str(error).split(' Raw counts')[0]} The perturbation pipeline needs the screen's raw "
            "counts (QC and normalization run here); point the perturbseq_raw catalog entry at the raw h5ad."
        ) from error
    adata = make_gene_names_unique(use_gene_symbols(perturbseq_raw.copy(), columns.gene_symbol))
    truth = pd.DataFrame({"gene": pd.Series([], dtype=str)})  # a real screen: no rows (still a readable CSV)
    if TRUTH_KEY in adata.varm:
        truth = pd.DataFrame(np.asarray(adata.varm[TRUTH_KEY]), index=adata.var_names,
                             columns=list(pd.DataFrame(adata.varm[TRUTH_KEY]).columns))
        truth.columns = [str(c).upper() for c in truth.columns]
        truth.index.name = "gene"
        del adata.varm[TRUTH_KEY]
    qc = params.get("qc", {})
    filtered, counts = quality_control(adata, QCThresholds(**qc))
    processed = normalize_log10(filtered, target_sum=params.get("target_sum", 1e4))
    labels = processed.obs[columns.perturbation].astype(str)
    processed.obs[columns.perturbation] = labels.where(labels == columns.control_label, labels.str.upper())
    metrics = {k: float(v) for k, v in counts.items()}
    metrics["n_perturbations"] = float(labels[labels != columns.control_label].nunique())
    metrics["n_control_cells"] = float((labels == columns.control_label).sum())
    logger.info("screen after QC: %d cells, %d genes, %d perturbations", processed.n_obs, processed.n_vars,
                int(metrics["n_perturbations"]))
    return processed, metrics, truth.reset_index() if truth.index.name == "gene" else truth


def screen_sentences(perturbseq_processed: ad.AnnData, params: dict[str, Any]) -> tuple[Dataset, dict[str, int]]:
    """Cell sentences of every cell of the screen, with its perturbation (and batch)."""
    columns = _columns(params)
    labels = [columns.perturbation] + ([columns.batch] if columns.batch else [])
    result = cell_sentences_from_adata(
        perturbseq_processed, label_columns=labels, seed=params.get("sentence_seed", 1234),
        label_setting=SETTINGS,
    )
    if result.n_empty_cells:
        logger.warning("%d cells have no expressed gene and an empty sentence", result.n_empty_cells)
    return result.sentences, result.vocabulary


def split_perturbation_screen(perturbseq_processed: ad.AnnData, params: dict[str, Any]) -> dict[str, Any]:
    """Train/val/test cells: held-out perturbations or held-out cells (``split.mode``)."""
    split = params["split"]
    return split_screen(
        perturbseq_processed.obs, _columns(params), mode=split.get("mode", "perturbations"),
        fractions=split.get("fractions"), seed=split.get("seed", 0), test_perturbations=split.get("test_perturbations"),
    )


def fit_screen_rank_expression(perturbseq_processed: ad.AnnData, perturbation_split: dict[str, Any],
                               params: dict[str, Any]) -> dict[str, float]:
    """The rank -> expression fit of the screen (training cells), used to turn sentences back into
    expression."""
    train = perturbseq_processed[perturbation_split["train"] + perturbation_split["control_train"]]
    n_cells = params.get("rank_fit_cells", 1024)
    cells, log_rank, expression = rank_expression_points(train, n_cells, seed=params.get("sentence_seed", 1234))
    fit = fit_rank_expression(log_rank, expression, len(cells))
    logger.info("rank fit of the screen: expression = %.3f %+.3f log10(1+rank), R2 %.3f", fit.intercept, fit.slope, fit.r2)
    return {k: float(v) for k, v in vars(fit).items()}


def initialize_perturbation_model(perturbseq_vocabulary: dict[str, int], params: dict[str, Any]) -> LanguageModel:
    """A gene-level tokenizer over the screen's genes and the prompt words, and an untrained
    GPT-NeoX sized by ``model.architecture`` (the offline default base model)."""
    words = template_words((PERTURBATION_TASK,)) + [str(params["control_label"]).upper()]
    architecture = params["model"]["architecture"]
    tokenizer = build_gene_tokenizer(perturbseq_vocabulary, words, model_max_length=architecture["max_position_embeddings"])
    model = build_gpt_neox(tokenizer, architecture, seed=params.get("seed", 0))
    logger.info("perturbation base model: %s parameters, %d tokens", f"{model.model.num_parameters():,}", len(tokenizer))
    return model


def _sentence_lookup(sentences: Dataset) -> dict[str, str]:
    table = sentences.select_columns(["cell_name", "cell_sentence"]).to_pandas()
    return dict(zip(table["cell_name"], table["cell_sentence"].fillna("")))


def _pairs(sentences: Dataset, split: dict[str, Any], part: str, params: dict[str, Any], seed: int) -> pd.DataFrame:
    columns = _columns(params)
    keep = [c for c in ("cell_name", columns.perturbation, columns.batch) if c]
    obs = sentences.select_columns(keep).to_pandas().set_index("cell_name")
    pairing = params.get("pairing", {})
    pairs = pair_with_controls(obs, split[part], split[f"control_{part}"], columns, seed=seed,
                               controls_per_cell=pairing.get("controls_per_cell", 1))
    if part != "test" and pairing.get("include_control_pairs", True):
        # control -> control pairs teach the model that "no perturbation" means "the same state"
        controls = split[f"control_{part}"]
        identity = pair_with_controls(obs, controls, controls, columns, seed=seed + 1)
        pairs = pd.concat([pairs, identity], ignore_index=True)
    return pairs


def format_perturbation_prompts(
    perturbseq_sentences: Dataset, perturbation_split: dict[str, Any], perturbation_base_model: LanguageModel,
    params: dict[str, Any],
) -> DatasetDict:
    """Pairs (perturbed cell, control cell of the same batch) of each part as prompts: the control
    sentence and the perturbation in, the perturbed sentence out. Training samples keep their
    response whole; test prompts leave room for ``max_new_tokens`` (the longest training response
    and its EOS), shortening the control sentence when needed (``posterior.on_overflow``)."""
    lookup = _sentence_lookup(perturbseq_sentences)
    tokenizer, context = perturbation_base_model.tokenizer, perturbation_base_model.context_length
    top_k = params.get("top_k_genes", 200)
    seed = params.get("pairing", {}).get("seed", 0)
    parts = {}
    for offset, part in enumerate(("train", "val", "test")):
        pairs = paired_sentences(_pairs(perturbseq_sentences, perturbation_split, part, params, seed + 10 * offset), lookup)
        if part != "test":
            formatter = PerturbationPromptFormatter(top_k_genes=top_k, seed=seed, tokenizer=tokenizer, max_tokens=context)
            parts[part] = formatter.format_dataset(pairs).shuffle(seed=seed, keep_in_memory=True).flatten_indices(keep_in_memory=True)
    budget = params.get("posterior", {}).get("max_new_tokens") or response_token_budget(tokenizer, parts["train"]["response"])
    formatter = PerturbationPromptFormatter(
        top_k_genes=top_k, seed=seed, tokenizer=tokenizer, max_tokens=context, response_budget=budget,
        on_overflow=params.get("posterior", {}).get("on_overflow", "shorten"),
    )
    test = formatter.format_dataset(pairs)
    parts["test"] = test.add_column("max_new_tokens", [budget] * test.num_rows)
    cap = params.get("finetuning", {}).get("max_eval_samples")
    if cap is not None and parts["val"].num_rows > cap:
        parts["val"] = parts["val"].select(range(cap), keep_in_memory=True)
    return DatasetDict(parts)


def finetune_perturbation_model(
    perturbation_base_model: LanguageModel, perturbation_prompts: DatasetDict, params: dict[str, Any]
) -> tuple[LanguageModel, list[dict[str, Any]]]:
    """The finetuning machinery on the perturbation prompts (loss on the perturbed sentence only)."""
    prompts = DatasetDict({part: perturbation_prompts[part].select_columns(["sample_type", "model_input", "response"])
                           for part in ("train", "val")})
    return finetune_model(perturbation_base_model, prompts, params["finetuning"])


def plot_perturbation_loss(perturbation_finetuning_log: list[dict[str, Any]]) -> plt.Figure:
    """Train and eval loss against the step."""
    return plotting.loss_curve_plot(perturbation_finetuning_log, "Perturbation-response fine-tuning")


def _chosen_prompts(test: Dataset, n_per_perturbation: int, seed: int) -> pd.DataFrame:
    table = test.select_columns(["perturbation", "control_cell", "perturbed_cell", "model_input", "n_control_genes",
                                 "max_new_tokens"]).to_pandas()
    rng = np.random.default_rng(seed)
    chosen = []
    for name, rows in table.groupby("perturbation", sort=True):
        chosen.append(rows.iloc[np.sort(rng.permutation(len(rows))[:n_per_perturbation])])
    return pd.concat(chosen, ignore_index=True)


def sample_perturbation_posterior(
    perturbation_model: LanguageModel, perturbation_prompts: DatasetDict, perturbseq_vocabulary: dict[str, int],
    params: dict[str, Any],
) -> pd.DataFrame:
    """For ``prompts_per_perturbation`` test prompts of each held-out perturbation: ``n_samples``
    constrained samples at each temperature, one prefill per prompt."""
    settings = params["posterior"]
    prompts = _chosen_prompts(perturbation_prompts["test"], settings.get("prompts_per_perturbation", 1), settings.get("seed", 0))
    budget = int(prompts["max_new_tokens"].iloc[0])
    samples = sample_posterior(
        perturbation_model, prompts["model_input"].tolist(), list(perturbseq_vocabulary),
        n_samples=settings.get("n_samples", 100), temperatures=settings.get("temperatures", [0.7, 1.0, 1.3]),
        max_new_tokens=budget, seed=settings.get("seed", 0), batch_size=settings.get("batch_size"),
    )
    samples = samples.join(prompts[["perturbation", "control_cell", "perturbed_cell", "n_control_genes"]], on="prompt_index")
    if samples["n_unknown"].sum() or samples["n_repeated"].sum():
        logger.warning("constrained samples contained %d unknown and %d repeated genes", samples["n_unknown"].sum(),
                       samples["n_repeated"].sum())
    logger.info("%d posterior samples, median %d genes each", len(samples), int(samples["n_genes"].median()))
    return samples


def _rank_fit(values: dict[str, float]) -> RankFit:
    return RankFit(**{k: (int(v) if k in ("n_cells", "n_points") else v) for k, v in values.items()})


def posterior_to_expression(
    posterior_samples: pd.DataFrame, perturbseq_processed: ad.AnnData, perturbation_rank_fit: dict[str, float],
    params: dict[str, Any],
) -> tuple[ad.AnnData, ad.AnnData]:
    """Each sample as expression (rank -> expression fit; a gene absent from a sample is 0) and,
    per perturbation and temperature, the posterior mean, variance and the share of samples that
    contain each gene. The caveat about absent genes is in ``.uns['caveat']`` of both."""
    genes = list(perturbseq_processed.var_names)
    matrix, n_unknown = reconstruct_expression(posterior_samples["sentence"].fillna("").tolist(), genes, _rank_fit(perturbation_rank_fit))
    obs = posterior_samples.drop(columns=["sentence"]).astype({"temperature": float}).reset_index(drop=True)
    obs.index = [f"sample-{i}" for i in range(len(obs))]
    obs["sentence"] = posterior_samples["sentence"].fillna("").to_numpy()
    samples = ad.AnnData(matrix, obs=obs, var=pd.DataFrame(index=genes))
    samples.uns["caveat"] = MISSING_GENE_CAVEAT
    samples.uns["rank_fit"] = dict(perturbation_rank_fit)
    groups, mean, variance, present = posterior_statistics(matrix, obs[["perturbation", "temperature"]])
    groups.index = [f"{p}@T{t}" for p, t in zip(groups["perturbation"], groups["temperature"])]
    statistics = ad.AnnData(mean.astype(np.float32), obs=groups, var=pd.DataFrame(index=genes))
    statistics.layers["variance"] = variance.astype(np.float32)
    statistics.layers["present_share"] = present.astype(np.float32)
    statistics.uns["caveat"] = MISSING_GENE_CAVEAT
    statistics.uns["variance"] = "sample variance over a group's samples (ddof=1), absent genes counted as 0"
    if n_unknown:
        logger.warning("%d words of the samples are not genes of the screen", n_unknown)
    return samples, statistics


def _sentence_space(names: list[str], lookup: dict[str, str], genes: list[str], fit: RankFit, top_k: int | None):
    sentences = [" ".join(lookup[n].split()[:top_k]) for n in names]
    return reconstruct_expression(sentences, genes, fit)[0]


def _real_cells(perturbseq_sentences: Dataset, split: dict[str, Any], part: str, genes, fit, params) -> ad.AnnData:
    columns = _columns(params)
    lookup = _sentence_lookup(perturbseq_sentences)
    obs = perturbseq_sentences.select_columns(["cell_name", columns.perturbation]).to_pandas().set_index("cell_name")
    names = list(split[part]) + list(split[f"control_{part}"])
    matrix = _sentence_space(names, lookup, genes, fit, params.get("top_k_genes", 200))
    return labelled_cells(matrix, obs.loc[names, columns.perturbation].astype(str).tolist(), genes, f"real-{part}", columns.perturbation)


def plot_posterior(posterior_samples_expression: ad.AnnData, perturbseq_sentences: Dataset, perturbation_split: dict[str, Any],
                   perturbation_rank_fit: dict[str, float], params: dict[str, Any]) -> tuple[plt.Figure, plt.Figure]:
    """PCA and UMAP of the posterior samples coloured by temperature, with the real control and
    real perturbed cells of each held-out perturbation in the same space (one panel each)."""
    genes = list(posterior_samples_expression.var_names)
    real = _real_cells(perturbseq_sentences, perturbation_split, "test", genes, _rank_fit(perturbation_rank_fit), params)
    column = _columns(params).perturbation
    return plotting.posterior_embedding_plots(
        posterior_samples_expression, real, column, str(params["control_label"]),
        max_panels=params.get("evaluation", {}).get("max_plot_panels", 6), seed=params.get("seed", 0),
    )


def evaluate_perturbation_predictions(
    posterior_samples_expression: ad.AnnData, perturbseq_sentences: Dataset, perturbation_split: dict[str, Any],
    perturbation_rank_fit: dict[str, float], perturbation_truth: pd.DataFrame, params: dict[str, Any],
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, float]]:
    """The model (one method per temperature) and the baselines scored on the same held-out
    perturbations, all in the space of top-k cell sentences turned back into expression."""
    columns = _columns(params)
    settings = params.get("evaluation", {})
    genes = list(posterior_samples_expression.var_names)
    fit = _rank_fit(perturbation_rank_fit)
    real = _real_cells(perturbseq_sentences, perturbation_split, "test", genes, fit, params)
    train = _real_cells(perturbseq_sentences, perturbation_split, "train", genes, fit, params)
    samples = posterior_samples_expression
    evaluated = sorted(set(samples.obs["perturbation"].astype(str)))
    labels = real.obs[columns.perturbation].astype(str)
    real = real[labels.isin(evaluated + [columns.control_label]).to_numpy()].copy()
    controls = real[(real.obs[columns.perturbation].astype(str) == columns.control_label).to_numpy()].copy()
    counts = real.obs[columns.perturbation].astype(str).value_counts()
    predictions: dict[str, ad.AnnData] = {}
    for temperature in sorted(samples.obs["temperature"].unique()):
        part = samples[(samples.obs["temperature"] == temperature).to_numpy()]
        cells = labelled_cells(part.X, part.obs["perturbation"].astype(str).tolist(), genes, f"model-T{temperature}", columns.perturbation)
        predictions[f"model_T{temperature:g}"] = ad.concat([cells, controls])
    predictions.update(baseline_predictions(
        train, controls, {name: int(counts[name]) for name in evaluated}, columns.perturbation, columns.control_label,
        seed=params.get("seed", 0), n_components=settings.get("baseline_pca_components", 10),
    ))
    # Genes any real or predicted cell has in its top k: genes absent everywhere would add (0, 0) points.
    used = np.asarray((real.X != 0).sum(axis=0)).ravel() + np.asarray((train.X != 0).sum(axis=0)).ravel()
    used += np.asarray((samples.X != 0).sum(axis=0)).ravel()
    keep = [g for g, n in zip(genes, used) if n > 0]
    truth = None
    if perturbation_truth is not None and not perturbation_truth.empty:
        truth = perturbation_truth.set_index("gene")
    scores = score_methods(
        real[:, keep], {m: p[:, keep] for m, p in predictions.items()}, columns.perturbation, columns.control_label,
        top_n_de=settings.get("top_n_de", 20), interval=settings.get("interval", 0.9), truth=truth,
        threads=min(2, os.cpu_count() or 1),
    )
    summary = summarize_scores(scores)
    metrics = {"n_genes_scored": float(len(keep)), "n_heldout_perturbations": float(len(evaluated))}
    if truth is not None:
        # How well the held-out cells themselves agree with the simulator's truth: the ceiling of
        # pearson_delta_simulated_truth in this space (top-k sentences hide genes below rank k).
        observed = score_methods(real[:, keep], {"observed": real[:, keep]}, columns.perturbation, columns.control_label,
                                 top_n_de=settings.get("top_n_de", 20), truth=truth, threads=min(2, os.cpu_count() or 1))
        metrics["observed_cells.pearson_delta_simulated_truth"] = float(observed["pearson_delta_simulated_truth"].mean())
    for _, row in summary.iterrows():
        for metric, value in row.items():
            if metric != "method":
                metrics[f"{row['method']}.{metric}"] = float(value)
    return scores, summary, metrics
