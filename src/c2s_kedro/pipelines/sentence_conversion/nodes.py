"""Nodes of the sentence_conversion pipeline (workflow notes section 1.1)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

# each core module loads when a node first uses it (c2s_kedro/core/__init__.py): every run imports every
# pipeline's nodes (the registry composes each pipeline with its upstream) and pays only for what its nodes use
from c2s_kedro.core.errors import C2SKeyError
from c2s_kedro import core
from c2s_kedro.core.data.splitting import split_names, split_report
from c2s_kedro.parameters import read_parameters, setting_hint
from c2s_kedro.parameters.atlas import DataSplitParameters, SentenceConversionParameters

if TYPE_CHECKING:
    import anndata as ad
    from datasets import Dataset

logger = logging.getLogger(__name__)


def _convert(adata: ad.AnnData, settings: SentenceConversionParameters):
    with setting_hint("sentence_conversion.label_columns"):
        return core.sentences.conversion.cell_sentences_from_adata(
            adata, label_columns=settings.label_columns, layer=settings.layer, seed=settings.seed,
            chunk_size=settings.chunk_size,
        )


def convert_to_cell_sentences(
    processed_adata: ad.AnnData | dict[str, Callable[[], ad.AnnData]], params: dict[str, Any]
) -> tuple[Dataset, dict[str, int], dict[str, float]]:
    """Cell sentences and vocabulary of one AnnData, or of several concatenated, and the cells
    whose label spelling the conversion changed (``core.sentences.conversion.unify_label_columns``).

    ``processed_adata`` is one AnnData, or a dict of them (or of their loaders, as a
    ``PartitionedDataset`` of h5ad files gives): each is converted on its own, rows are tagged
    with their source in ``source_dataset``, and the vocabularies are merged.
    """
    import anndata as ad  # loaded when the node runs, as core is

    settings = read_parameters(SentenceConversionParameters, params, "sentence_conversion")
    if isinstance(processed_adata, ad.AnnData):
        result = _convert(processed_adata, settings)
        return result.sentences, result.vocabulary, result.label_spellings
    parts, label_spellings = [], {}
    for name in sorted(processed_adata):
        item = processed_adata[name]
        adata = item() if callable(item) else item
        result = _convert(adata, settings)
        logger.info("converted %s: %d cells", name, result.sentences.num_rows)
        parts.append((name, result.sentences, result.vocabulary))
        for key, value in result.label_spellings.items():
            label_spellings[key] = label_spellings.get(key, 0.0) + value
    return *core.sentences.conversion.concatenate_sentence_datasets(parts), label_spellings


def summarize_sentences(
    cell_sentences: Dataset, vocabulary: dict[str, int], label_spellings: dict[str, float] | None = None
) -> dict[str, float]:
    """Cells, vocabulary size, genes per sentence, empty sentences, the cells without a label in
    each label column (``n_cells_without_label[<column>]``) and those whose label the conversion
    stripped or respelled (``label_spellings``)."""
    import pyarrow.compute as pc

    # with_format("arrow") honours a selection (select/filter/shuffle), unlike Dataset.data
    column = core.sentences.conversion.CELL_SENTENCE
    texts = cell_sentences.select_columns([column]).with_format("arrow")[:].column(column)
    # genes = spaces + 1: splitting every sentence into words held a list of 600M strings for a
    # 260,000-cell screen (+5 GB); counting the separators holds one integer per cell
    lengths = pc.add(pc.count_substring(pc.fill_null(texts, ""), " "), 1).to_numpy(zero_copy_only=False)
    empty = pc.equal(pc.fill_null(texts, ""), "").to_numpy(zero_copy_only=False)
    lengths = np.where(empty, 0, lengths)
    return {
        "n_cells": float(cell_sentences.num_rows),
        "n_genes_in_vocabulary": float(len(vocabulary)),
        "n_genes_expressed_somewhere": float(sum(1 for v in vocabulary.values() if v > 0)),
        "mean_genes_per_sentence": float(lengths.mean()) if lengths.size else 0.0,
        "median_genes_per_sentence": float(np.median(lengths)) if lengths.size else 0.0,
        "n_empty_sentences": float(empty.sum()),
        **{f"n_cells_without_label[{column}]": float((~core.sentences.conversion.has_label(cell_sentences[column])).sum())
           for column in cell_sentences.column_names if column not in (*core.sentences.conversion.RESERVED_COLUMNS, "source_dataset")},
        **{key: float(value) for key, value in (label_spellings or {}).items()},
    }


def split_dataset(cell_sentences: Dataset, params: dict[str, Any]) -> dict[str, Any]:
    """Train/val/test split of the cells (by ``cell_name``, unique), stratified by a label when set;
    a split that misses its fractions, or a test part too small to score, is logged (``split_report``).

    Every model trained or evaluated later uses this one split, so test cells stay unseen.
    """
    settings = read_parameters(DataSplitParameters, params, "data_split")
    stratify_by = settings.stratify_by
    if stratify_by and stratify_by not in cell_sentences.column_names:
        raise C2SKeyError(
            f"data_split.stratify_by '{stratify_by}' is not a column of cell_sentences; available: "
            f"{', '.join(cell_sentences.column_names)}. Add it to sentence_conversion.label_columns or set "
            "data_split.stratify_by: null in your environment (e.g. conf/local/parameters.yml)."
        )
    with setting_hint("data_split.fractions"):
        parts = split_names(
            cell_sentences["cell_name"], settings.fractions, settings.seed,
            stratify=cell_sentences[stratify_by] if stratify_by else None,
        )
    split_report(parts, settings.fractions)
    return {**parts, "seed": settings.seed, "stratify_by": stratify_by, "fractions": dict(settings.fractions)}
