"""Hugging Face causal LM directories (config, safetensors weights, tokenizer files) and hub ids."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset

from c2s_kedro.datasets.errors import C2SDatasetError
from c2s_kedro.core.models.loading import (
    LanguageModel,
    LoadOptions,
    ModelNotFoundError,
    ModelSource,
    UnsupportedLoadSettingError,
    hub_model_available,
    load_model,
    model_source,
    save_model,
)
from c2s_kedro.datasets._atomic import atomic_folder


class HFModelDataset(AbstractDataset[LanguageModel, LanguageModel]):
    """Loads a ``LanguageModel`` from a model directory or a hub id; saves one as a directory.

    Example::

        foundation_model:
          type: c2s_kedro.datasets.HFModelDataset
          path: data/06_models/foundation_model     # or a hub id: vandijklab/C2S-Pythia-410m-...
          load_args: {device: auto, dtype: auto}    # auto = fp32; bf16 also on CPU (fast with AMX); fp16 on GPU only

    ``load_args`` (all optional):

    - ``device``: ``auto`` (CUDA when present), ``cpu``, ``cuda``, ``cuda:1``.
    - ``dtype``: ``auto`` (fp32), ``fp32``, ``bf16``, ``fp16``.
    - ``device_map``: passed to ``from_pretrained``; ``auto`` spreads a model too large for one
      GPU over the GPUs and the CPU (accelerate). Leave ``device`` at ``auto`` with it.
    - ``low_cpu_mem_usage``: passed to ``from_pretrained`` (transformers 5 always loads that way).
    - ``attn_implementation``: ``sdpa``, ``eager``, or ``flash_attention_2`` (CUDA, the
      ``flash-attn`` package, bf16/fp16).
    - ``quantization``: ``transformers.BitsAndBytesConfig`` arguments, dtypes by name, e.g.
      ``{load_in_4bit: true, bnb_4bit_quant_type: nf4, bnb_4bit_compute_dtype: bf16,
      bnb_4bit_use_double_quant: true}`` (QLoRA's base model) or ``{load_in_8bit: true}``. Needs
      a CUDA GPU and ``pip install bitsandbytes`` (optional, not a project dependency).

    A malformed setting fails when the catalog creates the dataset; one this machine cannot
    honour (4-bit or flash_attention_2 without CUDA, bitsandbytes not installed) fails the
    ``exists`` check a run starts with and every load, before any weight is read.

    Where the model is: Kedro turns a relative ``path`` into an absolute one under the project,
    so the path is read back relative to the Kedro project root (the nearest folder above it
    whose pyproject.toml has ``[tool.kedro]``). Something existing there is a local directory.
    Otherwise an ``owner/name`` path whose ``owner`` is neither a folder of the project nor
    ``models`` is a hub id, read from the local Hugging Face cache when it is there and from the
    hub otherwise; any other path (``models/my_model``, ``data/06_models/...``) is a local
    directory that does not exist yet.

    ``exists()``: a local directory with a ``config.json``; a hub id in the cache or on a
    reachable hub. A hub id that is not cached while the hub cannot be reached fails the check at
    once, with how to copy the model over. A hub id is read-only: saving to it is refused.

    Saving writes a complete directory next to ``path`` first and then swaps it in, so an
    interrupted save leaves the previous model untouched. The saved folder opens with plain
    ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``.
    """

    def __init__(self, *, path: str, load_args: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None):
        self._path = str(path)
        self._load_args = dict(load_args or {})
        try:
            self._options = LoadOptions.from_dict(self._load_args)
        except UnsupportedLoadSettingError as error:
            raise C2SDatasetError(f"load_args of the model at {self._path}: {error}") from error
        self._root = kedro_project_root(Path(self._path)) if Path(self._path).is_absolute() else None
        self.metadata = metadata

    def _source(self) -> ModelSource:
        return model_source(self._path, self._root)

    def _describe(self) -> dict[str, Any]:
        return {"path": self._path, "hub_id": self._source().hub_id, "load_args": self._load_args}

    def _check_machine(self) -> None:
        try:
            self._options.check_machine()
        except UnsupportedLoadSettingError as error:
            raise C2SDatasetError(f"cannot load the model at {self._source()} here: {error} (this catalog entry's load_args)") from error

    def load(self) -> LanguageModel:
        self._check_machine()
        try:
            return load_model(self._source(), **self._load_args)
        except ModelNotFoundError as error:
            raise C2SDatasetError(_with_catalog_advice(error)) from error

    def save(self, data: LanguageModel) -> None:
        if not isinstance(data, LanguageModel):
            raise C2SDatasetError(f"HFModelDataset saves LanguageModel objects, got {type(data).__name__}")
        source = self._source()
        if source.is_hub:
            raise C2SDatasetError(
                f"'{source.hub_id}' is a Hugging Face hub id, which is read-only here: a pipeline tried to save "
                "a model to it. Point this catalog entry's path at a local directory to save, or run only "
                "the pipelines that read this model."
            )
        with atomic_folder(source.path) as staging:
            save_model(data, staging)

    def _exists(self) -> bool:
        self._check_machine()
        source = self._source()
        if not source.is_hub:
            return (source.path / "config.json").is_file()
        try:
            return hub_model_available(source)
        except ModelNotFoundError as error:
            raise C2SDatasetError(_with_catalog_advice(error)) from error


def _with_catalog_advice(error: ModelNotFoundError) -> str:
    if error.hub_id:
        return f"{error} In this catalog entry: `path: {error.local_dir}`."
    return f"{error} Check the `path` of this catalog entry."


@lru_cache(maxsize=64)
def kedro_project_root(path: Path) -> Path | None:
    """The nearest folder above ``path`` whose pyproject.toml declares ``[tool.kedro]``."""
    for folder in path.parents:
        pyproject = folder / "pyproject.toml"
        try:
            if pyproject.is_file() and "[tool.kedro]" in pyproject.read_text(encoding="utf-8"):
                return folder
        except OSError:
            continue
    return None
