"""Nodes of the pretraining pipeline."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any


# each core module loads when a node first uses it (c2s_kedro/core/__init__.py): every run imports every
# pipeline's nodes (the registry composes each pipeline with its upstream) and pays only for what its nodes use
from c2s_kedro import core
from c2s_kedro.parameters import read_parameters, setting_hint
from c2s_kedro.parameters.training import PretrainingParameters

if TYPE_CHECKING:
    import matplotlib.pyplot as plt
    from datasets import Dataset

    from c2s_kedro.core.models.loading import LanguageModel

logger = logging.getLogger(__name__)


def initialize_foundation_model(vocabulary: dict[str, int], cell_sentences: Dataset, params: dict[str, Any]) -> LanguageModel:
    """Gene-level tokenizer (genes, template words, label values) and an untrained GPT-NeoX."""
    settings = read_parameters(PretrainingParameters, params, "pretraining")
    words = core.prompts.formatting.template_words() + core.models.tokenizer.label_words(cell_sentences, [settings.label_column, settings.organism_column])
    tokenizer = core.models.tokenizer.build_gene_tokenizer(vocabulary, words)
    with setting_hint("pretraining.architecture"):  # the model sets the tokenizer's model_max_length to its context
        language_model = core.models.loading.build_gpt_neox(tokenizer, settings.architecture, seed=settings.seed)
    logger.info(
        "foundation model: %s parameters, %d tokens in the vocabulary",
        f"{language_model.model.num_parameters():,}", len(tokenizer),
    )
    return language_model


def build_pretraining_corpus(
    cell_sentences: Dataset, data_split: dict[str, Any], initial_model: LanguageModel, params: dict[str, Any]
) -> tuple[Dataset, Dataset]:
    """Train and val texts: each cell's plain sentence and, where it has a label, a
    cell-type-conditioned generation prompt, fitted to the context. Test cells are never used."""
    settings = read_parameters(PretrainingParameters, params, "pretraining")
    train, val = (
        core.prompts.training_sets.pretraining_corpus(
            core.sentences.conversion.select_cells(cell_sentences, data_split[part]), initial_model.tokenizer, initial_model.context_length,
            max_genes=settings.max_genes, label_column=settings.label_column,
            organism_column=settings.organism_column, seed=settings.seed,
        )
        for part in ("train", "val")
    )
    if settings.max_eval_samples is not None and val.num_rows > settings.max_eval_samples:
        # drawn from both kinds of text (plain sentences come first in the corpus)
        logger.info("pretraining eval loss on %d of %d val texts (pretraining.max_eval_samples)",
                    settings.max_eval_samples, val.num_rows)
        val = val.shuffle(seed=settings.seed, keep_in_memory=True).select(range(settings.max_eval_samples), keep_in_memory=True)
    return train, val


def pretrain_foundation_model(
    initial_model: LanguageModel, train_corpus: Dataset, val_corpus: Dataset, params: dict[str, Any]
) -> tuple[LanguageModel, list[dict[str, Any]]]:
    """Next-token prediction on the whole text (loss on prompt and sentence) with the HF Trainer."""
    from datasets import DatasetDict

    settings = read_parameters(PretrainingParameters, params, "pretraining")
    with setting_hint("pretraining", core.models.training.TrainingSettingsError):
        return core.models.training.finetune(initial_model, DatasetDict({"train": train_corpus, "val": val_corpus}), settings.training_settings())


def plot_pretraining_loss(training_log: list[dict[str, Any]]) -> plt.Figure:
    """Train and eval loss against the step."""
    return core.plotting.loss_curve_plot(training_log, "Foundation model pretraining")


def summarize_pretraining(training_log: list[dict[str, Any]], foundation_model: LanguageModel) -> dict[str, float]:
    """Losses, runtime and model size."""
    return {
        **core.models.training.summarize_history(training_log),
        "n_parameters": float(foundation_model.model.num_parameters()),
        "vocabulary_size": float(len(foundation_model.tokenizer)),
        "context_length": float(foundation_model.context_length),
    }
