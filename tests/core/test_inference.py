"""Label scoring, batched generation, constrained decoding and sampling on tiny random models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import PreTrainedTokenizerFast

from c2s_kedro.core import inference
from c2s_kedro.core.constraints import GeneVocabularyConstraint, postprocess_sentence
from c2s_kedro.core.inference import (
    _padded,
    embed_prompts,
    generate_labels,
    generate_texts,
    length_grouped_batches,
    match_answer,
    normalize_answer,
    predict_labels,
    sample_continuations,
    score_labels,
)
from c2s_kedro.core.models import build_gpt_neox
from c2s_kedro.core.prompts import load_templates, template_words
from c2s_kedro.core.tokenizer import build_gene_tokenizer
from tests.helpers import byte_level_bpe_tokenizer

# prefix pairs (CD3/CD3D, AC009/AC009.1) exercise the multi-token trie of the BPE tokenizer
GENES = ["CD3D", "CD3", "CD8A", "MT-CO1", "RP11-34P13.3", "HLA-DRB1", "AC009", "AC009.1"] + [f"GENE{i}" for i in range(60)]
LABELS = ["CD4+ T", "CD4+ T Reg", "CD8+ T", "B cell", "NK"]  # shared leading words share tree nodes
ARCHITECTURE = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64,
                "max_position_embeddings": 128}


def _bpe_tokenizer() -> PreTrainedTokenizerFast:
    corpus = [" ".join(GENES), " ".join(LABELS)] + list(load_templates("cell_type_prediction").inputs)
    tokenizer = byte_level_bpe_tokenizer(corpus)
    tokenizer.pad_token = tokenizer.eos_token  # as models.load_model sets it
    return tokenizer


@pytest.fixture(scope="module")
def gene_model():
    tokenizer = build_gene_tokenizer(GENES, template_words() + LABELS, model_max_length=128)
    return build_gpt_neox(tokenizer, ARCHITECTURE, seed=0)


@pytest.fixture(scope="module")
def eager_gene_model():
    """The gene model with eager attention, which adds the 4D tree mask to the scores itself."""
    tokenizer = build_gene_tokenizer(GENES, template_words() + LABELS, model_max_length=128)
    language_model = build_gpt_neox(tokenizer, ARCHITECTURE, seed=0)
    language_model.model.set_attn_implementation("eager")
    return language_model


@pytest.fixture(scope="module")
def bpe_model():
    language_model = build_gpt_neox(_bpe_tokenizer(), ARCHITECTURE, seed=1)
    assert len(language_model.tokenizer(" " + " ".join(GENES), add_special_tokens=False)["input_ids"]) > 1.5 * len(GENES)
    return language_model


def _prompt(genes: list[str]) -> str:
    return f"Cell sentence: {' '.join(genes)}.\nThe cell type is:"


PROMPTS = [_prompt(GENES[i : i + 2 + 3 * i]) for i in range(7)]


def _naive_scores(language_model, prompts, labels) -> np.ndarray:
    """One full forward pass per (prompt, label) over prompt + " label." + EOS, unbatched."""
    tokenizer, model = language_model.tokenizer, language_model.model
    scores = np.zeros((len(prompts), len(labels)))
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            for j, label in enumerate(labels):
                answer = tokenizer(" " + label + ".", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                log_probs = model(torch.tensor([prompt_ids + answer])).logits[0].log_softmax(-1)
                scores[i, j] = sum(float(log_probs[len(prompt_ids) - 1 + k, t]) for k, t in enumerate(answer))
    return scores


@pytest.mark.parametrize("model_name", ["gene_model", "bpe_model", "eager_gene_model"])
def test_label_scores_equal_a_full_forward_pass_per_label(model_name, request):
    language_model = request.getfixturevalue(model_name)
    scores = score_labels(language_model, PROMPTS, LABELS, batch_size=3)  # several padded batches
    assert scores.shape == (len(PROMPTS), len(LABELS))
    assert np.abs(scores - _naive_scores(language_model, PROMPTS, LABELS)).max() <= 1e-4


def test_length_grouped_batches_put_the_smaller_batch_where_it_saves_padding():
    long_tail = [300, 120, 100, 101, 99, 98, 102, 97, 100]  # one very long prompt
    batches = length_grouped_batches(long_tail, 4)
    assert [len(b) for b in batches] == [1, 4, 4] and list(batches[0]) == [0]
    short_tail = [100, 100, 99, 101, 100, 98, 100, 100, 5]  # one very short prompt
    assert [len(b) for b in length_grouped_batches(short_tail, 4)] == [4, 4, 1]
    for lengths in (long_tail, short_tail, [7] * 8, []):
        batches = length_grouped_batches(lengths, 4)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        assert len(batches) == -(-len(lengths) // 4) and all(len(b) <= 4 for b in batches)
        widths = [max(lengths[i] for i in b) for b in batches]
        assert widths == sorted(widths, reverse=True)


def test_padding_puts_pad_ids_on_the_asked_side_and_refuses_a_tokenizer_without_pad_token(gene_model):
    tokenizer, pad = gene_model.tokenizer, gene_model.tokenizer.pad_token_id
    ids, mask = _padded(tokenizer, [[5, 6, 7], [8]], "left", torch.device("cpu"))
    assert ids.tolist() == [[5, 6, 7], [pad, pad, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = _padded(tokenizer, [[8], [5, 6, 7]], "right", torch.device("cpu"))
    assert ids.tolist() == [[8, pad, pad], [5, 6, 7]] and mask.tolist() == [[1, 0, 0], [1, 1, 1]]
    assert ids.dtype == mask.dtype == torch.long and tokenizer.padding_side == "right"
    no_pad = _bpe_tokenizer()
    no_pad.pad_token = None
    language_model = build_gpt_neox(no_pad, ARCHITECTURE, seed=1)
    with pytest.raises(ValueError, match="no pad token.*eos_token"):
        generate_texts(language_model, PROMPTS[:2], max_new_tokens=2)
    with pytest.raises(ValueError, match="no pad token"):
        embed_prompts(language_model, PROMPTS[:2])


def test_generated_labels_are_the_greedy_answers_matched_to_the_label_set(gene_model, monkeypatch):
    answers, predicted = generate_labels(gene_model, PROMPTS, LABELS, extra_new_tokens=2, batch_size=3)
    longest = max(len(gene_model.tokenizer(f" {label}.", add_special_tokens=False)["input_ids"]) for label in LABELS)
    assert answers == generate_texts(gene_model, PROMPTS, max_new_tokens=longest + 2, batch_size=3)
    assert predicted == [match_answer(answer, LABELS) for answer in answers]
    # the answers in training form are the drafts; an answer is matched after normalization or is None
    calls = []
    monkeypatch.setattr(inference, "generate_texts", lambda *args, **kwargs: calls.append(kwargs) or [" nk.", " Cell sentence"])
    assert generate_labels(gene_model, PROMPTS[:2], LABELS, extra_new_tokens=3)[1] == ["NK", None]
    assert calls[0]["expected_answers"] == [f" {label}." for label in LABELS] and calls[0]["max_new_tokens"] == longest + 3


def test_predicted_labels_are_known_and_probabilities_sum_to_one(gene_model):
    predicted, probabilities = predict_labels(gene_model, PROMPTS, LABELS, batch_size=4)
    assert len(predicted) == len(PROMPTS) and set(predicted) <= set(LABELS)
    assert probabilities.shape == (len(PROMPTS), len(LABELS))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-9)
    assert [LABELS[i] for i in probabilities.argmax(axis=1)] == predicted


def test_label_scoring_refuses_prompts_without_room_for_the_answer(gene_model):
    crowded = "Cell sentence: " + " ".join((GENES * 2)[:122]) + "."
    with pytest.raises(ValueError, match=r"prompt 1 has \d+ tokens.*context of 128.*fit_prompt"):
        score_labels(gene_model, [PROMPTS[0], crowded], LABELS)
    with pytest.raises(ValueError, match="unique"):
        score_labels(gene_model, PROMPTS, ["NK", "NK"])


def test_generation_refuses_prompts_that_leave_no_room_for_new_tokens(gene_model, monkeypatch):
    long_prompt = "Cell sentence: " + " ".join((GENES * 2)[:100]) + "."
    n_tokens = len(gene_model.tokenizer(long_prompt, add_special_tokens=False)["input_ids"])
    assert n_tokens + 10 <= 128 < n_tokens + 30

    def never(*args, **kwargs):
        raise AssertionError("generate must not run")

    monkeypatch.setattr(gene_model.model, "generate", never)
    with pytest.raises(ValueError, match=rf"prompt 1 has {n_tokens} tokens and max_new_tokens is 30.*context of 128.*fit_prompt"):
        generate_texts(gene_model, [PROMPTS[0], long_prompt], max_new_tokens=30)
    with pytest.raises(ValueError, match="prompt 0 has"):
        sample_continuations(gene_model, long_prompt, n_samples=2, max_new_tokens=30)


@pytest.mark.parametrize("model_name", ["gene_model", "bpe_model"])
def test_greedy_output_of_a_prompt_does_not_depend_on_its_batch(model_name, request):
    language_model = request.getfixturevalue(model_name)
    padding_side = language_model.tokenizer.padding_side
    short = _prompt(GENES[:2])
    others = [_prompt(GENES[i : i + 10 + 2 * i]) for i in range(5)]
    alone = generate_texts(language_model, [short], max_new_tokens=8)[0]
    batched = generate_texts(language_model, others[:2] + [short] + others[2:], max_new_tokens=8, batch_size=6)
    assert batched[2] == alone and alone
    assert batched[0] == generate_texts(language_model, [others[0]], max_new_tokens=8)[0]
    assert language_model.tokenizer.padding_side == padding_side


@pytest.mark.parametrize("model_name", ["gene_model", "bpe_model"])
def test_expected_answers_change_no_output_and_save_forward_passes(model_name, request):
    language_model = request.getfixturevalue(model_name)
    prompts = [_prompt(GENES[i : i + 10 + 2 * i]) for i in range(6)]
    plain = generate_texts(language_model, prompts, max_new_tokens=8, batch_size=4)
    assert len(set(plain)) > 1
    tokenizer, model = language_model.tokenizer, language_model.model
    for prompt, text in zip(prompts, plain):  # what transformers' own greedy search writes, one prompt at a time
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
        assert tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True) == text
    # the model's own answers (accepted drafts), answers it does not give (rejected drafts, some
    # sharing its first tokens) and a budget shorter than the answers
    own = sorted(set(plain))
    near_misses = [text[: len(text) // 2] + " NK." for text in own] + [" B cell.", " CD4+ T Reg."]
    def forward_passes(expected):
        shapes: list[tuple[int, int]] = []
        handle = language_model.model.register_forward_pre_hook(
            lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
        try:
            return generate_texts(language_model, prompts, 8, batch_size=4, expected_answers=expected), shapes
        finally:
            handle.remove()

    drafted, passes = forward_passes(own)
    undrafted, token_by_token = forward_passes([" Homo sapiens."])  # never begins an answer
    assert drafted == plain and undrafted == plain
    assert len(token_by_token) == 2 * 8  # two batches: the prompt, then one token per pass
    if model_name == "gene_model":  # BPE re-tokenizes a random model's text differently: no drafts taken
        assert len(passes) < len(token_by_token) and any(width > 1 for _, width in passes[1:4])
    assert generate_texts(language_model, prompts, max_new_tokens=8, batch_size=4, expected_answers=near_misses) == plain
    assert generate_texts(language_model, prompts, max_new_tokens=3, batch_size=3, expected_answers=own) == \
        generate_texts(language_model, prompts, max_new_tokens=3, batch_size=3)
    with pytest.raises(ValueError, match="greedy decoding only"):
        generate_texts(language_model, prompts, max_new_tokens=4, do_sample=True, expected_answers=own)


def _words(text: str) -> list[str]:
    text = text.strip()
    return (text[:-1] if text.endswith(".") else text).split()


@pytest.mark.parametrize("model_name", ["gene_model", "bpe_model"])
def test_constrained_sampling_writes_only_vocabulary_genes_each_once(model_name, request):
    language_model = request.getfixturevalue(model_name)
    tokenizer = language_model.tokenizer
    genes = GENES[:24]
    texts = []
    for seed in range(3):
        texts += generate_texts(
            language_model, PROMPTS[:4], max_new_tokens=40, do_sample=True, temperature=1.5, seed=seed,
            logits_processor_factory=lambda: GeneVocabularyConstraint(tokenizer, genes),
        )
        texts += sample_continuations(
            language_model, PROMPTS[2], n_samples=6, max_new_tokens=40, temperature=1.5, seed=seed,
            logits_processor=GeneVocabularyConstraint(tokenizer, genes), batch_size=4,
        )
    assert len(texts) == 3 * (4 + 6)
    for text in texts:
        words = _words(text)
        assert words and set(words) <= set(genes), text
        assert len(words) == len(set(words)), text
    assert any(text.strip().endswith(".") for text in texts)  # sequences do stop with the stop text


@pytest.mark.parametrize("model_name", ["gene_model", "bpe_model"])
def test_a_sequence_that_has_written_every_gene_can_only_stop(model_name, request):
    language_model = request.getfixturevalue(model_name)
    genes = ["CD3", "CD3D", "AC009.1"]
    texts = sample_continuations(
        language_model, PROMPTS[1], n_samples=8, max_new_tokens=40, temperature=1.5, seed=0,
        logits_processor=GeneVocabularyConstraint(language_model.tokenizer, genes),
    )
    for text in texts:
        words = _words(text)
        assert 1 <= len(words) <= 3 and set(words) <= set(genes) and len(set(words)) == len(words), text


@pytest.mark.parametrize("model_name", ["gene_model", "bpe_model"])
def test_min_genes_keeps_a_sequence_going_until_it_has_written_that_many(model_name, request):
    language_model = request.getfixturevalue(model_name)
    genes = GENES[:40]

    def lengths(**constraint) -> list[int]:
        texts = sample_continuations(
            language_model, PROMPTS[2], n_samples=16, max_new_tokens=60, temperature=1.5, seed=1,
            logits_processor=GeneVocabularyConstraint(language_model.tokenizer, genes, **constraint),
        )
        for text in texts:
            words = _words(text)
            assert set(words) <= set(genes) and len(words) == len(set(words)), text
        return [len(_words(text)) for text in texts]

    assert min(lengths()) < 8  # the untrained model ends early on its own
    assert min(lengths(min_genes=8)) >= 8
    # a vocabulary smaller than min_genes: every gene, then the end
    few = sample_continuations(language_model, PROMPTS[1], n_samples=4, max_new_tokens=40, temperature=1.5, seed=0,
                               logits_processor=GeneVocabularyConstraint(language_model.tokenizer, ["CD3", "CD3D", "AC009.1"],
                                                                         min_genes=10))
    assert all(sorted(_words(text)) == ["AC009.1", "CD3", "CD3D"] for text in few), few
    with pytest.raises(ValueError, match="min_genes must be at least 1"):
        GeneVocabularyConstraint(language_model.tokenizer, genes, min_genes=0)


def test_sample_continuations_reads_the_prompt_once(gene_model):
    calls: list[tuple[int, int]] = []

    def record(module, args, kwargs):
        calls.append(tuple((kwargs.get("input_ids") if "input_ids" in kwargs else args[0]).shape))

    prompt_tokens = len(gene_model.tokenizer(PROMPTS[3], add_special_tokens=False)["input_ids"])
    handle = gene_model.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        texts = sample_continuations(gene_model, PROMPTS[3], n_samples=5, max_new_tokens=6, temperature=1.0, seed=3)
    finally:
        handle.remove()
    assert len(texts) == 5
    assert calls[0] == (1, prompt_tokens - 1)  # the one pass over the prompt
    assert all(shape == (5, 1) for shape in calls[1:]) and 1 <= len(calls) - 1 <= 6  # then one token per step
    again = sample_continuations(gene_model, PROMPTS[3], n_samples=5, max_new_tokens=6, temperature=1.0, seed=3)
    assert again == texts  # seeded
    assert len(set(texts)) > 1  # the samples differ


def test_postprocess_sentence_drops_unknown_words_and_merges_repeats_at_their_mean_position():
    genes = {"MT-CO1", "CD8A", "CD3D", "RP11-34P13.3"}
    sentence, unknown, merged = postprocess_sentence(" MT-CO1 CD8A CD3D Cell CD8A CD8A RP11-34P13.3 sentence.", genes)
    # positions: MT-CO1 0; CD8A 1, 4, 5 (mean 3.33); CD3D 2; RP11-34P13.3 6
    assert sentence == "MT-CO1 CD3D CD8A RP11-34P13.3"
    assert (unknown, merged) == (2, 2)
    assert postprocess_sentence("CD3D RP11-34P13.3.", genes) == ("CD3D RP11-34P13.3", 0, 0)
    assert postprocess_sentence("", genes) == ("", 0, 0)


def test_answers_match_labels_after_normalization():
    labels = ["CD14+ Monocyte", "CD19+ B", "Dendritic"]
    assert normalize_answer("  CD14+   Monocyte. ") == "cd14+ monocyte"
    assert match_answer(" cd14+ monocyte.", labels) == "CD14+ Monocyte"
    assert match_answer("Dendritic", labels) == "Dendritic"
    assert match_answer("Cell sentence", labels) is None
    assert match_answer("CD19+ B cells.", labels) is None


def test_guidance_pushes_each_step_away_from_the_prompts_last_token_alone(gene_model):
    tokenizer, model = gene_model.tokenizer, gene_model.model
    prompts = PROMPTS[:3]  # different lengths: one left-padded batch
    scale = 3.0
    guided = generate_texts(gene_model, prompts, max_new_tokens=1, batch_size=3, guidance_scale=scale)
    plain = generate_texts(gene_model, prompts, max_new_tokens=1, batch_size=3)
    expected = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([tokenizer(prompt)["input_ids"]])
            conditional = torch.log_softmax(model(ids).logits[0, -1], dim=-1)
            unconditional = torch.log_softmax(model(ids[:, -1:]).logits[0, -1], dim=-1)
            token = int(torch.argmax(unconditional + scale * (conditional - unconditional)))
            expected.append(tokenizer.decode([token], skip_special_tokens=True))
    assert [text.strip() for text in guided] == [text.strip() for text in expected]
    assert guided != plain  # the random model's choice moves under guidance on at least one prompt
    # against given unconditional prompts (of other lengths than the prompts: both left-padded)
    unconditional = [PROMPTS[6], PROMPTS[0], PROMPTS[4]]
    against = generate_texts(gene_model, prompts, max_new_tokens=1, batch_size=3, guidance_scale=scale,
                             unconditional_prompts=unconditional)
    expected = []
    with torch.no_grad():
        for prompt, negative in zip(prompts, unconditional):
            conditional = torch.log_softmax(model(torch.tensor([tokenizer(prompt)["input_ids"]])).logits[0, -1], dim=-1)
            base = torch.log_softmax(model(torch.tensor([tokenizer(negative)["input_ids"]])).logits[0, -1], dim=-1)
            expected.append(tokenizer.decode([int(torch.argmax(base + scale * (conditional - base)))], skip_special_tokens=True))
    assert [text.strip() for text in against] == [text.strip() for text in expected]
    assert against != guided  # the unconditional prompts are what guidance pushes away from, not the last token
    with pytest.raises(ValueError, match="2 unconditional prompts for 3 prompts"):
        generate_texts(gene_model, prompts, max_new_tokens=1, guidance_scale=scale, unconditional_prompts=unconditional[:2])
    # sampling with guidance (same seed) samples other genes, and still only vocabulary genes, each once
    genes = GENES[:24]
    sampled = {scale: generate_texts(gene_model, PROMPTS[:4], max_new_tokens=40, do_sample=True, seed=0, guidance_scale=scale,
                                     logits_processor_factory=lambda: GeneVocabularyConstraint(tokenizer, genes))
               for scale in (1.0, 8.0)}
    assert sampled[8.0] != sampled[1.0]
    for text in sampled[8.0]:
        words = _words(text)
        assert words and set(words) <= set(genes) and len(words) == len(set(words)), text
    with pytest.raises(ValueError, match="guidance_scale must be at least 1"):
        generate_texts(gene_model, prompts, max_new_tokens=1, guidance_scale=0.5)
