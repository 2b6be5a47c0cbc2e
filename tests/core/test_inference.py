"""Label scoring, batched generation, constrained decoding and sampling on tiny random models."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

from c2s_kedro.core.models import inference
from c2s_kedro.core.models.constraints import GeneVocabularyConstraint, postprocess_sentence
from c2s_kedro.core.models.inference import (
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
from c2s_kedro.core.models.loading import LanguageModel, build_gpt_neox
from c2s_kedro.core.models.tokenizer import build_gene_tokenizer
from c2s_kedro.core.prompts.formatting import load_templates, template_words
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


def _genes_written(text: str, genes: list[str]) -> list[str]:
    """The words of a constrained sample; a last word that is no gene must be one cut short by
    max_new_tokens (no stop after it), the beginning of a gene the sample has not written."""
    words = _words(text)
    if words and words[-1] not in genes and not text.strip().endswith("."):
        cut = words.pop()
        assert any(gene.startswith(cut) and gene not in words for gene in genes), text
    return words


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
        words = _genes_written(text, genes)  # a byte-level BPE sample may be cut inside a gene
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
        written = [_genes_written(text, genes) for text in texts]
        for words, text in zip(written, texts):
            assert set(words) <= set(genes) and len(words) == len(set(words)), text
        return [len(words) for words in written]

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
    shared: list[bool] = []

    def record(module, args, kwargs):
        calls.append(tuple((kwargs.get("input_ids") if "input_ids" in kwargs else args[0]).shape))
        shared.append(kwargs.get("shared_prefix") is not None)

    prompt_tokens = len(gene_model.tokenizer(PROMPTS[3], add_special_tokens=False)["input_ids"])
    handle = gene_model.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        texts = sample_continuations(gene_model, PROMPTS[3], n_samples=5, max_new_tokens=6, temperature=1.0, seed=3)
    finally:
        handle.remove()
    assert len(texts) == 5
    assert calls[0] == (1, prompt_tokens) and not shared[0]  # the one pass over the prompt, with the model's attention
    assert calls[1] == (1, 1)  # one step of one row: does every layer attend through the shared prompt?
    steps = calls[2:]  # then one token per unfinished row and step; the first token came from the prompt's pass
    assert all(rows <= 5 and width == 1 for rows, width in steps) and 1 <= len(steps) <= 5 and steps[0][0] == 5
    assert all(shared[1:])  # the prompt's keys are read from its one copy, not from a cache per row
    assert gene_model.model.config._attn_implementation == "sdpa"  # the model's own attention is put back
    again = sample_continuations(gene_model, PROMPTS[3], n_samples=5, max_new_tokens=6, temperature=1.0, seed=3)
    assert again == texts  # seeded
    assert len(set(texts)) > 1  # the samples differ


def _other_architecture(config_class, model_class, **settings):
    """A tiny random model of another architecture on the gene tokenizer."""
    tokenizer = build_gene_tokenizer(GENES, template_words() + LABELS, model_max_length=128)
    config = config_class(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=128, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, **settings)
    torch.manual_seed(0)
    return LanguageModel(model=model_class(config).eval(), tokenizer=tokenizer)


@pytest.fixture(scope="module")
def grouped_query_model():
    """Llama with two query heads per key/value head (grouped-query attention)."""
    return _other_architecture(LlamaConfig, LlamaForCausalLM, num_key_value_heads=2)


@pytest.fixture(scope="module")
def sliding_window_model():
    """Mistral whose layers attend to the last 8 positions only: its cache keeps only the window."""
    return _other_architecture(MistralConfig, MistralForCausalLM, num_key_value_heads=2, sliding_window=8)


@pytest.mark.parametrize("model_name", ["gene_model", "grouped_query_model", "sliding_window_model"])
def test_sampling_steps_give_the_logits_of_a_full_forward_pass(model_name, request):
    language_model = request.getfixturevalue(model_name)
    model = language_model.model
    prompt = language_model.tokenizer(PROMPTS[3], add_special_tokens=False)["input_ids"]
    continuations = torch.tensor([[5, 9, 13, 17, 21, 25], [6, 10, 14, 18, 22, 26], [7, 11, 15, 19, 23, 27]])
    with torch.inference_mode():
        prefill = model(input_ids=torch.tensor([prompt]), use_cache=True)
        shared = not any(prefill.cache.is_sliding)
        assert shared == (model_name != "sliding_window_model")
        with inference._attention_implementation(model, inference.SHARED_PREFIX_ATTENTION) if shared else nullcontext():
            decoder = (inference._SharedPrefixDecoder(model, prefill.cache, capacity=6) if shared
                       else inference._CacheDecoder(model, prefill.cache))
            assert not shared or decoder.works(prompt[-1], len(prompt), torch.device("cpu"))
            decoder.start(3)
            rows = torch.arange(3)
            steps = []
            for step in range(6):
                if step == 3:  # the second row has finished: it leaves the batch
                    rows = torch.tensor([0, 2])
                    decoder.keep(torch.tensor([0, 2]))
                steps.append((rows, decoder.step(continuations[rows, step], len(prompt) + step)))
        assert model.config._attn_implementation == "sdpa"
        for step, (rows, logits) in enumerate(steps):
            full = torch.cat([torch.tensor([prompt] * len(rows)), continuations[rows, : step + 1]], dim=1)
            torch.testing.assert_close(logits, model(input_ids=full).logits[:, -1], rtol=1e-4, atol=1e-4)


def _chi_square_p(observed: dict, expected: dict, draws: int) -> float:
    """p-value of Pearson's chi-square test of the draws' counts against the probabilities ``expected``."""
    outcomes = sorted(expected)
    assert set(observed) <= set(outcomes), set(observed) - set(outcomes)  # nothing drawn that has probability 0
    counts = np.array([observed.get(outcome, 0) for outcome in outcomes])
    probabilities = np.array([expected[outcome] for outcome in outcomes])
    assert np.isclose(probabilities.sum(), 1.0) and (draws * probabilities).min() >= 5  # the test's own condition
    return float(chisquare(counts, draws * probabilities / probabilities.sum()).pvalue)


def test_gumbel_max_draws_follow_the_softmax_of_the_scores():
    scores = torch.tensor([[2.0, 1.0, 0.0, float("-inf"), 0.5, -1.0], [0.0, 0.0, 3.0, 0.0, float("-inf"), 1.0]])
    draws = 20_000
    with inference._seeded(7, torch.device("cpu")):
        tokens = inference._gumbel_max(scores.repeat(draws, 1)).view(draws, 2)
    for row in range(2):
        observed = dict(zip(*np.unique(tokens[:, row].numpy(), return_counts=True)))
        allowed = [i for i in range(6) if scores[row, i] > float("-inf")]
        law = torch.softmax(scores[row], -1)
        assert _chi_square_p(observed, {i: float(law[i]) for i in allowed}, draws) > 1e-3
        wrong = torch.softmax(scores[row] / 1.3, -1)  # the test tells a slightly different law apart
        assert _chi_square_p(observed, {i: float(wrong[i]) for i in allowed}, draws) < 1e-6
    with pytest.raises(ValueError, match="no token to sample"):
        inference._gumbel_max(torch.full((2, 4), float("-inf")))


@pytest.fixture(scope="module")
def sharp_gene_model():
    """The gene model with its output weights scaled up: a random model's logits barely differ, so
    its distribution hardly changes with the temperature; these differ by a few units."""
    language_model = build_gpt_neox(build_gene_tokenizer(GENES, template_words() + LABELS, model_max_length=128),
                                    ARCHITECTURE, seed=0)
    with torch.no_grad():
        language_model.model.get_output_embeddings().weight.mul_(15.0)
    return language_model


def test_samples_follow_the_models_constrained_distribution_at_the_temperature(sharp_gene_model):
    """The first two tokens of many samples against softmax(constraint(logits) / T) from full forward passes."""
    tokenizer, model = sharp_gene_model.tokenizer, sharp_gene_model.model
    genes, temperature, draws = GENES[8:12], 1.7, 6000
    prompt = tokenizer(PROMPTS[2], add_special_tokens=False)["input_ids"]
    gene_ids = {tokenizer(" " + gene, add_special_tokens=False)["input_ids"][0]: gene for gene in genes}
    stop, eos = tokenizer(".", add_special_tokens=False)["input_ids"][0], tokenizer.eos_token_id

    def law(ids: list[int], temperature: float) -> torch.Tensor:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[:, -1]
        constrained = GeneVocabularyConstraint(tokenizer, genes, prompt_length=len(prompt))(torch.tensor([ids]), logits)
        return torch.softmax(constrained[0] / temperature, -1)

    def joint(temperature: float) -> dict[tuple[str, str], float]:
        first = law(prompt, temperature)
        expected = {}
        for token, gene in gene_ids.items():
            second = law(prompt + [token], temperature)
            for follower, probability in enumerate(second.tolist()):
                if probability > 0:
                    name = gene_ids.get(follower, {stop: ".", eos: "EOS"}.get(follower))
                    expected[(gene, name)] = float(first[token]) * probability
        return expected

    texts = sample_continuations(sharp_gene_model, PROMPTS[2], n_samples=draws, max_new_tokens=2, temperature=temperature,
                                 seed=5, logits_processor=GeneVocabularyConstraint(tokenizer, genes), batch_size=draws // 2)
    observed: dict[tuple[str, str], int] = {}
    for text in texts:
        words = text.strip().split()
        outcome = (words[0].rstrip("."), ".") if text.endswith(".") else (words[0], words[1] if len(words) > 1 else "EOS")
        observed[outcome] = observed.get(outcome, 0) + 1
    assert _chi_square_p(observed, joint(temperature), draws) > 1e-3
    assert _chi_square_p(observed, joint(1.4), draws) < 1e-6  # the test tells a slightly other temperature apart


def test_samples_are_seeded_and_batches_capped(gene_model, monkeypatch):
    rows_per_step: list[int] = []
    kept: list[int] = []
    keep = inference._SharedPrefix.keep
    monkeypatch.setattr(inference._SharedPrefix, "keep", lambda self, index: (kept.append(len(index)), keep(self, index)))
    handle = gene_model.model.register_forward_pre_hook(
        lambda module, args, kwargs: rows_per_step.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    constraint = GeneVocabularyConstraint(gene_model.tokenizer, GENES[:30])
    try:
        texts = sample_continuations(gene_model, PROMPTS[4], n_samples=7, max_new_tokens=20, seed=11,
                                     logits_processor=constraint, batch_size=3)
    finally:
        handle.remove()
    assert len(texts) == 7 and max(rows_per_step) == 3
    assert kept and max(kept) < 3  # rows that have finished leave the batch
    assert sample_continuations(gene_model, PROMPTS[4], n_samples=7, max_new_tokens=20, seed=11,
                                logits_processor=constraint, batch_size=3) == texts
    assert sample_continuations(gene_model, PROMPTS[4], n_samples=7, max_new_tokens=20, seed=12,
                                logits_processor=constraint, batch_size=3) != texts
    for text in texts:
        words = _words(text)
        assert words and set(words) <= set(GENES[:30]) and len(words) == len(set(words)), text


def test_sliding_window_models_sample_from_a_copied_cache(sliding_window_model):
    constraint = GeneVocabularyConstraint(sliding_window_model.tokenizer, GENES[:30])
    shared: list[bool] = []
    handle = sliding_window_model.model.register_forward_pre_hook(
        lambda module, args, kwargs: shared.append("shared_prefix" in kwargs), with_kwargs=True
    )
    try:
        texts = sample_continuations(sliding_window_model, PROMPTS[3], n_samples=6, max_new_tokens=30, seed=0,
                                     logits_processor=constraint)
    finally:
        handle.remove()
    assert not any(shared) and len(shared) > 2
    assert texts == sample_continuations(sliding_window_model, PROMPTS[3], n_samples=6, max_new_tokens=30, seed=0,
                                         logits_processor=constraint)
    for text in texts:
        words = _words(text)
        assert words and set(words) <= set(GENES[:30]) and len(words) == len(set(words)), text


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
