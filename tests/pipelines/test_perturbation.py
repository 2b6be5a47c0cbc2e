"""The three perturbation pipelines on a small simulated screen with a tiny model."""

from __future__ import annotations

import copy
import logging
import re

import numpy as np
import pandas as pd
import pytest
import yaml

from c2s_kedro.core.simulate.screen import simulate_perturbseq
from c2s_kedro.core.tasks.perturbation.posterior import MISSING_GENE_CAVEAT
from c2s_kedro.parameters import ParameterError
from c2s_kedro.pipeline_registry import register_pipelines
from c2s_kedro.pipelines.perturbation_data.nodes import check_screen_layout
from tests.helpers import PROJECT_ROOT, load_parameters, params_entries, run_pipeline

PIPELINES = register_pipelines()
# the screen and its prompts (perturbation_finetuning builds the base model whose tokens they are in)
SCREEN_PROMPTS = PIPELINES["perturbation_data"] + PIPELINES["perturbation_finetuning"].to_outputs("perturbation_prompts")


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
    params["perturbation"]["data_processing"]["qc"].update(min_genes_per_cell=50, min_counts_per_cell=200)
    pipeline = PIPELINES["perturbation_data"] + PIPELINES["perturbation_finetuning"] + PIPELINES["perturbation_posterior"]
    catalog = run_pipeline(pipeline, {"perturbseq_raw": screen, **params_entries(params)})
    return catalog, params["perturbation"]


def test_posterior_has_every_sample_of_both_test_sets_and_of_the_control_label(outputs):
    catalog, params = outputs
    split = catalog.load("perturbation_split")
    samples = catalog.load("posterior_samples")
    settings = params["posterior"]
    by_evaluation = samples.groupby("evaluation")["perturbation"].agg(lambda p: set(p)).to_dict()
    assert by_evaluation["heldout"] == set(split["test_perturbations"])
    assert by_evaluation["seen"] <= set(split["train_perturbations"]) and by_evaluation["seen"]
    assert by_evaluation["control"] == {"non-targeting"}
    assert not set(split["test_perturbations"]) & set(split["train_perturbations"])
    assert not set(split["test_seen"]) & set(split["train"])  # the seen perturbations' test cells are not trained on
    per_group = samples.groupby(["perturbation", "temperature"]).size()
    assert (per_group == settings["n_samples"] * settings["prompts_per_perturbation"]).all()
    assert sorted(samples["temperature"].unique()) == sorted(settings["temperatures"])
    assert (samples["n_unknown"] == 0).all() and (samples["n_repeated"] == 0).all()
    vocabulary = set(catalog.load("perturbation.vocabulary"))
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
    metrics = catalog.load("perturbation_posterior_metrics")
    methods = {f"model_T{t:g}" for t in params["posterior"]["temperatures"]} | {
        "control_mean", "train_perturbed_mean", "linear_additive", "knockdown_only", "coexpression_neighbours"}
    assert set(summary["method"]) == methods
    heldout = sorted(catalog.load("perturbation_split")["test_perturbations"])
    for _, group in scores[scores["evaluation"] == "heldout"].groupby("method"):
        assert sorted(group["perturbation"]) == heldout
    assert "seen.knockdown_only.pearson_delta" in metrics and "sensitivity.name_to_control_nats" in metrics
    for column in ("pearson_delta", "pearson_delta_top_de", "mse", "overlap_at_N", "calibration", "pearson_delta_simulated_truth"):
        assert column in summary.columns
    # the held-out cells themselves are nearer their own change than predicting no change is
    table = summary[summary["evaluation"] == "heldout"].set_index("method")
    assert table.loc["linear_additive", "mse"] > 0
    assert metrics["n_heldout_perturbations"] == len(heldout)
    assert catalog.load("perturbation.data_processing_metrics")["cells_removed_max_pct_mito"] > 0
    data = catalog.load("perturbation_data_metrics")
    assert data["n_test_perturbations"] == len(heldout) and data["n_test_control_cells"] > 0
    for plot in ("posterior_pca_plot", "posterior_umap_plot"):
        titles = {ax.get_title() for ax in catalog.load(plot).axes if ax.get_visible()}
        assert set(heldout[:6]) <= titles  # one panel per held-out perturbation


def test_the_screen_goes_through_the_atlas_pipelines_in_its_namespace():
    screen = PIPELINES["perturbation_data"]
    atlas = PIPELINES["data_processing"] + PIPELINES["sentence_conversion"] + PIPELINES["benchmarking"]
    namespaced = {node.name.removeprefix("perturbation.") for node in screen.nodes if node.namespace == "perturbation"}
    assert {"validate_raw_adata", "filter_cells_and_genes", "normalize_counts", "convert_to_cell_sentences",
            "fit_rank_to_expression"} <= namespaced <= {node.name for node in atlas.nodes} | {
            "check_screen_layout", "split_perturbation_screen", "summarize_screen"}
    assert {"perturbation.processed_adata", "perturbation.cell_sentences", "perturbation.rank_fit"} <= screen.all_outputs()
    assert "params:perturbation.data_processing.qc" in screen.inputs()


def test_missing_perturbation_column_or_control_label_stops_with_the_setting_to_change(screen, tmp_path):
    params = load_parameters("perturbation")["perturbation"]
    wrong_column = copy.deepcopy(params) | {"perturbation_column": "target_gene"}
    with pytest.raises(KeyError, match="perturbation column 'target_gene'.*Change perturbation.perturbation_column"):
        check_screen_layout(screen, wrong_column)
    wrong_label = copy.deepcopy(params) | {"control_label": "NTC"}
    with pytest.raises(KeyError, match="control label 'NTC'.*non-targeting.*Change perturbation.control_label"):
        check_screen_layout(screen, wrong_label)
    with pytest.raises(ParameterError, match="perturbation.qc"):  # the old layout is refused by name
        check_screen_layout(screen, copy.deepcopy(params) | {"qc": {}})
    normalized = screen.copy()
    normalized.X = normalized.X * 0.37  # not integers: the door names the screen's own setting
    parameters = _params(tmp_path)
    with pytest.raises(ValueError, match="perturbation.data_processing.accept_non_integer_counts"):
        run_pipeline(PIPELINES["perturbation_data"], {"perturbseq_raw": normalized, **params_entries(parameters)})


def test_the_screen_keeps_its_counts_and_the_truth_leaves_varm(screen):
    params = load_parameters("perturbation")["perturbation"]
    checked, truth = check_screen_layout(screen, params)
    assert checked.X is screen.X  # no copy of the matrix
    assert "perturbation_truth_log2fc" not in checked.varm and "perturbation_truth_log2fc" in screen.varm
    assert list(truth["gene"]) == list(screen.var["gene_name"].astype(str))
    labels = checked.obs["gene"].astype(str)
    assert (labels[labels != "non-targeting"] == labels[labels != "non-targeting"].str.upper()).all()


def test_a_screen_with_other_column_names_runs_through_parameters_alone(screen, tmp_path):
    """A real screen's own names (perturbation column, control label, batch, symbols in var_names)."""
    renamed = screen.copy()
    renamed.obs = renamed.obs.rename(columns={"gene": "target_gene", "gem_group": "lane"})
    renamed.obs["target_gene"] = renamed.obs["target_gene"].replace({"non-targeting": "NTC"})
    renamed.var_names = renamed.var["gene_name"].astype(str).to_numpy()
    del renamed.varm["perturbation_truth_log2fc"]
    params = _params(tmp_path)
    params["perturbation"].update(perturbation_column="target_gene", control_label="NTC", batch_column="lane")
    params["perturbation"]["data_processing"].update(gene_symbol_column=None, umap_color_keys=["lane"])
    params["perturbation"]["data_processing"]["qc"].update(min_genes_per_cell=50, min_counts_per_cell=200)
    params["perturbation"]["sentence_conversion"].update(label_columns=["target_gene", "lane"])
    catalog = run_pipeline(SCREEN_PROMPTS, {"perturbseq_raw": renamed, **params_entries(params)})
    split = catalog.load("perturbation_split")
    assert split["test_perturbations"] and all(name != "NTC" for name in split["test_perturbations"])
    assert catalog.load("perturbation_truth").empty  # a real screen has no simulated truth
    test = catalog.load("perturbation_prompts")["test"]
    lanes = renamed.obs["lane"]
    assert (lanes.loc[test["control_cell"]].to_numpy() == lanes.loc[test["perturbed_cell"]].to_numpy()).all()


@pytest.fixture(scope="module")
def labelled_screen():
    """A screen as real screens label it: two double perturbations (A+B) of trained singles, a
    target that is not among the genes (NOTAGENE) and a target whose gene name holds a space."""
    screen = simulate_perturbseq(n_genes=300, n_perturbations=8, cells_per_perturbation=24, n_control_cells=120, seed=3,
                                 n_double_perturbations=2)
    doubles = screen.uns["double_perturbations"]
    in_doubles = {name for pair in doubles["singles"] for name in pair}
    unknown, spaced = sorted(set(screen.uns["perturbation_truth"]["perturbation"]) - in_doubles)[:2]
    labels = screen.obs["gene"].astype(str)
    labels = labels.replace({unknown: "NOTAGENE", spaced: f"{spaced.lower()} variant"})
    screen.obs["gene"] = pd.Categorical(labels)
    screen.var["gene_name"] = screen.var["gene_name"].replace({spaced: f"{spaced} variant"})
    return screen, doubles, spaced


@pytest.fixture(scope="module")
def labelled_outputs(labelled_screen, tmp_path_factory):
    screen, doubles, _ = labelled_screen
    params = _params(tmp_path_factory.mktemp("labelled"))
    params["perturbation"]["data_processing"]["qc"].update(min_genes_per_cell=50, min_counts_per_cell=200)
    params["perturbation"]["split"]["test_perturbations"] = [*doubles["perturbation"], "notagene"]
    pipeline = PIPELINES["perturbation_data"] + PIPELINES["perturbation_finetuning"] + PIPELINES["perturbation_posterior"]
    return run_pipeline(pipeline, {"perturbseq_raw": screen, **params_entries(params)})


def test_a_target_that_is_not_a_gene_is_reported_at_the_screen_s_checks_with_its_cells(labelled_screen, caplog):
    screen, _, spaced = labelled_screen
    with caplog.at_level(logging.WARNING, logger="c2s_kedro.core.data.screen"):
        checked, _ = check_screen_layout(screen, load_parameters("perturbation")["perturbation"])
    warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING and "perturbation targets" in r.message]
    assert len(warnings) == 1 and warnings[0].startswith("perturbation targets not among the screen's genes (1): "
                                                         "NOTAGENE (24 cells). Their 24 cells stay")
    assert f"{spaced}_VARIANT" in set(checked.obs["gene"])  # written as the door writes the gene: one word


def test_the_screen_s_metrics_count_unknown_targets_and_combinations(labelled_outputs, outputs):
    catalog = labelled_outputs
    metrics = catalog.load("perturbation_data_metrics")
    processed = catalog.load("perturbation.processed_adata").obs["gene"].astype(str)
    assert metrics["n_targets_not_among_genes"] == 1
    assert metrics["n_cells_target_not_among_genes"] == (processed == "NOTAGENE").sum() > 0  # after QC
    assert metrics["n_combination_perturbations"] == 2 and metrics["n_combination_cells"] > 0
    assert catalog.load("perturbation_split")["targets"]["targets_not_among_genes"] == {
        "NOTAGENE": int((processed == "NOTAGENE").sum())}
    default = outputs[0].load("perturbation_data_metrics")  # the default screen: nothing to report
    assert default["n_targets_not_among_genes"] == 0 and default["n_combination_perturbations"] == 0


def test_prompts_name_both_targets_and_the_offline_tokenizer_reads_an_unknown_target_as_one_token(
        labelled_outputs, labelled_screen):
    catalog = labelled_outputs
    _, doubles, spaced = labelled_screen
    posterior = catalog.load("perturbation_prompts")["posterior"].to_pandas()
    for label, (a, b) in zip(doubles["perturbation"], doubles["singles"]):
        prompts = posterior.loc[posterior["perturbation"] == label, "model_input"]
        assert len(prompts) and all(f"{a} and {b}" in prompt and label not in prompt for prompt in prompts)
    tokenizer = catalog.load("perturbation_base_model").tokenizer
    assert len(tokenizer(" NOTAGENE", add_special_tokens=False)["input_ids"]) == 1
    assert len(tokenizer(f" {spaced}_VARIANT", add_special_tokens=False)["input_ids"]) == 1  # a gene of the screen
    assert f"{spaced}_VARIANT" in catalog.load("perturbation_split")["train_perturbations"]


def test_baselines_and_knockdown_diagnostics_say_what_they_did_with_combinations_and_unknown_targets(labelled_outputs):
    catalog = labelled_outputs
    metrics = catalog.load("perturbation_posterior_metrics")
    assert metrics["targets.n_combination_perturbations"] == 2 and metrics["targets.n_perturbations_target_not_a_gene"] == 1
    assert metrics["linear_additive.n_perturbations_sum_of_trained_singles"] == 2  # both singles of each were trained
    assert metrics["linear_additive.n_perturbations_mean_change_target_not_a_gene"] == 1
    assert metrics["knockdown_only.n_perturbations_no_gene_to_knock_down"] == 1
    assert metrics["knockdown.n_perturbations_target_not_a_gene"] == 1
    knockdown = catalog.load("perturbation_knockdown")
    heldout = knockdown[knockdown["evaluation"] == "heldout"].drop_duplicates(["perturbation", "target"])
    assert len(heldout) == 2 * 2 + 1  # each target of both doubles, and NOTAGENE
    assert heldout.set_index("target").loc["NOTAGENE", "status"] == "target_not_a_gene"



@pytest.fixture(scope="module")
def quirky_screen():
    """A screen as two lanes of a real screen write it: 30 cells without an assigned guide (NaN), the
    controls of one lane written 'Non-Targeting', and 40 cells without a batch (NaN gem_group)."""
    screen = simulate_perturbseq(n_genes=300, n_perturbations=8, cells_per_perturbation=24, n_control_cells=120, seed=3)
    rng = np.random.default_rng(1)
    labels = screen.obs["gene"].astype(object).to_numpy().copy()
    controls = np.flatnonzero(labels == "non-targeting")
    labels[controls[::2]] = "Non-Targeting"
    labels[rng.choice(np.flatnonzero(labels != "Non-Targeting"), 30, replace=False)] = np.nan
    screen.obs["gene"] = pd.Categorical(labels)
    batches = screen.obs["gem_group"].astype(float).to_numpy().copy()
    batches[rng.choice(screen.n_obs, 40, replace=False)] = np.nan
    screen.obs["gem_group"] = batches
    return screen


@pytest.fixture(scope="module")
def quirky_outputs(quirky_screen, tmp_path_factory):
    params = _params(tmp_path_factory.mktemp("quirky"))
    params["perturbation"]["data_processing"]["qc"].update(min_genes_per_cell=50, min_counts_per_cell=200)
    logger = logging.getLogger("c2s_kedro")
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        catalog = run_pipeline(SCREEN_PROMPTS, {"perturbseq_raw": quirky_screen, **params_entries(params)})
    finally:
        logger.removeHandler(handler)
    return catalog, [record.getMessage() for record in records]


def test_cells_without_a_perturbation_label_are_left_out_counted_and_never_a_perturbation(quirky_outputs, quirky_screen):
    catalog, messages = quirky_outputs
    assert catalog.load("perturbation_data_metrics")["n_cells_without_perturbation"] == 30
    assert any(m.startswith("30 cells have no perturbation label (.obs['gene'] empty") for m in messages)
    split = catalog.load("perturbation_split")
    unlabelled = set(quirky_screen.obs_names[quirky_screen.obs["gene"].isna()])
    cells = {cell for part in ("train", "val", "test", "test_seen", "control_train", "control_val", "control_test")
             for cell in split.get(part, [])}
    assert not cells & unlabelled
    named = {name for part in ("train", "val", "test", "test_seen") for name in split.get(f"{part}_perturbations", [])}
    prompts = catalog.load("perturbation_prompts")
    for part in prompts:
        named |= set(prompts[part]["perturbation"])
        assert not any(re.search(r"\b(NAN|NONE)\b", text) for text in prompts[part]["model_input"])
    assert not named & {"NAN", "nan", "None", "NONE"}


def test_the_control_label_in_two_spellings_is_one_control(quirky_outputs, quirky_screen):
    catalog, messages = quirky_outputs
    raw = quirky_screen.obs["gene"].astype(str)
    assert catalog.load("perturbation_data_metrics")["n_controls_other_spelling"] == (raw == "Non-Targeting").sum()
    assert any("control cells write the control label 'non-targeting' another way: Non-Targeting (" in m for m in messages)
    processed = catalog.load("perturbation.processed_adata").obs["gene"].astype(str)
    assert "NON-TARGETING" not in set(processed)
    split = catalog.load("perturbation_split")
    controls = set(split["control_train"]) | set(split["control_val"]) | set(split["control_test"])
    assert controls == set(processed.index[processed == "non-targeting"])
    assert controls & set(raw.index[raw == "Non-Targeting"]) and controls & set(raw.index[raw == "non-targeting"])
    train = catalog.load("perturbation_prompts")["train"].to_pandas()
    assert "NON-TARGETING" not in set(train["perturbation"])
    control_pairs = train[train["perturbation"] == "non-targeting"]
    assert len(control_pairs) and set(control_pairs["perturbed_cell"]) <= controls


def test_cells_without_a_batch_are_counted_and_paired_with_controls_of_any_batch(quirky_outputs):
    catalog, messages = quirky_outputs
    processed = catalog.load("perturbation.processed_adata").obs
    unbatched = set(processed.index[processed["gem_group"].isna()])
    assert catalog.load("perturbation_data_metrics")["n_cells_without_batch"] == len(unbatched) > 0
    assert any(m.startswith(f"{len(unbatched)} cells have no batch (.obs['gem_group'] empty)") for m in messages)
    split = catalog.load("perturbation_split")
    prompts = catalog.load("perturbation_prompts")
    pairs = pd.concat([prompts[part].to_pandas() for part in ("train", "val", "test")])
    theirs = pairs[pairs["perturbed_cell"].isin(unbatched) & (pairs["perturbation"] != "non-targeting")]
    controls = set(split["control_train"]) | set(split["control_val"]) | set(split["control_test"])
    assert len(theirs) and set(theirs["control_cell"]) <= controls
    assert set(theirs["control_cell"]) - unbatched  # real controls with a batch, not only the other cells without one


def test_a_target_whose_gene_qc_removed_is_a_warning_naming_the_qc_setting(outputs, caplog):
    from c2s_kedro.pipelines.perturbation_data.nodes import split_perturbation_screen

    catalog, params = outputs
    processed = catalog.load("perturbation.processed_adata")
    target = sorted(set(processed.obs[params["perturbation_column"]]) - {params["control_label"]})[0]
    without = processed[:, processed.var_names.str.upper() != target.upper()].copy()  # as min_cells_per_gene drops it
    with caplog.at_level(logging.WARNING):
        split = split_perturbation_screen(without, params)
    assert split["targets"]["targets_not_among_genes"] == {target.upper(): int((processed.obs[params["perturbation_column"]] == target).sum())}
    assert f"perturbation targets not among the screen's genes after QC (perturbation.data_processing.qc.min_cells_per_gene" in caplog.text
