"""Seeded train/val/test splits: the one splitter of the project (the atlas's cells, the screen's
perturbations, controls and cells all go through ``split_names``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def _check_fractions(fractions: Mapping[str, float]) -> np.ndarray:
    shares = np.array([fractions[part] for part in fractions], dtype=float)
    if not len(shares) or (shares < 0).any() or not np.isclose(shares.sum(), 1.0):
        raise ValueError(f"split fractions must be non-negative and sum to 1; got {dict(fractions)}")
    return shares


def part_sizes(n: int, shares: np.ndarray) -> np.ndarray:
    """How many of ``n`` members each part gets: cumulative rounding (the parts' bounds are
    ``round(cumsum(shares) * n)``, so the sizes always add up to ``n``). When there are at least 3
    members, a part with a positive share that rounding leaves empty takes one member from the
    largest part (the first of the largest on a tie)."""
    bounds = np.round(np.cumsum(shares) * n).astype(int)
    sizes = np.diff(np.concatenate([[0], bounds]))
    if n >= 3:
        for part in np.flatnonzero((shares > 0) & (sizes == 0)):
            donor = int(np.argmax(sizes))
            if sizes[donor] <= 1:
                break
            sizes[donor] -= 1
            sizes[part] += 1
    return sizes


def split_names(
    names: Sequence[str],
    fractions: Mapping[str, float],
    rng: np.random.Generator | int = 0,
    stratify: Sequence[str] | None = None,
) -> dict[str, list[str]]:
    """Split ``names`` into the parts of ``fractions`` (e.g. ``{"train": 0.8, "val": 0.1,
    "test": 0.1}``; non-negative, summing to 1), seeded.

    Each group (every name, or with ``stratify``, one label per name, the names of each label in
    sorted label order) is permuted with ``rng`` (a Generator, shared by successive calls, or a
    seed) and cut into consecutive pieces in the order of ``fractions`` with ``part_sizes``. Each
    part lists its names in their order in ``names``.
    """
    labels_given = stratify is not None
    names = np.asarray(names, dtype=str)
    shares = _check_fractions(fractions)
    if labels_given and len(stratify) != len(names):
        raise ValueError(f"{len(stratify)} labels to stratify by for {len(names)} names")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    if labels_given:
        labels = np.asarray(stratify, dtype=str)
        groups = [np.flatnonzero(labels == label) for label in sorted(set(labels.tolist()))]
    else:
        groups = [np.arange(len(names))]
    assigned: dict[str, list[np.ndarray]] = {part: [] for part in fractions}
    for members in groups:
        members = rng.permutation(members)
        bounds = np.cumsum(part_sizes(len(members), shares))
        for part, start, end in zip(fractions, np.concatenate([[0], bounds[:-1]]), bounds):
            assigned[part].append(members[start:end])
    return {part: names[np.sort(np.concatenate([np.zeros(0, dtype=int), *pieces]))].tolist() for part, pieces in assigned.items()}
