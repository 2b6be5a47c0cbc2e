"""AnnData stored as .h5ad."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import anndata as ad
from kedro.io import AbstractDataset
from kedro.utils import load_obj

from c2s_kedro.datasets.errors import C2SDatasetError
from c2s_kedro.datasets._atomic import atomic_file

logger = logging.getLogger(__name__)


class H5adDataset(AbstractDataset[ad.AnnData, ad.AnnData]):
    """Loads and saves an ``AnnData`` as an .h5ad file.

    Example::

        raw_adata:
          type: c2s_kedro.datasets.H5adDataset
          filepath: data/01_raw/my_cells.h5ad
          load_args:
            backed: r          # open large files without reading .X into memory

    ``create_if_missing`` names a function (dotted path) that builds the data when the file does
    not exist; the result is written to ``filepath`` first. The project's default raw data uses it
    to make the PBMC counts from the file shipped inside scanpy. ``create_args`` are passed to
    that function as keyword arguments::

        perturbseq_raw:
          type: c2s_kedro.datasets.H5adDataset
          filepath: data/01_raw/perturbseq_simulated.h5ad
          create_if_missing: c2s_kedro.core.simulate.screen.simulate_perturbseq
          create_args:
            n_perturbations: 48
            seed: 1

    Saving writes to a temporary file in the same folder and renames it, so an interrupted save
    never leaves a half-written file in place.
    """

    def __init__(
        self,
        *,
        filepath: str,
        load_args: dict[str, Any] | None = None,
        save_args: dict[str, Any] | None = None,
        create_if_missing: str | None = None,
        create_args: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self._filepath = Path(filepath)
        self._load_args = dict(load_args or {})
        self._save_args = dict(save_args or {})
        if create_args and not create_if_missing:
            raise C2SDatasetError(
                f"H5adDataset for {filepath}: create_args given without create_if_missing; name "
                "the function that builds the data in create_if_missing, or drop create_args"
            )
        self._create_if_missing = create_if_missing
        self._create_args = dict(create_args or {})
        self.metadata = metadata

    def _describe(self) -> dict[str, Any]:
        return {
            "filepath": str(self._filepath),
            "load_args": self._load_args,
            "create_if_missing": self._create_if_missing,
            "create_args": self._create_args,
        }

    def _create(self) -> None:
        logger.info("%s does not exist: creating it with %s", self._filepath, self._create_if_missing)
        self.save(load_obj(self._create_if_missing)(**self._create_args))

    def load(self) -> ad.AnnData:
        if not self._filepath.exists():
            if self._create_if_missing:
                self._create()
            else:
                raise C2SDatasetError(
                    f"h5ad file not found: {self._filepath.resolve()}. Put the file there, or point "
                    "the catalog entry's filepath at your data (e.g. in conf/local/catalog.yml)."
                )
        try:
            return ad.read_h5ad(self._filepath, **self._load_args)
        except OSError as error:
            raise C2SDatasetError(
                f"cannot read {self._filepath.resolve()} as h5ad ({error}): the file is incomplete or not an h5ad file, "
                "e.g. a download or copy that did not finish. Copy it again, or point the catalog entry's filepath "
                "at another file (e.g. in conf/local/catalog.yml)."
            ) from error

    def save(self, data: ad.AnnData) -> None:
        if not isinstance(data, ad.AnnData):
            raise C2SDatasetError(f"H5adDataset saves AnnData objects, got {type(data).__name__}")
        with atomic_file(self._filepath, suffix=".h5ad.tmp") as temporary:
            data.write_h5ad(temporary, **self._save_args)

    def _exists(self) -> bool:
        return self._filepath.exists()
