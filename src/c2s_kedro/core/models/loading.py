"""The one place that loads, builds and saves causal language models.

A model source is a local model directory (config, safetensors weights, tokenizer files) or a
Hugging Face hub id (``vandijklab/C2S-Pythia-410m-cell-type-prediction``), read from the local
Hugging Face cache when it is there and from the hub otherwise. Loading never runs remote code
and only reads safetensors weights. ``LoadOptions`` carries the settings large models need
(``device_map``, ``attn_implementation``, 8-/4-bit quantization with bitsandbytes); a setting this
machine cannot honour is refused before any weight is read.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import logging
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import file_exists, try_to_load_from_cache
from huggingface_hub.errors import GatedRepoError
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    PreTrainedModel,
)

from c2s_kedro.core.errors import C2SError, C2SValueError

logger = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")
# huggingface.co/models is the hub's model index, so no hub user is called "models"; it is also
# where local copies of hub models go (models/<name>)
LOCAL_ONLY_OWNERS = ("models",)
ARCHITECTURE_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "max_position_embeddings")
_BNB_ARGUMENTS = tuple(p for p in inspect.signature(BitsAndBytesConfig.__init__).parameters if p not in ("self", "kwargs"))
_BNB_DTYPE_ARGUMENTS = ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage")


@dataclass
class LanguageModel:
    """A causal LM with its tokenizer and where it came from."""

    model: PreTrainedModel
    tokenizer: Any
    source: str = ""

    @property
    def context_length(self) -> int:
        """Longest sequence the model accepts (``max_position_embeddings``; tokenizer limit otherwise)."""
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is None:
            limit = getattr(self.tokenizer, "model_max_length", None)
        return int(limit)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


class ModelNotFoundError(C2SError, FileNotFoundError):
    """A model source that is neither a model directory nor a hub model this machine can read.

    ``hub_id`` is set when the source was tried as a hub id; ``local_dir`` is then the folder name
    suggested for a local copy (``models/<name>``).
    """

    def __init__(self, message: str, hub_id: str | None = None) -> None:
        super().__init__(message)
        self.hub_id = hub_id
        self.local_dir = f"models/{hub_id.split('/')[-1]}" if hub_id else None


class UnsupportedLoadSettingError(C2SError, ValueError):
    """A load setting that is malformed or that this machine cannot honour (no CUDA, a missing package)."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model is read from: a local directory (``path``) or, when ``hub_id`` is set, the
    Hugging Face hub (``path`` is then the local folder that was looked for first)."""

    path: Path
    hub_id: str | None = None

    @property
    def is_hub(self) -> bool:
        return self.hub_id is not None

    def __str__(self) -> str:
        return self.hub_id or str(self.path)


def model_source(source: str | os.PathLike | ModelSource, root: str | os.PathLike | None = None) -> ModelSource:
    """Decide whether ``source`` is a local directory or a hub id.

    Something that exists at ``source`` is local. Otherwise ``source`` is read relative to
    ``root`` (default: the working directory); an absolute ``source`` inside ``root`` is read as
    the relative path it was before something made it absolute. That relative form is a hub id
    when it has the shape ``owner/name``, ``root`` has no folder ``owner`` and ``owner`` is not
    ``models`` (no hub user has that name); anything else (``models/my_model``,
    ``checkpoints/run1`` when there is a ``checkpoints/`` folder) is a local path that does not
    exist (yet).
    """
    if isinstance(source, ModelSource):
        return source
    text = os.fspath(source)
    base = Path(root) if root is not None else Path.cwd()
    path = Path(text).expanduser()
    local = path if path.is_absolute() else base / path
    if local.exists():
        return ModelSource(path=local)
    if path.is_absolute():
        try:
            relative = path.relative_to(base).as_posix() if root is not None else None
        except ValueError:
            relative = None
    else:
        relative = None if text.startswith((".", "~")) else path.as_posix()
    owner = relative.split("/")[0] if relative else ""
    if relative and HUB_ID.match(relative) and owner not in LOCAL_ONLY_OWNERS and not (base / owner).is_dir():
        return ModelSource(path=local, hub_id=relative)
    return ModelSource(path=local)


@dataclass(frozen=True)
class LoadOptions:
    """How a model is loaded.

    Attributes:
        device: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda``, ``cuda:1``...; the
            whole model goes there. Must stay ``auto`` when ``device_map`` is set.
        dtype: ``auto`` (fp32), ``fp32``, ``bf16``, ``fp16`` (fp16 applies on GPU only).
        device_map: passed to ``from_pretrained`` (``auto`` spreads a model over the GPUs and the
            CPU with accelerate); the model is then not moved afterwards.
        low_cpu_mem_usage: passed to ``from_pretrained``; transformers 5 always loads weights
            this way, so it only matters with older versions.
        attn_implementation: ``sdpa``, ``eager`` or ``flash_attention_2`` (CUDA, the
            ``flash-attn`` package and bf16/fp16 weights); default: what transformers picks.
        quantization: arguments of ``transformers.BitsAndBytesConfig`` for 8-bit
            (``load_in_8bit: true``) or 4-bit (``load_in_4bit: true``, ``bnb_4bit_quant_type:
            nf4``, ``bnb_4bit_compute_dtype: bf16``, ``bnb_4bit_use_double_quant: true``) weights;
            needs a CUDA GPU and the ``bitsandbytes`` package. Dtype values take the names of
            ``dtype``.
    """

    device: str | None = "auto"
    dtype: str | None = "auto"
    device_map: str | dict[str, Any] | None = None
    low_cpu_mem_usage: bool | None = None
    attn_implementation: str | None = None
    quantization: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, settings: dict[str, Any] | None) -> LoadOptions:
        """Options from a mapping; an unknown key or a malformed value is an error naming it."""
        settings = dict(settings or {})
        known = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(settings) - set(known))
        if unknown:
            raise UnsupportedLoadSettingError(f"unknown load setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
        options = cls(**settings)
        options.validate()
        return options

    def validate(self) -> None:
        """Check the values themselves (not the machine: see ``check_machine``)."""
        if self.device not in (None, "auto"):
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                raise UnsupportedLoadSettingError(
                    f"unknown device '{self.device}'; use auto, cpu, cuda, cuda:<index> or mps"
                ) from None
        if self.dtype not in (None, "auto") and self.dtype not in DTYPES:
            raise UnsupportedLoadSettingError(f"unknown dtype '{self.dtype}'; use one of auto, {', '.join(DTYPES)}")
        if self.device_map is not None and self.device not in (None, "auto"):
            raise UnsupportedLoadSettingError(
                f"device '{self.device}' and device_map {self.device_map!r} are both set; device_map places "
                "the model itself, so leave device at auto or drop device_map"
            )
        if self.low_cpu_mem_usage is not None and not isinstance(self.low_cpu_mem_usage, bool):
            raise UnsupportedLoadSettingError(f"low_cpu_mem_usage must be true or false, got {self.low_cpu_mem_usage!r}")
        if self.attn_implementation is not None and self.attn_implementation not in ATTENTION_IMPLEMENTATIONS:
            raise UnsupportedLoadSettingError(
                f"unknown attn_implementation '{self.attn_implementation}'; use one of {', '.join(ATTENTION_IMPLEMENTATIONS)}"
            )
        if self.quantization is not None:
            self.quantization_config()

    def quantization_config(self) -> BitsAndBytesConfig | None:
        """The ``BitsAndBytesConfig`` that ``quantization`` describes (None without quantization)."""
        if self.quantization is None:
            return None
        settings = dict(self.quantization)
        unknown = sorted(set(settings) - set(_BNB_ARGUMENTS))
        if unknown:
            raise UnsupportedLoadSettingError(
                f"unknown quantization setting(s) {', '.join(unknown)}; the settings are BitsAndBytesConfig's: "
                f"{', '.join(_BNB_ARGUMENTS)}"
            )
        if bool(settings.get("load_in_4bit")) == bool(settings.get("load_in_8bit")):
            raise UnsupportedLoadSettingError("quantization needs exactly one of load_in_4bit: true or load_in_8bit: true")
        if settings.get("bnb_4bit_quant_type", "nf4") not in ("nf4", "fp4"):
            raise UnsupportedLoadSettingError(
                f"unknown bnb_4bit_quant_type '{settings['bnb_4bit_quant_type']}'; use nf4 or fp4"
            )
        for key in _BNB_DTYPE_ARGUMENTS:
            if isinstance(settings.get(key), str):
                if settings[key] not in DTYPES:
                    raise UnsupportedLoadSettingError(f"unknown {key} '{settings[key]}'; use one of {', '.join(DTYPES)}")
                settings[key] = DTYPES[settings[key]]
        return BitsAndBytesConfig(**settings)

    @property
    def bits(self) -> int | None:
        """4 or 8 with quantization, else None."""
        if self.quantization is None:
            return None
        return 4 if self.quantization.get("load_in_4bit") else 8

    def check_machine(self) -> None:
        """Refuse, before anything is read, settings this machine cannot honour."""
        cuda = torch.cuda.is_available()
        if self.device not in (None, "auto") and torch.device(self.device).type == "cuda" and not cuda:
            raise UnsupportedLoadSettingError(
                f"device '{self.device}' needs a CUDA GPU and this machine has none (torch {torch.__version__} "
                "sees no CUDA device); use device auto or cpu here"
            )
        if self.bits is not None:
            if not cuda:
                raise UnsupportedLoadSettingError(
                    f"{self.bits}-bit loading (bitsandbytes) needs a CUDA GPU and this machine has none; load the "
                    "model without quantization here (dtype bf16 or fp32), or run on a machine with a CUDA GPU"
                )
            if not _has_package("bitsandbytes"):
                raise UnsupportedLoadSettingError(
                    f"{self.bits}-bit loading needs the bitsandbytes package, which is not installed: "
                    "`pip install bitsandbytes` (it is optional, not a dependency of this project)"
                )
        if self.attn_implementation == "flash_attention_2":
            if not cuda:
                raise UnsupportedLoadSettingError(
                    "attn_implementation flash_attention_2 needs a CUDA GPU and this machine has none; use sdpa here"
                )
            if not _has_package("flash_attn"):
                raise UnsupportedLoadSettingError(
                    "attn_implementation flash_attention_2 needs the flash-attn package, which is not installed: "
                    "`pip install flash-attn --no-build-isolation`; or use sdpa"
                )
            if self.bits is None and pick_dtype(self.dtype, torch.device("cuda")) == torch.float32:
                raise UnsupportedLoadSettingError(
                    "attn_implementation flash_attention_2 runs in half precision only; set dtype bf16 or fp16"
                )

    def from_pretrained_kwargs(self, device: torch.device) -> dict[str, Any]:
        """The keyword arguments this adds to ``AutoModelForCausalLM.from_pretrained`` (only the ones set)."""
        kwargs: dict[str, Any] = {}
        if self.attn_implementation is not None:
            kwargs["attn_implementation"] = self.attn_implementation
        if self.low_cpu_mem_usage is not None:
            kwargs["low_cpu_mem_usage"] = self.low_cpu_mem_usage
        if self.device_map is not None:
            kwargs["device_map"] = self.device_map
        quantization = self.quantization_config()
        if quantization is not None:
            kwargs["quantization_config"] = quantization
            kwargs.setdefault("device_map", {"": str(device)})  # bitsandbytes places its weights while loading
        return kwargs

    @property
    def places_itself(self) -> bool:
        """Whether ``from_pretrained`` puts the weights on their devices (no ``.to`` afterwards)."""
        return self.device_map is not None or self.quantization is not None


def _has_package(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def pick_device(device: str | None = "auto") -> torch.device:
    """``auto``: CUDA when present, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """``auto``: fp32. On GPU the requested precision; on CPU fp32 or, when asked for, bf16 (2-3x
    faster inference on CPUs with AMX or AVX512-BF16, slower elsewhere); fp16 on CPU falls back to
    fp32."""
    if dtype in (None, "auto"):
        return torch.float32
    if dtype not in DTYPES:
        raise C2SValueError(f"unknown dtype '{dtype}'; use one of auto, {', '.join(DTYPES)}")
    if device.type == "cpu" and DTYPES[dtype] == torch.float16:
        logger.info("dtype %s requested on CPU: using float32", dtype)
        return torch.float32
    return DTYPES[dtype]


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def _offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").strip().upper() in {"1", "TRUE", "YES", "ON"}:
        return True
    return hub_constants.is_offline_mode()


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection (False when HF_HUB_OFFLINE is set).

    Checked before a download so that a machine without the hub fails in seconds instead of
    waiting through the hub client's retries.
    """
    if _offline():
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def in_hub_cache(hub_id: str) -> bool:
    """Whether the local Hugging Face cache holds ``hub_id``'s config (no network)."""
    return isinstance(try_to_load_from_cache(hub_id, "config.json"), str)


def _unreachable_reason() -> str:
    if _offline():
        return "HF_HUB_OFFLINE is set"
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    return f"no connection to {host}"


def _hub_unreachable_error(source: ModelSource, reason: str) -> ModelNotFoundError:
    hub_id, folder = source.hub_id, f"models/{source.hub_id.split('/')[-1]}"
    return ModelNotFoundError(
        f"'{hub_id}' is neither a local model directory (nothing at {source.path}) nor, as a Hugging Face hub "
        f"id, in this machine's Hugging Face cache ({hub_constants.HF_HUB_CACHE}), and the hub cannot be read "
        f"({reason}). If it is a local directory, check the path. If it is a hub model, download it on a machine "
        f"with access to the hub (`hf download {hub_id} --local-dir {folder}`; `huggingface-cli download` with "
        f"older huggingface_hub), copy the folder {folder} here and load it from there.",
        hub_id=hub_id,
    )


def hub_model_available(source: str | ModelSource) -> bool:
    """Whether a hub id can be loaded here: in the local cache, or on a reachable hub.

    False when the hub answers that there is no such model; raises ``ModelNotFoundError`` (with
    what to do) when it is not cached and the hub cannot be reached, so that a run stops at once.
    """
    source = model_source(source)
    if not source.is_hub:
        raise C2SValueError(f"{source} is not a hub id")
    if in_hub_cache(source.hub_id):
        return True
    if not hub_reachable():
        raise _hub_unreachable_error(source, _unreachable_reason())
    try:
        return file_exists(source.hub_id, "config.json")  # False when the hub has no such model
    except GatedRepoError:
        return True  # it exists; loading says what access it needs
    except Exception as error:  # the hub client's network and HTTP errors share no base class
        raise _hub_unreachable_error(source, f"{type(error).__name__}: {str(error).splitlines()[0][:200]}") from error


def _open(location: str, dtype: torch.dtype, local_files_only: bool = False, **model_kwargs):
    tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=False, local_files_only=local_files_only)
    model = AutoModelForCausalLM.from_pretrained(
        location, trust_remote_code=False, use_safetensors=True, dtype=dtype, local_files_only=local_files_only,
        **model_kwargs,
    )
    return tokenizer, model


def load_model(
    source: str | os.PathLike | ModelSource,
    device: str | None = "auto",
    dtype: str | None = "auto",
    **settings: Any,
) -> LanguageModel:
    """Load a causal LM and its tokenizer from a model directory or a hub id.

    ``settings`` are the other ``LoadOptions`` (``device_map``, ``low_cpu_mem_usage``,
    ``attn_implementation``, ``quantization``); settings this machine cannot honour are refused
    before anything is read. A hub id is read from the local Hugging Face cache when it is there,
    from the hub otherwise. Sets a pad token when the tokenizer lacks one (the EOS token), puts the
    model in eval mode on the chosen device. Raises ``ModelNotFoundError`` with what to do when the
    source cannot be opened.
    """
    options = LoadOptions.from_dict({"device": device, "dtype": dtype, **settings})
    options.check_machine()
    source = model_source(source)
    target = pick_device(options.device)
    torch_dtype = pick_dtype(options.dtype, target)
    model_kwargs = options.from_pretrained_kwargs(target)
    path = source.path
    if not source.is_hub and path.exists():
        if not _is_model_dir(path):
            raise ModelNotFoundError(
                f"{path} exists but is not a Hugging Face model directory (no config.json); point the "
                "model source at a folder written by save_pretrained"
            )
        try:
            tokenizer, model = _open(str(path), torch_dtype, local_files_only=True, **model_kwargs)
        except OSError as error:
            raise ModelNotFoundError(f"could not load the model in {path}: {error}") from error
    elif source.is_hub:
        try:  # a hub model already in the local Hugging Face cache needs no network
            tokenizer, model = _open(source.hub_id, torch_dtype, local_files_only=True, **model_kwargs)
        except OSError:
            if not hub_reachable():
                raise _hub_unreachable_error(source, _unreachable_reason()) from None
            try:
                tokenizer, model = _open(source.hub_id, torch_dtype, **model_kwargs)
            except OSError as error:
                raise _hub_unreachable_error(source, f"{type(error).__name__}: {str(error).splitlines()[0][:200]}") from error
    else:
        raise ModelNotFoundError(
            f"model directory not found: {path}. Nothing was saved there: a model pretrained here is written "
            "there by pretraining; otherwise point the model source at an existing model directory or a "
            "Hugging Face hub id."
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    if not options.places_itself:
        model.to(target)
    model.eval()
    logger.info("loaded %s (%s parameters) on %s", source, f"{model.num_parameters():,}", next(model.parameters()).device)
    return LanguageModel(model=model, tokenizer=tokenizer, source=str(source))


def build_gpt_neox(tokenizer, architecture: dict[str, Any], seed: int = 0) -> LanguageModel:
    """A freshly initialized GPT-NeoX (Pythia) causal LM sized by ``architecture``.

    Keys: ``num_hidden_layers``, ``hidden_size``, ``num_attention_heads``, ``intermediate_size``
    (default 4 x hidden), ``max_position_embeddings`` (the context length); any other
    ``GPTNeoXConfig`` key passes through (``tie_word_embeddings`` is off unless set).
    """
    settings = dict(architecture)
    missing = [key for key in ARCHITECTURE_KEYS if key not in settings]
    if missing:
        raise C2SValueError(f"the architecture lacks {', '.join(missing)}; it needs {', '.join(ARCHITECTURE_KEYS)}")
    settings.setdefault("intermediate_size", 4 * settings["hidden_size"])
    if settings["hidden_size"] % settings["num_attention_heads"]:
        raise C2SValueError(
            f"hidden_size {settings['hidden_size']} is not divisible by num_attention_heads "
            f"{settings['num_attention_heads']}"
        )
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{"tie_word_embeddings": False, **settings},
    )
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(config)
    tokenizer.model_max_length = config.max_position_embeddings
    return LanguageModel(model=model, tokenizer=tokenizer, source="built")


def save_model(language_model: LanguageModel, directory: str | os.PathLike) -> None:
    """Write model (safetensors) and tokenizer into ``directory`` with ``save_pretrained``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    language_model.model.save_pretrained(directory, safe_serialization=True)
    language_model.tokenizer.save_pretrained(directory)
