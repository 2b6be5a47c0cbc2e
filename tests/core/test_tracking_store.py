"""The project's SQLite MLflow store survives a first run stopped while MLflow builds it."""

from __future__ import annotations

import re
import signal
import sqlite3
import subprocess
import sys
import time

import mlflow
import pytest

from c2s_kedro.core.tracking import half_created, prepare_sqlite_store


def _open(database) -> list[str]:
    return [e.name for e in mlflow.MlflowClient(f"sqlite:///{database}").search_experiments()]


def test_a_missing_store_is_created_whole(tmp_path):
    database = tmp_path / "mlflow.db"
    prepare_sqlite_store(database)
    assert "Default" in _open(database) and not half_created(database)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]  # no partial file left


def test_a_creation_stopped_midway_leaves_no_store_and_the_next_run_creates_it(tmp_path, monkeypatch):
    database = tmp_path / "mlflow.db"

    class Stopped:  # MLflow has built a table when Ctrl-C comes
        def __init__(self, tracking_uri):
            sqlite3.connect(tracking_uri.removeprefix("sqlite:///")).execute("create table experiments (x)")
            raise KeyboardInterrupt

    monkeypatch.setattr(mlflow, "MlflowClient", Stopped)
    with pytest.raises(KeyboardInterrupt):
        prepare_sqlite_store(database)
    assert not database.exists()
    monkeypatch.undo()
    prepare_sqlite_store(database)
    assert "Default" in _open(database)


CREATE = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
from c2s_kedro.core.tracking import prepare_sqlite_store
print("start", flush=True)
prepare_sqlite_store(sys.argv[1])
"""


@pytest.mark.parametrize("delay", [0.1, 0.4, 0.8])
def test_ctrl_c_while_the_store_is_built_never_breaks_the_next_run(tmp_path, delay):
    database = tmp_path / "mlflow.db"
    process = subprocess.Popen([sys.executable, "-c", CREATE, str(database)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "start"
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=60)
    prepare_sqlite_store(database)
    assert "Default" in _open(database)


OPEN = """
import sys
from c2s_kedro.core.tracking import prepare_sqlite_store
try:
    prepare_sqlite_store(sys.argv[1])
except Exception as error:
    print(f"{type(error).__name__}: {error}")
    sys.exit(1)
"""


def _half_created(database) -> None:
    """What MLflow leaves when stopped mid-migration: some tables, a migration's temporary table, no experiment."""
    with sqlite3.connect(database) as connection:
        connection.execute("create table alembic_version (version_num varchar(32))")
        connection.execute("insert into alembic_version values ('451aebb31d03')")
        connection.execute("create table experiments (experiment_id integer, name text)")
        connection.execute("create table runs (run_uuid text)")
        connection.execute("create table _alembic_tmp_metrics (key text)")


def test_a_half_created_store_without_runs_is_moved_aside_and_created_again(tmp_path, caplog):
    database = tmp_path / "mlflow.db"
    _half_created(database)
    with caplog.at_level("WARNING"):
        prepare_sqlite_store(database)
    assert "Default" in _open(database)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("mlflow.db.half-created-")]
    assert len(aside) == 1 and half_created(aside[0])  # kept, never deleted
    assert "left half-created" in caplog.text and aside[0].name in caplog.text


def test_a_store_with_runs_that_cannot_be_opened_is_left_as_it_is_with_what_to_do(tmp_path):
    database = tmp_path / "mlflow.db"
    prepare_sqlite_store(database)
    client = mlflow.MlflowClient(f"sqlite:///{database}")
    run = client.create_run("0")
    client.set_terminated(run.info.run_id)
    with sqlite3.connect(database) as connection:  # a schema version this MLflow does not know
        connection.execute("update alembic_version set version_num = 'ffffffffffff'")
    before = database.read_bytes()
    # in a new process, as the next `kedro run` (MLflow keeps the stores it opened in this one)
    opened = subprocess.run([sys.executable, "-c", OPEN, str(database)], capture_output=True, text=True, timeout=120)
    assert opened.returncode == 1, opened.stderr
    assert re.search(r"MlflowStoreError: .*holds 1 run\(s\), so it was left as it is.*mlflow db upgrade.*move it aside",
                     opened.stdout), opened.stdout
    assert database.read_bytes() == before
