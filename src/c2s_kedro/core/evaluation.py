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
