"""End to end on the copy of the project after the default `kedro run --env test` (conftest.py, shared
with test_kedro_run and the notebooks): the annotation's outputs; the run's MLflow model c2s_annotator
gives the pipeline's numbers through `mlflow.pyfunc.load_model`, `mlflow models predict` and
`mlflow models serve`; another raw-count h5ad (another gene set, no labels) is annotated through the
catalog alone. (test_kedro_run checks `--pipelines=finetuning` alone on a fresh project.)"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.e2e

MLFLOW = str(Path(sys.executable).with_name("mlflow"))


def _environment(project: Path) -> dict[str, str]:
    # the environment's bin/ first, as in an activated venv: mlflow models serve starts its uvicorn from PATH
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, "KEDRO_DISABLE_TELEMETRY": "1", "MPLBACKEND": "Agg",
            "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}


def _run(project: Path, *command: str, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(list(command), cwd=project, env=_environment(project), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def _kedro(project: Path, *args: str) -> subprocess.CompletedProcess:
    return _run(project, sys.executable, "-m", "kedro", "run", "--env", "test", *args)


@pytest.fixture(scope="module")
def project(default_run_project) -> Path:
    return default_run_project


def _model_uri(project: Path) -> str:
    logged = json.loads((project / "data" / "06_models" / "annotator_mlflow_model.json").read_text())
    assert logged["logged"] and logged["model_uri"].endswith("/c2s_annotator")
    return logged["model_uri"]


def _counts_table(project: Path, n_cells: int | None = None) -> pd.DataFrame:
    """The default annotation input (test split's raw counts) as a cells x genes table; the first
    cells, so that every cell keeps its position (ties between equal counts are broken by it)."""
    raw = ad.read_h5ad(project / "data" / "01_raw" / "annotation_counts.h5ad")[:n_cells]
    return pd.DataFrame(raw.X.toarray().astype(int), index=raw.obs_names, columns=raw.var_names)


def _pipeline_predictions(project: Path, n_cells: int | None = None) -> pd.DataFrame:
    return pd.read_csv(project / "data" / "07_model_output" / "annotation_predictions.csv").iloc[:n_cells]


def _assert_same(predicted: pd.DataFrame, expected: pd.DataFrame) -> None:
    assert list(predicted.columns) == list(expected.columns)
    assert predicted["cell"].astype(str).tolist() == expected["cell"].astype(str).tolist()
    assert predicted["label"].tolist() == expected["label"].tolist()
    numbers = expected.columns[2:]
    difference = np.nanmax(np.abs(predicted[numbers].to_numpy(float) - expected[numbers].to_numpy(float)))
    assert np.allclose(predicted[numbers].to_numpy(float), expected[numbers].to_numpy(float), rtol=1e-6, atol=1e-9,
                       equal_nan=True), f"largest difference {difference}"


def test_the_annotation_leaves_its_outputs_and_the_run_a_loadable_annotator(project: Path):
    import mlflow

    annotated = ad.read_h5ad(project / "data" / "07_model_output" / "annotated_adata.h5ad")
    predictions = _pipeline_predictions(project)
    labels = list(annotated.uns["c2s_labels"])
    assert len(labels) == 10 and list(predictions.columns) == ["cell", "label", "confidence", *labels]
    assert {"X_c2s", "X_umap_c2s", "c2s_label_probabilities"} <= set(annotated.obsm)
    assert {"c2s_cell_type", "c2s_confidence"} <= set(annotated.obs.columns)
    metrics = json.loads((project / "data" / "08_reporting" / "annotation_metrics.json").read_text())
    assert metrics["n_cells"] == len(predictions) and "accuracy" in metrics and "macro_f1" in metrics
    assert (project / "data" / "08_reporting" / "annotation" / "umap_c2s_cell_type.png").exists()

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model(_model_uri(project))
    _assert_same(model.predict(_counts_table(project)), predictions)
    # logged in a child run of the pipeline's run: the model lists none of the run's hundreds of metrics as its own
    client = mlflow.MlflowClient()
    logged = client.get_logged_model(model.metadata.model_id)
    assert not logged.metrics
    parent = client.get_run(client.get_run(logged.source_run_id).data.tags["mlflow.parentRunId"])
    assert parent.data.tags["c2s.annotator_run"] == logged.source_run_id and parent.data.metrics


def test_mlflow_models_predict_gives_the_pipelines_numbers(project: Path, tmp_path: Path):
    table = _counts_table(project, 6)
    request = tmp_path / "cells.json"
    request.write_text(json.dumps({"dataframe_split": table.to_dict(orient="split")}))
    answer = tmp_path / "predictions.json"
    _run(project, MLFLOW, "models", "predict", "-m", _model_uri(project), "-i", str(request), "-t", "json",
         "-o", str(answer), "--env-manager", "local")
    predicted = pd.DataFrame(json.loads(answer.read_text())["predictions"])
    _assert_same(predicted, _pipeline_predictions(project, 6))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_mlflow_models_serve_answers_a_request(project: Path):
    port = _free_port()
    server = subprocess.Popen(
        [MLFLOW, "models", "serve", "-m", _model_uri(project), "-h", "127.0.0.1", "-p", str(port), "--env-manager", "local"],
        cwd=project, env=_environment(project), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, "mlflow models serve exited before it answered"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert time.monotonic() < deadline, "mlflow models serve did not come up"
                time.sleep(2)
        table = _counts_table(project, 3)
        body = json.dumps({"dataframe_split": table.to_dict(orient="split")}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            predicted = pd.DataFrame(json.loads(response.read())["predictions"])
        _assert_same(predicted, _pipeline_predictions(project, 3))
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)


def test_another_gene_set_without_labels_through_the_catalog_alone(project: Path, tmp_path: Path):
    default = project / "data" / "01_raw" / "annotation_counts.h5ad"
    before = default.stat().st_mtime_ns
    raw = ad.read_h5ad(default)
    other = raw[:, 40:].copy()  # fewer genes, some renamed to genes the model never saw
    other.var_names = [*other.var_names[:-3], "NOTAGENE1", "NOTAGENE2", "NOTAGENE3"]
    other.obs = pd.DataFrame(index=[f"new_cell_{i}" for i in range(other.n_obs)])
    other.write_h5ad(tmp_path / "other.h5ad")
    local = project / "conf" / "test" / "catalog.yml"  # the run's environment (conf/local is read only by the default one)
    local.write_text(f"annotation_raw_adata:\n  type: c2s_kedro.datasets.H5adDataset\n  filepath: {tmp_path / 'other.h5ad'}\n")
    try:
        _kedro(project, "--pipelines", "annotation")
    finally:
        local.unlink()
    assert default.stat().st_mtime_ns == before
    predictions = _pipeline_predictions(project)
    assert predictions["cell"].tolist() == list(other.obs_names)
    metrics = json.loads((project / "data" / "08_reporting" / "annotation_metrics.json").read_text())
    assert "accuracy" not in metrics and metrics["n_genes"] == other.n_vars
    # matched: the file's genes the model's training prompts held (its top-k genes of the train cells),
    # never the 3 renamed ones
    config = json.loads((project / "data" / "06_models" / "finetuned_model" / "config.json").read_text())
    known = set(config["c2s_annotator"]["genes"])
    expected = sum(gene.upper() in known for gene in other.var_names)
    assert not {"NOTAGENE1", "NOTAGENE2", "NOTAGENE3"} & known and 0 < expected <= other.n_vars - 3
    assert metrics["n_genes_matched"] == expected
