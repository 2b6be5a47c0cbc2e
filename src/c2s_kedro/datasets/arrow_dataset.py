"""Hugging Face ``Dataset`` / ``DatasetDict`` folders written by ``save_to_disk`` (Arrow)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset

from c2s_kedro.datasets.errors import C2SDatasetError
from c2s_kedro.datasets._atomic import atomic_folder


class ArrowDataset(AbstractDataset):
    """Loads (memory-mapped, ``load_from_disk``) and saves (``save_to_disk``) a ``datasets.Dataset``
    or ``DatasetDict``: the folder kedro-datasets' ``huggingface.ArrowDataset`` reads and writes,
    on a local path.

    Example::

        cell_sentences:
          type: c2s_kedro.datasets.ArrowDataset
          path: data/04_feature/cell_sentences

    kedro-datasets' class cannot be imported without transformers and torch (its huggingface
    package imports its transformers pipeline dataset first), so every run that checked whether
    the cell sentences exist waited for them; here ``datasets`` loads with the first load or save.
    ``load_args`` / ``save_args`` go to ``load_from_disk`` / ``save_to_disk``. Saving writes a
    complete folder next to ``path`` and then swaps it in, so an interrupted save leaves the
    previous dataset untouched, and a dataset read from ``path`` can be saved back to it.
    """

    def __init__(
        self, *, path: str, load_args: dict[str, Any] | None = None, save_args: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self._path = Path(path)
        self._load_args = dict(load_args or {})
        self._save_args = dict(save_args or {})
        self.metadata = metadata

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path), "load_args": self._load_args, "save_args": self._save_args}

    def load(self):
        from datasets import load_from_disk

        return load_from_disk(str(self._path), **self._load_args)

    def save(self, data) -> None:
        from datasets import Dataset, DatasetDict

        if not isinstance(data, Dataset | DatasetDict):
            raise C2SDatasetError(
                f"ArrowDataset saves datasets.Dataset or DatasetDict objects, got {type(data).__name__}"
                " (materialize an iterable dataset first)"
            )
        with atomic_folder(self._path) as staging:
            data.save_to_disk(str(staging), **self._save_args)

    def _exists(self) -> bool:
        return (self._path / "dataset_info.json").is_file() or (self._path / "dataset_dict.json").is_file()
