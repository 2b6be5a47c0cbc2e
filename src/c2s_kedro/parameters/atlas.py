"""Settings of the atlas pipelines: data_processing, sentence_conversion, data_split, benchmarking.

The screen reuses the first three under the ``perturbation`` namespace (``perturbation.data_processing``
and so on), so these structures are shared by both."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class QCParameters:
    min_genes_per_cell: int | None
    max_genes_per_cell: int | None
    min_cells_per_gene: int | None
    min_counts_per_cell: float | None
    max_counts_per_cell: float | None
    max_pct_mito: float | None
    mito_prefix: str


@dataclass(frozen=True)
class NormalizationParameters:
    target_sum: float | None  # null: scanpy's default, each cell scaled to the median library size
    counts_layer: str | None  # layer of processed_adata keeping the raw counts; null: not kept


@dataclass(frozen=True)
class EmbeddingParameters:
    """PCA -> kNN -> UMAP of an expression matrix."""

    n_top_genes: int | None
    n_comps: int
    n_neighbors: int
    seed: int


@dataclass(frozen=True)
class DataProcessingParameters:
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
    seed: int
    chunk_size: int


@dataclass(frozen=True)
class DataSplitParameters:
    fractions: dict[str, float]
    seed: int
    stratify_by: str | None


@dataclass(frozen=True)
class RankFitParameters:
    n_cells: int
    log_rank_cutoff: float
    seed: int
    layer: str | None
    fit_on: list[str] | None  # parts of the split whose cells are fitted (null: every cell)


@dataclass(frozen=True)
class BenchmarkingParameters:
    rank_fit: RankFitParameters
    label_key: str | None
    leiden_resolution: float
    knn_k: int
    n_cells: int  # cells sampled for the reconstruction correlation
    seed: int
    embedding: EmbeddingParameters


def as_kwargs(settings: Any) -> dict[str, Any]:
    """A flat settings structure as keyword arguments of a core function."""
    return dict(vars(settings))
