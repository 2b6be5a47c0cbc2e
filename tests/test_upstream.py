"""c2s_kedro.upstream: a pipeline run alone produces its missing inputs first, in the same run, and
never produces what the user's environment points elsewhere."""

from __future__ import annotations

import os
import sys

import pytest
from kedro.framework.hooks import hook_impl
from kedro.framework.hooks.manager import _create_hook_manager
from kedro.io import DataCatalog
from kedro.pipeline import Pipeline, node
from kedro.runner import SequentialRunner, ThreadRunner
from kedro_datasets.json import JSONDataset

from c2s_kedro.core.errors import C2SError
from c2s_kedro.upstream import (
    EntryMatcher,
    UserEntryMissingError,
    UserModelOverwriteError,
    check_user_entries,
    environment_entries,
    plan,
)
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


def _run(own: Pipeline, catalog, user=(), manager=None, project: Pipeline = PROJECT_PIPELINE, runner=None) -> None:
    """What the project's `kedro run` does: plan, check the plan (the before_pipeline_run hook), run it."""
    user = EntryMatcher(user)
    planned = plan(own, project, catalog, user, "local")
    check_user_entries(planned, [n.name for n in own.nodes], catalog, user, "local")
    (runner or SequentialRunner()).run(planned, catalog, manager)


def test_missing_inputs_are_produced_in_the_same_run_with_node_hooks(catalog):
    manager, recorder = _hooks()
    _run(FINETUNING, catalog, manager=manager)
    assert CALLS == ["make_raw", "process", "train", "fine_tune"]  # report is not needed: not run
    assert recorder.nodes == CALLS  # every upstream node went through the node hooks (MLflow logs their params)
    assert catalog.load("finetuned") == {"weights": 13}
    assert not catalog.exists("report")


def test_any_runner_runs_the_plan(catalog):
    _run(FINETUNING, catalog, runner=ThreadRunner())
    assert sorted(CALLS) == sorted(["make_raw", "process", "train", "fine_tune"])


def test_a_second_run_goes_straight_to_the_pipelines_own_nodes(catalog):
    _run(FINETUNING, catalog)
    CALLS.clear()
    _run(FINETUNING, catalog)
    assert CALLS == ["fine_tune"]  # the own node always runs, even though its output exists


def test_only_the_missing_part_of_the_upstream_runs(catalog):
    catalog.save("raw", {"values": [5]})
    catalog.save("processed", {"values": [10]})
    _run(FINETUNING, catalog)
    assert CALLS == ["train", "fine_tune"]
    assert catalog.load("finetuned") == {"weights": 11}


def test_an_upstream_input_kept_in_memory_is_made_again_by_its_producer(tmp_path):
    """A dataset with no catalog entry lives in memory: a run that needs it runs its producer."""
    CALLS.clear()
    catalog = DataCatalog(datasets={name: JSONDataset(filepath=str(tmp_path / f"{name}.json"))
                                    for name in ("raw", "model", "finetuned")})
    catalog.save("raw", {"values": [1]})
    catalog.save("model", {"weights": 0})
    _run(FINETUNING, catalog)
    assert CALLS == ["process", "fine_tune"]


def test_a_missing_entry_of_the_users_environment_is_an_error_and_nothing_is_produced(catalog):
    with pytest.raises(UserEntryMissingError, match=r"'model' is not saved.*environment 'local'.*node 'train'"):
        _run(FINETUNING, catalog, user=["model"])
    assert CALLS == []  # refused before any node ran
    assert not any(catalog.exists(name) for name in ("raw", "processed", "model"))


def test_an_existing_entry_of_the_user_is_used_and_never_overwritten(catalog):
    catalog.save("model", {"weights": 100})
    _run(FINETUNING, catalog, user=["model"])
    assert CALLS == ["make_raw", "process", "fine_tune"]
    assert catalog.load("model") == {"weights": 100} and catalog.load("finetuned") == {"weights": 101}


def test_a_run_of_every_upstream_node_would_produce_a_user_entry_again_and_is_refused(catalog):
    """A Python session running the whole registered pipeline (upstream included), not the plan."""
    catalog.save("model", {"weights": 100})
    with pytest.raises(UserEntryMissingError, match=r"'model' would be produced again.*run_pipelines"):
        check_user_entries(PROJECT_PIPELINE, ["fine_tune"], catalog, EntryMatcher(["model"]), "local")
    assert catalog.load("model") == {"weights": 100}


def test_a_base_model_of_the_user_is_never_trained_into_even_by_the_pipelines_own_nodes(tmp_path):
    """The default run (or --pipeline=pretraining) with conf/local's foundation_model: refused, not overwritten."""
    CALLS.clear()
    target = tmp_path / "foundation_model.json"
    target.write_text('{"weights": "the user\'s"}')
    catalog = DataCatalog(datasets={"processed": JSONDataset(filepath=str(tmp_path / "p.json")),
                                    "foundation_model": JSONDataset(filepath=str(target))})
    catalog.save("processed", {"values": [1]})
    pretraining = Pipeline([node(_train, "processed", "foundation_model", name="pretrain")])
    with pytest.raises(UserModelOverwriteError, match="node 'pretrain' would write 'foundation_model'.*environment 'local'"):
        _run(pretraining, catalog, user=["foundation_model"], project=pretraining)
    assert "the user's" in target.read_text() and CALLS == []
    _run(pretraining, catalog, project=pretraining)  # the project's own entry: trained
    assert catalog.load("foundation_model") == {"weights": 1}


def test_an_output_of_the_pipeline_that_the_user_points_elsewhere_is_written_there(catalog):
    _run(FINETUNING, catalog, user=["finetuned"])
    assert catalog.load("finetuned") == {"weights": 13}


def test_a_default_input_of_the_user_is_read_and_its_writer_left_out(tmp_path):
    CALLS.clear()
    users = tmp_path / "annotation_raw_adata.json"
    users.write_text('{"values": [7]}')
    catalog = DataCatalog(datasets={"annotation_raw_adata": JSONDataset(filepath=str(users)),
                                    "processed": JSONDataset(filepath=str(tmp_path / "processed.json"))})
    project = Pipeline([node(_raw, None, "annotation_raw_adata", name="write_default"),
                        node(_process, "annotation_raw_adata", "processed", name="process")])
    _run(project, catalog, user=["annotation_raw_adata"], project=project)  # the default run
    assert CALLS == ["process"] and catalog.load("processed") == {"values": [14]}
    assert plan(project.only_nodes("write_default"), project, catalog, EntryMatcher(["annotation_raw_adata"]),
                "local").nodes == []
    with pytest.raises(UserModelOverwriteError, match="'annotation_raw_adata'"):  # a session running it anyway
        check_user_entries(project, ["write_default", "process"], catalog, EntryMatcher(["annotation_raw_adata"]), "local")


def test_user_entries_match_dataset_factory_patterns(catalog):
    with pytest.raises(UserEntryMissingError, match="'processed'"):
        _run(FINETUNING, catalog, user=["{name}ed"])


def test_a_failing_upstream_node_fails_the_run(catalog):
    project = Pipeline([node(_raw, None, "raw", name="make_raw"), node(_broken, "raw", "processed", name="process"),
                        node(_train, "processed", "model", name="train")]) + FINETUNING
    with pytest.raises(RuntimeError, match="upstream node failed"):
        _run(FINETUNING, catalog, project=project)
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
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    from c2s_kedro.upstream import run_pipelines

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
        for run in (run_pipelines, KedroSession.run):  # the project's plan; Kedro's whole registered pipeline
            with KedroSession.create(project_path=root) as session:
                # a typo'd path is not saved; an uncached hub id offline fails its existence check with the advice
                with pytest.raises(C2SError, match="foundation_model"):
                    run(session, pipeline_names=["embedding"])
    finally:
        os.chdir(cwd)
        sys.modules.pop("c2s_kedro.pipeline_registry", None)
    assert not (root / path).exists() and not (root / "data" / "06_models" / "foundation_model").exists()
    assert not (root / "data" / "03_primary" / "processed_adata.h5ad").exists()  # refused before anything ran
    runs = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}").search_runs(
        [e.experiment_id for e in mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}").search_experiments()])
    assert not runs  # refused before kedro-mlflow opens a run: none is left RUNNING


def test_a_perturbation_base_model_of_the_user_is_fine_tuned_and_the_default_one_not_built():
    """perturbation_finetuning builds the offline base model itself, unless your environment sets one."""
    from kedro.io import MemoryDataset

    from c2s_kedro.upstream import own_nodes

    own, project = own_nodes(["perturbation_finetuning"])
    catalog = DataCatalog(datasets={"perturbation_base_model": MemoryDataset("your model")})
    planned = {n.name for n in plan(own, project, catalog, EntryMatcher(["perturbation_base_model"]), "local").nodes}
    assert "initialize_perturbation_model" not in planned
    assert {"format_perturbation_prompts", "finetune_perturbation_model", "perturbation.split_perturbation_screen"} <= planned
    default = {n.name for n in plan(own, project, DataCatalog(), EntryMatcher(), "local").nodes}
    assert "initialize_perturbation_model" in default
