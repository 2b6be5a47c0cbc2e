"""The three perturbation pipelines on a small simulated screen with a tiny model."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import yaml

from c2s_kedro.core.perturbation import MISSING_GENE_CAVEAT
from c2s_kedro.core.simulate_perturbseq import simulate_perturbseq
from c2s_kedro.pipelines.perturbation import create_data_pipeline, create_finetuning_pipeline, create_posterior_pipeline
from c2s_kedro.pipelines.perturbation.nodes import prepare_screen
from tests.helpers import PROJECT_ROOT, load_parameters, params_entries, run_pipeline


def _params(tmp_path) -> dict:
    params = load_parameters("perturbation")
    with open(PROJECT_ROOT / "conf" / "test" / "parameters.yml") as stream:
        test = yaml.safe_load(stream)["perturbation"]

    def merge(base, override):
        for key, value in override.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                merge(base[key], value)
            else:
                base[key] = value

    merge(params["perturbation"], test)
    params["perturbation"]["finetuning"]["checkpoint_dir"] = str(tmp_path / "checkpoints")
    return params


@pytest.fixture(scope="module")
def screen():
    return simulate_perturbseq(n_genes=300, n_perturbations=8, cells_per_perturbation=24, n_control_cells=120, seed=3)


@pytest.fixture(scope="module")
def outputs(screen, tmp_path_factory):
    params = _params(tmp_path_factory.mktemp("perturbation"))
    params["perturbation"]["qc"].update(min_genes_per_cell=50, min_counts_per_cell=200)
    pipeline = create_data_pipeline() + create_finetuning_pipeline() + create_posterior_pipeline()
    catalog = run_pipeline(pipeline, {"perturbseq_raw": screen, **params_entries(params)})
    return catalog, params["perturbation"]


def test_posterior_has_every_sample_of_every_heldout_perturbation(outputs):
    catalog, params = outputs
    split = catalog.load("perturbation_split")
    samples = catalog.load("posterior_samples")
    settings = params["posterior"]
    assert set(samples["perturbation"]) == set(split["test_perturbations"])
    assert not set(split["test_perturbations"]) & set(split["train_perturbations"])
    per_group = samples.groupby(["perturbation", "temperature"]).size()
    assert (per_group == settings["n_samples"] * settings["prompts_per_perturbation"]).all()
    assert sorted(samples["temperature"].unique()) == sorted(settings["temperatures"])
    assert (samples["n_unknown"] == 0).all() and (samples["n_repeated"] == 0).all()
    vocabulary = set(catalog.load("perturbseq_vocabulary"))
    assert all(set(s.split()) <= vocabulary for s in samples["sentence"])


def test_prompts_pair_controls_within_the_batch_and_fit_the_context(outputs, screen):
    catalog, params = outputs
    prompts = catalog.load("perturbation_prompts")
    model = catalog.load("perturbation_model")
    batch = screen.obs["gem_group"]
    test = prompts["test"]
    assert (batch.loc[test["control_cell"]].to_numpy() == batch.loc[test["perturbed_cell"]].to_numpy()).all()
    budget = test["max_new_tokens"][0]
    lengths = [len(model.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in test["model_input"]]
    assert max(lengths) + budget <= model.context_length


def test_posterior_statistics_match_the_samples_and_state_the_caveat(outputs):
    catalog, _ = outputs
    expression = catalog.load("posterior_samples_expression")
    statistics = catalog.load("posterior_statistics")
    assert statistics.uns["caveat"] == MISSING_GENE_CAVEAT
    first = statistics.obs.iloc[0]
    rows = (expression.obs["perturbation"] == first["perturbation"]).to_numpy() & (
        expression.obs["temperature"] == first["temperature"]).to_numpy()
    values = np.asarray(expression.X[rows].todense())
    np.testing.assert_allclose(statistics.X[0], values.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(statistics.layers["variance"][0], values.var(axis=0, ddof=1), rtol=1e-4, atol=1e-5)


def test_model_and_baselines_are_scored_on_the_same_heldout_perturbations(outputs):
    catalog, params = outputs
    scores = catalog.load("perturbation_scores")
    summary = catalog.load("perturbation_summary")
    metrics = catalog.load("perturbation_metrics")
    methods = {f"model_T{t:g}" for t in params["posterior"]["temperatures"]} | {"control_mean", "train_perturbed_mean", "linear_additive"}
    assert set(summary["method"]) == methods
    heldout = sorted(catalog.load("perturbation_split")["test_perturbations"])
    for _, group in scores.groupby("method"):
        assert sorted(group["perturbation"]) == heldout
    for column in ("pearson_delta", "pearson_delta_top_de", "mse", "overlap_at_N", "calibration", "pearson_delta_simulated_truth"):
        assert column in summary.columns
    assert summary.set_index("method").loc["linear_additive", "mse"] >= 0
    assert metrics["n_heldout_perturbations"] == len(heldout)
    assert catalog.load("perturbation_qc_metrics")["cells_removed_max_pct_mito"] > 0
    assert {f.__class__.__name__ for f in (catalog.load("posterior_pca_plot"), catalog.load("posterior_umap_plot"))} == {"Figure"}


def test_missing_perturbation_column_or_control_label_stops_with_the_setting_to_change(screen):
    params = load_parameters("perturbation")["perturbation"]
    wrong_column = copy.deepcopy(params) | {"perturbation_column": "target_gene"}
    with pytest.raises(KeyError, match="perturbation column 'target_gene'.*perturbation_column"):
        prepare_screen(screen, wrong_column)
    wrong_label = copy.deepcopy(params) | {"control_label": "NTC"}
    with pytest.raises(ValueError, match="control label 'NTC'.*non-targeting"):
        prepare_screen(screen, wrong_label)
    normalized = screen.copy()
    normalized.X = normalized.X * 0.37  # normalized-looking, not integers
    with pytest.raises(ValueError, match="raw counts"):
        prepare_screen(normalized, params)


def test_a_screen_with_other_column_names_runs_through_parameters_alone(screen, tmp_path):
    """A real screen's own names (perturbation column, control label, batch, symbols in var_names)."""
    renamed = screen.copy()
    renamed.obs = renamed.obs.rename(columns={"gene": "target_gene", "gem_group": "lane"})
    renamed.obs["target_gene"] = renamed.obs["target_gene"].replace({"non-targeting": "NTC"})
    renamed.var_names = renamed.var["gene_name"].astype(str).to_numpy()
    del renamed.varm["perturbation_truth_log2fc"]
    params = _params(tmp_path)
    params["perturbation"].update(perturbation_column="target_gene", control_label="NTC", batch_column="lane",
                                  gene_symbol_column=None)
    params["perturbation"]["qc"].update(min_genes_per_cell=50, min_counts_per_cell=200)
    catalog = run_pipeline(create_data_pipeline(), {"perturbseq_raw": renamed, **params_entries(params)})
    split = catalog.load("perturbation_split")
    assert split["test_perturbations"] and all(name != "NTC" for name in split["test_perturbations"])
    assert catalog.load("perturbation_truth").empty  # a real screen has no simulated truth
    test = catalog.load("perturbation_prompts")["test"]
    lanes = renamed.obs["lane"]
    assert (lanes.loc[test["control_cell"]].to_numpy() == lanes.loc[test["perturbed_cell"]].to_numpy()).all()
