"""A pipeline's headline numbers: a flat JSON object of numbers, also logged to MLflow."""

from __future__ import annotations

import json
import math
import numbers
from pathlib import Path
from typing import Any

import numpy as np
from kedro.io import AbstractDataset

from c2s_kedro.datasets.errors import C2SDatasetError
from c2s_kedro.core.tracking import log_metrics
from c2s_kedro.datasets._atomic import atomic_file


class MetricsDataset(AbstractDataset[dict[str, float], dict[str, float]]):
    """Saves a flat ``{name: number}`` dict as JSON and, when an MLflow run is active (kedro-mlflow
    starts one per ``kedro run``), logs every number as an MLflow metric with ``prefix``.

    Non-finite numbers are written as ``null`` in JSON (JSON has no NaN) and not logged. In MLflow the
    names are made MLflow-safe (``c2s_kedro.core.tracking``); the JSON keeps them as they are.
    """

    def __init__(self, *, filepath: str, prefix: str | None = None, metadata: dict[str, Any] | None = None):
        self._filepath = Path(filepath)
        self._prefix = prefix
        self.metadata = metadata

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "prefix": self._prefix}

    def load(self) -> dict[str, float]:
        if not self._filepath.exists():
            raise C2SDatasetError(f"metrics file not found: {self._filepath}; run the pipeline that writes it")
        return json.loads(self._filepath.read_text())

    def save(self, data: dict[str, float]) -> None:
        bad = {k: type(v).__name__ for k, v in data.items() if isinstance(v, bool | np.bool_) or not isinstance(v, numbers.Real)}
        if bad:
            raise C2SDatasetError(f"metrics must be a flat dict of numbers; not numbers: {bad}")
        clean = {k: (float(v) if math.isfinite(float(v)) else None) for k, v in data.items()}
        with atomic_file(self._filepath, suffix=".json.tmp") as temporary, open(temporary, "w") as stream:
            json.dump(clean, stream, indent=2, sort_keys=True)
        self._log_to_mlflow(clean)

    def _log_to_mlflow(self, metrics: dict[str, float | None]) -> None:
        log_metrics(metrics, section=self._prefix or None)

    def _exists(self) -> bool:
        return self._filepath.exists()
