"""UpstreamRunner: a pipeline run alone produces its missing inputs first, in the same run, and
never produces what the user's environment points elsewhere."""

from __future__ import annotations

import os
import sys

import pytest
from kedro.framework.hooks import hook_impl
from kedro.framework.hooks.manager import _create_hook_manager
from kedro.io import DataCatalog
from kedro.pipeline import Pipeline, node
from kedro_datasets.json import JSONDataset

from c2s_kedro.runner import UpstreamRunner, UserEntryMissingError, UserModelOverwriteError, environment_entries
from tests.helpers import copy_project

CALLS: list[str] = []


def _raw() -> dict:
    CALLS.append("make_raw")
    return {"values": [1, 2, 3]}


def _process(raw: dict) -> dict:
    CALLS.append("process")
    return {"values": [2 * v for v in raw["values"]]}


def _train(processed: dict) -> dict:
    CALLS.append("train")
    return {"weights": sum(processed["values"])}


def _report(processed: dict) -> dict:
    CALLS.append("report")
    return {"n": len(processed["values"])}


def _fine_tune(model: dict, processed: dict) -> dict:
    CALLS.append("fine_tune")
    return {"weights": model["weights"] + 1}


def _broken(raw: dict) -> dict:
    raise RuntimeError("upstream node failed")


UPSTREAM = Pipeline([
    node(_raw, None, "raw", name="make_raw"),
    node(_process, "raw", "processed", name="process"),
    node(_train, "processed", "model", name="train"),
    node(_report, "processed", "report", name="report"),
])
FINETUNING = Pipeline([node(_fine_tune, ["model", "processed"], "finetuned", name="fine_tune")])
PROJECT_PIPELINE = UPSTREAM + FINETUNING


class _Recorder:
    def __init__(self) -> None:
        self.nodes: list[str] = []

    @hook_impl
    def before_node_run(self, node) -> None:
        self.nodes.append(node.name)


@pytest.fixture
def catalog(tmp_path) -> DataCatalog:
    CALLS.clear()
    return DataCatalog(datasets={name: JSONDataset(filepath=str(tmp_path / f"{name}.json"))
                                 for name in ("raw", "processed", "model", "report", "finetuned")})


def _hooks():
    manager = _create_hook_manager()
    recorder = _Recorder()
    manager.register(recorder)
    return manager, recorder


def test_missing_inputs_are_produced_in_the_same_run_with_node_hooks(catalog):
    manager, recorder = _hooks()
    UpstreamRunner(project_pipeline=PROJECT_PIPELINE).run(FINETUNING, catalog, manager)
    assert CALLS == ["make_raw", "process", "train", "fine_tune"]  # report is not needed: not run
    assert recorder.nodes == CALLS  # every upstream node went through the node hooks (MLflow logs their params)
    assert catalog.load("finetuned") == {"weights": 13}
    assert not catalog.exists("report")


def test_a_second_run_goes_straight_to_the_pipelines_own_nodes(catalog):
    runner = UpstreamRunner(project_pipeline=PROJECT_PIPELINE)
    runner.run(FINETUNING, catalog)
    CALLS.clear()
    runner.run(FINETUNING, catalog)
    assert CALLS == ["fine_tune"]  # the own node always runs, even though its output exists


def test_only_the_missing_part_of_the_upstream_runs(catalog):
    catalog.save("raw", {"values": [5]})
    catalog.save("processed", {"values": [10]})
    UpstreamRunner(project_pipeline=PROJECT_PIPELINE).run(FINETUNING, catalog)
    assert CALLS == ["train", "fine_tune"]
    assert catalog.load("finetuned") == {"weights": 11}


def test_a_missing_entry_of_the_users_environment_is_an_error_and_nothing_is_produced(catalog):
    runner = UpstreamRunner(project_pipeline=PROJECT_PIPELINE, user_entries=["model"], environment="local")
    with pytest.raises(UserEntryMissingError, match=r"'model' is not saved.*environment 'local'.*node 'train'"):
        runner.run(FINETUNING, catalog)
    assert CALLS == []  # refused before any node ran
    assert not any(catalog.exists(name) for name in ("raw", "processed", "model"))


def test_an_existing_entry_of_the_user_is_used_and_never_overwritten(catalog):
    catalog.save("model", {"weights": 100})
    runner = UpstreamRunner(project_pipeline=PROJECT_PIPELINE, user_entries=["model"])
    runner.run(FINETUNING, catalog)
    assert CALLS == ["make_raw", "process", "fine_tune"]
    assert catalog.load("model") == {"weights": 100} and catalog.load("finetuned") == {"weights": 101}


def test_a_base_model_of_the_user_is_never_trained_into_even_by_the_pipelines_own_nodes(tmp_path):
    """The default run (or --pipeline=pretraining) with conf/local's foundation_model: refused, not overwritten."""
    CALLS.clear()
    target = tmp_path / "foundation_model.json"
    target.write_text('{"weights": "the user\'s"}')
    catalog = DataCatalog(datasets={"processed": JSONDataset(filepath=str(tmp_path / "p.json")),
                                    "foundation_model": JSONDataset(filepath=str(target))})
    catalog.save("processed", {"values": [1]})
    pretraining = Pipeline([node(_train, "processed", "foundation_model", name="pretrain")])
    runner = UpstreamRunner(project_pipeline=pretraining, user_entries=["foundation_model"], environment="local")
    with pytest.raises(UserModelOverwriteError, match="node 'pretrain' would write 'foundation_model'.*environment 'local'"):
        runner.run(pretraining, catalog)
    assert "the user's" in target.read_text() and CALLS == []
    UpstreamRunner(project_pipeline=pretraining).run(pretraining, catalog)  # the project's own entry: trained
    assert catalog.load("foundation_model") == {"weights": 1}


def test_user_entries_match_dataset_factory_patterns(catalog):
    runner = UpstreamRunner(project_pipeline=PROJECT_PIPELINE, user_entries=["{name}ed"])
    with pytest.raises(UserEntryMissingError, match="'processed'"):
        runner.run(FINETUNING, catalog)


def test_a_failing_upstream_node_fails_the_run(catalog):
    project = Pipeline([node(_raw, None, "raw", name="make_raw"), node(_broken, "raw", "processed", name="process"),
                        node(_train, "processed", "model", name="train")]) + FINETUNING
    with pytest.raises(RuntimeError, match="upstream node failed"):
        UpstreamRunner(project_pipeline=project).run(FINETUNING, catalog)
    assert not catalog.exists("finetuned")


def test_environment_entries_are_the_keys_added_or_changed_against_base():
    base = {"_h5ad": {"type": "x"}, "raw": {"type": "a", "filepath": "1"}, "model": {"type": "m", "path": "p"}}
    merged = {**base, "model": {"type": "m", "path": "hub/id"}, "mine": {"type": "b"}, "_anchor": {"type": "y"}}
    assert environment_entries(merged, base) == ["mine", "model"]
    assert environment_entries(base, base) == []


@pytest.mark.parametrize("path", ["models/my_c2s_model_typo", "vandijklab/C2S-Pythia-410m-cell-type-prediction"])
def test_a_kedro_session_refuses_to_pretrain_into_a_model_entry_of_the_user(tmp_path, path, monkeypatch):
    """As a user runs it: conf/local overrides foundation_model, `embedding` runs on a fresh
    project. Nothing may be pretrained into that location; the run fails at once, naming it."""
    import mlflow
    from kedro.framework.startup import bootstrap_project

    from c2s_kedro.runner import ProjectSession

    root = copy_project(tmp_path / "project")
    (root / "conf" / "local" / "catalog.yml").write_text(
        f"foundation_model:\n  type: c2s_kedro.datasets.HFModelDataset\n  path: {path}\n"
    )
    # an absolute store: MLflow caches stores by URI, and other tests of this process use sqlite:///mlflow.db
    (root / "conf" / "local" / "mlflow.yml").write_text(f"server:\n  mlflow_tracking_uri: sqlite:///{root}/mlflow.db\n")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no hub here: an uncached hub id must fail at once
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_hf_cache"))
    bootstrap_project(root)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        with ProjectSession.create(project_path=root) as session:  # what `kedro run` creates (settings.SESSION_CLASS)
            with pytest.raises(Exception, match="foundation_model") as error:
                session.run(pipeline_names=["embedding"])
    finally:
        os.chdir(cwd)
        sys.modules.pop("c2s_kedro.pipeline_registry", None)
    assert isinstance(error.value, UserEntryMissingError) or "foundation_model" in str(error.value)
    assert not (root / path).exists() and not (root / "data" / "06_models" / "foundation_model").exists()
    assert not (root / "data" / "03_primary" / "processed_adata.h5ad").exists()  # refused before anything ran
    runs = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}").search_runs(
        [e.experiment_id for e in mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}").search_experiments()])
    assert runs and runs[0].info.status == "FAILED"  # kedro-mlflow ends the run as failed, not RUNNING
