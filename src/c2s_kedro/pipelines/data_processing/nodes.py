"""Nodes of the data_processing pipeline (workflow notes section 0)."""

from __future__ import annotations

import logging
from typing import Any

import anndata as ad
import matplotlib.pyplot as plt

from c2s_kedro.core import plotting
from c2s_kedro.core.preprocessing import QCThresholds, embed_expression, normalize_log10, quality_control
from c2s_kedro.core.validation import check_raw_counts, make_gene_names_unique, require_obs_columns, use_gene_symbols

logger = logging.getLogger(__name__)
SETTINGS_FILE = "conf/base/parameters_data_processing.yml"


def validate_raw_adata(raw_adata: ad.AnnData, params: dict[str, Any]) -> ad.AnnData:
    """Check the raw data and tidy gene names: counts (unless declared normalized), the obs keys
    to plot, gene symbols instead of Ensembl IDs, unique gene names."""
    adata = raw_adata.to_memory() if raw_adata.isbacked else raw_adata.copy()
    require_obs_columns(adata, params.get("umap_color_keys", []), setting=f"data_processing.umap_color_keys in {SETTINGS_FILE}")
    if not params.get("input_is_normalized", False):
        check_raw_counts(adata)
    adata = use_gene_symbols(adata, params.get("gene_symbol_column"))
    return make_gene_names_unique(adata)


def filter_cells_and_genes(adata: ad.AnnData, qc: dict[str, Any]) -> tuple[ad.AnnData, dict[str, int]]:
    """QC filters from parameters; returns the filtered data and cell/gene counts per filter."""
    unknown = set(qc) - set(QCThresholds.__dataclass_fields__)
    if unknown:
        raise ValueError(
            f"unknown QC setting(s) {sorted(unknown)} in data_processing.qc; known: "
            f"{sorted(QCThresholds.__dataclass_fields__)}"
        )
    return quality_control(adata, QCThresholds(**qc))


def normalize_and_embed(adata: ad.AnnData, params: dict[str, Any]) -> ad.AnnData:
    """normalize_total + log10 (raw counts kept in layers['counts']), then PCA -> kNN -> UMAP."""
    if params.get("input_is_normalized", False):
        logger.info("input_is_normalized: .X is used as log-normalized expression as it is")
        normalized = adata
    else:
        normalized = normalize_log10(adata, target_sum=params["normalization"]["target_sum"])
    return embed_expression(normalized, **params["embedding"])


def plot_expression_umaps(processed_adata: ad.AnnData, umap_color_keys: list[str]) -> dict[str, plt.Figure]:
    """One UMAP per configured obs key, in a file named after the key."""
    return {f"{key}.png": plotting.umap_plot(processed_adata, key, title=f"Expression UMAP: {key}") for key in umap_color_keys}


def summarize_processing(qc_counts: dict[str, int], processed_adata: ad.AnnData) -> dict[str, float]:
    """Headline numbers of the run."""
    return {**{k: float(v) for k, v in qc_counts.items()}, "n_pcs": float(processed_adata.obsm["X_pca"].shape[1])}
