"""Pairing, splits, prompts fitted to the context, posterior sampling and statistics, scoring."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from datasets import Dataset

from c2s_kedro.core.data.screen import ScreenColumns, ScreenLayoutError, check_screen
from c2s_kedro.core.models.loading import build_gpt_neox
from c2s_kedro.core.models.tokenizer import build_gene_tokenizer
from c2s_kedro.core.prompts.formatting import ContextTooSmallError, count_tokens, template_words
from c2s_kedro.core.prompts.perturbation import PerturbationPromptFormatter, posterior_prompt_pairs
from c2s_kedro.core.sentences.rank_fit import RankFit
from c2s_kedro.core.tasks.perturbation.evaluation import (
    LinearAdditiveBaseline,
    baseline_predictions,
    calibration,
    cell_eval_ceiling,
    evaluate_posterior,
    group_means,
    labelled_cells,
    normalized_scores,
    posterior_embedding,
    score_methods,
    sentence_space_cells,
)
from c2s_kedro.core.tasks.perturbation.pairs import (
    knockdown_drop_share,
    pair_with_controls,
    split_screen,
    synthetic_knockdown_pairs,
)
from c2s_kedro.core.tasks.perturbation.posterior import (
    MISSING_GENE_CAVEAT,
    choose_posterior_prompts,
    posterior_expression,
    posterior_statistics,
    sample_posterior,
    sample_test_posterior,
)

COLUMNS = ScreenColumns(perturbation="gene", control_label="non-targeting", batch="gem_group", gene_symbol=None)
GENES = [f"G{i}" for i in range(40)]


def _obs(n_per: int = 6, perturbations=("A", "B", "C", "D", "E"), batches=(1, 2, 3), n_controls: int = 12) -> pd.DataFrame:
    rows = []
    for name in perturbations:
        rows += [(f"{name}-{i}", name, batches[i % len(batches)]) for i in range(n_per)]
    rows += [(f"ctrl-{i}", "non-targeting", batches[i % len(batches)]) for i in range(n_controls)]
    return pd.DataFrame(rows, columns=["cell", "gene", "gem_group"]).set_index("cell")


def test_pairs_take_controls_from_the_same_batch_and_are_seeded():
    obs = _obs()
    perturbed = obs.index[obs["gene"] != "non-targeting"]
    controls = obs.index[obs["gene"] == "non-targeting"]
    pairs = pair_with_controls(obs, perturbed, controls, COLUMNS, seed=3, controls_per_cell=2)
    assert len(pairs) == 2 * len(perturbed)
    assert (obs.loc[pairs["perturbed_cell"], "gem_group"].to_numpy() == obs.loc[pairs["control_cell"], "gem_group"].to_numpy()).all()
    assert pairs["same_batch"].all()
    assert pairs.equals(pair_with_controls(obs, perturbed, controls, COLUMNS, seed=3, controls_per_cell=2))
    assert not pairs.equals(pair_with_controls(obs, perturbed, controls, COLUMNS, seed=4, controls_per_cell=2))


def test_a_batch_without_controls_falls_back_to_other_batches_and_says_so():
    obs = _obs(batches=(1, 2))
    obs.loc["A-0", "gem_group"] = 9  # no control in batch 9
    controls = obs.index[obs["gene"] == "non-targeting"]
    pairs = pair_with_controls(obs, ["A-0", "A-1"], controls, COLUMNS, seed=0)
    assert pairs.set_index("perturbed_cell").loc["A-0", "same_batch"] == False  # noqa: E712
    assert pairs.set_index("perturbed_cell").loc["A-1", "same_batch"] == True  # noqa: E712
    with pytest.raises(ValueError, match="no control cell"):
        pair_with_controls(obs, ["A-0"], [], COLUMNS)


def test_heldout_perturbations_are_never_in_training():
    obs = _obs(perturbations=tuple("ABCDEFGHIJ"))
    split = split_screen(obs, COLUMNS, mode="perturbations", seed=1)
    test = set(obs.loc[split["test"], "gene"])
    assert test and not test & set(obs.loc[split["train"], "gene"]) and not test & set(obs.loc[split["val"], "gene"])
    assert test == set(split["test_perturbations"])
    controls = [split[f"control_{p}"] for p in ("train", "val", "test")]
    assert sum(map(len, controls)) == 12 and not set(controls[0]) & set(controls[2])
    chosen = split_screen(obs, COLUMNS, mode="perturbations", test_perturbations=["B", "C"])
    assert chosen["test_perturbations"] == ["B", "C"] and not {"B", "C"} & set(chosen["train_perturbations"])


def test_heldout_cells_split_every_perturbation():
    obs = _obs(n_per=10)
    split = split_screen(obs, COLUMNS, mode="cells", seed=0)
    assert set(obs.loc[split["test"], "gene"]) == set(obs.loc[split["train"], "gene"]) == set("ABCDE")
    assert not set(split["test"]) & set(split["train"])


def test_bad_split_settings_are_refused():
    obs = _obs(perturbations=("A", "B"))
    with pytest.raises(ValueError, match="at least 3"):
        split_screen(obs, COLUMNS, mode="perturbations")
    with pytest.raises(ValueError, match="'perturbations' or 'cells'"):
        split_screen(obs, COLUMNS, mode="genes")
    with pytest.raises(ValueError, match="not perturbations of the screen"):
        split_screen(_obs(), COLUMNS, test_perturbations=["ZZZ"])
    with pytest.raises(ValueError, match="exactly train, val and test"):
        split_screen(_obs(), COLUMNS, fractions={"train": 0.9, "test": 0.1})
    with pytest.raises(ValueError, match="sum to 1"):
        split_screen(_obs(), COLUMNS, fractions={"train": 0.9, "val": 0.1, "test": 0.1})


def test_the_screen_split_rounds_cumulatively_and_gives_every_part_one_of_three():
    # 24 perturbations at 0.65 / 0.1 / 0.25: 6 held out, 2 for validation (the default screen's sizes)
    obs = _obs(n_per=2, perturbations=tuple(f"P{i:02d}" for i in range(24)), n_controls=30)
    split = split_screen(obs, COLUMNS, fractions={"train": 0.65, "val": 0.1, "test": 0.25}, seed=0)
    assert [len(split[f"{p}_perturbations"]) for p in ("train", "val", "test")] == [16, 2, 6]
    # 10 controls per batch cut test first: round(2.5) = 2 test, round(3.5) - 2 = 2 val, 6 train
    batch = obs["gem_group"]
    for part, n in (("test", 2), ("val", 2), ("train", 6)):
        assert batch.loc[split[f"control_{part}"]].value_counts().to_dict() == {1: n, 2: n, 3: n}
    three = split_screen(_obs(perturbations=("A", "B", "C")), COLUMNS, fractions={"train": 0.8, "val": 0.1, "test": 0.1})
    assert [len(three[f"{p}_perturbations"]) for p in ("train", "val", "test")] == [1, 1, 1]
    assert split == split_screen(obs, COLUMNS, fractions={"train": 0.65, "val": 0.1, "test": 0.25}, seed=0)
    assert split["test_perturbations"] != split_screen(obs, COLUMNS, fractions={"train": 0.65, "val": 0.1, "test": 0.25},
                                                       seed=1)["test_perturbations"]


def test_given_test_perturbations_leave_val_its_share_of_the_rest():
    obs = _obs(perturbations=tuple("ABCDEFGHIJK"))
    split = split_screen(obs, COLUMNS, fractions={"train": 0.6, "val": 0.2, "test": 0.2}, test_perturbations=["K"])
    assert split["test_perturbations"] == ["K"]
    assert len(split["val_perturbations"]) == 2 and len(split["train_perturbations"]) == 8  # 0.2 / 0.8 of 10 rounds to 2


def _screen() -> ad.AnnData:
    obs = _obs()
    return ad.AnnData(sp.csr_matrix(np.ones((len(obs), 3), dtype=np.float32)), obs=obs,
                      var=pd.DataFrame({"gene_name": ["X", "Y", "Z"]}, index=["E1", "E2", "E3"]))


def test_screen_check_names_the_missing_column_or_label():
    check_screen(_screen(), COLUMNS)
    cases = [
        (ScreenColumns(perturbation="guide", batch=None, gene_symbol=None), "perturbation column 'guide'", "perturbation"),
        (ScreenColumns(control_label="NTC", gene_symbol=None), "control label 'NTC'", "control_label"),
        (ScreenColumns(batch="lane", gene_symbol=None), "batch column 'lane'", "batch"),
        (ScreenColumns(gene_symbol="symbol"), "gene symbol column 'symbol'", "gene_symbol"),
    ]
    for columns, message, field in cases:
        with pytest.raises(ScreenLayoutError, match=message) as error:
            check_screen(_screen(), columns)
        assert error.value.field == field and "conf/" not in str(error.value)


@pytest.fixture(scope="module")
def tiny_model():
    tokenizer = build_gene_tokenizer(GENES, template_words(("perturbation_response",)), model_max_length=96)
    return build_gpt_neox(tokenizer, {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2,
                                      "intermediate_size": 64, "max_position_embeddings": 96}, seed=0)


def _pairs(n: int = 4, n_genes: int = 40) -> Dataset:
    rng = np.random.default_rng(0)
    return Dataset.from_dict({
        "perturbation": ["G3"] * n,
        "control_sentence": [" ".join(rng.permutation(GENES)[:n_genes]) for _ in range(n)],
        "perturbed_sentence": [" ".join(rng.permutation(GENES)[:n_genes]) for _ in range(n)],
        "control_cell": [f"c{i}" for i in range(n)],
    })


def test_training_prompts_keep_the_response_whole_and_fit_the_context(tiny_model):
    tokenizer, context = tiny_model.tokenizer, tiny_model.context_length
    formatted = PerturbationPromptFormatter(top_k_genes=None, tokenizer=tokenizer, max_tokens=context).format_dataset(_pairs())
    for row in formatted:
        assert len(row["response"].rstrip(".").split()) == 40  # the response is never cut
        total = count_tokens(tokenizer, [row["model_input"] + " " + row["response"]])[0] + 1
        assert total <= context and row["n_control_genes"] < 40  # the control sentence lost genes instead
        assert "G3" in row["model_input"] and row["control_cell"].startswith("c")


def test_generation_prompts_leave_room_for_the_requested_genes_or_refuse(tiny_model):
    tokenizer, context = tiny_model.tokenizer, tiny_model.context_length
    budget = 32
    formatted = PerturbationPromptFormatter(top_k_genes=30, tokenizer=tokenizer, max_tokens=context,
                                            response_budget=budget).format_dataset(_pairs())
    assert (count_tokens(tokenizer, formatted["model_input"]) + budget <= context).all()
    with pytest.raises(ContextTooSmallError, match="does not fit the model's context"):
        PerturbationPromptFormatter(top_k_genes=30, tokenizer=tokenizer, max_tokens=context, response_budget=budget,
                                    on_overflow="error").format_dataset(_pairs())


def test_sampling_refuses_a_prompt_that_would_run_past_the_context_before_sampling(tiny_model, monkeypatch):
    from c2s_kedro.core.tasks.perturbation import posterior

    monkeypatch.setattr(posterior, "sample_continuations", lambda *a, **k: pytest.fail("sampled anyway"))
    prompt = "Cell sentence: " + " ".join(GENES[:30]) + ". Perturbed cell sentence:"
    with pytest.raises(ContextTooSmallError, match="context of 96"):
        sample_posterior(tiny_model, [prompt], GENES, n_samples=2, max_new_tokens=80)


def test_constrained_posterior_samples_hold_only_vocabulary_genes_without_repeats(tiny_model):
    genes = GENES[:25]
    prompt = "Cell sentence: " + " ".join(GENES[:10]) + ". Perturbed cell sentence:"
    samples = sample_posterior(tiny_model, [prompt, prompt], genes, n_samples=6, temperatures=[0.7, 1.3], max_new_tokens=30)
    assert len(samples) == 2 * 2 * 6
    assert samples.groupby(["prompt_index", "temperature"]).size().eq(6).all()
    assert (samples["n_unknown"] == 0).all() and (samples["n_repeated"] == 0).all()
    for sentence in samples["sentence"]:
        words = sentence.split()
        assert words and set(words) <= set(genes) and len(words) == len(set(words))


def test_posterior_statistics_equal_hand_computed_values():
    # genes: a, b, c; absent genes are zeros
    expression = np.array([[2.0, 0.0, 1.0], [4.0, 1.0, 0.0], [3.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    groups = pd.DataFrame({"perturbation": ["P", "P", "P", "Q"], "temperature": [1.0, 1.0, 1.0, 1.0]})
    table, mean, variance, present = posterior_statistics(sp.csr_matrix(expression), groups)
    assert table["perturbation"].tolist() == ["P", "Q"] and table["n_samples"].tolist() == [3, 1]
    np.testing.assert_allclose(mean[0], [3.0, 1 / 3, 1 / 3])
    np.testing.assert_allclose(variance[0], [1.0, 1 / 3, 1 / 3])  # ddof=1: ((1+1+0)/2, (1/9+4/9+1/9)/2 ...)
    np.testing.assert_allclose(present[0], [1.0, 1 / 3, 1 / 3])
    np.testing.assert_allclose(mean[1], [1.0, 1.0, 1.0])
    np.testing.assert_allclose(variance[1], [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="group rows"):
        posterior_statistics(sp.csr_matrix(expression), groups.iloc[:2])


def test_posterior_statistics_keep_groups_in_order_of_first_appearance():
    expression = sp.csr_matrix(np.array([[1.0, 0.0], [5.0, 2.0], [3.0, 0.0], [7.0, 2.0]]))
    groups = pd.DataFrame({"perturbation": ["Q", "P", "Q", "P"], "temperature": [1.3, 0.7, 1.3, 0.7]})
    table, mean, variance, present = posterior_statistics(expression, groups)
    assert table["perturbation"].tolist() == ["Q", "P"] and table["temperature"].tolist() == [1.3, 0.7]
    np.testing.assert_allclose(mean, [[2.0, 0.0], [6.0, 2.0]])
    np.testing.assert_allclose(variance, [[2.0, 0.0], [2.0, 0.0]])
    np.testing.assert_allclose(present, [[1.0, 0.0], [1.0, 1.0]])


FIT = RankFit(slope=-1.0, intercept=2.0, r2=0.9, pearson_r=-0.9, spearman_r=-0.9, n_cells=10, n_points=100,
              log_rank_cutoff=3.0)


def test_posterior_expression_rebuilds_each_sample_and_summarises_each_group():
    samples = pd.DataFrame({
        "prompt_index": [0, 0, 0, 1], "temperature": [0.7, 0.7, 1.3, 0.7], "sample_index": [0, 1, 0, 0],
        "sentence": ["G1 G2", "G2", None, "G3 G1 NOTAGENE"], "perturbation": ["G3", "G3", "G3", "G5"],
    })
    expression, statistics = posterior_expression(samples, GENES[:5], FIT)
    top, second = FIT.predict(0), FIT.predict(1)
    np.testing.assert_allclose(expression.X.toarray()[:, :4], [[0, top, second, 0], [0, 0, top, 0], [0, 0, 0, 0],
                                                              [0, second, 0, top]], rtol=1e-6)
    assert expression.obs["sentence"].tolist() == ["G1 G2", "G2", "", "G3 G1 NOTAGENE"]
    assert expression.uns["rank_fit"] == FIT.to_dict() and expression.uns["caveat"] == MISSING_GENE_CAVEAT
    assert statistics.obs_names.tolist() == ["G3@T0.7", "G3@T1.3", "G5@T0.7"]
    assert statistics.obs["n_samples"].tolist() == [2, 1, 1]
    np.testing.assert_allclose(statistics.X[0, :3], [0, top / 2, (second + top) / 2], rtol=1e-6)
    np.testing.assert_allclose(statistics.layers["present_share"][0, :3], [0, 0.5, 1.0])
    np.testing.assert_allclose(statistics.layers["variance"][1], 0.0)
    with pytest.raises(KeyError, match="temperature"):
        posterior_expression(samples.drop(columns=["temperature"]), GENES[:5], FIT)


def _posterior_prompts(heldout: dict[str, int], seen: tuple[str, ...] = (), n_controls: int = 2) -> Dataset:
    rows = [("heldout", name, f"ctrl-{i}") for name in heldout for i in range(n_controls)]
    rows += [("seen", name, f"ctrl-{i}") for name in seen for i in range(n_controls)]
    rows += [("control", "non-targeting", f"ctrl-{i}") for i in range(n_controls)]
    return Dataset.from_dict({
        "evaluation": [r[0] for r in rows], "perturbation": [r[1] for r in rows], "control_cell": [r[2] for r in rows],
        "model_input": [f"prompt {r[1]} {r[2]}" for r in rows], "n_control_genes": [10] * len(rows),
        "max_new_tokens": [12] * len(rows),
    })


def test_posterior_prompts_share_their_control_cells_and_hold_the_control_label():
    lookup = {**{f"ctrl-{i}": f"G{i} G{i + 1}" for i in range(12)}, **{f"{p}-{i}": "G0" for p in "ABCDE" for i in range(6)}}
    split = split_screen(_obs(), COLUMNS, fractions={"train": 0.6, "val": 0.2, "test": 0.2}, seed=0, seen_test_fraction=0.3)
    pairs = posterior_prompt_pairs(split, COLUMNS, lookup, n_controls=2, seed=0).to_pandas()
    controls = sorted(set(pairs["control_cell"]))
    assert len(controls) == 2 and set(controls) <= set(split["control_test"])
    for (evaluation, name), rows in pairs.groupby(["evaluation", "perturbation"]):
        assert sorted(rows["control_cell"]) == controls  # every perturbation on the same control cells
    assert set(pairs.loc[pairs["evaluation"] == "heldout", "perturbation"]) == set(split["test_perturbations"])
    assert set(pairs.loc[pairs["evaluation"] == "seen", "perturbation"]) == set(split["test_seen_perturbations"])
    assert set(pairs.loc[pairs["evaluation"] == "control", "perturbation"]) == {"non-targeting"}
    assert pairs.equals(posterior_prompt_pairs(split, COLUMNS, lookup, n_controls=2, seed=0).to_pandas())
    with pytest.raises(ValueError, match="positive number"):
        posterior_prompt_pairs(split, COLUMNS, lookup, n_controls=0)


def test_posterior_prompts_are_chosen_per_evaluation_by_number_or_by_name():
    prompts = _posterior_prompts({"B": 1, "A": 1, "C": 1}, seen=("D", "E", "F"))
    everything = choose_posterior_prompts(prompts, seed=0)
    assert len(everything) == 2 * 7 and (everything["evaluation"] == "control").sum() == 2
    two = choose_posterior_prompts(prompts, seed=0, perturbations=2, seen_perturbations=1)
    assert two.groupby("evaluation")["perturbation"].nunique().to_dict() == {"control": 1, "heldout": 2, "seen": 1}
    assert two.equals(choose_posterior_prompts(prompts, seed=0, perturbations=2, seen_perturbations=1))
    named = choose_posterior_prompts(prompts, seed=0, perturbations=["c", "A"], seen_perturbations=["E"])
    assert sorted(set(named["perturbation"])) == ["A", "C", "E", "non-targeting"]
    with pytest.raises(ValueError, match=r"\['Z'\] are not among the 3 held-out perturbations"):
        choose_posterior_prompts(prompts, perturbations=["Z"])
    with pytest.raises(ValueError, match="at least 1"):
        choose_posterior_prompts(prompts, perturbations=0)
    with pytest.raises(ValueError, match="null \\(all\\), a number or a list"):
        choose_posterior_prompts(prompts, perturbations="A")
    with pytest.raises(KeyError, match="evaluation.*Rerun perturbation_data"):
        choose_posterior_prompts(prompts.remove_columns("evaluation"))


def test_calibration_counts_true_means_inside_the_central_interval():
    predicted = np.tile(np.arange(101, dtype=float)[:, None], (1, 4))  # 5%..95% interval = [5, 95]
    assert calibration(predicted, np.array([50.0, 4.0, 96.0, 5.0])) == pytest.approx(0.5)


def _cells(rng, n, mean, name, genes, prefix):
    return labelled_cells(np.maximum(rng.normal(mean, 0.05, size=(n, len(genes))), 0), name, genes, prefix, "gene")


def test_a_perfect_prediction_beats_no_change_and_baselines_are_scored_on_the_same_perturbations():
    rng = np.random.default_rng(0)
    genes = [f"g{i}" for i in range(30)]
    base = np.linspace(0.5, 2.0, 30)
    shift = {"A": np.r_[np.linspace(0.3, 1.5, 5), np.zeros(25)], "B": np.r_[np.zeros(5), np.linspace(-0.2, -0.8, 5), np.zeros(20)]}
    controls = _cells(rng, 40, base, "non-targeting", genes, "ctrl")
    real = ad.concat([_cells(rng, 30, base + shift[p], p, genes, f"real-{p}") for p in shift] + [controls])
    perfect = ad.concat([_cells(rng, 30, base + shift[p], p, genes, f"pred-{p}") for p in shift] + [controls])
    train = ad.concat([_cells(rng, 30, base + 0.5 * shift["A"], "C", genes, "train-C"), _cells(rng, 40, base, "non-targeting", genes, "tc")])
    predictions = {"perfect": perfect, **baseline_predictions(train, controls, {"A": 30, "B": 30}, "gene", "non-targeting", n_components=3)}
    scores = score_methods(real, predictions, "gene", "non-targeting", top_n_de=5, threads=1)
    assert set(scores["method"]) == {"perfect", "control_mean", "train_perturbed_mean", "linear_additive", "knockdown_only",
                                     "coexpression_neighbours"}
    assert all(sorted(group) == ["A", "B"] for _, group in scores.groupby("method")["perturbation"])
    best = scores.set_index(["method", "perturbation"])
    assert best.loc[("perfect", "A"), "pearson_delta"] > 0.95 and best.loc[("perfect", "A"), "pearson_delta_top_de"] > 0.95
    assert abs(best.loc[("control_mean", "A"), "pearson_delta"]) < 0.6
    assert best.loc[("perfect", "A"), "mse"] < best.loc[("control_mean", "A"), "mse"]


def test_scores_normalized_to_the_mean_baseline_are_vcc_s():
    summary = pd.DataFrame({
        "method": ["model", "worse", "train_perturbed_mean"],
        "pearson_delta": [0.75, 0.2, 0.5], "mse": [0.01, 0.04, 0.02], "overlap_at_N": [float("nan"), 0.1, 0.0],
        "calibration": [0.9, 0.9, 0.9],  # not a cell-eval metric: not normalized
    })
    scores = normalized_scores(summary)
    assert scores["model.pearson_delta_normalized"] == pytest.approx(0.5)  # (0.75 - 0.5) / (1 - 0.5)
    assert scores["model.mse_normalized"] == pytest.approx(0.5)  # 1 - 0.01 / 0.02: half the baseline's error
    assert scores["model.overlap_at_N_normalized"] == 0.0  # undefined scores 0
    assert scores["worse.pearson_delta_normalized"] == 0.0 and scores["worse.mse_normalized"] == 0.0  # clipped at 0
    assert scores["worse.overlap_at_N_normalized"] == pytest.approx(0.1)
    assert scores["model.mean_normalized_score"] == pytest.approx(1.0 / 3)
    assert not any(key.startswith("train_perturbed_mean.") or "calibration" in key for key in scores)
    with pytest.raises(ValueError, match="no 'train_perturbed_mean' among the methods"):
        normalized_scores(summary[summary["method"] != "train_perturbed_mean"])


def test_cell_eval_s_ceiling_is_high_for_clear_effects_and_absent_without_any():
    rng = np.random.default_rng(0)
    genes = [f"g{i}" for i in range(30)]
    base = np.linspace(0.5, 2.0, 30)
    shift = {"A": np.r_[np.linspace(0.3, 1.5, 5), np.zeros(25)], "B": np.r_[np.zeros(5), np.linspace(-0.2, -0.8, 5), np.zeros(20)]}
    controls = _cells(rng, 40, base, "non-targeting", genes, "ctrl")
    clear = ad.concat([_cells(rng, 30, base + shift[p], p, genes, f"real-{p}") for p in shift] + [controls])
    ceiling = cell_eval_ceiling(clear, "gene", "non-targeting")
    assert ceiling["cell_eval_ceiling.pearson_delta"] > 0.9 and "cell_eval_ceiling.mse" not in ceiling  # no ceiling of an error
    # perturbations that change nothing: the two halves' changes are noise, far from any ceiling
    none = ad.concat([_cells(rng, 30, base, p, genes, f"real-{p}") for p in shift] + [controls])
    assert ceiling["cell_eval_ceiling.pearson_delta"] - cell_eval_ceiling(none, "gene", "non-targeting").get(
        "cell_eval_ceiling.pearson_delta", 0.0) > 0.4


def test_linear_additive_baseline_repeats_a_seen_perturbation_and_predicts_an_unseen_one():
    rng = np.random.default_rng(1)
    controls = rng.normal(1.0, 0.2, size=(50, 6))
    deltas = {"g0": np.array([-1.0, 0, 0, 0.5, 0, 0]), "g1": np.array([0, -0.8, 0, 0.5, 0, 0])}
    model = LinearAdditiveBaseline(n_components=2).fit(controls, deltas, [f"g{i}" for i in range(6)])
    np.testing.assert_allclose(model.predict("g0"), deltas["g0"])
    unseen = model.predict("g2")
    assert unseen[2] == pytest.approx(-0.9)  # the average self-knockdown
    np.testing.assert_allclose(model.predict("not-a-gene"), np.mean(list(deltas.values()), axis=0))


def test_test_posterior_names_each_sample_s_prompt_perturbation_and_evaluation(tiny_model):
    tokenizer, context = tiny_model.tokenizer, tiny_model.context_length
    pairs = _pairs(n=4, n_genes=20)
    pairs = pairs.map(lambda row, i: {"perturbation": ["G3", "G5", "G7", "non-targeting"][i],
                                      "evaluation": ["heldout", "heldout", "seen", "control"][i]}, with_indices=True)
    test = PerturbationPromptFormatter(top_k_genes=20, tokenizer=tokenizer, max_tokens=context,
                                       response_budget=24).format_dataset(pairs)
    test = test.add_column("max_new_tokens", [24] * test.num_rows)
    samples = sample_test_posterior(tiny_model, test, GENES, n_samples=3, temperatures=[0.7, 1.3], seed=0)
    assert len(samples) == 4 * 2 * 3
    assert samples.groupby("perturbation")["evaluation"].first().to_dict() == {
        "G3": "heldout", "G5": "heldout", "G7": "seen", "non-targeting": "control"}
    assert set(samples.loc[samples["perturbation"] == "G3", "control_cell"]) == {"c0"}
    assert samples["n_genes"].max() <= 24 and (samples["n_unknown"] == 0).all()
    # min_genes: every sample as long as asked; more genes than max_new_tokens can hold is refused
    longer = sample_test_posterior(tiny_model, test, GENES, n_samples=3, temperatures=[1.3], seed=0, min_genes=15)
    assert (longer["n_genes"] >= 15).all() and samples["n_genes"].min() < 15
    with pytest.raises(ValueError, match="min_genes=30 needs about 31 new tokens .* max_new_tokens is 24"):
        sample_test_posterior(tiny_model, test, GENES, n_samples=3, temperatures=[1.3], min_genes=30)


def test_seen_perturbations_keep_most_cells_in_training_and_hold_out_the_rest():
    obs = _obs(n_per=10, perturbations=tuple("ABCDEFGHIJ"))
    split = split_screen(obs, COLUMNS, fractions={"train": 0.6, "val": 0.2, "test": 0.2}, seed=0, seen_test_fraction=0.3)
    assert split["test_seen_perturbations"] == split["train_perturbations"]
    assert not set(split["test_seen"]) & set(split["train"])  # no cell in both
    for name in split["train_perturbations"]:
        held = [c for c in split["test_seen"] if obs.at[c, "gene"] == name]
        trained = [c for c in split["train"] if obs.at[c, "gene"] == name]
        assert len(held) == 3 and len(trained) == 7
    assert not set(split["test_perturbations"]) & set(split["train_perturbations"])
    plain = split_screen(obs, COLUMNS, fractions={"train": 0.6, "val": 0.2, "test": 0.2}, seed=0)
    assert "test_seen" not in plain and plain["test_perturbations"] == split["test_perturbations"]
    with pytest.raises(ValueError, match="needs mode 'perturbations'"):
        split_screen(obs, COLUMNS, mode="cells", seen_test_fraction=0.2)
    with pytest.raises(ValueError, match="at least 0 and below 1"):
        split_screen(obs, COLUMNS, seen_test_fraction=1.0)


def test_synthetic_knockdown_pairs_drop_the_named_gene_at_the_given_rate():
    obs = _obs(n_controls=30)
    controls = list(obs.index[obs["gene"] == "non-targeting"])
    lookup = {c: " ".join(f"G{(i * 7 + k) % 40}" for k in range(12)) for i, c in enumerate(controls)}
    always = synthetic_knockdown_pairs(obs, controls, lookup, COLUMNS, per_control=2, drop_share=1.0, seed=0).to_pandas()
    assert len(always) == 60 and always["perturbation"].nunique() > 10  # many targets
    assert set(always["perturbation"]) <= {g for c in controls for g in lookup[c].split()}  # genes of the sentences
    for row in always.itertuples():
        original = lookup[row.perturbed_cell].split()
        assert row.perturbation not in row.perturbed_sentence.split()
        assert row.perturbed_sentence.split() == [g for g in original if g != row.perturbation]  # nothing else moves
        assert obs.at[row.control_cell, "gem_group"] == obs.at[row.perturbed_cell, "gem_group"]
    own = synthetic_knockdown_pairs(obs, controls, lookup, COLUMNS, per_control=2, drop_share=1.0, seed=0,
                                    same_cell=True).to_pandas()
    assert (own["control_cell"] == own["perturbed_cell"]).all() and len(own) == 60
    assert all(row.perturbed_sentence.split() == [g for g in row.control_sentence.split() if g != row.perturbation]
               for row in own.itertuples())  # the prompt's own cell, less the named gene
    never = synthetic_knockdown_pairs(obs, controls, lookup, COLUMNS, per_control=1, drop_share=0.0, seed=0).to_pandas()
    assert all(row.perturbed_sentence == lookup[row.perturbed_cell] for row in never.itertuples())
    with pytest.raises(ValueError, match="0 or more"):
        synthetic_knockdown_pairs(obs, controls, lookup, COLUMNS, per_control=-1, drop_share=0.5)


def test_synthetic_targets_are_drawn_independently_of_the_response_cell():
    # half the controls write genes A*, half B*: a target drawn from the response cell's own genes
    # would always be of the response's half, telling the model the cell expressed it highly
    obs = _obs(n_controls=60)
    controls = list(obs.index[obs["gene"] == "non-targeting"])
    lookup = {c: " ".join(f"{'AB'[i % 2]}{k}" for k in range(10)) for i, c in enumerate(controls)}
    pairs = synthetic_knockdown_pairs(obs, controls, lookup, COLUMNS, per_control=4, drop_share=1.0, seed=0).to_pandas()
    own_half = np.mean([row.perturbation[0] == lookup[row.perturbed_cell][0] for row in pairs.itertuples()])
    assert 0.35 < own_half < 0.65
    untouched = pairs[[row.perturbation[0] != lookup[row.perturbed_cell][0] for row in pairs.itertuples()]]
    assert all(row.perturbed_sentence == lookup[row.perturbed_cell] for row in untouched.itertuples())


def test_the_drop_share_is_measured_on_the_training_knockdowns():
    obs = _obs(n_per=4, perturbations=("G1", "G2"), n_controls=4)
    split = {"train": list(obs.index[obs["gene"] != "non-targeting"]),
             "control_train": list(obs.index[obs["gene"] == "non-targeting"])}
    lookup = {c: "G1 G2 G3" for c in split["control_train"]}  # both targets in every control
    lookup.update({"G1-0": "G1 G3", "G1-1": "G3", "G1-2": "G3", "G1-3": "G3", "G2-0": "G3", "G2-1": "G3", "G2-2": "G3",
                   "G2-3": "G3"})
    assert knockdown_drop_share(obs, split, COLUMNS, lookup) == pytest.approx(1 - 1 / 8)


def test_one_template_and_a_shorter_control_sentence_when_asked(tiny_model):
    pairs = _pairs(n=6, n_genes=20)
    formatted = PerturbationPromptFormatter(top_k_genes=20, control_top_k_genes=5, template=2).format_dataset(pairs)
    assert set(formatted["n_control_genes"]) == {5}
    assert all(len(r.rstrip(".").split()) == 20 for r in formatted["response"])  # the response keeps top_k_genes
    firsts = {prompt.split("\n")[0].replace("G3", "") for prompt in formatted["model_input"]}
    assert len(firsts) == 1  # one template
    drawn = PerturbationPromptFormatter(top_k_genes=20).format_dataset(pairs)
    assert len({prompt.split("\n")[0] for prompt in drawn["model_input"]}) > 1
    with pytest.raises(ValueError, match="index of one of the 7"):
        PerturbationPromptFormatter(template=7)
    first = PerturbationPromptFormatter(top_k_genes=20, template=6).format_dataset(pairs)
    assert all(prompt.startswith("The perturbation is G3. ") for prompt in first["model_input"])  # the name in a fixed slot
    with pytest.raises(ValueError, match="control_top_k_genes must be null or a positive"):
        PerturbationPromptFormatter(control_top_k_genes=0)


def test_every_template_names_the_target_with_the_token_its_sentences_write(tiny_model):
    # A prompt that starts with the name writes it without the space every gene in a sentence has
    # ("G3" and " G3" are different tokens for any tokenizer, gene-level or BPE): the model then
    # never learns that the named gene is the gene it writes, and tied embeddings cannot help it
    tokenizer = tiny_model.tokenizer
    gene_token = tokenizer(" G3", add_special_tokens=False)["input_ids"]
    pairs = _pairs(n=1, n_genes=20)
    for template in range(7):
        prompt = PerturbationPromptFormatter(top_k_genes=20, template=template).format_dataset(pairs)["model_input"][0]
        control = prompt[prompt.index("Cell sentence:"):]
        named = tokenizer(prompt[: len(prompt) - len(control)], add_special_tokens=False)["input_ids"]
        assert gene_token[0] in named, (template, tokenizer.convert_ids_to_tokens(named))


def _sentences() -> Dataset:
    return Dataset.from_dict({
        "cell_name": ["a", "b", "c"], "cell_sentence": ["G2 G0 G1", "G1", None], "gene": ["G3", "non-targeting", "G3"],
    })


def test_sentence_space_cells_cut_each_sentence_to_the_top_k_and_keep_the_labels():
    cells = sentence_space_cells(_sentences(), ["c", "a", "b"], "gene", GENES[:3], FIT, top_k_genes=2, prefix="real-test")
    np.testing.assert_allclose(cells.X.toarray(), [[0, 0, 0], [FIT.predict(1), 0, FIT.predict(0)], [0, FIT.predict(0), 0]],
                               rtol=1e-6)
    assert cells.obs["gene"].tolist() == ["G3", "G3", "non-targeting"] and cells.obs_names[0] == "real-test-0"
    with pytest.raises(KeyError, match="guide"):
        sentence_space_cells(_sentences(), ["a"], "guide", GENES[:3], FIT, 2, "x")
    with pytest.raises(ValueError, match="1 of the 2 cells"):
        sentence_space_cells(_sentences(), ["a", "zz"], "gene", GENES[:3], FIT, 2, "x")
    # read a batch of rows at a time: the same cells, in the order asked for
    in_batches = sentence_space_cells(_sentences(), ["c", "a", "b"], "gene", GENES[:3], FIT, top_k_genes=2, prefix="real-test",
                                      batch_size=1)
    assert (in_batches.X != cells.X).nnz == 0 and in_batches.obs.equals(cells.obs)


def test_group_means_are_the_dense_means_of_each_label():
    rng = np.random.default_rng(0)
    matrix = sp.random(30, 6, density=0.4, random_state=0, format="csr", dtype=np.float32)
    labels = rng.choice(["x", "y", "z"], 30)
    means = group_means(labelled_cells(matrix, labels.tolist(), GENES[:6], "c", "gene"), "gene")
    assert sorted(means) == ["x", "y", "z"]
    for name, mean in means.items():
        np.testing.assert_allclose(mean, matrix.toarray()[labels == name].astype(np.float64).mean(axis=0), rtol=1e-12)


def _posterior_case(rng):
    genes = [f"g{i}" for i in range(30)] + ["never"]
    base = np.r_[np.linspace(0.5, 2.0, 30), 0.0]
    shift = {"A": np.r_[np.linspace(0.3, 1.5, 5), np.zeros(26)], "B": np.r_[np.zeros(5), np.linspace(-0.2, -0.8, 5), np.zeros(21)]}

    def cells(n, mean, name, prefix):
        values = np.maximum(rng.normal(mean, 0.05, size=(n, len(genes))), 0)
        values[:, -1] = 0  # a gene no cell expresses
        return labelled_cells(values, name, genes, prefix, "gene")

    controls = cells(40, base, "non-targeting", "ctrl")
    real = ad.concat([cells(30, base + shift[p], p, f"real-{p}") for p in shift] + [cells(20, base, "D", "real-D"), controls])
    train = ad.concat([cells(30, base + 0.5 * shift["A"], "C", "train-C"), cells(40, base, "non-targeting", "tc")])
    parts = []
    for t in (0.7, 1.3):
        for p in shift:
            part = cells(25, base + shift[p], p, f"s{t}{p}")
            part.obs = pd.DataFrame({"perturbation": p, "temperature": t}, index=part.obs_names)
            parts.append(part)
    samples = ad.concat(parts)
    samples.obs_names_make_unique()
    truth = pd.DataFrame({"gene": genes, **{p: shift[p] / np.log10(2) for p in shift}})
    return samples, real, train, truth


def test_the_posterior_is_scored_with_the_baselines_on_its_perturbations_only():
    samples, real, train, truth = _posterior_case(np.random.default_rng(0))
    scores, summary, metrics, _ = evaluate_posterior(samples, real, train, "gene", "non-targeting", truth=truth, top_n_de=5,
                                                  baseline_pca_components=3, threads=1)
    methods = {"model_T0.7", "model_T1.3", "control_mean", "train_perturbed_mean", "linear_additive", "knockdown_only",
               "coexpression_neighbours"}
    assert set(summary["method"]) == methods
    assert all(sorted(group) == ["A", "B"] for _, group in scores.groupby("method")["perturbation"])  # D has no samples
    assert metrics["n_heldout_perturbations"] == 2 and metrics["n_genes_scored"] == 30  # "never" is left out
    by_method = summary.set_index("method")
    assert by_method.loc["model_T0.7", "pearson_delta"] > 0.9 > abs(by_method.loc["control_mean", "pearson_delta"])
    assert metrics["observed_cells.pearson_delta_simulated_truth"] > 0.9  # the held-out cells follow the truth
    assert metrics["model_T1.3.pearson_delta"] == pytest.approx(by_method.loc["model_T1.3", "pearson_delta"])
    assert metrics["model_T0.7.n_predicted_cells"] == 25
    assert metrics["n_heldout_perturbations_not_sampled"] == 1  # D
    # ceilings and normalized scores beside the raw metrics
    assert metrics["cell_eval_ceiling.pearson_delta"] > 0.9
    assert metrics["model_T0.7.pearson_delta_normalized"] > 0.5 and "train_perturbed_mean.pearson_delta_normalized" not in metrics
    assert {"model_T1.3.mse_normalized", "control_mean.mean_normalized_score"} < set(metrics)
    assert all(key.count(".") >= 1 for key in metrics
               if key not in ("n_genes_scored", "n_heldout_perturbations", "n_heldout_perturbations_not_sampled"))
    _, _, without_truth, _ = evaluate_posterior(samples, real, train, "gene", "non-targeting", truth=truth.iloc[:0], top_n_de=5,
                                             baseline_pca_components=3, threads=1)
    assert "observed_cells.pearson_delta_simulated_truth" not in without_truth


def test_posterior_scoring_refuses_samples_without_real_cells():
    samples, real, train, _ = _posterior_case(np.random.default_rng(1))
    without_b = real[(real.obs["gene"] != "B").to_numpy()].copy()
    with pytest.raises(ValueError, match=r"\['B'\] have samples but no real test cells"):
        evaluate_posterior(samples, without_b, train, "gene", "non-targeting")


def test_the_posterior_embedding_holds_the_chosen_perturbations_and_the_controls():
    samples, real, _, _ = _posterior_case(np.random.default_rng(2))
    embedding = posterior_embedding(samples, real, "gene", "non-targeting", max_perturbations=1, seed=0)
    is_sample = embedding.obs["is_sample"].to_numpy()
    assert set(embedding.obs.loc[is_sample, "perturbation"]) == {"A"} and is_sample.sum() == 50
    assert embedding.obs.loc[~is_sample, "perturbation"].value_counts().to_dict() == {"non-targeting": 40, "A": 30}
    assert embedding.obs.loc[~is_sample, "temperature"].isna().all()
    assert embedding.obsm["X_pca"].shape[0] == embedding.obsm["X_umap"].shape[0] == embedding.n_obs == 120
    assert sp.issparse(embedding.X)
    assert samples.obsm_keys() == []  # the samples themselves are left as they were
    pca = embedding.obsm["X_pca"][:, 0]
    control = (embedding.obs["perturbation"] == "non-targeting").to_numpy()
    assert abs(pca[control].mean() - pca[~control].mean()) > 2 * pca[control].std()  # A separates from the controls
