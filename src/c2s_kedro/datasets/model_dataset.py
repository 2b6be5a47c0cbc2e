"""Hugging Face causal LM directories (config, safetensors weights, tokenizer files)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset, DatasetError

from c2s_kedro.core.models import HUB_ID, LanguageModel, ModelNotFoundError, load_model, save_model


class HFModelDataset(AbstractDataset[LanguageModel, LanguageModel]):
    """Loads a ``LanguageModel`` from a model directory or a hub id; saves one as a directory.

    Example::

        foundation_model:
          type: c2s_kedro.datasets.HFModelDataset
          path: data/06_models/foundation_model     # or a hub id: vandijklab/C2S-Pythia-410m-...
          load_args: {device: auto, dtype: auto}    # auto = fp32; bf16 also on CPU (fast with AMX); fp16 on GPU only

    Saving writes a complete directory next to ``path`` first and then swaps it in, so an
    interrupted save leaves the previous model untouched. The saved folder opens with plain
    ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``.

    A hub id is read-only: it counts as existing (so a run does not rebuild it upstream and
    shadow it with a local folder of the same name), and saving to it is refused.
    """

    def __init__(self, *, path: str, load_args: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None):
        self._path = str(path)
        self._load_args = dict(load_args or {})
        self.metadata = metadata

    def _describe(self) -> dict[str, Any]:
        return {"path": self._path, "load_args": self._load_args}

    def load(self) -> LanguageModel:
        try:
            return load_model(self._path, **self._load_args)
        except ModelNotFoundError as error:
            raise DatasetError(str(error)) from error

    def _is_hub_id(self) -> bool:
        return not Path(self._path).expanduser().exists() and bool(HUB_ID.match(self._path))

    def save(self, data: LanguageModel) -> None:
        if not isinstance(data, LanguageModel):
            raise DatasetError(f"HFModelDataset saves LanguageModel objects, got {type(data).__name__}")
        if self._is_hub_id():
            raise DatasetError(
                f"'{self._path}' is a Hugging Face hub id, which is read-only here: a pipeline tried to save "
                "a model to it. Point this catalog entry's path at a local directory to save, or run only "
                "the pipelines that read this model."
            )
        target = Path(self._path)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            save_model(data, staging)
            if target.exists():
                retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
                retired.rmdir()
                target.rename(retired)
                staging.rename(target)
                shutil.rmtree(retired)
            else:
                staging.rename(target)
        finally:
            if staging.exists():
                shutil.rmtree(staging)

    def _exists(self) -> bool:
        return self._is_hub_id() or (Path(self._path) / "config.json").is_file()
