"""The one place that loads, builds and saves causal language models.

A model source is a local model directory (config, safetensors weights, tokenizer files) or a
Hugging Face hub id (``vandijklab/C2S-Pythia-410m-cell-type-prediction``). Loading never runs
remote code and only reads safetensors weights.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedModel

logger = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
ARCHITECTURE_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "max_position_embeddings")


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


class ModelNotFoundError(FileNotFoundError):
    """A model source that is neither a model directory nor a reachable hub id."""


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
        raise ValueError(f"unknown dtype '{dtype}'; use one of auto, {', '.join(DTYPES)}")
    if device.type == "cpu" and DTYPES[dtype] == torch.float16:
        logger.info("dtype %s requested on CPU: using float32", dtype)
        return torch.float32
    return DTYPES[dtype]


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection (False when HF_HUB_OFFLINE is set).

    Checked before a download so that a machine without the hub fails in seconds instead of
    waiting through the hub client's retries.
    """
    if os.environ.get("HF_HUB_OFFLINE", "0").strip().upper() in {"1", "TRUE", "YES", "ON"}:
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _hub_unreachable_error(source: str, reason: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"could not load '{source}' from the Hugging Face hub ({reason}). Without access to the hub, "
        "download the model on a machine that has it (e.g. `huggingface-cli download <id> --local-dir "
        "models/<name>`), copy the folder here and set the model source to that local directory."
    )


def _open(location: str, dtype: torch.dtype, **kwargs):
    tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=False, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        location, trust_remote_code=False, use_safetensors=True, dtype=dtype, **kwargs
    )
    return tokenizer, model


def load_model(source: str | os.PathLike, device: str | None = "auto", dtype: str | None = "auto") -> LanguageModel:
    """Load a causal LM and its tokenizer from a model directory or a hub id.

    Sets a pad token when the tokenizer lacks one (the EOS token), puts the model in eval mode on
    the chosen device. Raises ``ModelNotFoundError`` with what to do when the source cannot be
    opened.
    """
    source = str(source)
    path = Path(source).expanduser()
    target = pick_device(device)
    torch_dtype = pick_dtype(dtype, target)
    if path.exists():
        if not _is_model_dir(path):
            raise ModelNotFoundError(
                f"{path} exists but is not a Hugging Face model directory (no config.json); point the "
                "model source at a folder written by save_pretrained"
            )
        try:
            tokenizer, model = _open(str(path), torch_dtype, local_files_only=True)
        except OSError as error:
            raise ModelNotFoundError(f"could not load the model in {path}: {error}") from error
    elif HUB_ID.match(source) and not source.startswith((".", "~")):
        try:  # a hub model already in the local Hugging Face cache needs no network
            tokenizer, model = _open(source, torch_dtype, local_files_only=True)
        except OSError:
            if not hub_reachable():
                raise _hub_unreachable_error(source, "the hub cannot be reached from this machine") from None
            try:
                tokenizer, model = _open(source, torch_dtype)
            except OSError as error:
                raise _hub_unreachable_error(source, f"{type(error).__name__}: {str(error).splitlines()[0][:200]}") from error
    else:
        raise ModelNotFoundError(
            f"model directory not found: {path.resolve()}. Train the offline foundation model with "
            "`kedro run --pipeline=pretraining`, or set the model source to an existing model directory "
            "or a Hugging Face hub id."
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    model.to(target).eval()
    logger.info("loaded %s (%s parameters) on %s", source, f"{model.num_parameters():,}", target)
    return LanguageModel(model=model, tokenizer=tokenizer, source=source)


def build_gpt_neox(tokenizer, architecture: dict[str, Any], seed: int = 0) -> LanguageModel:
    """A freshly initialized GPT-NeoX (Pythia) causal LM sized by ``architecture``.

    Keys: ``num_hidden_layers``, ``hidden_size``, ``num_attention_heads``, ``intermediate_size``
    (default 4 x hidden), ``max_position_embeddings`` (the context length); any other
    ``GPTNeoXConfig`` key passes through.
    """
    settings = dict(architecture)
    missing = [key for key in ARCHITECTURE_KEYS if key not in settings]
    if missing:
        raise ValueError(f"the architecture lacks {', '.join(missing)}; it needs {', '.join(ARCHITECTURE_KEYS)}")
    settings.setdefault("intermediate_size", 4 * settings["hidden_size"])
    if settings["hidden_size"] % settings["num_attention_heads"]:
        raise ValueError(
            f"hidden_size {settings['hidden_size']} is not divisible by num_attention_heads "
            f"{settings['num_attention_heads']}"
        )
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **settings,
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
