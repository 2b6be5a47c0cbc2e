"""The screen's door on quirks of real screens, on tiny hand-made screens: cells without a
perturbation label (no guide assigned), the control label in several spellings, cells without a
batch, and too few control cells for a part of the split."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from c2s_kedro.core.data.screen import (
    SCREEN_CHECKS,
    ScreenColumns,
    check_screen,
    perturbation_label,
    perturbation_targets,
    screen_for_processing,
    screen_targets,
)
from c2s_kedro.core.tasks.perturbation.pairs import FEW_CONTROLS, pair_with_controls, split_screen

COLUMNS = ScreenColumns(perturbation="gene", control_label="non-targeting", batch="gem_group", gene_symbol=None)


def _screen(labels: list, batches: list | None = None) -> ad.AnnData:
    n = len(labels)
    obs = pd.DataFrame({"gene": pd.Categorical(labels), "gem_group": batches if batches is not None else [1] * n},
                       index=[f"cell-{i}" for i in range(n)])
    return ad.AnnData(np.ones((n, 3), dtype=np.float32), obs=obs, var=pd.DataFrame(index=["A", "B", "C"]))


def test_the_control_label_in_another_case_or_with_spaces_is_the_control_label():
    for spelling in ("Non-Targeting", " NON-TARGETING ", "non-targeting"):
        assert perturbation_label(spelling, COLUMNS) == "non-targeting"
        assert perturbation_targets(spelling, COLUMNS) == ()
    assert perturbation_label("a+Non-Targeting", COLUMNS) == "A"


def test_cells_without_a_perturbation_label_are_left_out_and_counted_and_spellings_of_the_control_are_controls(caplog):
    labels = ["A", np.nan, "non-targeting", "Non-Targeting", " NON-TARGETING ", "B", "nan", np.nan]
    screen = _screen(labels)
    check_screen(screen, COLUMNS)
    processed, _ = screen_for_processing(screen, COLUMNS, "truth")
    written = processed.obs["gene"].astype(str)
    assert list(processed.obs_names) == ["cell-0", "cell-2", "cell-3", "cell-4", "cell-5"]
    assert list(written) == ["A", "non-targeting", "non-targeting", "non-targeting", "B"]
    assert processed.X.shape == (5, 3)
    checks = processed.uns[SCREEN_CHECKS]
    assert checks["n_cells_without_perturbation"] == 3 and checks["n_controls_other_spelling"] == 2
    assert "Non-Targeting (1 cells)" in checks["control_spellings"] and " NON-TARGETING  (1 cells)" in checks["control_spellings"]
    assert screen_targets(written, ["A", "B", "C"], COLUMNS)["targets_not_among_genes"] == {}


def test_numbered_control_guides_are_controls_never_perturbations():
    labels = ["A", "non-targeting_1", "non-targeting_2", "NON-TARGETING-03", "non-targeting", "non-targeting_x", "B"]
    screen = _screen(labels)
    check_screen(screen, COLUMNS)
    processed, _ = screen_for_processing(screen, COLUMNS, "truth")
    written = processed.obs["gene"].astype(str).tolist()
    assert written == ["A", "non-targeting", "non-targeting", "non-targeting", "non-targeting", "NON-TARGETING_X", "B"]
    assert processed.uns[SCREEN_CHECKS]["n_controls_other_spelling"] == 3


def test_a_perturbation_column_of_guide_ids_is_pointed_out(caplog):
    from c2s_kedro.core.data.screen import log_screen_targets

    labels = pd.Series(["A_g1", "A_g2", "B_g1", "B_g2", "C", "non-targeting"])
    report = screen_targets(labels, ["A", "B", "C"], COLUMNS)
    assert report["n_targets"] == 5 and len(report["targets_not_among_genes"]) == 4
    with caplog.at_level(logging.WARNING):
        log_screen_targets(report, "the screen's genes")
    assert "most perturbation targets (4 of 5) are not among the screen's genes: the perturbation column may hold guide IDs" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        log_screen_targets(screen_targets(pd.Series(["A", "B", "NOTAGENE"]), ["A", "B", "C"], COLUMNS), "the screen's genes")
    assert "most perturbation targets" not in caplog.text  # one unknown target of three: no such hint


def test_a_screen_whose_controls_are_all_spelt_another_way_passes_the_checks():
    check_screen(_screen(["A", "Non-Targeting", "B"]), COLUMNS)
    with pytest.raises(KeyError, match="control label 'non-targeting'"):
        check_screen(_screen(["A", np.nan, "B"]), COLUMNS)


def test_cells_without_a_batch_are_paired_with_controls_of_any_batch(caplog):
    obs = pd.DataFrame({"gene": ["non-targeting"] * 6 + ["A"] * 4,
                        "gem_group": [1, 1, 2, 2, None, None, 1, 2, None, None]},
                       index=[f"cell-{i}" for i in range(10)])
    controls = [f"cell-{i}" for i in range(6)]
    with caplog.at_level(logging.INFO, logger="c2s_kedro.core.tasks.perturbation.pairs"):
        pairs = pair_with_controls(obs, ["cell-6", "cell-7", "cell-8", "cell-9"], controls, COLUMNS, seed=0,
                                   controls_per_cell=50)
    unbatched = pairs[pairs["perturbed_cell"].isin(["cell-8", "cell-9"])]
    assert set(unbatched["control_cell"]) == set(controls)  # any batch, not only the controls without one
    assert not unbatched["same_batch"].any() and (unbatched["batch"] == "").all()
    batched = pairs[pairs["perturbed_cell"] == "cell-6"]
    assert set(batched["control_cell"]) == {"cell-0", "cell-1"} and batched["same_batch"].all()
    assert any("2 cells have no batch (.obs['gem_group'] empty): paired with controls of any batch" in r.message
               for r in caplog.records)


def _split_obs(n_controls: int) -> pd.DataFrame:
    labels = ["non-targeting"] * n_controls + [name for name in "ABCDEFGH" for _ in range(10)]
    return pd.DataFrame({"gene": labels, "gem_group": [1] * len(labels)}, index=[f"cell-{i}" for i in range(len(labels))])


def test_a_part_with_fewer_controls_than_the_threshold_is_warned_with_the_counts(caplog):
    with caplog.at_level(logging.WARNING, logger="c2s_kedro.core.tasks.perturbation.pairs"):
        split = split_screen(_split_obs(5), COLUMNS, fractions={"train": 0.6, "val": 0.2, "test": 0.2}, seed=0)
    warnings = [r.message for r in caplog.records if "control cells (fewer than" in r.message]
    n_train, n_test = len(split["control_train"]), len(split["control_test"])
    assert warnings == [
        f"only {n_train} train control cells (fewer than {FEW_CONTROLS}) for {len(split['train'])} train perturbed cells: "
        "their pairs reuse these few controls, so a prediction starts from a handful of control states. The screen has 5 "
        "control cells; use a screen with more, or raise split.fractions.train",
        f"only {n_test} test control cells (fewer than {FEW_CONTROLS}) for {len(split['test'])} test perturbed cells: "
        "their pairs reuse these few controls, so a prediction starts from a handful of control states. The screen has 5 "
        "control cells; use a screen with more, or raise split.fractions.test",
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="c2s_kedro.core.tasks.perturbation.pairs"):
        split_screen(_split_obs(200), COLUMNS, fractions={"train": 0.6, "val": 0.2, "test": 0.2}, seed=0)
    assert not [r for r in caplog.records if "control cells (fewer than" in r.message]
