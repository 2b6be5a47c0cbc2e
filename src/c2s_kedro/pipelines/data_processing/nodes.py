"""Nodes of the data_processing pipeline (workflow notes section 0). The screen runs the same
nodes under the ``perturbation`` namespace."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any


# each core module loads when a node first uses it (c2s_kedro/core/__init__.py): every run imports every
# pipeline's nodes (the registry composes each pipeline with its upstream) and pays only for what its nodes use
from c2s_kedro import core
from c2s_kedro.parameters import qualified, read_parameters, setting_hint, settings_file_hint
from c2s_kedro.parameters.atlas import DataProcessingParameters, QCParameters, as_kwargs

if TYPE_CHECKING:
    import anndata as ad
    import matplotlib.pyplot as plt

logger = logging.getLogger(__name__)

SECTION = "data_processing"


def validate_raw_adata(raw_adata: ad.AnnData, params: dict[str, Any]) -> ad.AnnData:
    """The door of the data (``core.data.validation.validate_input``): the obs keys to plot, where the
    counts are, declarations the data contradict, gene names as sentence words (symbols, one word,
    unique), unique cell names. What it did is counted in ``.uns['input_checks']``."""
    settings = read_parameters(DataProcessingParameters, params, SECTION)
    with setting_hint(f"{SECTION}.umap_color_keys"):
        core.data.validation.require_obs_columns(raw_adata, settings.umap_color_keys)
    with (
        setting_hint(f"{SECTION}.input_is_normalized to true if .X already holds log-normalized values,", core.data.validation.NotCountsError),
        setting_hint(f"{SECTION}.gene_symbol_column", KeyError),
        settings_file_hint(SECTION, core.data.validation.InputError),
    ):
        adata, _ = core.data.validation.validate_input(
            raw_adata, counts_source=settings.counts_source, accept_non_integer_counts=settings.accept_non_integer_counts,
            input_is_normalized=settings.input_is_normalized, gene_symbol_column=settings.gene_symbol_column,
            setting_prefix=qualified(SECTION),
        )
    return adata


def filter_cells_and_genes(adata: ad.AnnData, qc: dict[str, Any]) -> tuple[ad.AnnData, dict[str, int]]:
    """QC filters from parameters; returns the filtered data and cell/gene counts per filter."""
    thresholds = read_parameters(QCParameters, qc, f"{SECTION}.qc")
    with setting_hint(f"{SECTION}.qc", ValueError):
        return core.data.preprocessing.quality_control(adata, core.data.preprocessing.QCThresholds(**as_kwargs(thresholds)))


def normalize_counts(adata: ad.AnnData, params: dict[str, Any]) -> ad.AnnData:
    """normalize_total (median library size by default) + log10, raw counts kept in the layer
    ``normalization.counts_layer`` (null: not kept);
    data declared normalized is used as it is."""
    settings = read_parameters(DataProcessingParameters, params, SECTION)
    if settings.input_is_normalized:
        return adata
    return core.data.preprocessing.normalize_log10(adata, target_sum=settings.normalization.target_sum,
                                                   counts_layer=settings.normalization.counts_layer)


def embed_normalized_cells(normalized_adata: ad.AnnData, params: dict[str, Any]) -> ad.AnnData:
    """PCA -> kNN -> UMAP of the normalized expression; the cells as they are when ``embed`` is false."""
    settings = read_parameters(DataProcessingParameters, params, SECTION)
    if not settings.embed:
        logger.info("%s.embed is false: no PCA, kNN graph or UMAP of the %d cells", SECTION, normalized_adata.n_obs)
        return normalized_adata
    return core.data.preprocessing.embed_expression(normalized_adata, **as_kwargs(settings.embedding))

NOT_EMBEDDED = "not_embedded.png"  # the one figure when the cells were not embedded


def plot_expression_umaps(processed_adata: ad.AnnData, umap_color_keys: list[str]) -> dict[str, plt.Figure]:
    """One UMAP per configured obs key, in a file named after the key; without a UMAP (``embed``
    false) one figure that says so."""
    if "X_umap" not in processed_adata.obsm:
        fig = core.plotting.message_figure(
            f"No expression UMAP: {SECTION}.embed is false, so the {processed_adata.n_obs:,} cells were not embedded. "
            f"Set {SECTION}.embed to true to draw it (a screen's: perturbation.{SECTION}.embed).")
        return {NOT_EMBEDDED: fig}
    return {f"{key}.png": core.plotting.umap_plot(processed_adata, key, title=f"Expression UMAP: {key}") for key in umap_color_keys}


def summarize_processing(qc_counts: dict[str, int], processed_adata: ad.AnnData) -> dict[str, float]:
    """Headline numbers of the run: what the input checks handled (gene and cell names made usable,
    genes only in .raw, non-integer counts), the QC counts and ``n_pcs`` (0 when the cells were not
    embedded)."""
    n_pcs = processed_adata.obsm["X_pca"].shape[1] if "X_pca" in processed_adata.obsm else 0
    return {**core.data.validation.input_check_metrics(processed_adata), **{k: float(v) for k, v in qc_counts.items()},
            "n_pcs": float(n_pcs)}
