"""Inference with causal LMs: cell embeddings."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from c2s_kedro.core.models import LanguageModel

logger = logging.getLogger(__name__)


def length_grouped_batches(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Indices in batches of similar length (longest first), so little compute goes to padding."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.inference_mode()
def embed_prompts(language_model: LanguageModel, prompts: Sequence[str], batch_size: int = 16) -> np.ndarray:
    """One vector per prompt: the last hidden layer averaged over the prompt's real tokens.

    Padding positions are excluded from the mean (attention-masked), so a prompt's embedding does
    not depend on the other prompts of its batch. Only the transformer body runs (no LM head), in
    batches grouped by length, without gradients. Prompts must fit the model's context (see
    ``prompts.fit_prompt``).
    """
    tokenizer, model = language_model.tokenizer, language_model.model
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    too_long = [i for i, ids in enumerate(encoded) if len(ids) > language_model.context_length]
    if too_long:
        raise ValueError(
            f"{len(too_long)} prompts exceed the model's context of {language_model.context_length} tokens "
            f"(e.g. prompt {too_long[0]}: {len(encoded[too_long[0]])} tokens); fit them with prompts.fit_prompt first"
        )
    empty = [i for i, ids in enumerate(encoded) if not ids]
    if empty:
        raise ValueError(f"{len(empty)} prompts are empty (e.g. prompt {empty[0]}); nothing to embed")
    body = model.base_model
    device = language_model.device
    pad_id = tokenizer.pad_token_id
    embeddings = np.zeros((len(encoded), model.config.hidden_size), dtype=np.float32)
    batches = length_grouped_batches([len(ids) for ids in encoded], batch_size)
    for batch in tqdm(batches, desc="embedding", unit="batch", leave=False):
        width = max(len(encoded[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            input_ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
            mask[row, : len(encoded[i])] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        hidden = body(input_ids=input_ids, attention_mask=mask).last_hidden_state.float()
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1)
        embeddings[batch] = pooled.cpu().numpy()
    return embeddings
