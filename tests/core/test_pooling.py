"""Embedding pooling (core.models.inference.embed_prompts): mean over the real tokens or the last real
token, the same for a prompt alone and in a batch, whichever side the tokenizer pads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from c2s_kedro.core.models.inference import embed_prompts
from c2s_kedro.core.models.loading import build_gpt_neox
from c2s_kedro.core.models.tokenizer import build_gene_tokenizer

GENES = [f"GENE{i}" for i in range(80)]
ARCHITECTURE = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 96}
SHORT = "Cell sentence: GENE3 GENE7."
OTHERS = ["Cell sentence: " + " ".join(GENES[: 10 + 4 * i]) + "." for i in range(12)]


@pytest.fixture(scope="module")
def model():
    tokenizer = build_gene_tokenizer(GENES, ["Cell", "sentence:"], model_max_length=96)
    return build_gpt_neox(tokenizer, ARCHITECTURE, seed=0)


def _hidden(model, prompt: str) -> torch.Tensor:
    """The last hidden layer of one prompt run alone, without padding."""
    ids = model.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        return model.model.base_model(input_ids=ids).last_hidden_state[0].float()


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_a_cell_gets_the_same_embedding_alone_and_in_a_batch(model, side, pooling, monkeypatch):
    monkeypatch.setattr(model.tokenizer, "padding_side", side)
    alone = embed_prompts(model, [SHORT], batch_size=1, pooling=pooling)[0]
    batched = embed_prompts(model, OTHERS[:6] + [SHORT] + OTHERS[6:], batch_size=13, pooling=pooling)[6]
    assert np.abs(alone - batched).max() <= 1e-4
    hidden = _hidden(model, SHORT)
    expected = hidden.mean(0) if pooling == "mean" else hidden[-1]
    assert np.abs(alone - expected.numpy()).max() <= 1e-4  # what the pooling says, from an unpadded run


def test_mean_and_last_pool_differently_and_an_unknown_pooling_is_refused(model):
    mean = embed_prompts(model, OTHERS[:3], pooling="mean")
    last = embed_prompts(model, OTHERS[:3], pooling="last")
    assert np.abs(mean - last).max() > 1e-3
    assert np.array_equal(mean, embed_prompts(model, OTHERS[:3]))  # mean is the default
    with pytest.raises(ValueError, match="unknown pooling 'max'; choose one of: mean, last"):
        embed_prompts(model, OTHERS[:3], pooling="max")
