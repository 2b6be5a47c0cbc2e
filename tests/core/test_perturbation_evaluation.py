"""The diagnostics that tell a model that listens to the perturbation from a deaf one (centred
changes, changes against its own control samples, E-distance, on-target knockdown) and the two
baselines a model must beat (knock the target down only; co-expression neighbours), on tiny screens
in sentence space."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from c2s_kedro.core.sentences.rank_fit import RankFit, reconstruct_expression
from c2s_kedro.core.tasks.perturbation.evaluation import (
    CoexpressionNeighboursBaseline,
    PosteriorEvaluation,
    baseline_predictions,
    centred_means,
    energy_distance,
    evaluate_posterior,
    knockdown_diagnostics,
    labelled_cells,
    score_methods,
    scores_vs_own_control,
)
from c2s_kedro.core.tasks.perturbation.posterior import posterior_expression

GENES = [f"G{i}" for i in range(16)]
CONTROL = "non-targeting"
FIT = RankFit(slope=-0.8, intercept=1.6, r2=0.9, pearson_r=-0.95, spearman_r=-0.95, n_cells=40, n_points=800,
              log_rank_cutoff=3.0)
TOP_K = 12
# G3 and G5 are in every control cell's top 12 and knocked out of their perturbed cells; G14 is in no
# control's top 12 (no clear knockdown to see); NOTAGENE is not a gene
PERTURBATIONS = ("G3", "G5", "G14", "NOTAGENE")
DEAF = " ".join(reversed(GENES[:TOP_K]))  # the same cell whatever the perturbation


def _control_sentence(rng) -> str:
    return " ".join(rng.permutation(GENES[:TOP_K]))


def _knocked_out(sentence: str, target: str) -> str:
    """The sentence without ``target``, topped up to ``TOP_K`` genes with G12 (as a real perturbed cell)."""
    words = [word for word in sentence.split() if word != target]
    return " ".join(words + ["G12"] * (TOP_K - len(words)))


def _moved_last(sentence: str, target: str) -> str:
    """The sentence with ``target`` moved to its end: a partial knockdown."""
    words = [word for word in sentence.split() if word != target]
    return " ".join(words + [target])


def _cells(sentences: list[str], labels: list[str], prefix: str) -> ad.AnnData:
    return labelled_cells(reconstruct_expression(sentences, GENES, FIT)[0], labels, GENES, prefix, "gene")


def _screen(seed: int = 0):
    """Real test cells (controls and the perturbations' cells), training cells and the control
    sentences the prompts are made of."""
    rng = np.random.default_rng(seed)
    controls = [_control_sentence(rng) for _ in range(20)]
    perturbed = {p: [_knocked_out(_control_sentence(rng), p) for _ in range(10)] for p in PERTURBATIONS}
    real = _cells(controls + sum(perturbed.values(), []), [CONTROL] * 20 + [p for p in PERTURBATIONS for _ in range(10)], "real")
    train_perturbed = {"G1": [_knocked_out(_control_sentence(rng), "G1") for _ in range(10)],
                       "G2": [_moved_last(_control_sentence(rng), "G2") for _ in range(10)]}
    train = _cells([_control_sentence(rng) for _ in range(20)] + sum(train_perturbed.values(), []),
                   [CONTROL] * 20 + ["G1"] * 10 + ["G2"] * 10, "train")
    return real, train, controls


def _samples(controls: list[str], answer, with_own_controls: bool = True, temperatures=(0.7, 1.3),
             prompts: dict[str, list[int]] | None = None) -> ad.AnnData:
    """Two samples on each of four control prompts (or those ``prompts`` gives a perturbation) for
    every perturbation (and the control label), written by ``answer(control_sentence, perturbation)``,
    as expression."""
    names = [*PERTURBATIONS, CONTROL] if with_own_controls else list(PERTURBATIONS)
    prompts = prompts or {}
    rows = [{"perturbation": p, "temperature": t, "prompt_index": i, "control_cell": f"ctrl-{i}", "sample_index": s,
             "sentence": answer(controls[i], p)}
            for t in temperatures for p in names for i in prompts.get(p, range(4)) for s in range(2)]
    return posterior_expression(pd.DataFrame(rows), GENES, FIT)[0]


def _knockdown_model(control: str, perturbation: str) -> str:
    return control if perturbation == CONTROL else _knocked_out(control, perturbation)


def test_a_deaf_model_reproduces_no_knockdown_and_shows_no_change_against_its_own_controls():
    real, _, controls = _screen()
    samples = _samples(controls, lambda control, perturbation: DEAF)
    table, metrics = knockdown_diagnostics(samples, real, "gene", CONTROL, top_k=TOP_K)
    assert metrics["knockdown.model_T0.7.reproduced_share"] == 0.0 and metrics["knockdown.model_T1.3.reproduced_share"] == 0.0
    assert metrics["knockdown.model_T0.7.target_presence"] == metrics["knockdown.model_T0.7.own_control_target_presence"]
    own = scores_vs_own_control(samples, real, "gene", CONTROL)
    assert own["pearson_delta_vs_own_control"].isna().all()  # its samples do not change at all: no signal
    assert (own["own_control_on_same_prompts"] == 1).all() and (own["n_own_control_samples"] == 8).all()
    assert set(table["reference"]) == {"own_control_same_prompts"}


def test_a_model_that_knocks_the_target_out_reproduces_every_clear_knockdown():
    real, _, controls = _screen()
    samples = _samples(controls, _knockdown_model)
    table, metrics = knockdown_diagnostics(samples, real, "gene", CONTROL, top_k=TOP_K)
    assert metrics["knockdown.model_T0.7.reproduced_share"] == 1.0
    # G3 and G5 scored; G14 is in no control's top 12; NOTAGENE is counted apart
    assert metrics["knockdown.n_perturbations_scored"] == 2
    assert metrics["knockdown.n_perturbations_real_knockdown_not_clear"] == 1
    assert metrics["knockdown.n_perturbations_target_not_a_gene"] == 1
    assert metrics["knockdown.control.target_presence"] == pytest.approx(2 / 3)  # G3 and G5 in every control, G14 in none
    assert metrics["knockdown.real.target_presence"] == 0.0
    assert metrics["knockdown.model_T0.7.target_rank"] == TOP_K  # absent everywhere: rank = top_k
    g3 = table.set_index(["method", "perturbation"]).loc[("model_T0.7", "G3")]
    expected_rank = np.mean([controls[i].split().index("G3") for i in range(4)])
    assert g3["reference_target_rank"] == pytest.approx(expected_rank) and g3["status"] == "scored"
    assert g3["control_target_expression"] > 0 and g3["model_target_expression"] == 0.0
    assert table.set_index("perturbation").loc["NOTAGENE", "status"].tolist() == ["target_not_a_gene"] * 2
    own = scores_vs_own_control(samples, real, "gene", CONTROL).set_index(["method", "perturbation"])
    assert own.loc[("model_T0.7", "G3"), "pearson_delta_vs_own_control"] > 0.8


def test_a_target_written_past_the_real_cells_top_k_counts_as_absent():
    real, _, controls = _screen()

    def pushed_down(control: str, perturbation: str) -> str:  # a longer sample with the target at position 14
        words = [w for w in control.split() if w != perturbation]
        return control if perturbation == CONTROL else " ".join(words + ["G12", "G13", "G15"][: 14 - len(words)] + [perturbation])

    table, metrics = knockdown_diagnostics(_samples(controls, pushed_down, temperatures=(1.0,)), real, "gene", CONTROL,
                                           top_k=TOP_K)
    assert metrics["knockdown.model_T1.target_presence"] == 0.0 and metrics["knockdown.model_T1.target_rank"] == TOP_K
    assert table.set_index("perturbation").loc["G3", "model_target_expression"] > 0  # present in the sample, past top-k
    assert metrics["knockdown.model_T1.reproduced_share"] == 1.0


def test_the_own_control_reference_is_on_the_perturbation_s_own_prompts():
    real, _, controls = _screen()
    samples = _samples(controls, _knockdown_model, prompts={"G3": [0, 1], "G5": [2, 3]}, temperatures=(1.0,))
    table = knockdown_diagnostics(samples, real, "gene", CONTROL, top_k=TOP_K)[0].set_index("perturbation")
    for name, chosen in (("G3", [0, 1]), ("G5", [2, 3])):
        assert table.loc[name, "reference_target_rank"] == pytest.approx(np.mean([controls[i].split().index(name) for i in chosen]))
        assert table.loc[name, "reference_n_cells"] == 4
    own = scores_vs_own_control(samples, real, "gene", CONTROL).set_index("perturbation")
    assert own.loc["G3", "n_own_control_samples"] == 4 and own.loc["G14", "n_own_control_samples"] == 8


def test_without_control_label_samples_the_other_perturbations_are_the_reference_and_own_control_scores_absent():
    real, _, controls = _screen()
    samples = _samples(controls, _knockdown_model, with_own_controls=False)
    table, metrics = knockdown_diagnostics(samples, real, "gene", CONTROL, top_k=TOP_K)
    assert set(table["reference"]) == {"other_perturbations"}
    assert "knockdown.model_T0.7.other_perturbations_target_presence" in metrics
    assert not any("own_control" in key for key in metrics)
    assert metrics["knockdown.model_T0.7.reproduced_share"] == 1.0  # G3 is in the samples for G5, and the other way
    assert scores_vs_own_control(samples, real, "gene", CONTROL).empty


def test_knockdown_only_changes_only_the_target_gene():
    real, train, _ = _screen()
    seen = _cells([_knocked_out(_control_sentence(np.random.default_rng(5)), "G3") for _ in range(10)], ["G3"] * 10, "seen")
    train = ad.concat([train, seen])
    test_controls = real[(real.obs["gene"] == CONTROL).to_numpy()].copy()
    counts = {"G3": 6, "G7": 6, "NOTAGENE": 6}
    predictions = baseline_predictions(train, test_controls, counts, "gene", CONTROL, n_components=2)
    knocked, untouched = predictions["knockdown_only"], predictions["control_mean"]  # the same drawn control cells
    train_means = {p: np.asarray(train[(train.obs["gene"] == p).to_numpy()].X.mean(axis=0)).ravel() for p in ("G1", "G2", "G3", CONTROL)}
    ratio = np.mean([train_means[p][GENES.index(p)] / train_means[CONTROL][GENES.index(p)] for p in ("G1", "G2", "G3")])
    for name in counts:
        rows = (knocked.obs["gene"] == name).to_numpy()
        after, before = knocked.X[rows].toarray(), untouched.X[rows].toarray()
        changed = np.flatnonzero(np.abs(after - before).max(axis=0) > 1e-6)
        if name == "NOTAGENE":
            assert changed.size == 0
            continue
        target = GENES.index(name)
        assert changed.tolist() == [target]
        if name == "G3":  # seen in training: its own self-effect, clipped at 0
            effect = train_means["G3"][target] - train_means[CONTROL][target]
            np.testing.assert_allclose(after[:, target], np.maximum(before[:, target] + effect, 0), rtol=1e-5)
        else:  # unseen: the screen's average ratio (G1 and G3 knocked out, G2 moved down)
            assert 0 < ratio < 1
            np.testing.assert_allclose(after[:, target], before[:, target] * ratio, rtol=1e-5)
    assert (predictions["coexpression_neighbours"].X.toarray() >= 0).all()


def test_coexpression_neighbours_are_the_most_correlated_seen_targets():
    rng = np.random.default_rng(0)
    signal = rng.normal(size=400)
    noise = rng.normal(size=(400, 6))
    genes = ["g0", "g1", "g2", "g3", "g4", "g5"]
    # g1 follows g0 closely, g2 loosely, g3 not at all, g4 against it; g5 never varies
    controls = np.column_stack([signal, signal + 0.3 * noise[:, 1], signal + 1.5 * noise[:, 2], noise[:, 3],
                                -signal + 0.1 * noise[:, 4], np.zeros(400)]) + 5
    deltas = {name: np.eye(6)[i] * (i + 1) for i, name in enumerate(genes) if name != "g5"} | {"g5": np.full(6, -1.0)}
    model = CoexpressionNeighboursBaseline(n_neighbours=2).fit(controls, deltas, genes)
    assert model.neighbours("g0") == ["g1", "g2"]  # g0 itself is left out though it was seen
    np.testing.assert_allclose(model.predict("g0"), (deltas["g1"] + deltas["g2"]) / 2)
    np.testing.assert_allclose(model.correlations("g0")["g1"], np.corrcoef(controls[:, 0], controls[:, 1])[0, 1], rtol=1e-9)
    mean_change = np.mean(list(deltas.values()), axis=0)
    np.testing.assert_allclose(model.predict("NOTAGENE"), mean_change)
    np.testing.assert_allclose(model.predict("g5"), mean_change)  # a target that never varies has no co-expression
    with pytest.raises(ValueError, match="at least 1"):
        CoexpressionNeighboursBaseline(n_neighbours=0)


def _shifted_screen(rng):
    genes = [f"g{i}" for i in range(30)]
    base = np.linspace(0.5, 2.0, 30)
    shift = {p: np.where(np.arange(30) // 6 == k, rng.uniform(0.5, 1.5, 30), 0.0) for k, p in enumerate("ABCD")}

    def cells(n, mean, name, prefix):
        return labelled_cells(np.maximum(rng.normal(mean, 0.1, size=(n, 30)), 0), name, genes, prefix, "gene")

    controls = cells(40, base, CONTROL, "ctrl")
    real = ad.concat([cells(30, base + shift[p], p, f"real-{p}") for p in shift] + [controls])
    return genes, base, shift, controls, real, cells


def test_centred_pearson_ignores_a_shift_common_to_every_perturbation():
    genes, base, shift, controls, real, cells = _shifted_screen(np.random.default_rng(0))
    common = np.linspace(-1.0, 1.0, 30) + 1.0  # every perturbation's prediction moves the same way
    honest = ad.concat([cells(30, base + shift[p], p, f"pred-{p}") for p in shift] + [controls])
    shifted = honest.copy()
    is_perturbed = (shifted.obs["gene"] != CONTROL).to_numpy()
    shifted.X = shifted.X.toarray()
    shifted.X[is_perturbed] += common
    scores = score_methods(real, {"honest": honest, "shifted": shifted}, "gene", CONTROL, top_n_de=5, threads=1)
    by = scores.set_index(["method", "perturbation"])
    for p in shift:
        assert by.loc[("shifted", p), "centered_pearson_delta"] == pytest.approx(by.loc[("honest", p), "centered_pearson_delta"],
                                                                                 abs=1e-9)
        assert by.loc[("honest", p), "pearson_delta"] - by.loc[("shifted", p), "pearson_delta"] > 0.1
        assert by.loc[("honest", p), "energy_distance"] < by.loc[("shifted", p), "energy_distance"]
    assert by.loc[("honest", "A"), "centered_pearson_delta"] > 0.9
    # a deaf method (the same cells for every perturbation) has nothing left once centred
    deaf = ad.concat([cells(30, base + common, p, f"deaf-{p}") for p in shift] + [controls])
    deaf_scores = score_methods(real, {"deaf": deaf}, "gene", CONTROL, top_n_de=5, threads=1)
    assert deaf_scores["centered_pearson_delta"].abs().max() < 0.5
    one = centred_means({"A": np.ones(3)}, ["A"])  # one perturbation: undefined
    assert np.isnan(one["A"]).all()


def test_energy_distance_is_smaller_for_cells_from_the_real_distribution():
    rng = np.random.default_rng(1)
    mean = np.linspace(0.5, 2.0, 40)
    real = rng.normal(mean, 0.3, size=(60, 40))
    same = rng.normal(mean, 0.3, size=(50, 40))
    moved = rng.normal(mean + 0.3, 0.3, size=(50, 40))
    assert abs(energy_distance(same, real)) < 0.2 * energy_distance(moved, real)
    assert energy_distance(moved + 0.5, real) > energy_distance(moved, real)
    assert np.isnan(energy_distance(same[:1], real))  # one cell has no within-group spread


def test_control_label_samples_are_not_merged_into_the_real_controls():
    real, train, controls = _screen()
    deaf = _samples(controls, lambda control, perturbation: DEAF, temperatures=(1.0,))
    without = deaf[(deaf.obs["perturbation"] != CONTROL).to_numpy()].copy()
    kwargs = {"top_n_de": 5, "baseline_pca_components": 2, "threads": 1, "top_k_genes": TOP_K}
    plain = evaluate_posterior(without, real, train, "gene", CONTROL, **kwargs)
    with_own = evaluate_posterior(deaf, real, train, "gene", CONTROL, **kwargs)
    assert isinstance(with_own, PosteriorEvaluation)
    assert set(plain.summary["method"]) == {"model_T1", "control_mean", "train_perturbed_mean", "linear_additive",
                                            "knockdown_only", "coexpression_neighbours"}
    # the model's (constant) control-label samples would move its control mean if they were merged
    for key, value in plain.metrics.items():
        if key.startswith("knockdown.model_T1."):
            continue  # the knockdown reference is meant to change: other perturbations -> own control
        assert with_own.metrics[key] == pytest.approx(value, nan_ok=True), key
    assert not any("vs_own_control" in key for key in plain.metrics)
    assert np.isnan(with_own.metrics["model_T1.pearson_delta_vs_own_control"])  # deaf: no change against itself
    assert not any(key.startswith(("control_mean.", "knockdown_only.")) and "own_control" in key for key in with_own.metrics)
    assert with_own.metrics["knockdown.model_T1.reproduced_share"] == 0.0
    assert with_own.metrics["posterior.n_own_control_samples"] == 8
    assert set(with_own.knockdown["perturbation"]) == set(PERTURBATIONS)
    assert "centered_pearson_delta" in plain.scores.columns and "energy_distance" in plain.scores.columns
    with pytest.raises(ValueError, match="only the control label 'non-targeting'"):
        evaluate_posterior(deaf[(deaf.obs["perturbation"] == CONTROL).to_numpy()].copy(), real, train, "gene", CONTROL)
