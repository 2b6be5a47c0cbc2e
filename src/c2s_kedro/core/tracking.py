"""Numbers to the active MLflow run: the one place where metric names are made MLflow-safe.

MLflow's UI groups a run's charts into sections by the part of a name before the first ``/``, so
each name is ``<pipeline>/<metric>`` (``finetuning/loss``, ``perturbation/model_T0_7.pearson_delta``):
one section per pipeline. The metric part carries cell types (``CD4+/CD25 T Reg``), labels in
brackets and temperatures (``model_T1.3``); MLflow refuses ``+`` and ``[``, and a ``/`` there would
start a section of its own, so it keeps letters, digits, ``_``, ``-`` and the ``.`` between name parts;
a dot between digits (a temperature) becomes ``_`` (``model_T1_3``), anything else becomes ``_``.
Files (the metrics JSON) keep their own names.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path

from c2s_kedro.core.errors import C2SError

logger = logging.getLogger(__name__)


def mlflow_metric_name(name: str) -> str:
    """``name`` as an MLflow-safe metric name (see the module docstring)."""
    name = re.sub(r"(?<=\d)\.(?=\d)", "_", name)
    name = re.sub(r"[^A-Za-z0-9_.\-]+", "_", name)
    parts = [re.sub(r"_{2,}", "_", part).strip("_") or "_" for part in name.split(".")]
    return ".".join(parts)


def mlflow_metrics(metrics: Mapping[str, float | None], section: str | None = None) -> dict[str, float]:
    """The finite numbers of ``metrics`` under MLflow-safe names, each ``<section>/<name>`` when a
    section (the pipeline) is given; two names that would become the same keep the first, with a warning."""
    safe: dict[str, float] = {}
    sources: dict[str, str] = {}
    head = f"{mlflow_metric_name(section)}/" if section else ""
    for name, value in metrics.items():
        if value is None or not math.isfinite(float(value)):
            continue
        key = head + mlflow_metric_name(name)
        if key in safe:
            logger.warning("metrics '%s' and '%s' are both '%s' in MLflow; only the first is logged", sources[key], name, key)
            continue
        safe[key], sources[key] = float(value), name
    return safe


def log_metrics(metrics: Mapping[str, float | None], step: int | None = None, section: str | None = None,
                run: Mapping[str, str] | None = None) -> None:
    """Log ``metrics`` (non-finite ones skipped) to the active MLflow run, if there is one, in the
    chart section ``section`` (the pipeline: ``<section>/<name>``). ``run`` (``run_id`` and
    ``tracking_uri``) names the run instead: a training process the node started logs to the
    node's run without making it its own (MLflow would end it when the process exits)."""
    import mlflow

    safe = mlflow_metrics(metrics, section)
    if run is not None and safe:
        import time

        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        mlflow.MlflowClient(run["tracking_uri"]).log_batch(
            run["run_id"], metrics=[Metric(key, value, stamp, step or 0) for key, value in safe.items()])
        return
    if mlflow.active_run() is None:
        return
    if safe:
        mlflow.log_metrics(safe, step=step)


RUN_FILE = "mlflow_run_id"  # in a checkpoint folder: the MLflow run whose training wrote the checkpoints
RESUMES_TAG = "c2s.resumes_run"


def note_resumed_run(checkpoint_dir: str | Path) -> str | None:
    """Tags the active MLflow run with the run whose checkpoints it resumes (``c2s.resumes_run``),
    as recorded by ``record_training_run``; returns that run's id."""
    import mlflow

    run = mlflow.active_run()
    marker = Path(checkpoint_dir) / RUN_FILE
    previous = marker.read_text().strip() if marker.is_file() else None
    if run is not None and previous and previous != run.info.run_id:
        mlflow.set_tag(RESUMES_TAG, previous)
    return previous


def record_training_run(checkpoint_dir: str | Path) -> None:
    """Writes the active MLflow run's id into the checkpoint folder, so that a run resuming these
    checkpoints after this one was killed can say which run it continues."""
    import mlflow

    run = mlflow.active_run()
    if run is None:
        return
    folder = Path(checkpoint_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RUN_FILE).write_text(run.info.run_id)


# ---- the local SQLite store: created whole or not at all ---------------------------------------------

class MlflowStoreError(C2SError, OSError):
    """The project's MLflow store cannot be opened, and it holds runs, so it is left as it is."""


def _store_tables(database: Path) -> dict[str, int | None]:
    """Each table of the SQLite file and, for MLflow's ``alembic_version``, ``experiments`` and
    ``runs``, its number of rows (read only)."""
    import sqlite3

    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
        names = [row[0] for row in connection.execute("select name from sqlite_master where type='table'")]
        return {name: (connection.execute(f'select count(*) from "{name}"').fetchone()[0]  # noqa: S608 - names from the file
                       if name in ("alembic_version", "experiments", "runs") else None) for name in names}


def half_created(database: Path) -> bool:
    """Whether an MLflow SQLite store was left half-made (its creation was stopped): a migration's
    temporary table, no schema version, or no experiment (MLflow adds the Default one last)."""
    tables = _store_tables(database)
    return (any(name.startswith("_alembic_tmp_") for name in tables) or not tables.get("alembic_version")
            or not tables.get("experiments"))


def _create_store(database: Path) -> None:
    """A new MLflow store at ``database``, made under another name and moved into place once whole,
    so a run stopped while MLflow builds its tables (seconds on a first run) leaves no store at all."""
    import mlflow

    partial = database.with_name(database.name + ".creating")
    partial.unlink(missing_ok=True)  # a creation stopped earlier
    mlflow.MlflowClient(f"sqlite:///{partial}").search_experiments(max_results=1)  # builds every table
    os.replace(partial, database)
    logger.info("created the MLflow store %s", database)


def prepare_sqlite_store(database: str | Path) -> None:
    """Makes the project's SQLite MLflow store ready before MLflow opens it: creates a missing one
    whole (``_create_store``); one left half-made by a stopped first run, with no run in it, is moved
    aside (``<name>.half-created-<time>``, never deleted) and created again, with a log line. A store
    that holds runs but cannot be opened is left as it is: ``MlflowStoreError`` says what to do."""
    import mlflow

    database = Path(database)
    if not database.exists():
        database.parent.mkdir(parents=True, exist_ok=True)
        _create_store(database)
        return
    n_runs = _store_tables(database).get("runs") or 0
    if half_created(database) and not n_runs:
        aside = database.with_name(f"{database.name}.half-created-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(database, aside)
        logger.warning("the MLflow store %s was left half-created by a run stopped while MLflow built it (it held no "
                       "run): moved it to %s and created it again", database, aside.name)
        _create_store(database)
        return
    try:
        mlflow.MlflowClient(f"sqlite:///{database}").search_experiments(max_results=1)
    except Exception as error:  # noqa: BLE001 - any failure to open is reported the same way
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise MlflowStoreError(
            f"the MLflow store {database} cannot be opened ({first_line}). It holds {n_runs} run(s), so it was left "
            f"as it is. If an older MLflow made it, upgrade it: mlflow db upgrade sqlite:///{database}; otherwise move "
            f"it aside (mv {database} {database}.old) and run again: a new store is created and your runs stay in the "
            "moved file."
        ) from error
