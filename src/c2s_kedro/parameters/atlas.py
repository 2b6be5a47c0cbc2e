"""Settings of the atlas pipelines: data_processing, sentence_conversion, data_split, benchmarking.

The screen reuses the first three under the ``perturbation`` namespace (``perturbation.data_processing``
and so on), so these structures are shared by both."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from c2s_kedro.parameters import at_least, between, greater_than


@dataclass(frozen=True)
class QCParameters:
    min_genes_per_cell: int | None = at_least(0)
    max_genes_per_cell: int | None = at_least(1)
    min_cells_per_gene: int | None = at_least(0)
    min_counts_per_cell: float | None = at_least(0)
    max_counts_per_cell: float | None = greater_than(0)
    max_pct_mito: float | None = between(0, 100)
    mito_prefix: str


@dataclass(frozen=True)
class NormalizationParameters:
    target_sum: float | None = greater_than(0)  # null: scanpy's default, each cell scaled to the median library size
    counts_layer: str | None  # layer of processed_adata keeping the raw counts; null: not kept


@dataclass(frozen=True)
class EmbeddingParameters:
    """PCA -> kNN -> UMAP of an expression matrix."""

    n_top_genes: int | None = at_least(1)
    n_comps: int = at_least(1)
    n_neighbors: int = at_least(2)  # a cell's neighbours include itself
    seed: int = at_least(0)


@dataclass(frozen=True)
class DataProcessingParameters:
    counts_source: str  # auto | X | raw | a layer's name
    accept_non_integer_counts: bool  # ambient-corrected counts (non-negative, fractional) are counts
    input_is_normalized: bool
    gene_symbol_column: str | None
    qc: QCParameters
    normalization: NormalizationParameters
    embed: bool  # PCA -> kNN -> UMAP of the processed cells (for the UMAP plots and benchmarking)
    embedding: EmbeddingParameters
    umap_color_keys: list[str]


@dataclass(frozen=True)
class SentenceConversionParameters:
    label_columns: list[str]
    layer: str | None
    seed: int = at_least(0)
    chunk_size: int = at_least(1)


@dataclass(frozen=True)
class DataSplitParameters:
    fractions: dict[str, float] = between(0, 1)
    seed: int = at_least(0)
    stratify_by: str | None


@dataclass(frozen=True)
class RankFitParameters:
    n_cells: int = at_least(2)  # a fit needs two points
    log_rank_cutoff: float = at_least(0)
    seed: int = at_least(0)
    layer: str | None
    fit_on: list[str] | None  # parts of the split whose cells are fitted (null: every cell)


@dataclass(frozen=True)
class BenchmarkingParameters:
    rank_fit: RankFitParameters
    label_key: str | None
    leiden_resolution: float = greater_than(0)
    knn_k: int = at_least(1)
    n_cells: int = at_least(2)  # cells sampled for the reconstruction correlation
    seed: int = at_least(0)
    embedding: EmbeddingParameters


def as_kwargs(settings: Any) -> dict[str, Any]:
    """A flat settings structure as keyword arguments of a core function."""
    return dict(vars(settings))
