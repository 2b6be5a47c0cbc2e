"""Nodes of the perturbation_data pipeline (workflow notes section 10). QC, normalization,
sentences and the rank fit are the atlas's nodes run under the ``perturbation`` namespace; these
are the screen's own steps around them."""

from __future__ import annotations

import logging
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
from datasets import Dataset, DatasetDict

from c2s_kedro.core.models import LanguageModel, build_gpt_neox
from c2s_kedro.core.perturbation import (
    PERTURBATION_TASK,
    PerturbationPromptFormatter,
    ScreenLayoutError,
    check_screen,
    pair_with_controls,
    paired_sentences,
    response_token_budget,
    split_screen,
)
from c2s_kedro.core.prompts import template_words
from c2s_kedro.core.tokenizer import build_gene_tokenizer
from c2s_kedro.core.validation import make_gene_names_unique, use_gene_symbols
from c2s_kedro.parameters import ENVIRONMENT_HINT, read_parameters, setting_hint
from c2s_kedro.parameters.perturbation import PerturbationParameters

logger = logging.getLogger(__name__)
SECTION = "perturbation"
TRUTH_KEY = "perturbation_truth_log2fc"
SCREEN_SETTINGS = {  # ScreenColumns field -> the setting that names it
    "perturbation": f"{SECTION}.perturbation_column", "control_label": f"{SECTION}.control_label",
    "batch": f"{SECTION}.batch_column", "gene_symbol": f"{SECTION}.data_processing.gene_symbol_column",
}


def _settings(params: dict[str, Any]) -> PerturbationParameters:
    return read_parameters(PerturbationParameters, params, SECTION)


def check_screen_layout(perturbseq_raw: ad.AnnData, params: dict[str, Any]) -> tuple[ad.AnnData, pd.DataFrame]:
    """The screen's columns checked, perturbation names upper-cased like the gene vocabulary (the
    control label kept), and the simulator's truth (genes x perturbations, expected log2 fold
    change; no rows for a real screen) taken out of ``.varm``. The counts are shared, not copied."""
    settings = _settings(params)
    columns = settings.columns()
    try:
        check_screen(perturbseq_raw, columns)
    except ScreenLayoutError as error:
        with setting_hint(SCREEN_SETTINGS[error.field], ScreenLayoutError):
            raise
    labels = perturbseq_raw.obs[columns.perturbation].astype(str)
    obs = perturbseq_raw.obs.copy()
    obs[columns.perturbation] = labels.where(labels == columns.control_label, labels.str.upper())
    varm = {key: value for key, value in perturbseq_raw.varm.items() if key != TRUTH_KEY}
    screen = ad.AnnData(X=perturbseq_raw.X, obs=obs, var=perturbseq_raw.var.copy(), varm=varm,
                        layers=dict(perturbseq_raw.layers), uns=dict(perturbseq_raw.uns))
    truth = pd.DataFrame({"gene": pd.Series([], dtype=str)})  # a real screen: no rows (still a readable CSV)
    if TRUTH_KEY in perturbseq_raw.varm:
        table = pd.DataFrame(perturbseq_raw.varm[TRUTH_KEY])
        truth = pd.DataFrame(np.asarray(table), index=_symbols(perturbseq_raw, columns.gene_symbol),
                             columns=[str(c).upper() for c in table.columns])
        truth.index.name = "gene"
        truth = truth.reset_index()
    return screen, truth


def _symbols(adata: ad.AnnData, symbol_column: str | None) -> pd.Index:
    """Gene names as data_processing will call them (the same symbol lookup, made unique)."""
    genes = make_gene_names_unique(use_gene_symbols(ad.AnnData(var=adata.var.copy()), symbol_column))
    return pd.Index(genes.var_names.astype(str))


def split_perturbation_screen(processed_adata: ad.AnnData, params: dict[str, Any]) -> dict[str, Any]:
    """Train/val/test cells: held-out perturbations or held-out cells (``split.mode``)."""
    settings = _settings(params)
    split = settings.split
    with setting_hint(f"{SECTION}.split"):
        return split_screen(
            processed_adata.obs, settings.columns(), mode=split.mode, fractions=split.fractions, seed=split.seed,
            test_perturbations=split.test_perturbations,
        )


def summarize_screen(perturbation_split: dict[str, Any]) -> dict[str, float]:
    """Perturbations and cells of each part of the split."""
    metrics: dict[str, float] = {}
    for part in ("train", "val", "test"):
        metrics[f"n_{part}_perturbations"] = float(len(perturbation_split[f"{part}_perturbations"]))
        metrics[f"n_{part}_perturbed_cells"] = float(len(perturbation_split[part]))
        metrics[f"n_{part}_control_cells"] = float(len(perturbation_split[f"control_{part}"]))
    return metrics


def initialize_perturbation_model(vocabulary: dict[str, int], params: dict[str, Any]) -> LanguageModel:
    """A gene-level tokenizer over the screen's genes and the prompt words, and an untrained
    GPT-NeoX sized by ``model.architecture`` (the offline default base model)."""
    settings = _settings(params)
    words = template_words((PERTURBATION_TASK,)) + [str(settings.control_label).upper()]
    architecture = settings.model.architecture
    tokenizer = build_gene_tokenizer(vocabulary, words, model_max_length=architecture["max_position_embeddings"])
    with setting_hint(f"{SECTION}.model.architecture"):
        model = build_gpt_neox(tokenizer, architecture, seed=settings.seed)
    logger.info("perturbation base model: %s parameters, %d tokens", f"{model.model.num_parameters():,}", len(tokenizer))
    return model


def _sentence_lookup(sentences: Dataset) -> dict[str, str]:
    table = sentences.select_columns(["cell_name", "cell_sentence"]).to_pandas()
    return dict(zip(table["cell_name"], table["cell_sentence"].fillna("")))


def _pairs(sentences: Dataset, split: dict[str, Any], part: str, settings: PerturbationParameters, seed: int) -> pd.DataFrame:
    columns = settings.columns()
    keep = [c for c in ("cell_name", columns.perturbation, columns.batch) if c]
    missing = [c for c in keep if c not in sentences.column_names]
    if missing:
        raise KeyError(
            f"column(s) {missing} are not in perturbation.cell_sentences; add them to "
            f"perturbation.sentence_conversion.label_columns {ENVIRONMENT_HINT}"
        )
    obs = sentences.select_columns(keep).to_pandas().set_index("cell_name")
    pairing = settings.pairing
    pairs = pair_with_controls(obs, split[part], split[f"control_{part}"], columns, seed=seed,
                               controls_per_cell=pairing.controls_per_cell)
    if part != "test" and pairing.include_control_pairs:
        # control -> control pairs teach the model that "no perturbation" means "the same state"
        controls = split[f"control_{part}"]
        identity = pair_with_controls(obs, controls, controls, columns, seed=seed + 1)
        pairs = pd.concat([pairs, identity], ignore_index=True)
    return pairs


def format_perturbation_prompts(
    cell_sentences: Dataset, perturbation_split: dict[str, Any], perturbation_base_model: LanguageModel,
    params: dict[str, Any],
) -> DatasetDict:
    """Pairs (perturbed cell, control cell of the same batch) of each part as prompts: the control
    sentence and the perturbation in, the perturbed sentence out. Training samples keep their
    response whole; test prompts leave room for ``max_new_tokens`` (the longest training response
    and its EOS), shortening the control sentence when needed (``posterior.on_overflow``)."""
    settings = _settings(params)
    lookup = _sentence_lookup(cell_sentences)
    tokenizer, context = perturbation_base_model.tokenizer, perturbation_base_model.context_length
    seed = settings.pairing.seed
    parts = {}
    for offset, part in enumerate(("train", "val", "test")):
        pairs = paired_sentences(_pairs(cell_sentences, perturbation_split, part, settings, seed + 10 * offset), lookup)
        if part != "test":
            formatter = PerturbationPromptFormatter(top_k_genes=settings.top_k_genes, seed=seed, tokenizer=tokenizer, max_tokens=context)
            with setting_hint(f"{SECTION}.top_k_genes"):
                parts[part] = formatter.format_dataset(pairs).shuffle(seed=seed, keep_in_memory=True).flatten_indices(keep_in_memory=True)
    budget = settings.posterior.max_new_tokens or response_token_budget(tokenizer, parts["train"]["response"])
    formatter = PerturbationPromptFormatter(
        top_k_genes=settings.top_k_genes, seed=seed, tokenizer=tokenizer, max_tokens=context, response_budget=budget,
        on_overflow=settings.posterior.on_overflow,
    )
    with setting_hint(f"{SECTION}.posterior.on_overflow"):
        test = formatter.format_dataset(pairs)
    parts["test"] = test.add_column("max_new_tokens", [budget] * test.num_rows)
    cap = settings.finetuning.max_eval_samples
    if cap is not None and parts["val"].num_rows > cap:
        parts["val"] = parts["val"].select(range(cap), keep_in_memory=True)
    return DatasetDict(parts)
