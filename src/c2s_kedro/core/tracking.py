"""Numbers to the active MLflow run: the one place where metric names are made MLflow-safe.

The project's names carry cell types (``CD4+/CD25 T Reg``), labels in brackets and temperatures
(``model_T1.3``). MLflow splits chart sections on ``/`` and refuses ``+`` and ``[``, so in MLflow
a name keeps letters, digits, ``_``, ``-`` and the ``.`` between name parts (``finetuning.loss``);
a dot between digits (a temperature) becomes ``_`` (``model_T1_3``), anything else becomes ``_``.
Files (the metrics JSON) keep their own names.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path

logger = logging.getLogger(__name__)


def mlflow_metric_name(name: str) -> str:
    """``name`` as an MLflow-safe metric name (see the module docstring)."""
    name = re.sub(r"(?<=\d)\.(?=\d)", "_", name)
    name = re.sub(r"[^A-Za-z0-9_.\-]+", "_", name)
    parts = [re.sub(r"_{2,}", "_", part).strip("_") or "_" for part in name.split(".")]
    return ".".join(parts)


def mlflow_metrics(metrics: Mapping[str, float | None]) -> dict[str, float]:
    """The finite numbers of ``metrics`` under MLflow-safe names; two names that would become the
    same keep the first, with a warning."""
    safe: dict[str, float] = {}
    sources: dict[str, str] = {}
    for name, value in metrics.items():
        if value is None or not math.isfinite(float(value)):
            continue
        key = mlflow_metric_name(name)
        if key in safe:
            logger.warning("metrics '%s' and '%s' are both '%s' in MLflow; only the first is logged", sources[key], name, key)
            continue
        safe[key], sources[key] = float(value), name
    return safe


def log_metrics(metrics: Mapping[str, float | None], step: int | None = None) -> None:
    """Log ``metrics`` (non-finite ones skipped) to the active MLflow run, if there is one."""
    import mlflow

    if mlflow.active_run() is None:
        return
    safe = mlflow_metrics(metrics)
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
