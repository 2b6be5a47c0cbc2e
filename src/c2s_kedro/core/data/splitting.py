"""Seeded train/val/test splits: the one splitter of the project (the atlas's cells, the screen's
perturbations, controls and cells all go through ``split_names``)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from c2s_kedro.core.errors import C2SValueError

logger = logging.getLogger(__name__)

# Fewer test (or scored) cells than this give scores that one or two cells swing by 5 points or more:
# a split or a score on fewer says so (a warning and a metrics field)
MIN_SCORED_CELLS = 20
# A part whose size misses its fraction by more than this share of its expected size (and by more than
# one member) does not honour the fraction asked for
SPLIT_TOLERANCE = 0.2


def _check_fractions(fractions: Mapping[str, float]) -> np.ndarray:
    shares = np.array([fractions[part] for part in fractions], dtype=float)
    if not len(shares) or (shares < 0).any() or not np.isclose(shares.sum(), 1.0):
        raise C2SValueError(f"split fractions must be non-negative and sum to 1; got {dict(fractions)}")
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


def require_unique_names(names: Sequence[str], where: str) -> None:
    """Refuse names that occur more than once: a split or a selection by name would take every row of
    a repeated name (two samples' cells under one 10x barcode), so one cell could be trained on and
    scored. ``where`` names what holds them, for the message."""
    index = np.asarray(names, dtype=str)
    values, counts = np.unique(index, return_counts=True)
    repeated = values[counts > 1]
    if repeated.size:
        raise C2SValueError(
            f"{repeated.size} cell names occur more than once in {where} (e.g. {', '.join(repeated[:3].tolist())}): a "
            "repeated name could put one name in two parts of the split, or select two cells for one. Make the names "
            "unique first: data_processing does (anndata's obs_names_make_unique, 'AAAC-1' -> 'AAAC-1-1'); re-run "
            "data_processing and sentence_conversion, or call adata.obs_names_make_unique() on your h5ad"
        )


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
    part lists its names in their order in ``names``. Names must be unique (``require_unique_names``):
    a repeated name would be in two parts.
    """
    labels_given = stratify is not None
    names = np.asarray(names, dtype=str)
    require_unique_names(names, "the names to split")
    shares = _check_fractions(fractions)
    if labels_given and len(stratify) != len(names):
        raise C2SValueError(f"{len(stratify)} labels to stratify by for {len(names)} names")
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


def split_report(parts: Mapping[str, Sequence[str]], fractions: Mapping[str, float] | None = None) -> dict[str, float]:
    """Sizes of a split's parts as metrics (``n_<part>_cells``, ``<part>_share``), with a warning when
    a part misses its fraction (more than one cell and ``SPLIT_TOLERANCE`` of its expected size: too
    few cells, or too many small strata, for the fractions asked) and when the test part holds fewer
    than ``MIN_SCORED_CELLS`` cells. ``fractions`` default to none (sizes only)."""
    names = [part for part in (fractions or parts) if part in parts]
    sizes = {part: len(parts[part]) for part in names}
    total = sum(sizes.values())
    metrics: dict[str, float] = {}
    for part in names:
        metrics[f"n_{part}_cells"] = float(sizes[part])
        metrics[f"{part}_share"] = sizes[part] / total if total else 0.0
    if fractions and total:
        missed = [part for part in names
                  if abs(sizes[part] - fractions[part] * total) > max(1.0, SPLIT_TOLERANCE * fractions[part] * total)]
        if missed:
            logger.warning(
                "the split of %d cells cannot honour its fractions: %s asked, %s made. Too few cells (or too many small "
                "strata) for these fractions: use more cells, or change data_split.fractions or data_split.stratify_by",
                total, "/".join(f"{fractions[p]:g}" for p in names), "/".join(str(sizes[p]) for p in names),
            )
    if "test" in sizes and 0 < sizes["test"] < MIN_SCORED_CELLS:
        logger.warning(
            "the test part holds %d cells, fewer than %d: scores on it are too noisy to compare (one cell moves an "
            "accuracy by %.0f points)", sizes["test"], MIN_SCORED_CELLS, 100 / sizes["test"],
        )
    return metrics
