"""C2S cell embeddings as an AnnData beside the expression PCA/UMAP of the same cells."""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np

from c2s_kedro.core.errors import C2SValueError
from c2s_kedro.core.data.preprocessing import neighbors_umap


def embedding_adata(
    source: ad.AnnData,
    cell_names: Sequence[str],
    embeddings: np.ndarray,
    genes_in_prompt: Sequence[int],
    n_neighbors: int = 15,
    seed: int = 0,
) -> ad.AnnData:
    """The cells ``cell_names`` of ``source`` with their embeddings in ``obsm['X_c2s']``, a kNN
    graph and UMAP on it (no PCA: ``obsm['X_umap_c2s']``, graph under the ``c2s`` neighbors key),
    the expression PCA/UMAP of ``source`` kept as ``X_pca_expression``/``X_umap_expression``, and
    ``obs['genes_in_prompt']``."""
    names = list(cell_names)
    if len(names) != len(embeddings) or len(names) != len(genes_in_prompt):
        raise C2SValueError(
            f"{len(names)} cell names, {len(embeddings)} embeddings and {len(genes_in_prompt)} gene counts: "
            "one of each per cell is needed"
        )
    missing = [n for n in names if n not in source.obs_names]
    if missing:
        raise C2SValueError(
            f"{len(missing)} embedded cells are not in the expression data (e.g. {missing[:3]}); the cell sentences "
            "were built from other cells: re-run sentence_conversion on the current processed_adata"
        )
    cells = source[names]
    adata = ad.AnnData(obs=cells.obs.copy(), obsm={"X_c2s": np.asarray(embeddings, dtype=np.float32)})
    for key in ("X_pca", "X_umap"):
        if key in cells.obsm:
            adata.obsm[f"{key}_expression"] = np.asarray(cells.obsm[key])
    adata.obs["genes_in_prompt"] = list(genes_in_prompt)
    neighbors_umap(adata, "X_c2s", n_neighbors=n_neighbors, seed=seed, key_added="c2s")
    return adata
