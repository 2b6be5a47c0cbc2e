"""Cell sentences: rank conversion and vocabulary (the rank-expression fit and reconstruction are
``rank_fit``).

A cell sentence lists a cell's expressed genes (value > 0) by descending expression, ties broken
in a seeded random order. Conversion works on CSR row chunks with array operations (no Python
loop over cells or genes) and streams Arrow record batches to disk, so a large or backed AnnData
converts in bounded memory.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import unicodedata
import uuid
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp
from datasets import Dataset, Features, concatenate_datasets
from tqdm.auto import tqdm

from c2s_kedro.core.errors import C2SKeyError, C2SRuntimeError, C2SValueError
from c2s_kedro.core.data.splitting import require_unique_names
from c2s_kedro.core.data.validation import require_obs_columns, unique_ignoring_case
from c2s_kedro.core.sentences import kernels

logger = logging.getLogger(__name__)

CELL_NAME = "cell_name"
CELL_SENTENCE = "cell_sentence"
RESERVED_COLUMNS = (CELL_NAME, CELL_SENTENCE)


def iter_row_chunks(
    adata: ad.AnnData, layer: str | None = None, chunk_size: int = 1024
) -> Iterator[tuple[int, int, sp.csr_matrix]]:
    """Yield ``(start, end, csr_chunk)`` over the cells of ``adata``.

    Works for in-memory and backed AnnData, dense or sparse; only one chunk is densified or
    loaded at a time.
    """
    if layer is not None and layer not in adata.layers:
        raise C2SKeyError(
            f"layer '{layer}' not found in the AnnData; available layers: "
            f"{', '.join(adata.layers.keys()) or '(none)'}. Set `layer: null` to use .X."
        )
    matrix = adata.X if layer is None else adata.layers[layer]
    if matrix is None:
        raise C2SValueError("the AnnData has no expression matrix (.X is None)")
    in_memory_csr = isinstance(matrix, sp.csr_matrix | sp.csr_array)
    for start in range(0, adata.n_obs, chunk_size):
        end = min(start + chunk_size, adata.n_obs)
        if in_memory_csr:
            # Rows of an in-memory CSR matrix as views, no copy. The arrays are set after
            # construction because scipy's constructor copies views of a larger array.
            first, last = matrix.indptr[start], matrix.indptr[end]
            chunk = sp.csr_matrix((end - start, matrix.shape[1]), dtype=matrix.dtype)
            chunk.data = matrix.data[first:last]
            chunk.indices = matrix.indices[first:last]
            chunk.indptr = matrix.indptr[start : end + 1] - first
        else:
            chunk = matrix[start:end]
            chunk = sp.csr_matrix(chunk) if not sp.issparse(chunk) else chunk.tocsr()
        yield start, end, chunk


def _check_values(n_negative: int, n_nan: int, start: int, n_rows: int) -> None:
    if n_negative or n_nan:
        raise C2SValueError(
            f"cells {start}..{start + n_rows - 1} hold {n_negative} negative and {n_nan} NaN values; "
            "cell sentences rank non-negative (normalized) expression. Pass log-normalized data, not "
            "scaled data (or choose a non-negative layer with sentence_conversion.layer)."
        )


def _scan(chunk: sp.csr_matrix, name_lengths: np.ndarray, start: int) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """Check a chunk's values, drop stored zeros, put it in canonical form (each row's genes
    sorted, no repeated entry); return it with sentence byte lengths and the cells expressing each
    gene. Ties are broken by an entry's position in its row, so the canonical form makes the same
    values give the same sentence however they were stored (CSC, dense, an h5ad's own order). The
    chunk is copied only when it needs a change: the caller's matrix is never modified."""
    copied = False
    if chunk.nnz:
        smallest = chunk.data.min()  # NaN propagates
        if not smallest > 0:
            n_nan = int(np.count_nonzero(np.isnan(chunk.data))) if np.issubdtype(chunk.data.dtype, np.floating) else 0
            _check_values(int(np.count_nonzero(chunk.data < 0)), n_nan, start, chunk.shape[0])
            chunk, copied = chunk.copy(), True
            chunk.eliminate_zeros()
    if not chunk.has_canonical_format:
        chunk = chunk if copied else chunk.copy()
        chunk.sum_duplicates()  # sorts each row's indices
    gene_counts = np.zeros(chunk.shape[1], dtype=np.int64)
    lengths = kernels.sentence_lengths(chunk.indptr, chunk.indices, name_lengths, gene_counts)
    return chunk, lengths, gene_counts


def expressed_entries(chunk: sp.csr_matrix, start: int) -> sp.csr_matrix:
    """Return the chunk with only strictly positive entries, refusing negative or NaN values."""
    return _scan(chunk, np.zeros(chunk.shape[1], dtype=np.int64), start)[0]


BLOCK_ROWS = 128  # rows sorted together; rows are grouped by length so little goes to padding


def value_codes(values: np.ndarray) -> np.ndarray:
    """Order-preserving 32-bit codes of positive values.

    The float32 bit pattern orders like the value for positive floats; values that float32 cannot
    hold exactly (float64 data) get their dense rank instead, so no two distinct values tie.
    """
    as_float32 = values.astype(np.float32, copy=False)
    if values.dtype.itemsize <= 4 or np.array_equal(as_float32, values):
        return as_float32.view(np.uint32)
    _, ranks = np.unique(values, return_inverse=True)
    return (ranks + 1).astype(np.uint32)


def _gene_bits(n_genes: int) -> int:
    bits = max(1, int(n_genes - 1).bit_length())
    if bits > 32:
        raise C2SValueError(f"{n_genes} genes do not fit the 32-bit gene index of the ranking key")
    return bits


_buffers = threading.local()


def _buffer(name: str, size: int, dtype) -> np.ndarray:
    """A per-thread scratch array of at least ``size`` items, reused across chunks: fresh large
    arrays cost page faults on every chunk."""
    current = getattr(_buffers, name, None)
    if current is None or current.size < size:
        current = np.empty(max(size, 1), dtype=dtype)
        setattr(_buffers, name, current)
    return current[:size]


def _sorted_blocks(chunk: sp.csr_matrix, seed: int, first_row: int):
    """Yield ``(rows, sorted_keys)`` for blocks of rows of similar length."""
    counts = np.diff(chunk.indptr)
    order = np.argsort(counts, kind="stable")
    codes = value_codes(chunk.data)
    bits = _gene_bits(chunk.shape[1])
    for start in range(0, order.size, BLOCK_ROWS):
        rows = order[start : start + BLOCK_ROWS]
        width = int(counts[rows[-1]])
        if width == 0:
            continue
        keys = _buffer("keys", rows.size * width, np.uint64).reshape(rows.size, width)
        kernels.fill_sort_keys(chunk.indptr, chunk.indices, codes, rows, keys, seed, first_row, bits)
        keys.sort(axis=1)  # numpy's vectorized sort; releases the GIL
        yield rows, keys


def rank_genes(chunk: sp.csr_matrix, seed: int = 0, first_row: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Order each row's stored entries by descending value, ties in seeded random order.

    Entries must be positive (see ``expressed_entries``). Returns ``(gene_indices, offsets)``:
    row ``i``'s genes, highest first, are ``gene_indices[offsets[i]:offsets[i + 1]]``.
    ``first_row`` is the index of the chunk's first row in the whole dataset, so that a cell's tie
    order is the same whatever the chunking.
    """
    counts = np.diff(chunk.indptr)
    offsets = np.zeros(chunk.shape[0] + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    genes = np.zeros(int(offsets[-1]), dtype=np.int32)
    bits = _gene_bits(chunk.shape[1])
    for rows, keys in _sorted_blocks(chunk, seed, first_row):
        kernels.extract_genes(keys, rows, counts, offsets, genes, bits)
    return genes, offsets


@dataclass(frozen=True)
class GeneNameTable:
    """Gene names as rows of 64-bit words (name, a space, zero padding) for the sentence writer."""

    words: np.ndarray
    lengths: np.ndarray

    @classmethod
    def from_names(cls, names: Sequence[str]) -> GeneNameTable:
        if sys.byteorder != "little":
            raise C2SRuntimeError("the sentence writer assumes a little-endian machine")
        encoded = np.char.encode(np.asarray(names, dtype=str), "utf-8")
        n, longest = len(encoded), max(encoded.itemsize, 1)
        lengths = np.char.str_len(encoded).astype(np.int64)
        width = -(-(longest + 1) // 8) * 8
        table = np.zeros((n, width), dtype=np.uint8)
        table[:, : encoded.itemsize] = encoded.view(np.uint8).reshape(n, encoded.itemsize)
        table[np.arange(n), lengths] = ord(" ")
        return cls(table.view(np.uint64), lengths)


def chunk_sentences(
    chunk: sp.csr_matrix, names: GeneNameTable, seed: int = 0, first_row: int = 0
) -> tuple[pa.StringArray, np.ndarray]:
    """Cell sentences of a CSR chunk (one Arrow string per row) and the number of cells of the
    chunk expressing each gene. Refuses negative and NaN values; stored zeros are not genes.

    The returned strings live in a per-thread buffer that the thread's next call overwrites:
    write or copy them before converting another chunk in the same thread.
    """
    chunk, lengths, gene_counts = _scan(chunk, names.lengths, first_row)
    byte_offsets = np.zeros(chunk.shape[0] + 1, dtype=np.int64)
    np.cumsum(lengths, out=byte_offsets[1:])
    if byte_offsets[-1] >= 2**31:
        raise C2SValueError("a chunk's sentences exceed 2 GB; lower sentence_conversion.chunk_size")
    counts = np.diff(chunk.indptr)
    bits = _gene_bits(chunk.shape[1])
    out = _buffer("text", int(byte_offsets[-1]) // 8 + names.words.shape[1] + 2, np.uint64)
    for rows, keys in _sorted_blocks(chunk, seed, first_row):
        kernels.write_sentences(keys, rows, counts, byte_offsets, names.words, names.lengths, bits, out)
    sentences = pa.StringArray.from_buffers(
        chunk.shape[0], pa.py_buffer(byte_offsets.astype(np.int32)), pa.py_buffer(out.view(np.uint8))
    )
    return sentences, gene_counts


def vocabulary_names(var_names: Sequence[str]) -> np.ndarray:
    """Gene names as they appear in sentences: upper-cased, one word per gene (names that coincide
    once upper-cased get numeric suffixes, ``validation.unique_ignoring_case``; data that passed
    the door has none)."""
    return np.char.upper(np.asarray(unique_ignoring_case(var_names), dtype=str))


@dataclass
class ConversionResult:
    """Output of ``cell_sentences_from_adata``."""

    sentences: Dataset
    vocabulary: dict[str, int]
    n_empty_cells: int
    label_spellings: dict[str, float]  # cells whose label was stripped or respelled, per column (unify_label_columns)


# What str() makes of a missing value (None, NaN, pd.NA, NaT), compared without case and surrounding space;
# and "Unassigned", which Azimuth and data portals write for cells they could not label (and which the
# annotation answers below its min_probability): no cell type a model should learn
MISSING_LABEL_TEXTS = frozenset({"", "nan", "none", "<na>", "nat", "unassigned"})
_WHITESPACE_RUN = re.compile(r"\s+")


def has_label(values: Sequence[Any] | pd.Series | np.ndarray) -> np.ndarray:
    """Whether each value is a label: not None, NaN or empty, nor the text a missing value becomes
    once turned into a string ("nan", "None", "<NA>"), nor "Unassigned" (any case). The one test of
    a label present: cells without one are converted and embedded, but left out of prompts, label
    sets and scores."""
    series = values if isinstance(values, pd.Series) else pd.Series(np.asarray(values, dtype=object), dtype=object)
    if isinstance(series.dtype, pd.CategoricalDtype):  # one test per category, not per cell
        present = np.append(has_label(series.cat.categories.to_numpy(dtype=object)), False)
        return present[series.cat.codes.to_numpy()]  # code -1 (missing) reads the appended False
    text = series.astype(str).str.strip().str.lower()
    return (series.notna() & ~text.isin(MISSING_LABEL_TEXTS)).to_numpy(dtype=bool)


def label_key(label: Any) -> str:
    """A label in the form labels are compared in: whitespace runs made one space, surrounding
    whitespace removed, letter case folded ("CD14+ Monocyte ", "cd14+ monocyte" and "CD14+ Monocyte"
    are one label). The one comparison of labels: conversion merges spellings with it, the annotation
    scores with it, as generation's ``inference.match_answer`` reads answers."""
    return tidy_label(label).casefold()


def _spelling_group(label: Any) -> str:
    """Spellings of one label: equal by ``label_key`` once trailing periods are dropped ("Fibroblasts"
    and "Fibroblasts." are one label; an answer ends in a period, so the two could not be told apart)."""
    return label_key(label).rstrip(".").rstrip()


def tidy_label(label: Any) -> str:
    """A label as conversion keeps it: one Unicode form (NFC: a "ü" typed as "u" plus a combining mark
    is the same "ü"), every whitespace run (tab, non-breaking space) one space, none around it. A tab
    inside a label was one unknown token to a gene-level tokenizer, so two such labels were one."""
    return _WHITESPACE_RUN.sub(" ", unicodedata.normalize("NFC", str(label))).strip()


@dataclass(frozen=True)
class UnifiedLabels:
    """One label column with one spelling per label (``unify_label_spellings``)."""

    labels: pd.Categorical  # each cell's label, NaN where it has none (``has_label``)
    n_cells_stripped: int  # cells whose label was tidied (``tidy_label``: surrounding whitespace, tabs, Unicode form)
    n_cells_relabelled: int  # cells given the spelling of their label that most cells have
    merged: dict[str, list[str]]  # each label spelled several ways: its other spellings


def unify_label_spellings(values: pd.Series | Sequence[Any]) -> UnifiedLabels:
    """The labels of a column with surrounding whitespace removed and the spellings of one label
    (equal by ``label_key``: concatenated downloads write "CD14+ Monocyte", "CD14+ Monocyte " and
    "cd14+ monocyte") made one: the spelling most cells have, ties by sort order. Otherwise they
    would be separate classes (split strata, label sets) and generation, which reads answers without
    case, could never name some of them right. Cells without a label (``has_label``) stay without."""
    series = values if isinstance(values, pd.Series) else pd.Series(np.asarray(values, dtype=object), dtype=object)
    codes, uniques = pd.factorize(series, use_na_sentinel=True)  # one step per distinct value, not per cell
    uniques = np.asarray(uniques, dtype=object)
    present = has_label(uniques) if uniques.size else np.zeros(0, dtype=bool)
    cells = np.bincount(codes[codes >= 0], minlength=uniques.size)
    texts = [str(value) for value in uniques]
    stripped = [tidy_label(text) for text in texts]
    spellings: dict[str, dict[str, int]] = {}  # label_key -> spelling -> cells
    for text, is_label, n in zip(stripped, present, cells):
        if is_label:
            group = spellings.setdefault(_spelling_group(text), {})
            group[text] = group.get(text, 0) + int(n)
    chosen = {key: min(group, key=lambda spelling: (-group[spelling], spelling)) for key, group in spellings.items()}
    merged = {chosen[key]: sorted(set(group) - {chosen[key]}) for key, group in sorted(spellings.items()) if len(group) > 1}
    final = [chosen[_spelling_group(text)] if is_label else None for text, is_label in zip(stripped, present)]
    categories = sorted(set(chosen.values()))
    position = {label: i for i, label in enumerate(categories)}
    unique_codes = np.array([position[label] if label is not None else -1 for label in final] + [-1], dtype=np.int64)
    cell_codes = unique_codes[codes]  # code -1 (missing) reads the appended -1
    n_stripped = sum(int(n) for text, s, is_label, n in zip(texts, stripped, present, cells) if is_label and text != s)
    n_relabelled = sum(int(n) for s, f, n in zip(stripped, final, cells) if f is not None and s != f)
    return UnifiedLabels(pd.Categorical.from_codes(cell_codes, categories=categories), n_stripped, n_relabelled, merged)


def unify_label_columns(adata: ad.AnnData, label_columns: Sequence[str]) -> tuple[dict[str, pd.Categorical], dict[str, float]]:
    """``unify_label_spellings`` of each label column, logged: the labels the sentences carry, and
    counts for the conversion's metrics (``n_cells_label_stripped[<column>]``,
    ``n_cells_relabelled[<column>]``)."""
    labels, counts = {}, {}
    for column in label_columns:
        unified = unify_label_spellings(adata.obs[column])
        labels[column] = unified.labels
        counts[f"n_cells_label_stripped[{column}]"] = float(unified.n_cells_stripped)
        counts[f"n_cells_relabelled[{column}]"] = float(unified.n_cells_relabelled)
        if unified.n_cells_stripped:
            logger.warning("%d cells' '%s' labels had surrounding whitespace: removed (and tabs or repeated spaces made one "
                           "space, one Unicode form)", unified.n_cells_stripped, column)
        if unified.merged:
            logger.warning(
                "'%s' labels equal apart from letter case, whitespace or a trailing period made one (the spelling most cells have): %s; "
                "%d cells relabelled", column,
                "; ".join(f"{', '.join(map(repr, others))} -> {label!r}" for label, others in unified.merged.items()),
                unified.n_cells_relabelled,
            )
    return labels, counts


def _label_arrays(labels: Mapping[str, pd.Categorical], start: int, end: int) -> dict[str, pa.Array]:
    """The chunk's labels as Arrow strings, a cell without a label as null."""
    arrays = {}
    for column, values in labels.items():
        codes = values.codes[start:end]
        categories = pa.array(np.asarray(values.categories, dtype=str), type=pa.string())
        arrays[column] = pa.DictionaryArray.from_arrays(pa.array(codes, mask=codes < 0), categories).cast(pa.string())
    return arrays


def warn_cells_without_label(adata: ad.AnnData, label_columns: Sequence[str]) -> None:
    """A warning per column of ``label_columns`` where cells of ``adata`` have no label (``has_label``),
    naming how many (the conversion's metrics count them too: ``n_cells_without_label[<column>]``)."""
    for column in label_columns:
        n = int((~has_label(adata.obs[column])).sum())
        if n:
            logger.warning(
                "%d of %d cells have no '%s' label (missing, empty, or the text 'nan', 'None', 'NaT', '<NA>' or 'Unassigned'): they are converted and "
                "embedded, and a step that uses '%s' as the label it learns or scores leaves them out (a screen's batch "
                "column only pairs them with controls of any batch)", n, adata.n_obs, column, column,
            )


def cell_sentences_from_adata(
    adata: ad.AnnData,
    label_columns: Sequence[str] = (),
    layer: str | None = None,
    seed: int = 0,
    chunk_size: int = 1024,
    cache_dir: str | Path | None = None,
    n_threads: int | None = None,
) -> ConversionResult:
    """Convert every cell of ``adata`` into a cell sentence.

    Args:
        adata: cells x genes, normalized non-negative expression (in memory or backed).
        label_columns: ``.obs`` columns copied into the dataset beside ``cell_name`` and
            ``cell_sentence``.
        layer: layer to rank instead of ``.X``.
        seed: seed of the random tie-break.
        chunk_size: cells per chunk; bounds memory.
        cache_dir: where the Arrow files backing the returned dataset are written. By default a
            new temporary directory, removed when the process ends: save the dataset (the
            catalog's ``cell_sentences`` does) to keep it.
        n_threads: threads converting chunks (default: the CPUs available, at most 4).

    Returns:
        The Hugging Face dataset (memory-mapped from disk), the vocabulary (upper-cased gene ->
        number of cells expressing it, in ``.var`` order) and the number of empty cells.
    """
    started = time.perf_counter()
    label_columns = list(label_columns)
    reserved = sorted(set(label_columns) & set(RESERVED_COLUMNS))
    if reserved:
        raise C2SValueError(
            f"label column(s) {reserved} collide with the reserved dataset columns "
            f"{list(RESERVED_COLUMNS)}; rename them in .obs or drop them from the label columns"
        )
    require_obs_columns(adata, label_columns)
    warn_cells_without_label(adata, label_columns)
    labels_by_column, label_spellings = unify_label_columns(adata, label_columns)

    names = vocabulary_names(adata.var_names)
    name_table = GeneNameTable.from_names(names)
    cell_names = np.asarray(adata.obs_names, dtype=str)
    schema = pa.schema(
        [(CELL_NAME, pa.string()), (CELL_SENTENCE, pa.string())]
        + [(column, pa.string()) for column in label_columns]
    )
    if cache_dir is None:
        # The dataset is memory-mapped from these files, so they stay while the process runs; they
        # used to stay for good (one copy of the sentences in /tmp per conversion).
        directory = Path(tempfile.mkdtemp(prefix="c2s_sentences_"))
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
    else:
        directory = Path(cache_dir)
        directory.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex

    def convert(index: int, start: int, chunk: sp.csr_matrix, labels: dict[str, pa.Array]):
        sentences, gene_counts = chunk_sentences(chunk, name_table, seed, start)
        batch = pa.record_batch(
            {CELL_NAME: pa.array(cell_names[start : start + chunk.shape[0]], type=pa.string()),
             CELL_SENTENCE: sentences, **labels},
            schema=schema,
        )
        path = directory / f"cell_sentences-{run_id}-{index:06d}.arrow"
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            writer.write_batch(batch)
        return path, gene_counts, int(np.count_nonzero(pc.equal(sentences, "").to_numpy(zero_copy_only=False)))

    workers = n_threads or min(4, len(os.sched_getaffinity(0)))
    cells_expressing = np.zeros(adata.n_vars, dtype=np.int64)
    n_empty = 0
    parts: list[Path] = []
    # Chunks are read in this thread (h5py is not thread-safe); worker threads rank, write the
    # sentences and save each chunk as its own Arrow file (the kernels, numpy's sort and Arrow's
    # I/O release the GIL). At most two chunks per worker are in flight, so memory stays bounded.
    with (
        ThreadPoolExecutor(max_workers=workers) as pool,
        tqdm(total=adata.n_obs, desc="cell sentences", unit="cell", leave=False) as progress,
    ):
        pending: deque = deque()

        def collect_oldest() -> None:
            nonlocal n_empty, cells_expressing
            cells, future = pending.popleft()
            path, gene_counts, n_empty_rows = future.result()
            parts.append(path)
            cells_expressing += gene_counts
            n_empty += n_empty_rows
            progress.update(cells)

        for index, (start, end, chunk) in enumerate(iter_row_chunks(adata, layer, chunk_size)):
            labels = _label_arrays(labels_by_column, start, end)
            pending.append((end - start, pool.submit(convert, index, start, chunk, labels)))
            if len(pending) >= 2 * workers:
                collect_oldest()
        while pending:
            collect_oldest()
    if parts:
        sentences = concatenate_datasets([Dataset.from_file(str(path)) for path in parts])
    else:
        sentences = Dataset.from_dict({field.name: [] for field in schema}, features=Features.from_arrow_schema(schema))

    seconds = time.perf_counter() - started
    logger.info("cell sentences of %d cells in %.2f s (%.0f cells/s)", adata.n_obs, seconds, adata.n_obs / max(seconds, 1e-9))
    if n_empty:
        logger.warning(
            "%d of %d cells express no gene and got an empty cell sentence", n_empty, adata.n_obs
        )
    vocabulary = dict(zip(names.tolist(), cells_expressing.tolist()))
    n_suffixed = int(np.count_nonzero(names != np.char.upper(np.asarray(adata.var_names, dtype=str))))
    if n_suffixed:
        logger.warning(
            "%d gene names coincide with another once upper-cased: each is its own word with a numeric suffix "
            "(data_processing's input checks count them as duplicated_gene_names)", n_suffixed,
        )
    return ConversionResult(sentences, vocabulary, n_empty, label_spellings)


def merge_vocabularies(vocabularies: Sequence[dict[str, int]]) -> dict[str, int]:
    """Union of vocabularies in first-seen order, cell counts summed."""
    merged: dict[str, int] = {}
    for vocabulary in vocabularies:
        for gene, count in vocabulary.items():
            merged[gene] = merged.get(gene, 0) + int(count)
    return merged


def concatenate_sentence_datasets(
    parts: Sequence[tuple[str, Dataset, dict[str, int]]], source_column: str = "source_dataset"
) -> tuple[Dataset, dict[str, int]]:
    """Concatenate several converted datasets, tagging rows with their source; merge vocabularies.

    Label columns missing from a part are filled with nulls so that all parts share one schema.
    """
    if not parts:
        raise C2SValueError("no datasets to concatenate")
    columns: list[str] = []
    for _, dataset, _ in parts:
        columns += [c for c in dataset.column_names if c not in columns]
    aligned = []
    for name, dataset, _ in parts:
        for column in columns:
            if column not in dataset.column_names:
                dataset = dataset.add_column(column, [None] * dataset.num_rows)
        dataset = dataset.add_column(source_column, [name] * dataset.num_rows)
        aligned.append(dataset.select_columns(columns + [source_column]))
    return concatenate_datasets(aligned), merge_vocabularies([v for _, _, v in parts])


def select_cells(cell_sentences: Dataset, names: Sequence[str]) -> Dataset:
    """The rows of ``cell_sentences`` whose ``cell_name`` is in ``names``, in dataset order. A name
    of ``names`` that several rows carry is refused (``require_unique_names``): it would select
    cells of two samples for one.

    Kept in memory (an index over the saved table), so nothing is written next to the saved
    dataset in the catalog's folder.
    """
    all_names = pd.Index(cell_sentences.select_columns([CELL_NAME]).with_format("arrow")[:].column(CELL_NAME).to_pylist())
    rows = np.flatnonzero(all_names.isin(list(names)))
    require_unique_names(all_names[rows], "the cell sentences")
    return cell_sentences.select(rows, keep_in_memory=True)
