"""Metric names in MLflow: ``<pipeline>/<metric>`` (one chart section per pipeline), no other slash,
no characters MLflow refuses, no dot inside a temperature; the training callback and the metrics files
go through the same names."""

from __future__ import annotations

import re

import pytest

from c2s_kedro.core.tracking import mlflow_metric_name, mlflow_metrics

SAFE = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("cell_generation.mean_expression_correlation_CD4+/CD25 T Reg", "cell_generation.mean_expression_correlation_CD4_CD25_T_Reg"),
        ("evaluation.f1[CD14+ Monocyte]", "evaluation.f1_CD14_Monocyte"),
        ("perturbation.model_T1.3.pearson_delta", "perturbation.model_T1_3.pearson_delta"),
        ("perturbation.model_T0.7.overlap_at_N", "perturbation.model_T0_7.overlap_at_N"),
        ("finetuning.eval_loss", "finetuning.eval_loss"),
        ("perturbation_data_processing.cells_removed_max_pct_mito", "perturbation_data_processing.cells_removed_max_pct_mito"),
    ],
)
def test_names_are_mlflow_safe(name, expected):
    assert mlflow_metric_name(name) == expected
    assert SAFE.match(mlflow_metric_name(name))


def test_every_name_the_project_can_write_is_safe():
    hostile = ["a/b", "x+y", "l[0]", "T1.3", "  spaced  name ", "dots..twice", "é", "CD4+/CD25 T Reg", "model_T1.3.x"]
    for name in hostile:
        assert SAFE.match(mlflow_metric_name(name)), name
        assert not set("/+[] ") & set(mlflow_metric_name(name))


def test_each_pipeline_is_one_chart_section():
    logged = mlflow_metrics({"f1[CD4+/CD25 T Reg]": 0.5, "model_T1.3.pearson_delta": 0.2}, section="evaluation")
    assert logged == {"evaluation/f1_CD4_CD25_T_Reg": 0.5, "evaluation/model_T1_3.pearson_delta": 0.2}
    assert all(name.count("/") == 1 for name in logged)


def test_non_finite_values_are_skipped_and_colliding_names_keep_the_first(caplog):
    logged = mlflow_metrics({"f1[CD4+]": 0.5, "f1[CD4/]": 0.7, "nan": float("nan"), "none": None})
    assert logged == {"f1_CD4": 0.5}
    assert "f1[CD4/]" in caplog.text and "f1_CD4" in caplog.text


def test_the_training_callback_logs_safe_names_with_steps(tmp_path):
    import mlflow
    from mlflow import MlflowClient
    from transformers import TrainerState

    from c2s_kedro.core.models.training import MlflowStepLogger

    uri = f"sqlite:///{tmp_path}/steps.db"
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.set_experiment("step-names")
        state = TrainerState()
        state.global_step = 3
        with mlflow.start_run() as run:
            MlflowStepLogger("perturbation_finetuning").on_log(None, state, None, logs={"loss": 2.0, "eval_cell_type_prediction_loss": 1.5,
                                                                                  "grad_norm": float("inf")})
        history = MlflowClient(uri).get_metric_history(run.info.run_id, "perturbation_finetuning/loss")
        assert [(m.step, m.value) for m in history] == [(3, 2.0)]
        assert set(MlflowClient(uri).get_run(run.info.run_id).data.metrics) == {
            "perturbation_finetuning/loss", "perturbation_finetuning/eval_cell_type_prediction_loss"}
    finally:
        mlflow.set_tracking_uri(None)
