"""A numpy array stored as .npy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from kedro.io import AbstractDataset

from c2s_kedro.datasets.errors import C2SDatasetError
from c2s_kedro.datasets._atomic import atomic_file


class NpyDataset(AbstractDataset[np.ndarray, np.ndarray]):
    """Loads and saves one numpy array (``np.save`` format, no pickled objects)."""

    def __init__(self, *, filepath: str, metadata: dict[str, Any] | None = None):
        self._filepath = Path(filepath)
        self.metadata = metadata

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}

    def load(self) -> np.ndarray:
        if not self._filepath.exists():
            raise C2SDatasetError(f"array file not found: {self._filepath}; run the pipeline that writes it")
        return np.load(self._filepath, allow_pickle=False)

    def save(self, data: np.ndarray) -> None:
        with atomic_file(self._filepath, suffix=".npy.tmp") as temporary, open(temporary, "wb") as stream:
            np.save(stream, np.asarray(data), allow_pickle=False)

    def _exists(self) -> bool:
        return self._filepath.exists()
