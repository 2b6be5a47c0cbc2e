"""Nodes of the sentence_conversion pipeline (workflow notes section 1.1)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import anndata as ad
import numpy as np
import pyarrow.compute as pc
from datasets import Dataset

from c2s_kedro.core.sentences import CELL_SENTENCE, cell_sentences_from_adata, concatenate_sentence_datasets, split_cells

logger = logging.getLogger(__name__)
LABEL_SETTING = "sentence_conversion.label_columns in conf/base/parameters_sentence_conversion.yml"


def _convert(adata: ad.AnnData, params: dict[str, Any]):
    return cell_sentences_from_adata(
        adata,
        label_columns=params.get("label_columns", []),
        layer=params.get("layer"),
        seed=params.get("seed", 0),
        chunk_size=params.get("chunk_size", 1024),
        label_setting=LABEL_SETTING,
    )


def convert_to_cell_sentences(
    processed_adata: ad.AnnData | dict[str, Callable[[], ad.AnnData]], params: dict[str, Any]
) -> tuple[Dataset, dict[str, int]]:
    """Cell sentences and vocabulary of one AnnData, or of several concatenated.

    ``processed_adata`` is one AnnData, or a dict of them (or of their loaders, as a
    ``PartitionedDataset`` of h5ad files gives): each is converted on its own, rows are tagged
    with their source in ``source_dataset``, and the vocabularies are merged.
    """
    if isinstance(processed_adata, ad.AnnData):
        result = _convert(processed_adata, params)
        return result.sentences, result.vocabulary
    parts = []
    for name in sorted(processed_adata):
        item = processed_adata[name]
        adata = item() if callable(item) else item
        result = _convert(adata, params)
        logger.info("converted %s: %d cells", name, result.sentences.num_rows)
        parts.append((name, result.sentences, result.vocabulary))
    return concatenate_sentence_datasets(parts)


def summarize_sentences(cell_sentences: Dataset, vocabulary: dict[str, int]) -> dict[str, float]:
    """Cells, vocabulary size, genes per sentence, empty sentences."""
    # with_format("arrow") honours a selection (select/filter/shuffle), unlike Dataset.data
    sentences = cell_sentences.select_columns([CELL_SENTENCE]).with_format("arrow")[:].column(CELL_SENTENCE)
    lengths = pc.list_value_length(pc.split_pattern(pc.fill_null(sentences, ""), " ")).to_numpy(zero_copy_only=False)
    empty = pc.equal(pc.fill_null(sentences, ""), "").to_numpy(zero_copy_only=False)
    lengths = np.where(empty, 0, lengths)
    return {
        "n_cells": float(cell_sentences.num_rows),
        "n_genes_in_vocabulary": float(len(vocabulary)),
        "n_genes_expressed_somewhere": float(sum(1 for v in vocabulary.values() if v > 0)),
        "mean_genes_per_sentence": float(lengths.mean()) if lengths.size else 0.0,
        "median_genes_per_sentence": float(np.median(lengths)) if lengths.size else 0.0,
        "n_empty_sentences": float(empty.sum()),
    }


def split_dataset(cell_sentences: Dataset, split: dict[str, Any]) -> dict[str, Any]:
    """Train/val/test split of the cells (by ``cell_name``), stratified by a label when set.

    Every model trained or evaluated later uses this one split, so test cells stay unseen.
    """
    stratify_by = split.get("stratify_by")
    if stratify_by and stratify_by not in cell_sentences.column_names:
        raise KeyError(
            f"sentence_conversion.split.stratify_by '{stratify_by}' is not a column of cell_sentences; "
            f"available: {', '.join(cell_sentences.column_names)}. Add it to sentence_conversion.label_columns "
            "or set stratify_by: null."
        )
    parts = split_cells(
        cell_sentences["cell_name"],
        fractions=split["fractions"],
        seed=split.get("seed", 0),
        stratify=cell_sentences[stratify_by] if stratify_by else None,
    )
    return {**parts, "seed": split.get("seed", 0), "stratify_by": stratify_by, "fractions": dict(split["fractions"])}
