"""Figures draw what they are given: counts in the confusion cells, one legend entry per category,
one panel per perturbation; plotting leaves the data as it was."""

from __future__ import annotations

import anndata as ad
import matplotlib.colors as mcolors
import numpy as np
import pandas as pd
import pytest

from c2s_kedro.core import plotting

LABELS = ["B cell", "NK", "T cell"]


def test_confusion_cells_show_the_counts_and_are_shaded_by_the_true_class_share():
    matrix = np.array([[8, 2, 0], [0, 1, 0], [5, 0, 45]])
    fig = plotting.confusion_matrix_plot(matrix, LABELS, "method: accuracy 0.90")
    ax = fig.axes[0]
    shown = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts if t.get_visible()}
    assert shown == {(i, j): str(count) for (i, j), count in np.ndenumerate(matrix) if count}
    image = ax.images[0]
    np.testing.assert_allclose(image.get_array(), matrix / matrix.sum(axis=1, keepdims=True))
    assert image.get_clim() == (0, 1)
    # the one NK cell is its whole row: shaded darker than the 45 of 50 T cells, though fewer
    assert image.norm(image.get_array()[1, 1]) == 1.0 > image.norm(image.get_array()[2, 2])
    assert {t.get_text(): t.get_color() for t in ax.texts if t.get_visible()}["2"] == "black"  # light cell, dark text
    assert [t.get_text() for t in ax.get_xticklabels()] == LABELS == [t.get_text() for t in ax.get_yticklabels()]
    assert ax.get_xlabel() == "predicted" and ax.get_ylabel() == "true" and ax.get_title() == "method: accuracy 0.90"
    with pytest.raises(ValueError, match="for 2 labels"):
        plotting.confusion_matrix_plot(matrix, LABELS[:2], "x")


def test_a_confusion_matrix_without_one_valid_answer_says_so_instead_of_an_empty_grid():
    fig = plotting.confusion_matrix_plot(np.zeros((3, 3), dtype=int), LABELS, "generation: accuracy 0.00")
    notes = [t.get_text() for t in fig.axes[0].texts if t.get_visible() and "No prediction" in t.get_text()]
    assert notes == ["No prediction is one of the labels:\nevery answer was something else,\nso every cell counts as wrong."]
    fig = plotting.confusion_matrix_plot(np.eye(3, dtype=int), LABELS, "x")
    assert not [t for t in fig.axes[0].texts if "No prediction" in t.get_text()]


def _embedded(n: int = 60) -> ad.AnnData:
    rng = np.random.default_rng(0)
    cell_type = pd.Categorical(rng.choice(LABELS, n))
    adata = ad.AnnData(np.zeros((n, 2), dtype=np.float32), obs=pd.DataFrame({"cell_type": cell_type}, index=[f"c{i}" for i in range(n)]))
    adata.obsm["X_umap"] = rng.normal(size=(n, 2))
    return adata


def test_a_umap_plot_has_one_legend_entry_per_category_and_leaves_the_data_alone():
    adata = _embedded()
    fig = plotting.umap_plot(adata, "cell_type", title="Expression UMAP: cell_type")
    ax = fig.axes[0]
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == LABELS
    assert ax.get_title() == "Expression UMAP: cell_type" and ax.get_xlabel() == "UMAP1"
    points = np.concatenate([c.get_offsets() for c in ax.collections])
    assert sorted(map(tuple, points)) == sorted(map(tuple, adata.obsm["X_umap"]))
    assert "cell_type_colors" not in adata.uns  # scanpy's colours went to a copy
    with pytest.raises(KeyError, match="obs column 'tissue' not found"):
        plotting.umap_plot(adata, "tissue")
    with pytest.raises(KeyError, match="no 'X_tsne' coordinates"):
        plotting.umap_plot(adata, "cell_type", basis="X_tsne")


def test_a_umap_plot_keeps_the_colours_the_data_carries():
    adata = _embedded()
    adata.uns["cell_type_colors"] = ["#000000", "#ff0000", "#00ff00"]
    ax = plotting.umap_plot(adata, "cell_type").axes[0]
    handles = ax.get_legend().legend_handles
    assert [mcolors.to_hex(handle.get_facecolor()[0]) for handle in handles] == adata.uns["cell_type_colors"]


def _posterior_embedding() -> ad.AnnData:
    rng = np.random.default_rng(0)
    rows = [(p, t, True) for p in ("G3", "G5", "G7", "G9") for t in (0.7, 1.3) for _ in range(5)]
    rows += [(p, np.nan, False) for p in ("G3", "G5", "G7", "G9") for _ in range(4)]
    rows += [("non-targeting", np.nan, False)] * 6
    obs = pd.DataFrame(rows, columns=["perturbation", "temperature", "is_sample"])
    obs.index = [f"cell-{i}" for i in range(len(obs))]
    embedding = ad.AnnData(np.zeros((len(obs), 3), dtype=np.float32), obs=obs)
    embedding.obsm["X_pca"] = rng.normal(size=(len(obs), 5))
    embedding.obsm["X_umap"] = rng.normal(size=(len(obs), 2))
    return embedding


def test_posterior_plots_have_one_panel_per_perturbation_with_its_samples_controls_and_cells():
    embedding = _posterior_embedding()
    pca, umap = plotting.posterior_embedding_plots(embedding, "non-targeting")
    for fig, basis, axis in ((pca, "X_pca", "PC1"), (umap, "X_umap", "UMAP1")):
        panels = [ax for ax in fig.axes if ax.get_visible()]
        assert [ax.get_title() for ax in panels] == ["G3", "G5", "G7", "G9"]
        assert len(fig.axes) == 6  # a 2 x 3 grid, the two empty axes hidden
        g5 = panels[1]
        assert [t.get_text() for t in g5.get_legend().get_texts()] == ["real control", "samples T=0.7", "samples T=1.3", "real G5"]
        assert g5.get_xlabel() == axis
        coords = embedding.obsm[basis][:, :2]
        obs = embedding.obs
        expected = [
            obs["perturbation"].eq("non-targeting") & ~obs["is_sample"],
            obs["perturbation"].eq("G5") & obs["temperature"].eq(0.7),
            obs["perturbation"].eq("G5") & obs["temperature"].eq(1.3),
            obs["perturbation"].eq("G5") & ~obs["is_sample"],
        ]
        for collection, mask in zip(g5.collections, expected):
            np.testing.assert_allclose(collection.get_offsets(), coords[mask.to_numpy()])
    assert embedding.obsm["X_umap"].shape == (len(embedding), 2)  # nothing was computed or added
    assert set(embedding.obsm) == {"X_pca", "X_umap"} and not embedding.uns


def test_a_figure_that_only_says_why_there_is_no_plot_keeps_its_text_inside_the_image():
    message = ("No expression UMAP: data_processing.embed is false, so the 260,000 cells were not embedded. Set "
               "data_processing.embed to true to draw it (a screen's: perturbation.data_processing.embed).")
    fig = plotting.message_figure(message)
    fig.canvas.draw()
    text = fig.axes[0].texts[0]
    box, frame = text.get_window_extent(), fig.bbox
    assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
    assert " ".join(text.get_text().split()) == message  # wrapped, nothing lost
