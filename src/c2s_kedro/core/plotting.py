"""Figures. Plotting reads data and returns a matplotlib Figure; it never changes the data."""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import matplotlib

from c2s_kedro.core.errors import C2SKeyError, C2SValueError

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

EVALUATION_NAMES = {"heldout": "held-out"}  # an evaluation's key as a panel title writes it


def _scatter_by(
    ax, coords: np.ndarray, labels: pd.Series | None, title: str, point_size: float, categories: list[str] | None = None
) -> None:
    if labels is None:
        ax.scatter(coords[:, 0], coords[:, 1], s=point_size, c="tab:blue", linewidths=0)
    else:
        labels = pd.Series(np.asarray(labels).astype(str))
        categories = categories or sorted(labels.unique())
        cmap = plt.get_cmap("tab20" if len(categories) > 10 else "tab10")
        for i, category in enumerate(categories):
            mask = (labels == category).to_numpy()
            if not mask.any():
                continue
            ax.scatter(
                coords[mask, 0], coords[mask, 1], s=point_size, color=cmap(i % cmap.N),
                label=category, linewidths=0,
            )
        if len(categories) <= 30:
            ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, markerscale=3, frameon=False)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])


def _point_size(n: int) -> float:
    return float(np.clip(12000 / max(n, 1), 0.5, 20))


def umap_plot(adata: ad.AnnData, color: str, basis: str = "X_umap", title: str | None = None) -> plt.Figure:
    """One UMAP coloured by an ``.obs`` column, drawn by scanpy's ``sc.pl.embedding`` (legend in
    the right margin, one entry per category)."""
    import scanpy as sc

    if basis not in adata.obsm:
        raise C2SKeyError(f"no '{basis}' coordinates in .obsm (it has {', '.join(adata.obsm) or 'none'})")
    if color not in adata.obs.columns:
        raise C2SKeyError(f"obs column '{color}' not found; available: {', '.join(map(str, adata.obs.columns))}")
    # scanpy writes a categorical's colours to .uns: draw a copy of the column and coordinates only
    uns = {f"{color}_colors": adata.uns[f"{color}_colors"]} if f"{color}_colors" in adata.uns else {}
    view = ad.AnnData(obs=adata.obs[[color]].copy(), obsm={basis: np.asarray(adata.obsm[basis])[:, :2]}, uns=uns)
    # a constrained layout keeps the legend in the right margin inside the saved image
    fig, ax = plt.subplots(figsize=(7.5, 5), constrained_layout=True)
    sc.pl.embedding(view, basis=basis, color=color, title=title or f"UMAP: {color}", size=_point_size(adata.n_obs) * 4,
                    legend_fontsize=8, frameon=True, ax=ax, show=False)
    ax.set_xlabel("UMAP1")
    ax.set_ylabel("UMAP2")
    return fig


def umap_side_by_side(
    panels: Sequence[tuple[str, np.ndarray]], labels: pd.Series | Sequence[pd.Series] | None, suptitle: str
) -> plt.Figure:
    """Several embeddings side by side, coloured by the same labels (one series for all panels when
    they show the same cells, or one per panel); a category keeps its colour across panels."""
    per_panel = list(labels) if isinstance(labels, list | tuple) else [labels] * len(panels)
    categories = sorted({str(v) for series in per_panel if series is not None for v in series})
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels) + 2, 5), constrained_layout=True)
    axes = np.atleast_1d(axes)
    for i, (ax, (title, coords), series) in enumerate(zip(axes, panels, per_panel)):
        _scatter_by(ax, coords, series, title, _point_size(len(coords)), categories)
        if i < len(panels) - 1 and ax.get_legend() is not None:
            ax.get_legend().remove()
    fig.suptitle(suptitle)
    return fig


def mean_expression_heatmap(
    real_means: np.ndarray, generated_means: np.ndarray, types: Sequence[str], genes: Sequence[str], n_genes: int = 40
) -> plt.Figure:
    """Mean expression per cell type of real and generated cells, on the genes that vary most
    between the real types."""
    chosen = np.argsort(-real_means.var(axis=0))[:n_genes]
    top = float(max(real_means[:, chosen].max(), generated_means[:, chosen].max(), 1e-9))
    fig, axes = plt.subplots(1, 2, figsize=(0.22 * len(chosen) * 2 + 4, 0.4 * len(types) + 2.5), constrained_layout=True)
    for ax, means, title in zip(axes, (real_means, generated_means), ("real", "generated")):
        image = ax.imshow(means[:, chosen], aspect="auto", cmap="viridis", vmin=0, vmax=top)
        ax.set_xticks(range(len(chosen)), [genes[g] for g in chosen], rotation=90, fontsize=6)
        ax.set_yticks(range(len(types)), types, fontsize=7)
        ax.set_title(f"{title} cells: mean expression per type")
    fig.colorbar(image, ax=axes, shrink=0.8, label="mean log10 expression")
    return fig


def rank_expression_plot(
    log_rank: np.ndarray, expression: np.ndarray, slope: float, intercept: float, cutoff: float, r2: float
) -> plt.Figure:
    """Normalized expression against log10(1 + rank), with the fitted line and the fit cut-off."""
    fig, ax = plt.subplots(figsize=(7, 5), constrained_layout=True)
    inside = log_rank < cutoff
    ax.scatter(log_rank[inside], expression[inside], s=2, alpha=0.15, linewidths=0, label="fitted points")
    ax.scatter(log_rank[~inside], expression[~inside], s=2, alpha=0.15, linewidths=0, color="grey", label="beyond cut-off")
    xs = np.linspace(0, max(float(log_rank.max()), cutoff), 100)
    ax.plot(xs, intercept + slope * xs, color="crimson", lw=2, label=f"fit: {intercept:.3f} {slope:+.3f}·x (R²={r2:.3f})")
    ax.axvline(cutoff, color="black", ls=":", lw=1)
    ax.set_xlabel("log10(1 + rank)")
    ax.set_ylabel("normalized expression (log10)")
    ax.set_title("Expression vs rank in the cell sentence")
    ax.legend(markerscale=5, fontsize=8)
    return fig


def reconstruction_plot(original: np.ndarray, reconstructed: np.ndarray, pearson_r: float) -> plt.Figure:
    """Reconstructed against original expression, one point per expressed (cell, gene)."""
    fig, ax = plt.subplots(figsize=(6, 6), constrained_layout=True)
    ax.scatter(original, reconstructed, s=2, alpha=0.15, linewidths=0)
    top = float(max(original.max(initial=0), reconstructed.max(initial=0)))
    ax.plot([0, top], [0, top], color="black", ls=":", lw=1, label="y = x")
    ax.set_xlabel("original expression (log10)")
    ax.set_ylabel("reconstructed from rank")
    ax.set_title(f"Reconstruction from cell sentences (Pearson r = {pearson_r:.3f})")
    ax.legend(fontsize=8)
    return fig


def loss_curve_plot(log_history: list[dict], title: str) -> plt.Figure:
    """Train and eval loss per step from a Hugging Face Trainer log history, with each task's
    training loss where the training set mixed tasks."""
    from c2s_kedro.core.models.training import loss_history

    history = loss_history(log_history)
    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    tasks = sorted(key.removeprefix("train_loss_") for key in history if key.startswith("train_loss_"))
    ax.plot(history["train_step"], history["train_loss"], label="train loss (all tasks)" if tasks else "train loss",
            lw=1.5, alpha=0.35 if tasks else 1.0)
    for task in tasks:  # mixed tasks: the overall loss alternates between them, each task's curve is smooth
        ax.plot(history[f"train_step_{task}"], history[f"train_loss_{task}"], lw=1.2, label=f"train loss: {task}")
    if history["eval_loss"]:
        ax.plot(history["eval_step"], history["eval_loss"], "o-", label="eval loss", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title(title)
    ax.legend()
    return fig


def message_figure(message: str, width_inches: float = 7.5) -> plt.Figure:
    """A figure that only says why there is no plot (wrapped to fit its width), where a pipeline
    writes a plot file that it could not draw."""
    import textwrap

    lines = [line for paragraph in message.split("\n") for line in textwrap.wrap(paragraph, width=int(width_inches * 11)) or [""]]
    fig, ax = plt.subplots(figsize=(width_inches, 0.6 + 0.25 * len(lines)))
    ax.axis("off")
    ax.text(0.5, 0.5, "\n".join(lines), ha="center", va="center", fontsize=10)
    return fig


def confusion_matrix_plot(matrix: np.ndarray, labels: Sequence[str], title: str) -> plt.Figure:
    """Confusion matrix (scikit-learn's ``ConfusionMatrixDisplay``), rows true labels, columns
    predictions: each non-zero cell shows its count and is shaded by its share of the true class
    (so a rare class reads as clearly as a common one)."""
    from sklearn.metrics import ConfusionMatrixDisplay

    matrix = np.asarray(matrix)
    if matrix.shape != (len(labels), len(labels)):
        raise C2SValueError(f"a {matrix.shape} confusion matrix for {len(labels)} labels")
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = 2.5 + 0.55 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 1.5, size), constrained_layout=True)
    display = ConfusionMatrixDisplay(matrix, display_labels=list(labels))
    display.plot(ax=ax, cmap="Blues", colorbar=False, xticks_rotation=60,
                 values_format="d" if np.issubdtype(matrix.dtype, np.integer) else ".3g", text_kw={"fontsize": 7})
    display.im_.set_data(shares)
    display.im_.set_clim(0, 1)
    for (i, j), text in np.ndenumerate(display.text_):
        text.set_visible(bool(matrix[i, j]))
        text.set_color("white" if shares[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(labels)), list(labels), rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(labels)), list(labels), fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(display.im_, ax=ax, shrink=0.7, label="share of the true class")
    if not matrix.any():  # every answer was something else than a label: an empty grid would read as a bug
        ax.text(0.5, 0.5, "No prediction is one of the labels:\nevery answer was something else,\nso every cell counts as wrong.",
                transform=ax.transAxes, ha="center", va="center", fontsize=10, wrap=True,
                bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "0.6"})
    return fig


def posterior_embedding_plots(embedding: ad.AnnData, control_label: str) -> tuple[plt.Figure, plt.Figure]:
    """PCA and UMAP figures of ``perturbation_evaluation.posterior_embedding``'s cells, one panel
    per perturbation with samples: real control cells in grey, the samples coloured by
    temperature, the real perturbed cells as black crosses. Drawn by hand: scanpy's embedding
    plots colour by one column, not overlaid groups."""
    perturbation = embedding.obs["perturbation"].astype(str).to_numpy()
    temperature = embedding.obs["temperature"].to_numpy(dtype=float)
    is_sample = embedding.obs["is_sample"].to_numpy(dtype=bool)
    names = sorted(set(perturbation[is_sample]))
    temperatures = sorted(np.unique(temperature[is_sample]))
    # cold to hot, none of them grey (the real control cells are grey)
    colours = plt.get_cmap("plasma")(np.linspace(0.0, 0.8, max(len(temperatures), 1)))
    control = ~is_sample & (perturbation == control_label)
    figures = []
    for basis, label in (("X_pca", "PC"), ("X_umap", "UMAP")):
        coords = np.asarray(embedding.obsm[basis])[:, :2]
        columns = min(3, len(names))
        rows = int(np.ceil(len(names) / columns))
        fig, axes = plt.subplots(rows, columns, figsize=(5 * columns + 1.5, 4.2 * rows), squeeze=False, constrained_layout=True)
        for ax, name in zip(axes.ravel(), names):
            ax.scatter(coords[control, 0], coords[control, 1], s=6, color="lightgrey", label="real control", linewidths=0)
            for colour, t in zip(colours, temperatures):
                mask = is_sample & (perturbation == name) & (temperature == t)
                ax.scatter(coords[mask, 0], coords[mask, 1], s=6, color=colour, alpha=0.7, label=f"samples T={t:g}", linewidths=0)
            real_cells = ~is_sample & (perturbation == name)
            ax.scatter(coords[real_cells, 0], coords[real_cells, 1], s=12, color="black", marker="x", label=f"real {name}", linewidths=0.8)
            ax.set_title(name)
            ax.set_xlabel(f"{label}1")
            ax.set_ylabel(f"{label}2")
            ax.legend(fontsize=7, markerscale=2, frameon=False)
        for ax in axes.ravel()[len(names):]:
            ax.set_visible(False)
        fig.suptitle(f"Posterior samples by temperature ({'PCA' if label == 'PC' else 'UMAP'} of samples and real cells)")
        figures.append(fig)
    return figures[0], figures[1]


def target_presence_plot(table: pd.DataFrame, series: dict[str, str], title: str) -> plt.Figure:
    """On-target knockdown per perturbation: one bar per ``series`` (column of ``table`` -> its
    legend label; shares in [0, 1]) for each row of ``table`` (indexed by perturbation), one panel
    per value of its ``evaluation`` column when it has one."""
    groups = list(table.groupby("evaluation", sort=False)) if "evaluation" in table.columns else [("", table)]
    widths = [max(3.0, 0.45 * len(rows) * len(series) / 3) for _, rows in groups]
    fig, axes = plt.subplots(1, len(groups), figsize=(sum(widths) + 2.5, 3.8), squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    colors = plt.get_cmap("tab10")
    bar = 0.8 / len(series)
    for ax, (evaluation, rows) in zip(axes[0], groups):
        x = np.arange(len(rows))
        for i, (column, label) in enumerate(series.items()):
            ax.bar(x + (i - (len(series) - 1) / 2) * bar, rows[column].to_numpy(dtype=float), width=bar, label=label,
                   color=colors(i))
        ax.set_xticks(x)
        ax.set_xticklabels([str(name) for name in rows.index], rotation=90, fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_title(f"{EVALUATION_NAMES.get(evaluation, evaluation)} perturbations" if evaluation else title, fontsize=9)
    axes[0][0].set_ylabel("share of cells / samples holding the target")
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
