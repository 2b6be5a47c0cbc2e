"""Nodes of the pretraining pipeline."""

from __future__ import annotations

import logging
from typing import Any

import matplotlib.pyplot as plt
from datasets import Dataset, concatenate_datasets

from c2s_kedro.core import plotting
from c2s_kedro.core.models import LanguageModel, build_gpt_neox
from c2s_kedro.core.prompts import C2SPromptFormatter, template_words
from c2s_kedro.core.sentences import select_cells
from c2s_kedro.core.tokenizer import build_gene_tokenizer
from c2s_kedro.core.training import summarize_history, tokenize_dataset, train_causal_lm, training_arguments

logger = logging.getLogger(__name__)


def _label_words(cell_sentences: Dataset, columns: list[str]) -> list[str]:
    words: list[str] = []
    for column in columns:
        if column in cell_sentences.column_names:
            words += [str(v) for v in cell_sentences.unique(column) if v is not None]
    return words


def initialize_foundation_model(vocabulary: dict[str, int], cell_sentences: Dataset, params: dict[str, Any]) -> LanguageModel:
    """Gene-level tokenizer (genes, template words, label values) and an untrained GPT-NeoX."""
    words = template_words() + _label_words(cell_sentences, [params["label_column"], params["organism_column"]])
    tokenizer = build_gene_tokenizer(vocabulary, words, model_max_length=params["architecture"]["max_position_embeddings"])
    language_model = build_gpt_neox(tokenizer, params["architecture"], seed=params.get("seed", 0))
    logger.info(
        "foundation model: %s parameters, %d tokens in the vocabulary",
        f"{language_model.model.num_parameters():,}", len(tokenizer),
    )
    return language_model


def _corpus(cell_sentences: Dataset, cells: list[str], params: dict[str, Any], model: LanguageModel) -> Dataset:
    part = select_cells(cell_sentences, cells)
    # one token per gene with the gene-level tokenizer; one more for the EOS
    max_genes = min(params["max_genes"], model.context_length - 1)
    sentences = part.map(
        lambda batch: {
            "sample_type": ["cell_sentence"] * len(batch["cell_sentence"]),
            "model_input": [""] * len(batch["cell_sentence"]),
            "response": [" ".join((s or "").split()[:max_genes]) for s in batch["cell_sentence"]],
        },
        batched=True,
        remove_columns=part.column_names,
        keep_in_memory=True,
        desc="plain sentences",
    )
    label = params["label_column"]
    if label not in part.column_names:
        logger.info("no '%s' column: pretraining on plain cell sentences only", label)
        return sentences
    labelled = part.filter(lambda values: [v is not None for v in values], input_columns=label, batched=True, keep_in_memory=True)
    formatter = C2SPromptFormatter(
        task="cell_type_generation", top_k_genes=max_genes, label_column=label,
        organism_column=params["organism_column"], seed=params.get("seed", 0),
        tokenizer=model.tokenizer, max_tokens=model.context_length,
    )
    return concatenate_datasets([sentences, formatter.format_dataset(labelled)])


def build_pretraining_corpus(
    cell_sentences: Dataset, data_split: dict[str, Any], initial_model: LanguageModel, params: dict[str, Any]
) -> tuple[Dataset, Dataset]:
    """Train and val texts: each cell's plain sentence and, where it has a label, a
    cell-type-conditioned generation prompt, fitted to the context. Test cells are never used."""
    return (
        _corpus(cell_sentences, data_split["train"], params, initial_model),
        _corpus(cell_sentences, data_split["val"], params, initial_model),
    )


def pretrain_foundation_model(
    initial_model: LanguageModel, train_corpus: Dataset, val_corpus: Dataset, params: dict[str, Any]
) -> tuple[LanguageModel, list[dict[str, Any]]]:
    """Next-token prediction on the whole text (loss on prompt and sentence) with the HF Trainer."""
    tokenizer, context = initial_model.tokenizer, initial_model.context_length
    train = tokenize_dataset(train_corpus, tokenizer, context, loss_on_response_only=False)
    val = tokenize_dataset(val_corpus, tokenizer, context, loss_on_response_only=False)
    arguments = training_arguments(params["training_arguments"], params["checkpoint_dir"])
    return train_causal_lm(
        initial_model, train, val if len(val) else None, arguments, "pretraining",
        resume=params.get("resume", True), keep_checkpoints=params.get("keep_checkpoints", False),
    )


def plot_pretraining_loss(training_log: list[dict[str, Any]]) -> plt.Figure:
    """Train and eval loss against the step."""
    return plotting.loss_curve_plot(training_log, "Foundation model pretraining")


def summarize_pretraining(training_log: list[dict[str, Any]], foundation_model: LanguageModel) -> dict[str, float]:
    """Losses, runtime and model size."""
    return {
        **summarize_history(training_log),
        "n_parameters": float(foundation_model.model.num_parameters()),
        "vocabulary_size": float(len(foundation_model.tokenizer)),
        "context_length": float(foundation_model.context_length),
    }
