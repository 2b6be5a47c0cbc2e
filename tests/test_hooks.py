"""Project hooks: the parameter namespace of the running node, and the MLflow run."""

from kedro.pipeline import node, pipeline

from c2s_kedro.hooks import ParameterNamespaceHook
from c2s_kedro.parameters import PARAMETER_NAMESPACE, qualified


def _identity(x, params):
    return x


def test_namespaced_parameters_make_messages_name_the_namespaced_setting():
    base = pipeline([node(_identity, ["raw_adata", "params:data_processing.qc"], "qc_adata", name="filter")])
    screen = pipeline(base, namespace="perturbation")
    hook = ParameterNamespaceHook()
    hook.before_node_run(screen.nodes[0])
    assert qualified("data_processing.qc") == "perturbation.data_processing.qc"
    hook.before_node_run(base.nodes[0])
    assert qualified("data_processing.qc") == "data_processing.qc"


def test_a_namespace_whose_parameters_are_shared_keeps_the_plain_setting():
    """zero_shot.* nodes read the evaluation's own parameters: their messages name evaluation.*"""
    base = pipeline([node(_identity, ["prompts", "params:evaluation"], "scores", name="score")])
    zero_shot = pipeline(base, namespace="zero_shot", parameters={"params:evaluation": "params:evaluation"})
    ParameterNamespaceHook().before_node_run(zero_shot.nodes[0])
    assert PARAMETER_NAMESPACE.get() is None
    assert qualified("evaluation.batch_size") == "evaluation.batch_size"


# ---- the MLflow run: its name, killed runs ------------------------------------------

import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import mlflow  # noqa: E402
import pytest  # noqa: E402
from mlflow import MlflowClient  # noqa: E402


@pytest.fixture
def store(tmp_path):
    """A fresh SQLite MLflow store in tmp_path, as the tracking URI of this test."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.set_experiment("killed-runs").experiment_id
    yield MlflowClient(uri), experiment
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def test_the_run_is_named_after_the_pipelines_run():
    from c2s_kedro.hooks import run_name

    assert run_name(["finetuning"]) == "finetuning"
    assert run_name(["finetuning", "evaluation"]) == "finetuning + evaluation"
    assert run_name(None) == run_name(["__default__"]) == "all pipelines"


def test_the_name_hook_sets_the_name_only_when_mlflow_yml_leaves_it_out():
    from types import SimpleNamespace

    from c2s_kedro.hooks import MlflowRunNameHook

    for configured, expected in ((None, "finetuning + evaluation"), ("my run", "my run")):
        config = SimpleNamespace(tracking=SimpleNamespace(run=SimpleNamespace(name=configured)))
        hook = MlflowRunNameHook()
        hook.after_context_created(SimpleNamespace(mlflow=config))
        hook.before_pipeline_run({"pipeline_names": ["finetuning", "evaluation"]})
        assert config.tracking.run.name == expected


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_runs_left_running_by_a_killed_process_end_as_killed_when_the_next_run_starts(store):
    from c2s_kedro.hooks import ENDED_TAG, HOST_TAG, PID_TAG, MlflowRunLivenessHook

    client, experiment = store
    host = socket.gethostname()
    killed = client.create_run(experiment, tags={PID_TAG: str(_dead_pid()), HOST_TAG: host}).info.run_id
    alive = client.create_run(experiment, tags={PID_TAG: str(os.getpid()), HOST_TAG: host}).info.run_id
    elsewhere = client.create_run(experiment, tags={PID_TAG: str(_dead_pid()), HOST_TAG: "another-machine"}).info.run_id
    with mlflow.start_run(experiment_id=experiment) as current:
        MlflowRunLivenessHook().before_pipeline_run()
        assert client.get_run(current.info.run_id).data.tags[PID_TAG] == str(os.getpid())
    assert client.get_run(killed).info.status == "KILLED"
    assert current.info.run_id in client.get_run(killed).data.tags[ENDED_TAG]
    assert client.get_run(alive).info.status == "RUNNING"  # its process (this one) still runs
    assert client.get_run(elsewhere).info.status == "RUNNING"  # another machine's process cannot be checked from here
    assert client.get_run(current.info.run_id).info.status == "FINISHED"


@pytest.mark.parametrize("stop", ["ctrl_c", "sigterm"])
def test_a_run_stopped_by_ctrl_c_or_sigterm_ends_as_killed(store, stop):
    from c2s_kedro.stopping import Terminated, killed_runs_end_as_killed

    client, experiment = store
    expected = KeyboardInterrupt if stop == "ctrl_c" else Terminated
    with pytest.raises(expected) as raised:
        with killed_runs_end_as_killed():
            run = mlflow.start_run(experiment_id=experiment)
            if stop == "ctrl_c":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)
    assert mlflow.active_run() is None
    assert client.get_run(run.info.run_id).info.status == "KILLED"
    if stop == "sigterm":
        assert raised.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed afterwards


def _ctrl_c_then(what: str) -> None:
    """Ctrl-C while a library runs: it turns the interrupt into its own error, or swallows it."""
    try:
        os.kill(os.getpid(), signal.SIGINT)
    except KeyboardInterrupt:
        if what == "converted":
            raise RuntimeError("compilation failed")  # as numba/llvmlite do when interrupted mid-compile
        # "swallowed": a ctypes callback or __del__ prints "Exception ignored in ..." and goes on


@pytest.fixture
def ctrl_c_reaches_python():
    """Ctrl-C as in a terminal: a process started in the background of a script (a CI job, `cmd &`)
    inherits SIGINT ignored, and Python then never raises KeyboardInterrupt."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("what", ["converted", "swallowed"])
def test_ctrl_c_that_a_library_turns_into_an_error_or_swallows_still_ends_the_run_killed(store, what,
                                                                                         ctrl_c_reaches_python):
    from kedro.io import DataCatalog, MemoryDataset
    from kedro.framework.hooks.manager import _create_hook_manager
    from kedro.pipeline import Pipeline
    from kedro.runner import SequentialRunner

    from c2s_kedro.hooks import StopBetweenNodesHook
    from c2s_kedro.stopping import killed_runs_end_as_killed

    client, experiment = store
    ran = []
    first = node(lambda: _ctrl_c_then(what) or 1, None, "a", name="native_code")
    second = node(lambda a: ran.append("after") or a, "a", "b", name="next_node")
    hooks = _create_hook_manager()
    hooks.register(StopBetweenNodesHook())
    with pytest.raises(KeyboardInterrupt):
        with killed_runs_end_as_killed():
            run = mlflow.start_run(experiment_id=experiment)
            SequentialRunner().run(Pipeline([first, second]), DataCatalog({"b": MemoryDataset()}), hooks)
    assert ran == []  # the node after the Ctrl-C never ran
    assert client.get_run(run.info.run_id).info.status == "KILLED"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C is Python's again


def test_an_error_without_ctrl_c_is_left_to_kedro_mlflow(store):
    from c2s_kedro.stopping import killed_runs_end_as_killed

    client, experiment = store
    with pytest.raises(ValueError), killed_runs_end_as_killed():
        run = mlflow.start_run(experiment_id=experiment)
        raise ValueError("a node failed")
    assert client.get_run(run.info.run_id).info.status == "RUNNING"  # kedro-mlflow's on_pipeline_error ends it FAILED
    mlflow.end_run()


def test_an_orchestrators_run_is_left_open(store):
    from c2s_kedro.stopping import killed_runs_end_as_killed

    client, experiment = store
    with mlflow.start_run(experiment_id=experiment) as outer:
        with pytest.raises(KeyboardInterrupt), killed_runs_end_as_killed():
            raise KeyboardInterrupt
        assert mlflow.active_run().info.run_id == outer.info.run_id
    assert client.get_run(outer.info.run_id).info.status == "FINISHED"


def test_a_resumed_training_names_the_run_whose_checkpoints_it_continues(store, tmp_path):
    from c2s_kedro.core.tracking import RESUMES_TAG, note_resumed_run, record_training_run

    client, experiment = store
    checkpoints = tmp_path / "checkpoints"
    with mlflow.start_run(experiment_id=experiment) as first:
        assert note_resumed_run(checkpoints) is None
        record_training_run(checkpoints)
    with mlflow.start_run(experiment_id=experiment) as second:
        assert note_resumed_run(checkpoints) == first.info.run_id
        record_training_run(checkpoints)
    assert client.get_run(second.info.run_id).data.tags[RESUMES_TAG] == first.info.run_id
    assert RESUMES_TAG not in client.get_run(first.info.run_id).data.tags


def test_the_store_hook_finds_the_sqlite_file_as_kedro_mlflow_reads_the_uri(tmp_path):
    from c2s_kedro.hooks import sqlite_store_path

    assert sqlite_store_path("sqlite:///mlflow.db", tmp_path) == tmp_path / "mlflow.db"
    assert sqlite_store_path(f"sqlite:///{tmp_path}/runs/mlflow.db", "/elsewhere") == tmp_path / "runs" / "mlflow.db"
    assert sqlite_store_path("mlruns", tmp_path) is None
    assert sqlite_store_path("http://tracking.example:5000", tmp_path) is None


def test_settings_in_conf_local_that_another_environment_does_not_read_are_named(tmp_path):
    from c2s_kedro.hooks import unread_local_settings

    local = tmp_path / "local"
    local.mkdir()
    (local / ".gitkeep").touch()
    (local / "credentials.yml").write_text("# nothing yet\n")
    assert unread_local_settings(tmp_path, "test") == []  # nothing to miss
    (local / "catalog.yml").write_text("raw_adata:\n  filepath: /data/mine.h5ad\n")
    assert unread_local_settings(tmp_path, "test") == ["catalog.yml"]
    assert unread_local_settings(tmp_path, "local") == []  # read: the default environment


def test_the_run_tags_read_as_words_not_object_printouts(store):
    from c2s_kedro.hooks import MlflowRunTagsHook, readable_tags

    params = {"runner": "<kedro.runner.sequential_runner.SequentialRunner object at 0x7efc1a2b3c40>",
              "run_id": "2026-12-07T09.01.02.345Z"}
    assert readable_tags(params) == {"runner": "SequentialRunner", "kedro_session_id": "2026-12-07T09.01.02.345Z"}
    assert readable_tags({"runner": "SequentialRunner", "run_id": None}) == {}
    client, experiment = store
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.set_tags({k: v for k, v in params.items()})  # what kedro-mlflow sets from Kedro's run parameters
        MlflowRunTagsHook().before_pipeline_run(params)
    tags = client.get_run(run.info.run_id).data.tags
    assert tags["runner"] == "SequentialRunner" and tags["kedro_session_id"] == params["run_id"] and "run_id" not in tags
