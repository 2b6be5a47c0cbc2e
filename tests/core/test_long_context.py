"""The context guard and the room left for generation, on a 128-position model (the 8,192-token case
of benchmarks/long_context.py, shrunk): prompts are fitted, never overflow, and the log says how
many genes the room allows."""

from __future__ import annotations

import logging

import pytest

from c2s_kedro.core.models import inference
from c2s_kedro.core.models.constraints import GeneVocabularyConstraint
from c2s_kedro.core.models.loading import build_gpt_neox
from c2s_kedro.core.prompts.formatting import cell_generation_prompts, count_tokens, load_templates
from c2s_kedro.core.tasks.cell_generation import generate_cells
from tests.helpers import TRICKY_GENES, byte_level_bpe_tokenizer

CONTEXT = 128
ARCHITECTURE = {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64,
                "max_position_embeddings": CONTEXT}
GENES = TRICKY_GENES[:60]


@pytest.fixture(scope="module")
def model():
    corpus = [" ".join(GENES)] * 3 + list(load_templates("cell_type_generation").inputs)
    tokenizer = byte_level_bpe_tokenizer(corpus, vocab_size=300)
    tokenizer.pad_token = tokenizer.eos_token
    return build_gpt_neox(tokenizer, ARCHITECTURE, seed=0)


def test_cell_generation_fits_the_context_and_logs_the_room_in_genes(model, caplog):
    sentences = [" ".join(GENES)] * 2  # 60 genes: far more than 128 positions hold
    prompts = cell_generation_prompts(sentences, ["T cell", "B cell"], model.tokenizer, CONTEXT, n_per_type=1)
    longest = int(count_tokens(model.tokenizer, prompts["prompt"]).max())
    assert longest + prompts["max_new_tokens"] == CONTEXT  # all the room, not a position more
    assert 0 < prompts["genes_requested"][0] < len(GENES)
    per_gene = GeneVocabularyConstraint(model.tokenizer, GENES).tokens_per_gene
    assert per_gene > 1  # a byte-level BPE spends several tokens on a gene
    with caplog.at_level(logging.INFO, logger="c2s_kedro.core.models.inference"):
        cells = generate_cells(model, prompts["prompt"], prompts["cell_type"], GENES, prompts["max_new_tokens"],
                               batch_size=2, seed=0)
    room = CONTEXT - longest
    expected = f"leaves room for {room} new tokens ≈ {int(room / per_gene)} genes in the context of {CONTEXT}"
    assert any(expected in message for message in caplog.messages), caplog.messages
    assert set(" ".join(cells["cell_sentence"]).split()) <= set(GENES)


def test_sampling_logs_the_room_once_per_run_and_refuses_to_overflow(model, caplog):
    prompt = "Generate genes of a T cell :"
    prompt_tokens = int(count_tokens(model.tokenizer, [prompt])[0])
    room = CONTEXT - prompt_tokens
    with caplog.at_level(logging.INFO, logger="c2s_kedro.core.models.inference"):
        for seed in (0, 1):  # as sample_posterior calls it, once per prompt and temperature
            inference.sample_continuations(model, prompt, 2, room, seed=seed,
                                           logits_processor=GeneVocabularyConstraint(model.tokenizer, GENES))
    logged = [m for m in caplog.messages if "leaves room" in m]
    assert len(logged) == 1 and f"generating at most {room} new tokens ≈" in logged[0]
    with pytest.raises(ValueError, match=f"more than the model's context of {CONTEXT}"):
        inference.sample_continuations(model, prompt, 2, room + 1)
    with pytest.raises(ValueError, match="Generating past the context"):
        inference.generate_texts(model, [prompt], max_new_tokens=room + 1)


def test_the_room_without_a_gene_vocabulary_is_given_in_tokens():
    message = inference.log_generation_room(CONTEXT - 4, 4, CONTEXT)
    assert message.startswith(f"prompt of {CONTEXT - 4} tokens leaves room for 4 new tokens in the context of {CONTEXT}")
    assert "genes" not in message
