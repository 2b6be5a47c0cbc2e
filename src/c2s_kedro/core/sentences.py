"""Cell sentences: rank conversion, vocabulary, the rank-expression fit and reconstruction.

A cell sentence lists a cell's expressed genes (value > 0) by descending expression, ties broken
in a seeded random order. Conversion works on CSR row chunks with array operations (no Python
loop over cells or genes) and streams Arrow record batches to disk, so a large or backed AnnData
converts in bounded memory.
"""

from __future__ import annotations

import logging
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp
from datasets import Dataset, concatenate_datasets
from tqdm.auto import tqdm

from c2s_kedro.core.validation import require_obs_columns

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
        raise KeyError(
            f"layer '{layer}' not found in the AnnData; available layers: "
            f"{', '.join(adata.layers.keys()) or '(none)'}. Set `layer: null` to use .X."
        )
    matrix = adata.X if layer is None else adata.layers[layer]
    if matrix is None:
        raise ValueError("the AnnData has no expression matrix (.X is None)")
    for start in range(0, adata.n_obs, chunk_size):
        end = min(start + chunk_size, adata.n_obs)
        chunk = matrix[start:end]
        chunk = sp.csr_matrix(chunk) if not sp.issparse(chunk) else chunk.tocsr()
        yield start, end, chunk


def _expressed_entries(chunk: sp.csr_matrix, start: int) -> sp.csr_matrix:
    """Return the chunk with only strictly positive entries, refusing negative or NaN values."""
    data = chunk.data
    bad_nan = np.issubdtype(data.dtype, np.floating) and np.isnan(data).any()
    if data.size and (bad_nan or (data < 0).any()):
        raise ValueError(
            f"cells {start}..{start + chunk.shape[0] - 1} hold negative or NaN values; cell "
            "sentences rank non-negative (normalized) expression. Pass log-normalized data, not "
            "scaled data (or choose a non-negative layer with sentence_conversion.layer)."
        )
    if data.size and (data == 0).any():
        chunk = chunk.copy()
        chunk.eliminate_zeros()
    return chunk


def rank_genes(chunk: sp.csr_matrix, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Order each row's stored entries by descending value, ties in random order.

    Returns ``(gene_indices, offsets)``: row ``i``'s genes, highest first, are
    ``gene_indices[offsets[i]:offsets[i + 1]]``. Entries must be positive (see
    ``_expressed_entries``).

    Each entry becomes one 64-bit key: the float32 bits of its value (which order like the value
    for non-negative floats) in the high word, random tie-break bits, then the gene index in the
    low bits. One vectorized row-wise sort of the padded key matrix then orders all cells at once.
    """
    counts = np.diff(chunk.indptr)
    n_rows, n_genes = chunk.shape
    offsets = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    width = int(counts.max()) if n_rows else 0
    if width == 0:
        return np.zeros(0, dtype=np.int32), offsets
    gene_bits = max(1, int(n_genes - 1).bit_length())
    if gene_bits > 32:
        raise ValueError(f"{n_genes} genes do not fit the 32-bit gene index of the ranking key")
    tie_bits = 32 - gene_bits

    key = chunk.data.astype(np.float32, copy=False).view(np.uint32).astype(np.uint64)
    key <<= np.uint64(32)
    key |= chunk.indices.astype(np.uint64)
    if tie_bits:
        ties = rng.integers(0, 1 << tie_bits, size=key.size, dtype=np.uint64)
        ties <<= np.uint64(gene_bits)
        key |= ties

    # Padding is 0, below every real key (values are > 0), so it sorts to the front of each row.
    padded = np.zeros((n_rows, width), dtype=np.uint64)
    filled = np.arange(width)[None, :] < counts[:, None]
    padded[filled] = key
    padded.sort(axis=1)
    descending = padded[:, ::-1]
    gene_indices = (descending[filled] & np.uint64((1 << gene_bits) - 1)).astype(np.int32)
    return gene_indices, offsets


def join_sentences(
    gene_names: pa.Array, gene_indices: np.ndarray, offsets: np.ndarray
) -> pa.StringArray:
    """Turn ranked gene indices into space-separated sentences (one Arrow string per cell)."""
    words = gene_names.take(pa.array(gene_indices, type=pa.int32()))
    lists = pa.ListArray.from_arrays(pa.array(offsets, type=pa.int64()).cast(pa.int32()), words)
    return pc.binary_join(lists, " ")


def vocabulary_names(var_names: Sequence[str]) -> np.ndarray:
    """Gene names as they appear in sentences: upper-cased."""
    return np.char.upper(np.asarray(var_names, dtype=str))


@dataclass
class ConversionResult:
    """Output of ``cell_sentences_from_adata``."""

    sentences: Dataset
    vocabulary: dict[str, int]
    n_empty_cells: int


def _label_arrays(adata: ad.AnnData, label_columns: Sequence[str], start: int, end: int):
    arrays = {}
    for column in label_columns:
        values = adata.obs[column].iloc[start:end]
        arrays[column] = pa.array(
            [None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in values],
            type=pa.string(),
        )
    return arrays


def cell_sentences_from_adata(
    adata: ad.AnnData,
    label_columns: Sequence[str] = (),
    layer: str | None = None,
    seed: int = 0,
    chunk_size: int = 1024,
    cache_dir: str | Path | None = None,
    label_setting: str | None = None,
) -> ConversionResult:
    """Convert every cell of ``adata`` into a cell sentence.

    Args:
        adata: cells x genes, normalized non-negative expression (in memory or backed).
        label_columns: ``.obs`` columns copied into the dataset beside ``cell_name`` and
            ``cell_sentence``.
        layer: layer to rank instead of ``.X``.
        seed: seed of the random tie-break.
        chunk_size: cells per chunk; bounds memory.
        cache_dir: where the Arrow file backing the returned dataset is written (a new
            temporary directory by default).
        label_setting: where ``label_columns`` is configured, named in error messages.

    Returns:
        The Hugging Face dataset (memory-mapped from disk), the vocabulary (upper-cased gene ->
        number of cells expressing it, in ``.var`` order) and the number of empty cells.
    """
    label_columns = list(label_columns)
    reserved = sorted(set(label_columns) & set(RESERVED_COLUMNS))
    if reserved:
        raise ValueError(
            f"label column(s) {reserved} collide with the reserved dataset columns "
            f"{list(RESERVED_COLUMNS)}; rename them in .obs or drop them from "
            f"{label_setting or 'label_columns'}"
        )
    require_obs_columns(adata, label_columns, setting=label_setting)

    names = vocabulary_names(adata.var_names)
    gene_names = pa.array(names, type=pa.string())
    cell_names = np.asarray(adata.obs_names, dtype=str)
    schema = pa.schema(
        [(CELL_NAME, pa.string()), (CELL_SENTENCE, pa.string())]
        + [(column, pa.string()) for column in label_columns]
    )
    directory = Path(cache_dir or tempfile.mkdtemp(prefix="c2s_sentences_"))
    directory.mkdir(parents=True, exist_ok=True)
    arrow_path = directory / f"cell_sentences-{uuid.uuid4().hex}.arrow"

    rng = np.random.default_rng(seed)
    cells_expressing = np.zeros(adata.n_vars, dtype=np.int64)
    n_empty = 0
    with pa.OSFile(str(arrow_path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        progress = tqdm(total=adata.n_obs, desc="cell sentences", unit="cell", leave=False)
        for start, end, chunk in iter_row_chunks(adata, layer, chunk_size):
            chunk = _expressed_entries(chunk, start)
            cells_expressing += np.bincount(chunk.indices, minlength=adata.n_vars)
            gene_indices, offsets = rank_genes(chunk, rng)
            n_empty += int(np.count_nonzero(np.diff(offsets) == 0))
            columns = {
                CELL_NAME: pa.array(cell_names[start:end], type=pa.string()),
                CELL_SENTENCE: join_sentences(gene_names, gene_indices, offsets),
                **_label_arrays(adata, label_columns, start, end),
            }
            writer.write_batch(pa.record_batch(columns, schema=schema))
            progress.update(end - start)
        progress.close()

    if n_empty:
        logger.warning(
            "%d of %d cells express no gene and got an empty cell sentence", n_empty, adata.n_obs
        )
    vocabulary: dict[str, int] = {}
    for name, count in zip(names.tolist(), cells_expressing.tolist()):
        vocabulary[name] = vocabulary.get(name, 0) + count
    if len(vocabulary) < len(names):
        logger.warning(
            "%d gene names coincide once upper-cased; their cell counts were merged in the vocabulary",
            len(names) - len(vocabulary),
        )
    return ConversionResult(Dataset.from_file(str(arrow_path)), vocabulary, n_empty)


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
        raise ValueError("no datasets to concatenate")
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


@dataclass
class RankFit:
    """Linear fit of normalized expression on log10(1 + rank) (rank 0-based)."""

    slope: float
    intercept: float
    r2: float
    pearson_r: float
    spearman_r: float
    n_cells: int
    n_points: int
    log_rank_cutoff: float

    def predict(self, rank: np.ndarray) -> np.ndarray:
        """Expression expected at 0-based ``rank`` (floored at 0: expression is non-negative)."""
        return np.maximum(self.intercept + self.slope * np.log10(1.0 + np.asarray(rank)), 0.0)


def rank_expression_points(
    adata: ad.AnnData, n_cells: int, seed: int = 0, layer: str | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample cells and return ``(cell_indices, log10(1 + rank), expression)`` of their
    expressed genes."""
    rng = np.random.default_rng(seed)
    n = min(n_cells, adata.n_obs)
    cells = np.sort(rng.choice(adata.n_obs, size=n, replace=False))
    matrix = adata.X if layer is None else adata.layers[layer]
    chunk = matrix[cells]
    chunk = _expressed_entries(sp.csr_matrix(chunk) if not sp.issparse(chunk) else chunk.tocsr(), 0)
    gene_indices, offsets = rank_genes(chunk, rng)
    counts = np.diff(offsets)
    ranks = np.arange(gene_indices.size) - np.repeat(offsets[:-1], counts)
    rows = np.repeat(np.arange(n), counts)
    values = np.asarray(chunk[rows, gene_indices]).ravel()
    return cells, np.log10(1.0 + ranks), values


def fit_rank_expression(
    log_rank: np.ndarray, expression: np.ndarray, n_cells: int, log_rank_cutoff: float = 3.0
) -> RankFit:
    """Least-squares fit of expression on log10(1 + rank), using points with log rank < cutoff."""
    from scipy import stats
    from sklearn.linear_model import LinearRegression

    keep = log_rank < log_rank_cutoff
    x, y = log_rank[keep], expression[keep]
    if x.size < 3 or np.unique(x).size < 2:
        raise ValueError(
            f"only {x.size} expressed (gene, cell) points below log10 rank {log_rank_cutoff}: "
            "too few to fit; sample more cells (benchmarking.n_cells) or check the data"
        )
    model = LinearRegression().fit(x[:, None], y)
    return RankFit(
        slope=float(model.coef_[0]),
        intercept=float(model.intercept_),
        r2=float(model.score(x[:, None], y)),
        pearson_r=float(stats.pearsonr(x, y).statistic),
        spearman_r=float(stats.spearmanr(x, y).statistic),
        n_cells=int(n_cells),
        n_points=int(x.size),
        log_rank_cutoff=float(log_rank_cutoff),
    )


def reconstruct_expression(
    sentences: Sequence[str] | pa.Array, gene_names: Sequence[str], rank_fit: RankFit
) -> tuple[sp.csr_matrix, int]:
    """Expression matrix (cells x ``gene_names``) predicted from each gene's position.

    A gene absent from a sentence gets 0, so a sentence cut to its top-k genes yields zeros
    beyond k. Words that are not in ``gene_names`` are skipped; a gene repeated in one sentence
    keeps its first position. Returns the matrix and the number of skipped words.
    """
    array = sentences if isinstance(sentences, pa.Array) else pa.array(list(sentences), pa.string())
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    array = pc.fill_null(array, "")
    words = pc.split_pattern(array, " ")
    flat = pc.list_flatten(words)
    lengths = pc.list_value_length(words).to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = np.zeros(len(array) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    positions = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
    rows = np.repeat(np.arange(len(array)), lengths)
    upper = vocabulary_names(gene_names)
    genes = pc.index_in(flat, value_set=pa.array(upper, pa.string())).to_numpy(zero_copy_only=False)
    non_empty = pc.not_equal(flat, "").to_numpy(zero_copy_only=False)
    known = ~np.isnan(genes.astype(float)) if genes.dtype == object else ~np.isnan(genes)
    n_unknown = int(np.count_nonzero(non_empty & ~known))
    keep = known & non_empty
    rows, positions = rows[keep], positions[keep]
    genes = np.asarray(genes[keep], dtype=np.int64)
    # First occurrence of each (cell, gene): np.unique reports the first index of each key.
    _, first = np.unique(rows * len(upper) + genes, return_index=True)
    rows, positions, genes = rows[first], positions[first], genes[first]
    values = rank_fit.predict(positions).astype(np.float32)
    matrix = sp.csr_matrix((values, (rows, genes)), shape=(len(array), len(upper)))
    matrix.eliminate_zeros()
    return matrix, n_unknown


def split_cells(
    cell_names: Sequence[str],
    fractions: dict[str, float],
    seed: int = 0,
    stratify: Sequence[str] | None = None,
) -> dict[str, list[str]]:
    """Split cells into named parts (e.g. train/val/test = 0.8/0.1/0.1), seeded.

    With ``stratify`` (one label per cell) each label is split in the same proportions, so rare
    cell types reach every part when they have enough cells.
    """
    names = np.asarray(cell_names, dtype=str)
    parts = list(fractions)
    shares = np.array([fractions[p] for p in parts], dtype=float)
    if (shares < 0).any() or not np.isclose(shares.sum(), 1.0):
        raise ValueError(f"split fractions must be non-negative and sum to 1; got {fractions}")
    rng = np.random.default_rng(seed)
    groups = [np.arange(len(names))] if stratify is None else [
        np.flatnonzero(np.asarray(stratify, dtype=str) == label) for label in sorted(set(map(str, stratify)))
    ]
    assigned: dict[str, list[int]] = {p: [] for p in parts}
    for members in groups:
        members = rng.permutation(members)
        bounds = np.round(np.cumsum(shares) * len(members)).astype(int)
        for part, start, end in zip(parts, np.concatenate([[0], bounds[:-1]]), bounds):
            assigned[part].extend(members[start:end].tolist())
    return {part: names[np.sort(np.asarray(idx, dtype=int))].tolist() for part, idx in assigned.items()}
