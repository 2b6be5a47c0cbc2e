"""Metrics that compare representations of the same cells."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import adjusted_rand_score
from sklearn.neighbors import NearestNeighbors


def knn_overlap(a: np.ndarray, b: np.ndarray, k: int = 15) -> float:
    """Mean share of each cell's k nearest neighbours in ``a`` that are also among its k in ``b``."""
    k = min(k, len(a) - 1)
    if k < 1:
        raise ValueError("kNN overlap needs at least two cells")
    neighbours_a = NearestNeighbors(n_neighbors=k + 1).fit(a).kneighbors(a, return_distance=False)[:, 1:]
    neighbours_b = NearestNeighbors(n_neighbors=k + 1).fit(b).kneighbors(b, return_distance=False)[:, 1:]
    shared = (neighbours_a[:, :, None] == neighbours_b[:, None, :]).any(axis=2).sum(axis=1)
    return float(shared.mean() / k)


def cluster_agreement(labels_a, labels_b) -> float:
    """Adjusted Rand index between two clusterings of the same cells."""
    return float(adjusted_rand_score(np.asarray(labels_a), np.asarray(labels_b)))


def embedding_quality(
    embedding: np.ndarray, labels: np.ndarray, batches: np.ndarray | None = None, k: int = 15, seed: int = 0
) -> dict[str, float]:
    """How well an embedding separates labels (and mixes batches).

    ``silhouette_label``: mean silhouette of cells by label (higher: labels separate better).
    ``knn_label_accuracy``: share of cells whose label is the majority among their k nearest
    neighbours, in 5-fold cross-validation (kNN classifier). ``silhouette_batch``: silhouette by
    batch (lower: batches better mixed), when batches are given and there are at least two.
    """
    from sklearn.metrics import silhouette_score
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    scores: dict[str, float] = {}
    if len(set(labels)) > 1:
        scores["silhouette_label"] = float(silhouette_score(embedding, labels))
        smallest = min(np.unique(labels, return_counts=True)[1])
        folds = max(2, min(5, smallest))
        classifier = KNeighborsClassifier(n_neighbors=min(k, len(labels) - 1))
        scores["knn_label_accuracy"] = float(
            cross_val_score(classifier, embedding, labels, cv=StratifiedKFold(folds, shuffle=True, random_state=seed)
                            if smallest >= 2 else 2).mean()
        )
    if batches is not None and len(set(batches)) > 1:
        scores["silhouette_batch"] = float(silhouette_score(embedding, batches))
    return scores
