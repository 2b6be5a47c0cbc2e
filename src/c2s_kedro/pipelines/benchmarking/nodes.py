"""Nodes of the benchmarking pipeline (workflow notes sections 1.2-1.3). The rank-fit node also
serves the screen, under the ``perturbation`` namespace."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any


# each core module loads when a node first uses it (c2s_kedro/core/__init__.py): every run imports every
# pipeline's nodes (the registry composes each pipeline with its upstream) and pays only for what its nodes use
from c2s_kedro import core
from c2s_kedro.parameters import read_parameters, setting_hint
from c2s_kedro.parameters.atlas import BenchmarkingParameters, RankFitParameters, as_kwargs

if TYPE_CHECKING:
    import anndata as ad
    import matplotlib.pyplot as plt
    from datasets import Dataset


def fit_rank_to_expression(
    processed_adata: ad.AnnData, data_split: dict[str, Any], params: dict[str, Any]
) -> tuple[dict[str, float], plt.Figure]:
    """Fit expression ~ log10(1 + rank) on a sample of cells (of the split parts ``fit_on``, or of
    every cell); return the fit and its plot."""
    settings = read_parameters(RankFitParameters, params, "benchmarking.rank_fit")
    with setting_hint("benchmarking.rank_fit.fit_on"):
        cells = core.sentences.rank_fit.cells_of_parts(processed_adata, data_split, settings.fit_on)
    with setting_hint("benchmarking.rank_fit (n_cells, layer)"):
        fit, log_rank, expression = core.sentences.rank_fit.fit_rank_on_cells(cells, settings.n_cells, settings.seed, settings.log_rank_cutoff, settings.layer)
    figure = core.plotting.rank_expression_plot(log_rank, expression, fit.slope, fit.intercept, fit.log_rank_cutoff, fit.r2)
    return fit.to_dict(), figure


def reconstruct_adata(
    cell_sentences: Dataset, rank_fit: dict[str, float], processed_adata: ad.AnnData, params: dict[str, Any]
) -> ad.AnnData:
    """Expression rebuilt from the sentences with the rank fit, embedded like the original."""
    settings = read_parameters(BenchmarkingParameters, params, "benchmarking")
    table = cell_sentences.select_columns([core.sentences.conversion.CELL_NAME, core.sentences.conversion.CELL_SENTENCE]).with_format("arrow")[:]
    rebuilt = core.sentences.rank_fit.reconstructed_adata(
        table.column(core.sentences.conversion.CELL_NAME).to_pylist(), table.column(core.sentences.conversion.CELL_SENTENCE), processed_adata,
        core.sentences.rank_fit.RankFit.from_dict(rank_fit),
    )
    return core.data.preprocessing.embed_expression(rebuilt, **as_kwargs(settings.embedding))


def compare_reconstruction(
    processed_adata: ad.AnnData, reconstructed_adata: ad.AnnData, params: dict[str, Any]
) -> tuple[dict[str, float], plt.Figure, plt.Figure]:
    """Agreement of original and reconstructed data: expression correlation, Leiden ARI, kNN overlap;
    the ARI with ``label_key`` over the cells that have a label (``n_cells_without_label`` counts the others).

    Returns the metrics, the reconstructed-vs-original scatter and the side-by-side UMAPs.
    """
    settings = read_parameters(BenchmarkingParameters, params, "benchmarking")
    label = settings.label_key
    if label:
        with setting_hint("benchmarking.label_key"):
            core.data.validation.require_obs_columns(processed_adata, [label])
    metrics, values, rebuilt = core.sentences.rank_fit.reconstruction_agreement(
        processed_adata, reconstructed_adata, settings.n_cells, settings.leiden_resolution, settings.knn_k, settings.seed, label,
    )
    if label:
        metrics["n_cells_without_label"] = float((~core.sentences.conversion.has_label(processed_adata.obs[label])).sum())
    metrics.update(core.tasks.evaluation.report_scored_cells(processed_adata.n_obs, "the reconstruction is"))
    scatter = core.plotting.reconstruction_plot(values, rebuilt, metrics["reconstruction_pearson_r"])
    umaps = core.plotting.umap_side_by_side(
        [("original expression", processed_adata.obsm["X_umap"]),
         ("reconstructed from cell sentences", reconstructed_adata[processed_adata.obs_names].obsm["X_umap"])],
        processed_adata.obs[label] if label else None,
        f"UMAP agreement: Leiden ARI {metrics['leiden_ari_original_vs_reconstructed']:.2f}, "
        f"{settings.knn_k}-NN overlap {metrics['knn_overlap_pca']:.2f}",
    )
    return metrics, scatter, umaps


def summarize_benchmark(rank_fit: dict[str, float], comparison: dict[str, float]) -> dict[str, float]:
    """The rank fit and the reconstruction agreement in one flat dict."""
    return {**{f"rank_fit_{k}": float(v) for k, v in rank_fit.items()}, **comparison}
