"""Pairing, splits, prompts fitted to the context, posterior sampling and statistics, scoring."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from datasets import Dataset

from c2s_kedro.core.models import build_gpt_neox
from c2s_kedro.core.perturbation import (
    PerturbationPromptFormatter,
    ScreenColumns,
    check_screen,
    pair_with_controls,
    posterior_statistics,
    sample_posterior,
    split_screen,
)
from c2s_kedro.core.perturbation_evaluation import (
    LinearAdditiveBaseline,
    baseline_predictions,
    calibration,
    labelled_cells,
    score_methods,
)
from c2s_kedro.core.prompts import ContextTooSmallError, count_tokens, template_words
from c2s_kedro.core.tokenizer import build_gene_tokenizer

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


def _screen() -> ad.AnnData:
    obs = _obs()
    return ad.AnnData(sp.csr_matrix(np.ones((len(obs), 3), dtype=np.float32)), obs=obs,
                      var=pd.DataFrame({"gene_name": ["X", "Y", "Z"]}, index=["E1", "E2", "E3"]))


def test_screen_check_names_the_missing_column_or_label():
    check_screen(_screen(), COLUMNS, "SETTINGS")
    with pytest.raises(KeyError, match="perturbation column 'guide'.*perturbation_column in SETTINGS"):
        check_screen(_screen(), ScreenColumns(perturbation="guide", batch=None, gene_symbol=None), "SETTINGS")
    with pytest.raises(ValueError, match="control label 'NTC'.*control_label"):
        check_screen(_screen(), ScreenColumns(control_label="NTC", gene_symbol=None), "SETTINGS")
    with pytest.raises(KeyError, match="batch column 'lane'"):
        check_screen(_screen(), ScreenColumns(batch="lane", gene_symbol=None), "SETTINGS")
    with pytest.raises(KeyError, match="gene symbol column 'symbol'"):
        check_screen(_screen(), ScreenColumns(gene_symbol="symbol"), "SETTINGS")


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
    import c2s_kedro.core.perturbation as perturbation

    monkeypatch.setattr(perturbation, "sample_continuations", lambda *a, **k: pytest.fail("sampled anyway"))
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
    assert set(scores["method"]) == {"perfect", "control_mean", "train_perturbed_mean", "linear_additive"}
    assert all(sorted(group) == ["A", "B"] for _, group in scores.groupby("method")["perturbation"])
    best = scores.set_index(["method", "perturbation"])
    assert best.loc[("perfect", "A"), "pearson_delta"] > 0.95 and best.loc[("perfect", "A"), "pearson_delta_top_de"] > 0.95
    assert abs(best.loc[("control_mean", "A"), "pearson_delta"]) < 0.6
    assert best.loc[("perfect", "A"), "mse"] < best.loc[("control_mean", "A"), "mse"]


def test_linear_additive_baseline_repeats_a_seen_perturbation_and_predicts_an_unseen_one():
    rng = np.random.default_rng(1)
    controls = rng.normal(1.0, 0.2, size=(50, 6))
    deltas = {"g0": np.array([-1.0, 0, 0, 0.5, 0, 0]), "g1": np.array([0, -0.8, 0, 0.5, 0, 0])}
    model = LinearAdditiveBaseline(n_components=2).fit(controls, deltas, [f"g{i}" for i in range(6)])
    np.testing.assert_allclose(model.predict("g0"), deltas["g0"])
    unseen = model.predict("g2")
    assert unseen[2] == pytest.approx(-0.9)  # the average self-knockdown
    np.testing.assert_allclose(model.predict("not-a-gene"), np.mean(list(deltas.values()), axis=0))
