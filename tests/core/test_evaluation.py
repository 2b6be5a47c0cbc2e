import numpy as np
import pytest

from c2s_kedro.core.evaluation import cluster_agreement, knn_overlap


@pytest.fixture
def points():
    return np.random.default_rng(0).normal(size=(200, 5))


def test_knn_overlap_is_one_for_identical_and_rescaled_embeddings(points):
    assert knn_overlap(points, points, k=10) == pytest.approx(1.0)
    assert knn_overlap(points, 3.0 * points + 7.0, k=10) == pytest.approx(1.0)


def test_knn_overlap_is_low_for_shuffled_cells(points):
    shuffled = points[np.random.default_rng(1).permutation(len(points))]
    # By chance a neighbour is shared with probability about k / n = 0.05.
    assert knn_overlap(points, shuffled, k=10) < 0.15


def test_knn_overlap_counts_shared_neighbours():
    # Points on a line with distinct gaps (no ties); moving the last point next to the first
    # changes the nearest neighbour of points 0 and 4 only.
    a = np.array([[0.0], [1.0], [3.0], [6.0], [20.0]])
    b = np.array([[0.0], [1.0], [3.0], [6.0], [-0.4]])
    # a: 0->1, 1->0, 2->1, 3->2, 4->3.  b: 0->4, 1->0, 2->1, 3->2, 4->0.  Shared: 1, 2, 3.
    assert knn_overlap(a, b, k=1) == pytest.approx(3 / 5)


def test_knn_overlap_caps_k_and_needs_two_cells():
    two = np.array([[0.0], [1.0]])
    assert knn_overlap(two, two, k=15) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="two cells"):
        knn_overlap(two[:1], two[:1])


def test_cluster_agreement():
    labels = np.array(["a", "a", "b", "b", "c", "c"])
    assert cluster_agreement(labels, labels) == pytest.approx(1.0)
    # Renaming clusters does not matter.
    assert cluster_agreement(labels, [2, 2, 0, 0, 1, 1]) == pytest.approx(1.0)
    # One cluster for everything agrees no better than chance.
    assert cluster_agreement(labels, ["x"] * 6) == pytest.approx(0.0)
    rng = np.random.default_rng(0)
    random_a, random_b = rng.integers(0, 5, 2000), rng.integers(0, 5, 2000)
    assert abs(cluster_agreement(random_a, random_b)) < 0.02
