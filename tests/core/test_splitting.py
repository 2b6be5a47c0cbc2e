"""The one splitter: cumulative rounding, strata, the at-least-one guarantee, the atlas's split."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from c2s_kedro.core.data.splitting import MIN_SCORED_CELLS, part_sizes, split_names, split_report

ATLAS = {"train": 0.8, "val": 0.1, "test": 0.1}
# The atlas's parts of the 700 default PBMCs (fractions 0.8/0.1/0.1, seed 0, stratified by
# cell_type) as sentences.split_cells gave them before the splitters were merged: sha256 of the
# part's names joined by newlines.
ATLAS_DIGESTS = {
    "train": (558, "39530705fde7205006002423e7d52cd8fae06b367f0f4e4a99abd849b6df2af5"),
    "val": (73, "1722d95f58539b75e944dc21a608ffcae8910cc2d90c0bc728a8a409d473f39d"),
    "test": (69, "a71b10422e8a8060e9b13c5c67dd6041e4a5d13a9f8ec33dd0b7b94bd16c0863"),
}


def _digest(names: list[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def test_the_atlas_split_of_the_default_cells_is_unchanged(pbmc_counts):
    cell_types = pbmc_counts.obs["cell_type"].astype(str).tolist()
    parts = split_names(pbmc_counts.obs_names, ATLAS, 0, stratify=cell_types)
    assert {part: (len(names), _digest(names)) for part, names in parts.items()} == ATLAS_DIGESTS


def test_parts_follow_cumulative_rounding_in_the_order_given():
    np.testing.assert_array_equal(part_sizes(24, np.array([0.65, 0.1, 0.25])), [16, 2, 6])
    # rounding each part alone gives 2 + 2 + 5 = 9 of 10; cumulative bounds always add up
    np.testing.assert_array_equal(part_sizes(10, np.array([0.25, 0.25, 0.5])), [2, 3, 5])
    for n in range(0, 40):
        assert part_sizes(n, np.array([0.8, 0.1, 0.1])).sum() == n


def test_a_positive_part_of_three_or_more_gets_one_member_and_fewer_get_none():
    np.testing.assert_array_equal(part_sizes(3, np.array([0.8, 0.1, 0.1])), [1, 1, 1])  # rounding: 2, 1, 0
    np.testing.assert_array_equal(part_sizes(4, np.array([0.9, 0.05, 0.05])), [2, 1, 1])  # rounding: 4, 0, 0
    np.testing.assert_array_equal(part_sizes(2, np.array([0.8, 0.1, 0.1])), [2, 0, 0])
    np.testing.assert_array_equal(part_sizes(5, np.array([0.5, 0.0, 0.5])), [2, 0, 3])  # a zero part stays empty
    parts = split_names(["a", "b", "c"], ATLAS, 0)
    assert sorted(len(names) for names in parts.values()) == [1, 1, 1]


def test_every_name_lands_in_exactly_one_part_in_input_order_and_the_seed_decides():
    names = [f"cell{i:03d}" for i in range(101)]
    parts = split_names(names, ATLAS, 5)
    together = [name for part in parts.values() for name in part]
    assert sorted(together) == names and len(set(together)) == len(names)
    assert all(part == sorted(part, key=names.index) for part in parts.values())
    assert parts == split_names(names, ATLAS, 5)
    assert parts != split_names(names, ATLAS, 6)
    assert list(parts) == ["train", "val", "test"]


def test_strata_are_split_alike_and_a_shared_generator_continues_its_stream():
    names = [f"c{i}" for i in range(60)]
    labels = ["rare"] * 10 + ["common"] * 50
    parts = split_names(names, ATLAS, 0, stratify=labels)
    assert [sum(n in parts[p] for n in names[:10]) for p in ATLAS] == [8, 1, 1]
    assert [sum(n in parts[p] for n in names[10:]) for p in ATLAS] == [40, 5, 5]
    rng = np.random.default_rng(0)
    first, second = split_names(names, ATLAS, rng), split_names(names, ATLAS, rng)
    assert first == split_names(names, ATLAS, 0) and second != first


def test_bad_fractions_or_labels_are_refused():
    with pytest.raises(ValueError, match="sum to 1"):
        split_names(["a", "b"], {"train": 0.8, "test": 0.1}, 0)
    with pytest.raises(ValueError, match="non-negative"):
        split_names(["a", "b"], {"train": 1.2, "test": -0.2}, 0)
    with pytest.raises(ValueError, match="2 labels to stratify by for 3 names"):
        split_names(["a", "b", "c"], ATLAS, 0, stratify=["x", "y"])


def test_repeated_names_are_refused_so_no_name_is_in_two_parts():
    # two samples concatenated: 10x barcodes repeat across lanes
    names = [f"AAAC-{i}" for i in range(30)] * 2
    with pytest.raises(ValueError, match=r"30 cell names occur more than once in the names to split \(e\.g\. AAAC-0, AAAC-1, AAAC-10\).*"
                                         r"obs_names_make_unique"):
        split_names(names, ATLAS, 0)
    unique = [f"{name}-{i // 30}" if i >= 30 else name for i, name in enumerate(names)]
    parts = split_names(unique, ATLAS, 0)
    assert sum(len(part) for part in parts.values()) == 60 and len({n for part in parts.values() for n in part}) == 60


def test_a_split_that_cannot_honour_its_fractions_is_reported(caplog):
    # 12 cells of three types: each stratum of 4 is cut 2/1/1, so 6/3/3 instead of about 10/1/1
    names = [f"c{i}" for i in range(12)]
    parts = split_names(names, ATLAS, 0, stratify=["T", "B", "NK"] * 4)
    report = split_report(parts, ATLAS)
    assert report == {"n_train_cells": 6.0, "train_share": 0.5, "n_val_cells": 3.0, "val_share": 0.25, "n_test_cells": 3.0,
                      "test_share": 0.25}
    assert "the split of 12 cells cannot honour its fractions: 0.8/0.1/0.1 asked, 6/3/3 made" in caplog.text
    assert "the test part holds 3 cells, fewer than 20" in caplog.text


def test_a_split_that_honours_its_fractions_says_nothing(caplog, pbmc_counts):
    parts = split_names(pbmc_counts.obs_names, ATLAS, 0, stratify=pbmc_counts.obs["cell_type"].astype(str).tolist())
    report = split_report(parts, ATLAS)
    assert report["n_test_cells"] == 69 and report["train_share"] == pytest.approx(558 / 700)
    assert caplog.text == ""
    assert MIN_SCORED_CELLS == 20
