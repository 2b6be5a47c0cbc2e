"""Screens as real screens label them: a target that is not among the genes, combinatorial
perturbations (``A+B``) and target names with whitespace, through labels, prompts, tokenizers,
baselines and the knockdown diagnostics, on tiny hand-made screens."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from datasets import Dataset

from c2s_kedro.core.data.screen import (
    ScreenColumns,
    ScreenTargets,
    perturbation_label,
    perturbation_targets,
    screen_for_processing,
    screen_targets,
)
from c2s_kedro.core.models.tokenizer import build_gene_tokenizer
from c2s_kedro.core.prompts.formatting import template_words
from c2s_kedro.core.prompts.perturbation import PerturbationPromptFormatter, perturbation_phrase
from c2s_kedro.core.tasks.perturbation.evaluation import (
    KnockdownOnlyBaseline,
    LinearAdditiveBaseline,
    baseline_rules,
    fit_baselines,
    knockdown_diagnostics,
    labelled_cells,
    report_baseline_rules,
)
from c2s_kedro.core.tasks.perturbation.tokens import TargetTokenError, check_target_tokens, target_words

COLUMNS = ScreenColumns(perturbation="gene", control_label="non-targeting", batch=None, gene_symbol=None)
CONTROL = "non-targeting"


def test_a_label_names_its_targets_and_the_control_label_is_never_split():
    assert perturbation_targets("A+B", COLUMNS) == ("A", "B")
    assert perturbation_targets(" a + b ", COLUMNS) == ("A", "B")
    assert perturbation_targets("HES4 variant", COLUMNS) == ("HES4_VARIANT",)  # as the door names the gene
    assert perturbation_targets("CBL+non-targeting", COLUMNS) == ("CBL",)  # GEARS-style single
    assert perturbation_targets(CONTROL, COLUMNS) == ()
    plus_control = ScreenColumns(perturbation="gene", control_label="ctrl+ctrl", batch=None, gene_symbol=None)
    assert perturbation_targets("ctrl+ctrl", plus_control) == () and perturbation_label("ctrl+ctrl", plus_control) == "ctrl+ctrl"
    no_separator = ScreenColumns(perturbation="gene", batch=None, gene_symbol=None, combination_separator=None)
    assert perturbation_targets("A+B", no_separator) == ("A+B",)
    assert perturbation_label("a+b", COLUMNS) == "A+B" and perturbation_label("cbl+non-targeting", COLUMNS) == "CBL"
    assert perturbation_label("hes4 variant", COLUMNS) == "HES4_VARIANT"


def test_a_target_with_whitespace_matches_the_gene_the_door_made_one_word():
    targets = ScreenTargets(["HES4_variant", "C1orf112", "CD3D"], COLUMNS)
    assert targets.positions("HES4 variant") == [0]
    assert targets.positions(perturbation_label("hes4 variant", COLUMNS)) == [0]
    assert targets.positions("C1ORF112+CD3D") == [1, 2]  # matched as sentences write genes: upper-cased
    assert targets.not_genes("CD3D+NOTAGENE") == ["NOTAGENE"]


def _screen(labels: dict[str, int], genes=("A", "B", "C", "HES4 variant")) -> ad.AnnData:
    rows = [(f"{name}-{i}", name) for name, n in labels.items() for i in range(n)]
    obs = pd.DataFrame(rows, columns=["cell", "gene"]).set_index("cell")
    return ad.AnnData(np.ones((len(obs), len(genes)), dtype=np.float32), obs=obs, var=pd.DataFrame(index=list(genes)))


def test_the_screen_reports_each_target_not_among_its_genes_with_its_cells():
    screen, _ = screen_for_processing(_screen({"A": 4, "a+b": 3, "hes4 variant": 2, "NOTAGENE": 5, "A+NOTAGENE": 2,
                                               CONTROL: 6}), COLUMNS, "truth")
    assert sorted(screen.obs["gene"].unique()) == sorted(["A", "A+B", "HES4_VARIANT", "NOTAGENE", "A+NOTAGENE", CONTROL])
    genes = ["A", "B", "C", "HES4_variant"]  # as the door names them
    report = screen_targets(screen.obs["gene"], genes, COLUMNS)
    assert report["targets_not_among_genes"] == {"NOTAGENE": 7}  # its own 5 cells and the 2 of A+NOTAGENE
    assert report["n_cells_target_not_among_genes"] == 7
    assert report["combinations"] == {"A+B": 3, "A+NOTAGENE": 2}


def test_prompts_name_each_target_of_a_combination():
    assert perturbation_phrase("A+B", COLUMNS) == "A and B"
    assert perturbation_phrase("A+B+C", COLUMNS) == "A, B and C"
    assert perturbation_phrase("CD3D", COLUMNS) == "CD3D" and perturbation_phrase(CONTROL, COLUMNS) == "NON-TARGETING"
    pairs = Dataset.from_dict({"perturbation": ["A+B"] * 7, "control_sentence": ["A B C"] * 7,
                               "perturbed_sentence": ["C"] * 7})
    for template in range(7):
        prompt = PerturbationPromptFormatter(template=template, columns=COLUMNS).format_dataset(pairs)["model_input"][0]
        assert "A and B" in prompt and "A+B" not in prompt


def test_a_gene_level_tokenizer_needs_a_token_for_every_target():
    genes = ["A", "B", "C"]
    words = template_words(("perturbation_response",)) + [CONTROL.upper()]
    without = build_gene_tokenizer(genes, words)
    with pytest.raises(TargetTokenError, match="NOTAGENE.*letter by letter"):
        check_target_tokens(without, ["A+NOTAGENE", "B"], COLUMNS, genes)
    added = target_words(["A+NOTAGENE", "B"], genes, COLUMNS)
    assert added == ["NOTAGENE"]
    with_target = build_gene_tokenizer(genes, words + added)
    check_target_tokens(with_target, ["A+NOTAGENE", "B"], COLUMNS, genes)
    assert len(with_target(" NOTAGENE", add_special_tokens=False)["input_ids"]) == 1  # one token, not letters
    # the phrase's word "and" is a word of the templates: "A and B" is three tokens
    assert len(with_target(" A and B", add_special_tokens=False)["input_ids"]) == 3
    # the offline base model's tokenizer is built the same way, in one call
    from c2s_kedro.core.tasks.perturbation.tokens import screen_tokenizer

    screen, targets = screen_tokenizer(genes, ["A+NOTAGENE", "B"], COLUMNS, 64)
    assert targets == ["NOTAGENE"]
    check_target_tokens(screen, ["A+NOTAGENE", "B"], COLUMNS, genes)
    assert len(screen(f" {CONTROL.upper()} NOTAGENE A and B", add_special_tokens=False)["input_ids"]) == 5


def _deltas():
    rng = np.random.default_rng(0)
    controls = rng.normal(1.0, 0.2, size=(60, 6))
    genes = ["A", "B", "C", "D", "E", "F"]
    deltas = {"A": np.array([-1.0, 0.0, 0.2, 0.5, 0.0, 0.0]), "B": np.array([0.0, -0.8, 0.0, 0.3, 0.4, 0.0]),
              "E": np.array([0.0, 0.0, 0.1, 0.0, -0.9, 0.2])}
    return controls, genes, deltas


def test_linear_additive_sums_the_trained_single_effects_of_a_combination():
    controls, genes, deltas = _deltas()
    model = LinearAdditiveBaseline(n_components=2).fit(controls, deltas, genes, COLUMNS)
    np.testing.assert_array_equal(model.predict("A+B"), deltas["A"] + deltas["B"])
    assert model.rule("A+B") == "sum_of_trained_singles"
    # C was not trained alone: its change is the baseline's prediction for an unseen single
    np.testing.assert_allclose(model.predict("A+C"), deltas["A"] + model.predict("C"))
    assert model.rule("A+C") == "sum_with_untrained_singles" and model.rule("C") == "ridge"
    # a target that is not a gene falls back to the mean change, alone or in a combination
    mean_change = np.mean(list(deltas.values()), axis=0)
    np.testing.assert_allclose(model.predict("NOTAGENE"), mean_change)
    assert model.rule("NOTAGENE") == "mean_change_target_not_a_gene"
    np.testing.assert_allclose(model.predict("A+NOTAGENE"), deltas["A"] + mean_change)
    # a combination seen in training is its own training change
    trained = LinearAdditiveBaseline(n_components=2).fit(controls, {**deltas, "A+B": np.full(6, 0.1)}, genes, COLUMNS)
    np.testing.assert_array_equal(trained.predict("A+B"), np.full(6, 0.1))
    assert trained.rule("A+B") == "training_change"
    # without a separator, "A+B" is one unknown target
    alone = LinearAdditiveBaseline(n_components=2).fit(controls, deltas, genes,
                                                       ScreenColumns(batch=None, gene_symbol=None, combination_separator=None))
    np.testing.assert_allclose(alone.predict("A+B"), mean_change)


def test_knockdown_only_knocks_down_every_target_and_leaves_a_target_that_is_not_a_gene():
    genes = ["A", "B", "C", "D"]
    control_mean = np.array([2.0, 4.0, 1.0, 1.0])
    means = {"A": np.array([0.5, 4.0, 1.0, 1.0]), "B": np.array([2.0, 1.0, 1.0, 1.0])}
    model = KnockdownOnlyBaseline().fit(control_mean, means, genes, COLUMNS)
    cells = np.tile([[2.0, 4.0, 1.0, 3.0]], (3, 1))
    knocked = model.predict_cells(cells, "A+B").toarray()
    np.testing.assert_allclose(knocked, np.tile([[0.5, 1.0, 1.0, 3.0]], (3, 1)))  # each target by its single's effect
    ratio = np.mean([0.5 / 2.0, 1.0 / 4.0])
    np.testing.assert_allclose(model.predict_cells(cells, "C+D").toarray(), np.tile([[2.0, 4.0, ratio, 3 * ratio]], (3, 1)))
    np.testing.assert_allclose(model.predict_cells(cells, "NOTAGENE").toarray(), cells)
    assert (model.rule("A+B"), model.rule("A+NOTAGENE"), model.rule("NOTAGENE")) == (
        "knocked_down", "some_targets_not_genes", "no_gene_to_knock_down")


def _cells(matrix, labels, prefix):
    return labelled_cells(np.asarray(matrix, dtype=np.float32), labels, ["A", "B", "C", "D", "E", "F"], prefix, "gene")


def test_every_baseline_says_what_it_did_with_combinations_and_targets_that_are_not_genes(caplog):
    rng = np.random.default_rng(1)
    base = np.array([2.0, 2.0, 2.0, 1.0, 1.0, 1.0])
    controls = rng.normal(base, 0.3, size=(30, 6)).clip(0)
    a, b = rng.normal(base * [0.2, 1, 1, 1.5, 1, 1], 0.1, size=(10, 6)), rng.normal(base * [1, 0.2, 1, 1, 1.5, 1], 0.1, size=(10, 6))
    train = ad.concat([_cells(controls, [CONTROL] * 30, "ctrl"), _cells(a, ["A"] * 10, "a"), _cells(b, ["B"] * 10, "b")])
    baselines = fit_baselines(train, "gene", CONTROL, n_components=2)
    rules = baseline_rules(baselines, ["A+B", "C", "NOTAGENE"]).set_index(["perturbation", "method"])["rule"]
    assert rules["A+B", "linear_additive"] == "sum_of_trained_singles"
    assert rules["NOTAGENE", "knockdown_only"] == "no_gene_to_knock_down"
    with caplog.at_level(logging.INFO, logger="c2s_kedro.core.tasks.perturbation.evaluation"):
        metrics = report_baseline_rules(baseline_rules(baselines, ["A+B", "C", "NOTAGENE"]))
    assert metrics["linear_additive.n_perturbations_sum_of_trained_singles"] == 1
    assert metrics["linear_additive.n_perturbations_mean_change_target_not_a_gene"] == 1
    assert metrics["knockdown_only.n_perturbations_no_gene_to_knock_down"] == 1
    assert metrics["coexpression_neighbours.n_perturbations_sum_over_targets"] == 1
    assert "linear_additive.n_perturbations_ridge" not in metrics  # a single gene target is no fallback
    assert any(r.message.startswith("linear_additive predicts") and "A+B as the sum of its single targets' training changes"
               in r.message for r in caplog.records)
    assert any("knockdown_only predicts NOTAGENE as no change" in r.message for r in caplog.records)


def test_the_knockdown_diagnostics_treat_each_target_and_skip_the_ones_that_are_not_genes(caplog):
    genes = ["A", "B", "C", "D", "E", "F"]
    on = np.array([3.0, 2.5, 2.0, 1.5, 1.0, 0.5])  # every gene present, A first

    def without(*names):
        return np.where(np.isin(genes, names), 0.0, on)

    real = ad.concat([_cells([on] * 6, [CONTROL] * 6, "ctrl"), _cells([without("A", "B")] * 4, ["A+B"] * 4, "ab"),
                      _cells([without("C")] * 4, ["C+NOTAGENE"] * 4, "cx")])
    samples = _cells([without("A", "B")] * 3 + [on] * 3 + [on] * 3, ["A+B"] * 3 + ["C+NOTAGENE"] * 3 + [CONTROL] * 3, "s")
    samples.obs["perturbation"] = samples.obs["gene"].astype(str)
    samples.obs["temperature"] = 1.0
    with caplog.at_level(logging.INFO, logger="c2s_kedro.core.tasks.perturbation.evaluation"):
        table, metrics = knockdown_diagnostics(samples, real, "gene", CONTROL, top_k=6)
    rows = table.set_index(["perturbation", "target"])
    assert list(rows.index) == [("A+B", "A"), ("A+B", "B"), ("C+NOTAGENE", "C"), ("C+NOTAGENE", "NOTAGENE")]
    assert rows.loc[("A+B", "A"), "reproduced"] == 1.0 and rows.loc[("A+B", "B"), "reproduced"] == 1.0
    assert rows.loc[("C+NOTAGENE", "C"), "reproduced"] == 0.0  # the model wrote C in its samples
    assert rows.loc[("C+NOTAGENE", "NOTAGENE"), "status"] == "target_not_a_gene"
    assert metrics["knockdown.n_perturbations_scored"] == 3 and metrics["knockdown.n_perturbations_target_not_a_gene"] == 1
    assert metrics["knockdown.model_T1.reproduced_share"] == pytest.approx(2 / 3)
    assert any("skip the targets not among the genes (1): NOTAGENE (of C+NOTAGENE)" in r.message for r in caplog.records)
