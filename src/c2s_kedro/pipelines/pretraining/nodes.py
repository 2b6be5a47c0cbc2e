"""Nodes of the pretraining pipeline."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import lazy_loader as lazy

from c2s_kedro.parameters import read_parameters, setting_hint
from c2s_kedro.parameters.training import PretrainingParameters

if TYPE_CHECKING:
    import matplotlib.pyplot as plt
    from datasets import Dataset

    from c2s_kedro.core.models import LanguageModel

# Loaded when a node first uses them: every run imports every pipeline's nodes (c2s_kedro.runner
# looks up the producers of missing inputs), and a run pays only for the libraries its nodes use.
hf_datasets = lazy.load("datasets")
models = lazy.load("c2s_kedro.core.models", suppress_warning=True)
plotting = lazy.load("c2s_kedro.core.plotting", suppress_warning=True)
core_prompts = lazy.load("c2s_kedro.core.prompts", suppress_warning=True)
sentences = lazy.load("c2s_kedro.core.sentences", suppress_warning=True)
tokenizers = lazy.load("c2s_kedro.core.tokenizer", suppress_warning=True)  # `tokenizer` names the nodes' tokenizer
training = lazy.load("c2s_kedro.core.training", suppress_warning=True)

logger = logging.getLogger(__name__)


def initialize_foundation_model(vocabulary: dict[str, int], cell_sentences: Dataset, params: dict[str, Any]) -> LanguageModel:
    """Gene-level tokenizer (genes, template words, label values) and an untrained GPT-NeoX."""
    settings = read_parameters(PretrainingParameters, params, "pretraining")
    words = core_prompts.template_words() + tokenizers.label_words(cell_sentences, [settings.label_column, settings.organism_column])
    tokenizer = tokenizers.build_gene_tokenizer(vocabulary, words)
    with setting_hint("pretraining.architecture"):  # the model sets the tokenizer's model_max_length to its context
        language_model = models.build_gpt_neox(tokenizer, settings.architecture, seed=settings.seed)
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
    return tuple(
        training.pretraining_corpus(
            sentences.select_cells(cell_sentences, data_split[part]), initial_model.tokenizer, initial_model.context_length,
            max_genes=settings.max_genes, label_column=settings.label_column,
            organism_column=settings.organism_column, seed=settings.seed,
        )
        for part in ("train", "val")
    )


def pretrain_foundation_model(
    initial_model: LanguageModel, train_corpus: Dataset, val_corpus: Dataset, params: dict[str, Any]
) -> tuple[LanguageModel, list[dict[str, Any]]]:
    """Next-token prediction on the whole text (loss on prompt and sentence) with the HF Trainer."""
    settings = read_parameters(PretrainingParameters, params, "pretraining")
    with setting_hint("pretraining", training.TrainingSettingsError):
        return training.finetune(initial_model, hf_datasets.DatasetDict({"train": train_corpus, "val": val_corpus}), settings.training_settings())


def plot_pretraining_loss(training_log: list[dict[str, Any]]) -> plt.Figure:
    """Train and eval loss against the step."""
    return plotting.loss_curve_plot(training_log, "Foundation model pretraining")


def summarize_pretraining(training_log: list[dict[str, Any]], foundation_model: LanguageModel) -> dict[str, float]:
    """Losses, runtime and model size."""
    return {
        **training.summarize_history(training_log),
        "n_parameters": float(foundation_model.model.num_parameters()),
        "vocabulary_size": float(len(foundation_model.tokenizer)),
        "context_length": float(foundation_model.context_length),
    }
