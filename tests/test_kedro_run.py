"""End to end: `kedro run --env test` of the default pipelines on the default PBMC data, in a
temporary copy of the project, then the MLflow run and `kedro viz build` are checked."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import anndata as ad
import pandas as pd
import pytest
from datasets import load_from_disk

from tests.helpers import copy_project

pytestmark = pytest.mark.e2e



def _kedro(project: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "MPLBACKEND": "Agg"}
    result = subprocess.run(
        [sys.executable, "-m", "kedro", *args], cwd=project, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"kedro {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def _new_project(tmp_path_factory) -> Path:
    return copy_project(tmp_path_factory.mktemp("project"))


@pytest.fixture(scope="module")
def project(default_run_project) -> Path:
    """A copy of the project's configuration in a temporary folder (the package is installed),
    after the default `kedro run` of the test environment, its output in run.log (conftest.py:
    made once per session, the notebook tests read it too)."""
    return default_run_project


def test_the_run_starts_without_library_warnings(project: Path):
    """What a user cannot act on is left out (c2s_kedro.library_warnings)."""
    output = (project / "run.log").read_text()
    for noise in ("register_new_resolver", "Add type hints to the `predict` method", "dataset names contain '.'",
                  "'--pipeline' is deprecated"):
        assert noise not in output


def test_an_error_of_the_project_is_one_line_with_its_fix(tmp_path_factory):
    root = _new_project(tmp_path_factory)
    (root / "conf" / "local" / "catalog.yml").write_text(
        "raw_adata:\n  type: c2s_kedro.datasets.H5adDataset\n  filepath: data/01_raw/my_cells.h5ad\n")
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "MPLBACKEND": "Agg"}
    env.pop("C2S_TRACEBACK", None)
    result = subprocess.run([sys.executable, "-m", "kedro", "run", "--pipelines=data_processing"], cwd=root, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: h5ad file not found: {root / 'data' / '01_raw' / 'my_cells.h5ad'}. Put the file there, or point the "
        "catalog entry's filepath at your data (e.g. in conf/local/catalog.yml).")


def test_finetuning_alone_on_a_fresh_project_produces_its_upstream_once(tmp_path_factory):
    root = _new_project(tmp_path_factory)
    _kedro(root, "run", "--env", "test", "--pipelines", "finetuning")
    data = root / "data"
    upstream = [data / "03_primary" / "processed_adata.h5ad", data / "06_models" / "foundation_model" / "model.safetensors"]
    model = data / "06_models" / "finetuned_model" / "model.safetensors"
    assert all(p.exists() for p in upstream) and model.exists()
    before = [p.stat().st_mtime_ns for p in upstream]
    model_before = model.stat().st_mtime_ns
    _kedro(root, "run", "--env", "test", "--pipelines", "finetuning")
    assert [p.stat().st_mtime_ns for p in upstream] == before  # upstream not redone
    assert model.stat().st_mtime_ns != model_before  # the fine-tuning itself runs again


def test_an_explicit_runner_runs_the_pipeline_with_its_upstream_and_no_more(tmp_path_factory):
    root = _new_project(tmp_path_factory)
    _kedro(root, "run", "--env", "test", "--pipelines", "sentence_conversion", "--runner", "SequentialRunner")
    data = root / "data"
    assert (data / "03_primary" / "processed_adata.h5ad").exists() and (data / "04_feature" / "cell_sentences").is_dir()
    assert not (data / "06_models" / "rank_fit.json").exists()  # benchmarking is downstream, not upstream
    before = (data / "03_primary" / "processed_adata.h5ad").stat().st_mtime_ns
    _kedro(root, "run", "--env", "test", "--pipelines", "sentence_conversion", "--runner", "ThreadRunner")
    assert (data / "03_primary" / "processed_adata.h5ad").stat().st_mtime_ns == before


def test_perturbation_posterior_alone_on_a_fresh_project_simulates_trains_and_scores(tmp_path_factory):
    root = _new_project(tmp_path_factory)
    _kedro(root, "run", "--env", "test", "--pipelines", "perturbation_posterior")
    data = root / "data"
    screen = data / "01_raw" / "perturbseq_simulated.h5ad"
    model = data / "06_models" / "perturbation_model" / "model.safetensors"
    assert screen.exists() and model.exists()
    summary = pd.read_csv(data / "08_reporting" / "perturbation_summary.csv")
    heldout = summary[summary["evaluation"] == "heldout"]
    assert len(heldout) == 7 and heldout["n_perturbations"].nunique() == 1  # every method, same perturbations
    before = [screen.stat().st_mtime_ns, model.stat().st_mtime_ns]
    _kedro(root, "run", "--env", "test", "--pipelines", "perturbation_posterior")
    assert [screen.stat().st_mtime_ns, model.stat().st_mtime_ns] == before  # upstream not redone


def test_default_run_leaves_every_output(project: Path):
    data = project / "data"
    raw = ad.read_h5ad(data / "01_raw" / "pbmc68k_counts.h5ad")
    assert raw.shape == (700, 765) and "cell_type" in raw.obs

    processed = ad.read_h5ad(data / "03_primary" / "processed_adata.h5ad")
    assert "counts" in processed.layers and {"X_pca", "X_umap"} <= set(processed.obsm)

    sentences = load_from_disk(str(data / "04_feature" / "cell_sentences"))
    assert sentences.num_rows == processed.n_obs
    assert {"cell_name", "cell_sentence", "cell_type", "tissue", "organism"} <= set(sentences.column_names)
    vocabulary = json.loads((data / "04_feature" / "vocabulary.json").read_text())
    assert list(vocabulary) == [g.upper() for g in processed.var_names]
    first = sentences[0]["cell_sentence"].split(" ")
    assert set(first) <= set(vocabulary)

    rank_fit = json.loads((data / "06_models" / "rank_fit.json").read_text())
    assert rank_fit["slope"] < 0 and rank_fit["r2"] > 0.5
    reconstructed = ad.read_h5ad(data / "07_model_output" / "reconstructed_adata.h5ad")
    assert reconstructed.shape == processed.shape

    for name in ("expression_vs_log_rank.png", "reconstructed_vs_original.png", "umap_original_vs_reconstructed.png"):
        assert (data / "08_reporting" / "benchmarking" / name).stat().st_size > 10_000
    assert (data / "08_reporting" / "expression_umap" / "cell_type.png").exists()
    split = json.loads((data / "05_model_input" / "data_split.json").read_text())
    assert sorted(split["train"] + split["val"] + split["test"]) == sorted(processed.obs_names)

    embeddings = ad.read_h5ad(data / "07_model_output" / "cell_embeddings.h5ad")
    assert embeddings.obsm["X_c2s"].shape == (processed.n_obs, 64) and "X_umap_c2s" in embeddings.obsm
    assert (data / "08_reporting" / "embedding_umap" / "cell_type.png").exists()
    assert (data / "08_reporting" / "pretraining" / "loss_curves.png").exists()
    assert (data / "06_models" / "finetuned_model" / "model.safetensors").exists()
    assert (data / "08_reporting" / "finetuning" / "loss_curves.png").exists()
    predictions = pd.read_csv(data / "07_model_output" / "cell_type_predictions.csv")
    assert len(predictions) == len(split["test"])
    labels = set(pd.read_csv(data / "07_model_output" / "label_scoring_predictions.csv")["prediction"])
    assert labels <= set(raw.obs["cell_type"].astype(str))  # label scoring only ever names known labels
    assert (data / "08_reporting" / "confusion" / "label_scoring.png").exists()
    assert (data / "08_reporting" / "zero_shot_evaluation_metrics.json").exists()
    generated = pd.read_csv(data / "07_model_output" / "generated_cells.csv", index_col=0)
    vocabulary_genes = set(json.loads((data / "04_feature" / "vocabulary.json").read_text()))
    for sentence in generated["cell_sentence"].fillna(""):
        assert set(sentence.split()) <= vocabulary_genes and len(sentence.split()) == len(set(sentence.split()))
    assert (data / "08_reporting" / "cell_generation" / "umap_by_cell_type.png").exists()
    summary = pd.read_csv(data / "08_reporting" / "perturbation_summary.csv")
    assert {"control_mean", "train_perturbed_mean", "linear_additive", "knockdown_only", "coexpression_neighbours", "model_T0.7",
            "model_T1.3"} == set(summary["method"])
    assert (data / "08_reporting" / "perturbation" / "target_presence.png").stat().st_size > 10_000
    assert (data / "08_reporting" / "perturbation" / "posterior_umap.png").stat().st_size > 10_000
    assert ad.read_h5ad(data / "07_model_output" / "posterior_statistics.h5ad").layers["variance"].shape[1] > 0
    for pipeline in ("data_processing", "sentence_conversion", "benchmarking", "pretraining", "embedding", "finetuning", "evaluation",
                     "zero_shot_evaluation", "cell_generation", "perturbation_data_processing", "perturbation_sentence_conversion",
                     "perturbation_data", "perturbation_posterior"):
        metrics = json.loads((data / "08_reporting" / f"{pipeline}_metrics.json").read_text())
        assert metrics and all(v is None or isinstance(v, int | float) for v in metrics.values())


def test_the_foundation_model_opens_with_plain_transformers(project: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = project / "data" / "06_models" / "foundation_model"
    assert (directory / "model.safetensors").exists()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory)
    vocabulary = json.loads((project / "data" / "04_feature" / "vocabulary.json").read_text())
    genes = list(vocabulary)[:50]
    text = "Cell sentence: " + " ".join(genes) + "."
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == 3 + len(genes) + 1  # "Cell", "▁sentence", ":", one token per gene, "."
    assert tokenizer.decode(ids) == text
    assert model.config.max_position_embeddings == 320


def test_the_run_is_one_mlflow_run_with_params_metrics_and_plots(project: Path):
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    client = MlflowClient()
    experiment = client.get_experiment_by_name("c2s_kedro_test")
    runs = [r for r in client.search_runs([experiment.experiment_id]) if r.info.run_name == "all pipelines"]
    assert len(runs) == 1  # named after what ran, not __default__
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["c2s.pid"].isdigit()
    # <pipeline>/<metric>: one chart section per pipeline in the UI; nothing MLflow refuses, no dot inside a temperature
    assert all(re.fullmatch(r"[A-Za-z0-9_\-]+/[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*", name) for name in run.data.metrics)
    assert "perturbation_posterior/model_T1_3.pearson_delta" in run.data.metrics
    assert run.info.artifact_uri.startswith(str(project / "mlruns"))
    assert run.data.params["data_processing.qc.min_genes_per_cell"] == "50"
    written = json.loads((project / "data" / "08_reporting" / "benchmarking_metrics.json").read_text())
    assert run.data.metrics["benchmarking/rank_fit_slope"] == pytest.approx(written["rank_fit_slope"])
    assert "sentence_conversion/n_cells" in run.data.metrics
    assert "embedding/c2s_knn_label_accuracy" in run.data.metrics
    loss_steps = client.get_metric_history(run.info.run_id, "pretraining/loss")
    assert len(loss_steps) >= 3 and len({m.step for m in loss_steps}) == len(loss_steps)
    assert client.get_metric_history(run.info.run_id, "pretraining/eval_loss")
    assert len(client.get_metric_history(run.info.run_id, "finetuning/loss")) >= 3
    assert client.get_metric_history(run.info.run_id, "finetuning/learning_rate")
    assert {"evaluation/label_scoring_accuracy", "evaluation/baseline_accuracy", "evaluation/generation_accuracy"} <= set(run.data.metrics)

    def walk(path=None):
        for item in client.list_artifacts(run.info.run_id, path):
            yield from walk(item.path) if item.is_dir else [item.path]

    artifacts = set(walk())
    assert {"plots/benchmarking/expression_vs_log_rank.png", "plots/benchmarking/umap_original_vs_reconstructed.png", "data/vocabulary.json", "plots/pretraining/loss_curves.png", "plots/finetuning/loss_curves.png"} <= artifacts
    assert "plots/expression_umap/cell_type.png" in artifacts
    assert not [path for path in artifacts if path.startswith("plots/") and path.count("/") == 1]  # each in its pipeline's folder
    assert {"plots/perturbation/posterior_pca.png", "plots/perturbation/loss_curves.png", "tables/perturbation_summary.csv"} <= artifacts
    assert "perturbation_posterior/linear_additive.pearson_delta" in run.data.metrics
    assert client.get_metric_history(run.info.run_id, "perturbation_finetuning/loss")
    # the screen's namespaced processing logs under its own prefix and parameters
    assert "perturbation_data_processing/cells_after" in run.data.metrics
    assert run.data.params["perturbation.data_processing.qc.min_genes_per_cell"] == "500"
    assert "plots/perturbation/expression_vs_log_rank.png" in artifacts
    # folders of plots land once under their own name, not twice
    assert {"plots/perturbation/expression_umap/not_embedded.png", "plots/confusion/label_scoring.png",
            "plots/zero_shot_confusion/label_scoring.png", "plots/cell_generation/umap_by_cell_type.png"} <= artifacts
    # the expression baseline is the same predictions in both evaluations: its confusion matrix is stored once
    assert "plots/confusion/baseline.png" in artifacts and "plots/zero_shot_confusion/baseline.png" not in artifacts


def test_a_pipeline_reruns_alone_from_persisted_outputs(project: Path):
    before = (project / "data" / "03_primary" / "processed_adata.h5ad").stat().st_mtime_ns
    _kedro(project, "run", "--env", "test", "--pipelines", "benchmarking")
    assert (project / "data" / "03_primary" / "processed_adata.h5ad").stat().st_mtime_ns == before


def test_kedro_viz_build_shows_every_pipeline_offline(project: Path):
    result = _kedro(project, "viz", "build")
    assert "Layers visualisation is disabled" not in result.stdout + result.stderr
    for view in (project / "build" / "api" / "pipelines").iterdir():
        shown = json.loads(view.read_text())
        assert shown["layers"] and all(n.get("layer") for n in shown["nodes"] if n["type"] == "data"), view.name
    main = json.loads((project / "build" / "api" / "main").read_text())
    assert {p["id"] for p in main["pipelines"]} >= {"data_processing", "sentence_conversion", "benchmarking", "pretraining", "embedding", "finetuning", "evaluation", "cell_type_evaluation", "zero_shot_annotation",
                                                      "cell_generation", "perturbation_data", "perturbation_finetuning", "perturbation_posterior"}
    names = {n["name"] for n in main["nodes"]}
    assert {"raw_adata", "processed_adata", "cell_sentences", "vocabulary", "rank_fit", "reconstructed_adata", "foundation_model", "cell_embeddings", "data_split", "finetuned_model"} <= names
    # the screen flows through the atlas's boxes, in its own namespace (one box to expand in kedro-viz)
    screen = json.loads((project / "build" / "api" / "pipelines" / "perturbation_data").read_text())
    in_box = {n["name"] for n in screen["nodes"] if n["type"] == "task" and n.get("modular_pipelines") == ["perturbation"]}
    assert {"validate_raw_adata", "filter_cells_and_genes", "convert_to_cell_sentences", "fit_rank_to_expression",
            "split_perturbation_screen"} <= in_box
    assert "perturbation" in screen["modular_pipelines"]


def _epochs_per_step(project: Path) -> float:
    log = json.loads((project / "data" / "08_reporting" / "finetuning_log.json").read_text())
    last = next(entry for entry in reversed(log) if "loss" in entry)
    return last["epoch"] / last["step"]


def test_finetuning_in_two_processes_is_one_kedro_run_with_ddp_on_cpu(project: Path):
    """The node starts 2 training processes (DDP on CPU, gloo): one kedro run, one MLflow run with
    the steps of rank 0, and a model that opens with plain transformers."""
    import mlflow
    from mlflow import MlflowClient
    from transformers import AutoModelForCausalLM

    single_process = _epochs_per_step(project)
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    client = MlflowClient()
    experiment = client.get_experiment_by_name("c2s_kedro_test")

    def finetuning_runs() -> list:
        return [r for r in client.search_runs([experiment.experiment_id]) if r.info.run_name == "finetuning"]

    before = len(finetuning_runs())
    _kedro(project, "run", "--env", "test", "--pipelines", "finetuning", "--params", "finetuning.processes=2")
    runs = finetuning_runs()
    assert len(runs) == before + 1 and runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "finetuning/loss")]
    assert steps and steps == sorted(set(steps))  # logged once per step, by rank 0
    assert _epochs_per_step(project) == pytest.approx(2 * single_process, rel=0.05)  # each step takes a batch per process
    AutoModelForCausalLM.from_pretrained(project / "data" / "06_models" / "finetuned_model")
