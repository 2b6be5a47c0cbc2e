"""perturbation_posterior's nodes and pipeline on a tiny in-memory screen with a tiny untrained model."""

from __future__ import annotations

import copy

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from datasets import Dataset, DatasetDict

from c2s_kedro.core.data.screen import ScreenColumns
from c2s_kedro.core.models.loading import build_gpt_neox
from c2s_kedro.core.models.tokenizer import build_gene_tokenizer
from c2s_kedro.core.prompts.formatting import template_words
from c2s_kedro.core.prompts.perturbation import PerturbationPromptFormatter, posterior_prompt_pairs
from c2s_kedro.core.sentences.rank_fit import RankFit
from c2s_kedro.core.tasks.perturbation.posterior import MISSING_GENE_CAVEAT
from c2s_kedro.parameters import ParameterError
from c2s_kedro.pipelines.perturbation_posterior import create_pipeline
from c2s_kedro.pipelines.perturbation_posterior.nodes import (
    evaluate_perturbation_predictions,
    plot_posterior,
    posterior_to_expression,
    sample_perturbation_posterior,
)
from tests.helpers import load_parameters, params_entries, run_pipeline

GENES = [f"G{i}" for i in range(30)]
CONTROL = "non-targeting"
HELD_OUT = ["G3", "G5"]
SEEN = ["G1", "G2"]
COLUMNS = ScreenColumns(perturbation="gene", control_label=CONTROL, batch="gem_group", gene_symbol=None)
RANK_FIT = RankFit(slope=-0.8, intercept=1.6, r2=0.9, pearson_r=-0.95, spearman_r=-0.95, n_cells=40, n_points=800,
                   log_rank_cutoff=3.0).to_dict()


def _params() -> dict:
    params = load_parameters("perturbation")
    settings = params["perturbation"]
    settings["top_k_genes"] = 12
    settings["posterior"].update(n_samples=4, temperatures=[0.7, 1.3], prompts_per_perturbation=1)
    settings["evaluation"].update(top_n_de=5, baseline_pca_components=2, sensitivity_pairs=8)
    return params


@pytest.fixture(scope="module")
def screen():
    """Sentences of a screen whose perturbations knock their target out of the sentence, a split
    holding out G3 and G5 (and 3 cells each of the seen G1 and G2), and the prompts of both test
    sets and of the posterior formatted for a tiny model."""
    rng = np.random.default_rng(0)
    rows = []
    for name, n in (("G1", 10), ("G2", 10), ("G3", 10), ("G5", 10), (CONTROL, 24)):
        for i in range(n):
            genes = [g for g in rng.permutation(GENES[:16]) if g != name]
            rows.append((f"{name}-{i}", " ".join(genes), name, i % 2 + 1))
    sentences = Dataset.from_dict(dict(zip(["cell_name", "cell_sentence", "gene", "gem_group"], map(list, zip(*rows)))))
    names = {name: [r[0] for r in rows if r[2] == name] for name in ("G1", "G2", "G3", "G5", CONTROL)}
    split = {
        "train": names["G1"][:7] + names["G2"][:7], "val": [], "test": names["G3"] + names["G5"],
        "test_seen": names["G1"][7:] + names["G2"][7:],
        "control_train": names[CONTROL][:12], "control_val": [], "control_test": names[CONTROL][12:],
        "train_perturbations": ["G1", "G2"], "val_perturbations": [], "test_perturbations": HELD_OUT,
        "test_seen_perturbations": SEEN,
    }
    processed = ad.AnnData(sp.csr_matrix((len(rows), len(GENES)), dtype=np.float32),
                           obs=pd.DataFrame(index=[r[0] for r in rows]), var=pd.DataFrame(index=GENES))
    tokenizer = build_gene_tokenizer(GENES, template_words(("perturbation_response",)) + [CONTROL.upper()], model_max_length=64)
    model = build_gpt_neox(tokenizer, {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2,
                                       "intermediate_size": 64, "max_position_embeddings": 64}, seed=0)
    lookup = dict(zip(sentences["cell_name"], sentences["cell_sentence"]))
    parts = {}
    for part in ("test", "test_seen"):
        perturbed = split[part]
        controls = [split["control_test"][i % 12] for i in range(len(perturbed))]
        parts[part] = Dataset.from_dict({
            "perturbation": [c.split("-")[0] for c in perturbed], "control_cell": controls, "perturbed_cell": perturbed,
            "control_sentence": [lookup[c] for c in controls], "perturbed_sentence": [lookup[c] for c in perturbed],
        })
    parts["posterior"] = posterior_prompt_pairs(split, COLUMNS, lookup, n_controls=1, seed=0)
    prompts = DatasetDict()
    for part, pairs in parts.items():
        formatted = PerturbationPromptFormatter(top_k_genes=12, tokenizer=tokenizer, max_tokens=64,
                                                response_budget=14).format_dataset(pairs)
        prompts[part] = formatted.add_column("max_new_tokens", [14] * formatted.num_rows)
    truth = pd.DataFrame({"gene": GENES, **{name: np.where(np.array(GENES) == name, -3.0, 0.0) for name in HELD_OUT + SEEN}})
    return {"sentences": sentences, "split": split, "processed": processed, "model": model, "prompts": prompts,
            "vocabulary": {g: 1 for g in GENES}, "truth": truth}


@pytest.fixture(scope="module")
def outputs(screen):
    params = _params()
    inputs = {
        "perturbation_model": screen["model"], "perturbation_prompts": screen["prompts"],
        "perturbation.vocabulary": screen["vocabulary"], "perturbation.processed_adata": screen["processed"],
        "perturbation.rank_fit": RANK_FIT, "perturbation.cell_sentences": screen["sentences"],
        "perturbation_split": screen["split"], "perturbation_truth": screen["truth"], **params_entries(params),
    }
    return run_pipeline(create_pipeline(), inputs), params["perturbation"]


def test_the_pipeline_reads_the_screen_s_namespaced_datasets():
    pipeline = create_pipeline()
    assert pipeline.inputs() == {
        "perturbation_model", "perturbation_prompts", "perturbation.vocabulary", "perturbation.processed_adata",
        "perturbation.rank_fit", "perturbation.cell_sentences", "perturbation_split", "perturbation_truth",
        "params:perturbation",
    }
    assert {n.name for n in pipeline.nodes} == {"sample_perturbation_posterior", "posterior_to_expression", "plot_posterior",
                                                 "probe_input_sensitivity", "evaluate_perturbation_predictions",
                                                 "plot_target_presence"}
    assert pipeline.all_outputs() == {
        "posterior_samples", "posterior_samples_expression", "posterior_statistics", "posterior_pca_plot",
        "posterior_umap_plot", "perturbation_sensitivity", "perturbation_sensitivity_metrics", "perturbation_scores",
        "perturbation_summary", "perturbation_knockdown", "perturbation_posterior_metrics", "perturbation_knockdown_plot",
    }


def test_every_perturbation_and_the_control_label_have_samples_on_the_same_control_cells(outputs):
    catalog, params = outputs
    samples = catalog.load("posterior_samples")
    assert samples.groupby("evaluation")["perturbation"].agg(lambda p: sorted(set(p))).to_dict() == {
        "heldout": HELD_OUT, "seen": SEEN, "control": [CONTROL]}
    assert (samples.groupby(["perturbation", "temperature"]).size() == params["posterior"]["n_samples"]).all()
    assert all(set(s.split()) <= set(GENES) for s in samples["sentence"])
    assert samples.groupby("perturbation")["control_cell"].agg(lambda c: tuple(sorted(set(c)))).nunique() == 1


def test_the_posterior_becomes_expression_and_statistics(outputs):
    catalog, params = outputs
    samples = catalog.load("posterior_samples")
    expression = catalog.load("posterior_samples_expression")
    statistics = catalog.load("posterior_statistics")
    assert expression.n_obs == len(samples) and list(expression.var_names) == GENES
    assert expression.uns["rank_fit"] == RANK_FIT and statistics.uns["caveat"] == MISSING_GENE_CAVEAT
    row = int(np.flatnonzero(samples["n_genes"].to_numpy() > 0)[0])
    first = samples["sentence"].iloc[row].split()[0]  # the first gene of a sample sits at rank 0
    assert expression.X[row, GENES.index(first)] == pytest.approx(RANK_FIT["intercept"], rel=1e-6)
    assert statistics.n_obs == (len(HELD_OUT) + len(SEEN) + 1) * len(params["posterior"]["temperatures"])
    rows = (expression.obs["perturbation"] == "G5").to_numpy() & (expression.obs["temperature"] == 1.3).to_numpy()
    np.testing.assert_allclose(statistics["G5@T1.3"].X[0], np.asarray(expression.X[rows].mean(axis=0)).ravel(), rtol=1e-5)


def test_the_model_and_the_baselines_are_scored_on_both_test_sets(outputs):
    catalog, params = outputs
    scores = catalog.load("perturbation_scores")
    summary = catalog.load("perturbation_summary")
    metrics = catalog.load("perturbation_posterior_metrics")
    methods = {"model_T0.7", "model_T1.3", "control_mean", "train_perturbed_mean", "linear_additive", "knockdown_only",
               "coexpression_neighbours"}
    assert set(summary["method"]) == methods and set(summary["evaluation"]) == {"heldout", "seen"}
    for evaluation, names in (("heldout", HELD_OUT), ("seen", SEEN)):
        rows = scores[scores["evaluation"] == evaluation]
        assert all(sorted(group) == names for _, group in rows.groupby("method")["perturbation"])
    assert metrics["n_heldout_perturbations"] == 2 and metrics["seen.n_heldout_perturbations"] == 2
    assert metrics["model_T0.7.n_predicted_cells"] == params["posterior"]["n_samples"]
    assert metrics["control_mean.n_predicted_cells"] == 10  # as many as the real cells of each held-out perturbation
    assert metrics["seen.control_mean.n_predicted_cells"] == 3
    # the held-out cells lack their target gene, as the truth says: the observed ceiling is high
    assert metrics["observed_cells.pearson_delta_simulated_truth"] > 0.5
    assert set(metrics) >= {f"{m}.pearson_delta" for m in methods} | {f"seen.{m}.pearson_delta" for m in methods}
    # the diagnostics: deltas against the model's own control-label samples, centred scores, the knockdown
    assert {"model_T0.7.pearson_delta_vs_own_control", "model_T0.7.centered_pearson_delta",
            "knockdown.real.target_presence", "knockdown.model_T0.7.reproduced_share", "sensitivity.n_pairs",
            "seen.sensitivity.n_pairs"} <= set(metrics)
    assert metrics["knockdown.real.target_presence"] == 0.0  # every real perturbed cell lost its target
    knockdown = catalog.load("perturbation_knockdown")
    assert set(knockdown["evaluation"]) == {"heldout", "seen"}
    assert set(knockdown["perturbation"]) == set(HELD_OUT + SEEN)


def test_the_sensitivity_probe_measures_both_test_sets(outputs):
    catalog, params = outputs
    table = catalog.load("perturbation_sensitivity")
    assert set(table["evaluation"]) == {"heldout", "seen"}
    assert (table.groupby("evaluation").size() <= params["evaluation"]["sensitivity_pairs"]).all()
    metrics = catalog.load("perturbation_sensitivity_metrics")
    assert metrics["sensitivity.n_pairs"] == (table["evaluation"] == "heldout").sum()


def test_the_target_presence_plot_has_a_panel_per_evaluation(outputs):
    catalog, _ = outputs
    figure = catalog.load("perturbation_knockdown_plot")
    titles = [ax.get_title() for ax in figure.axes]
    assert titles == ["held-out perturbations", "seen perturbations"]
    assert sorted(t.get_text() for t in figure.axes[0].get_xticklabels()) == HELD_OUT


def test_the_posterior_plots_have_one_panel_per_heldout_perturbation_and_the_control_label(outputs):
    catalog, _ = outputs
    for name in ("posterior_pca_plot", "posterior_umap_plot"):
        figure = catalog.load(name)
        assert [ax.get_title() for ax in figure.axes if ax.get_visible()] == HELD_OUT + [CONTROL]


def test_a_plot_shows_at_most_max_plot_panels_perturbations(outputs, screen):
    catalog, params = outputs
    settings = copy.deepcopy(params)
    settings["evaluation"]["max_plot_panels"] = 1
    pca, _ = plot_posterior(catalog.load("posterior_samples_expression"), screen["sentences"], screen["split"], RANK_FIT, settings)
    assert [ax.get_title() for ax in pca.axes if ax.get_visible()] == ["G3"]


def test_a_rank_fit_with_counts_as_floats_is_read_as_the_fit(outputs, screen):
    catalog, params = outputs
    as_floats = {k: float(v) for k, v in RANK_FIT.items()}
    expression, _ = posterior_to_expression(catalog.load("posterior_samples"), screen["processed"], as_floats)
    assert expression.uns["rank_fit"] == RANK_FIT and isinstance(expression.uns["rank_fit"]["n_cells"], int)


def test_settings_are_checked_and_errors_name_the_setting(outputs, screen):
    catalog, params = outputs
    expression = catalog.load("posterior_samples_expression")
    misspelt = copy.deepcopy(params)
    misspelt["evaluation"]["top_n_degs"] = misspelt["evaluation"].pop("top_n_de")
    with pytest.raises(ParameterError, match="perturbation.evaluation.top_n_degs"):
        evaluate_perturbation_predictions(expression, screen["sentences"], screen["split"], RANK_FIT, screen["truth"], {},
                                          misspelt)
    renamed = copy.deepcopy(params) | {"perturbation_column": "target"}
    with pytest.raises(KeyError, match=r"\['target'\].*Change perturbation.sentence_conversion.label_columns"):
        evaluate_perturbation_predictions(expression, screen["sentences"], screen["split"], RANK_FIT, screen["truth"], {},
                                          renamed)
    no_samples = copy.deepcopy(params)
    no_samples["posterior"]["n_samples"] = 0
    with pytest.raises(ParameterError, match="perturbation.posterior.n_samples must be at least 1, got 0"):
        sample_perturbation_posterior(screen["model"], screen["prompts"], screen["vocabulary"], no_samples)
    # every range is refused like a wrong type, naming the setting, before anything runs
    for section, key, value, message in (("posterior", "temperatures", [0.7, 0.0], r"\[1\] must be greater than 0"),
                                         ("posterior", "prompts_per_perturbation", 0, "at least 1"),
                                         ("evaluation", "interval", 1.5, "between 0 and 1"),
                                         ("pairing", "synthetic_drop_share", -0.1, "between 0 and 1"),
                                         ("split", "fractions", {"train": 1.2, "val": 0.0, "test": 0.1}, "between 0 and 1")):
        wrong = copy.deepcopy(params)
        wrong[section][key] = value
        with pytest.raises(ParameterError, match=rf"perturbation\.{section}\.{key}.*{message}"):
            sample_perturbation_posterior(screen["model"], screen["prompts"], screen["vocabulary"], wrong)
    with pytest.raises(ParameterError, match="perturbation.top_k_genes must be at least 1, got 0"):
        sample_perturbation_posterior(screen["model"], screen["prompts"], screen["vocabulary"], params | {"top_k_genes": 0})


def test_posterior_perturbations_samples_a_subset_and_every_method_is_scored_on_it(screen):
    params = _params()["perturbation"]
    params["posterior"].update(perturbations=["g5"], seen_perturbations=1)
    samples = sample_perturbation_posterior(screen["model"], screen["prompts"], screen["vocabulary"], params)
    assert set(samples.loc[samples["evaluation"] == "heldout", "perturbation"]) == {"G5"}
    assert samples.loc[samples["evaluation"] == "seen", "perturbation"].nunique() == 1
    assert (samples["seconds_per_sample"] > 0).all()
    expression, _ = posterior_to_expression(samples, screen["processed"], RANK_FIT)
    scores, _, _, metrics = evaluate_perturbation_predictions(expression, screen["sentences"], screen["split"], RANK_FIT,
                                                              screen["truth"], {}, params)
    heldout = scores[scores["evaluation"] == "heldout"]
    assert all(group.tolist() == ["G5"] for _, group in heldout.groupby("method")["perturbation"])
    assert metrics["n_heldout_perturbations"] == 1 and metrics["n_heldout_perturbations_not_sampled"] == 1
    assert metrics["seen.n_heldout_perturbations"] == 1 and metrics["seen.n_heldout_perturbations_not_sampled"] == 1
    assert metrics["posterior.seconds_per_sample"] == pytest.approx(samples["seconds_per_sample"].mean())
    params["posterior"]["perturbations"] = ["G1"]  # a training perturbation
    with pytest.raises(ValueError, match=r"\['G1'\] are not among.*Change perturbation.posterior"):
        sample_perturbation_posterior(screen["model"], screen["prompts"], screen["vocabulary"], params)
    old = DatasetDict({"test": screen["prompts"]["test"]})  # prompts made before the posterior part existed
    with pytest.raises(KeyError, match="no 'posterior' part.*run perturbation_data again"):
        sample_perturbation_posterior(screen["model"], old, screen["vocabulary"], params)
