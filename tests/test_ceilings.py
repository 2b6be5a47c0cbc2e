"""Every score of the default run has its ceiling beside it, in its metrics file and in the MLflow
run (the session's one default `kedro run --env test`, conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.e2e


def _metrics(project: Path, name: str) -> dict[str, float]:
    return json.loads((project / "data" / "08_reporting" / f"{name}_metrics.json").read_text())


def test_each_score_and_its_ceiling_are_in_the_same_metrics_file(default_run_project: Path):
    generation = _metrics(default_run_project, "cell_generation")
    for name in ("real_classifier_accuracy_on_generated_types", "real_classifier_accuracy_on_reconstructed_real"):
        assert 0.0 <= generation[name] <= 1.0
    assert generation["n_reconstructed_real_cells"] > 0
    # real cells rebuilt from their own sentences: the classifier of real types recognises most of them
    assert generation["real_classifier_accuracy_on_reconstructed_real"] > 0.5

    for name in ("evaluation", "zero_shot_evaluation"):
        annotation = _metrics(default_run_project, name)
        assert annotation["sentence_baseline_accuracy"] > 0.5  # ten types: well above chance
    # each accuracy is the share of right answers in the predictions the run wrote
    annotation = _metrics(default_run_project, "evaluation")
    for method in ("generation", "label_scoring", "baseline", "sentence_baseline"):
        table = pd.read_csv(default_run_project / "data" / "07_model_output" / f"{method}_predictions.csv")
        assert annotation[f"{method}_accuracy"] == pytest.approx((table["label"] == table["prediction"]).mean())
        assert annotation["n_scored_cells"] == len(table)

    perturbation = _metrics(default_run_project, "perturbation_posterior")
    assert -1.0 <= perturbation["observed_cells.pearson_delta_simulated_truth"] <= 1.0
    # cell-eval's ceiling where it is defined (agreement metrics whose two halves agree at all)
    ceilings = {key: value for key, value in perturbation.items() if key.startswith("cell_eval_ceiling.")}
    assert ceilings and all(0.0 < value <= 1.0 for value in ceilings.values())
    assert set(ceilings) <= {f"cell_eval_ceiling.{m}" for m in ("pearson_delta", "overlap_at_N", "de_direction_match",
                                                                 "discrimination_score_l1")}
    for method in ("model_T0.7", "model_T1.3", "control_mean", "linear_additive"):
        for metric in ("pearson_delta", "mse", "discrimination_score_l1"):
            assert f"{method}.{metric}" in perturbation
            assert 0.0 <= perturbation[f"{method}.{metric}_normalized"] <= 1.0
        assert 0.0 <= perturbation[f"{method}.mean_normalized_score"] <= 1.0
    assert not any(key.startswith("train_perturbed_mean.") and key.endswith("_normalized") for key in perturbation)


def test_the_ceilings_are_in_the_mlflow_run(default_run_project: Path):
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{default_run_project / 'mlflow.db'}")
    client = MlflowClient()
    experiment = client.get_experiment_by_name("c2s_kedro_test")
    run = next(r for r in client.search_runs([experiment.experiment_id]) if r.info.run_name == "all pipelines")
    written = _metrics(default_run_project, "perturbation_posterior")
    ceilings = {key: value for key, value in written.items() if key.startswith("cell_eval_ceiling.")}
    assert ceilings and all(run.data.metrics[f"perturbation_posterior/{key}"] == pytest.approx(value) for key, value in ceilings.items())
    assert run.data.metrics["perturbation_posterior/model_T1_3.pearson_delta_normalized"] == pytest.approx(
        written["model_T1.3.pearson_delta_normalized"])
    assert {"cell_generation/real_classifier_accuracy_on_reconstructed_real", "evaluation/sentence_baseline_accuracy",
            "zero_shot_evaluation/sentence_baseline_macro_f1", "perturbation_posterior/model_T0_7.mse_normalized",
            "perturbation_posterior/observed_cells.pearson_delta_simulated_truth"} <= set(run.data.metrics)
