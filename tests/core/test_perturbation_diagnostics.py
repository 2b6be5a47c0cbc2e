"""Input sensitivity: a model that reads the perturbation's name against one that cannot."""

from __future__ import annotations

import logging
import re
import string

import numpy as np
import pytest
import torch
from datasets import Dataset

from c2s_kedro.core.models.loading import build_gpt_neox
from c2s_kedro.core.models.tokenizer import build_gene_tokenizer
from c2s_kedro.core.models.training import IGNORE_INDEX, tokenize_pairs
from c2s_kedro.core.prompts.formatting import load_templates, template_words
from c2s_kedro.core.prompts.perturbation import PerturbationPromptFormatter
from c2s_kedro.core.tasks.perturbation.diagnostics import input_sensitivity

GENES = [f"G{i}" for i in range(20)]
CONTROL = "non-targeting"
CONTEXT = 96
TRAINING_STEPS = 200


def _toy_pairs(n: int, seed: int, genes_per_cell: int = 4, control_share: float = 0.25) -> Dataset:
    """A knockdown screen in miniature: the perturbed cell is the control cell without the named
    gene (one of the control cell's genes); a quarter are control -> control pairs, unchanged."""
    rng = np.random.default_rng(seed)
    names, controls, perturbed = [], [], []
    for _ in range(n):
        cell = [GENES[i] for i in np.sort(rng.choice(len(GENES), size=genes_per_cell, replace=False))]
        if rng.random() < control_share:
            name, response = CONTROL, cell
        else:
            name = str(rng.choice(cell))
            response = [gene for gene in cell if gene != name]
        names.append(name)
        controls.append(" ".join(cell))
        perturbed.append(" ".join(response))
    return Dataset.from_dict({"perturbation": names, "control_sentence": controls, "perturbed_sentence": perturbed})


def _tiny_model(seed: int = 0):
    words = [*template_words(("perturbation_response",)), CONTROL.upper()]
    tokenizer = build_gene_tokenizer(GENES, words, model_max_length=CONTEXT)
    return build_gpt_neox(tokenizer, {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                                      "max_position_embeddings": CONTEXT}, seed=seed)


def _formatter(language_model, **options) -> PerturbationPromptFormatter:
    settings = {"top_k_genes": None, "seed": 0, "tokenizer": language_model.tokenizer, "max_tokens": CONTEXT, **options}
    return PerturbationPromptFormatter(**settings)


def _padded(tokenized: dict[str, list]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in tokenized["input_ids"])
    ids = torch.zeros((len(tokenized["input_ids"]), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for row, (sample, label) in enumerate(zip(tokenized["input_ids"], tokenized["labels"])):
        ids[row, : len(sample)] = torch.tensor(sample)
        mask[row, : len(sample)] = 1
        labels[row, : len(label)] = torch.tensor(label)
    return ids, mask, labels


def _trained(pairs: Dataset, steps: int = TRAINING_STEPS, seed: int = 0):
    """A tiny GPT-NeoX trained on ``pairs`` (loss on the response), a plain torch loop."""
    language_model = _tiny_model(seed)
    model = language_model.model
    ids, mask, labels = _padded(tokenize_pairs(_formatter(language_model).format_dataset(pairs)[:], language_model.tokenizer))
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    threads = torch.get_num_threads()
    # matrices this small gain nothing from a second thread, and on a busy machine the threads
    # wait for each other (minutes instead of seconds)
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            batch = torch.randint(0, len(ids), (32,), generator=generator)
            loss = model(input_ids=ids[batch], attention_mask=mask[batch], labels=labels[batch]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return language_model


@pytest.fixture(scope="module")
def toy_screen() -> tuple[Dataset, Dataset]:
    return _toy_pairs(800, seed=0), _toy_pairs(200, seed=1)


@pytest.fixture(scope="module")
def reading_model(toy_screen):
    return _trained(toy_screen[0])


@pytest.fixture(scope="module")
def deaf_model(toy_screen):
    # the same cells with the names permuted across pairs (the control label among them): the
    # model sees real names in training but learns that they predict nothing
    train = toy_screen[0]
    names = np.random.default_rng(3).permutation(train["perturbation"]).tolist()
    return _trained(train.remove_columns("perturbation").add_column("perturbation", names))


def test_a_model_that_reads_the_name_is_sensitive_to_it_and_a_deaf_one_is_not(toy_screen, reading_model, deaf_model):
    pairs = toy_screen[1]
    reading, table = input_sensitivity(reading_model, pairs, _formatter(reading_model), CONTROL, n_pairs=64)
    deaf, _ = input_sensitivity(deaf_model, pairs, _formatter(deaf_model), CONTROL, n_pairs=64)
    assert reading["sensitivity.n_pairs"] == deaf["sensitivity.n_pairs"] == 64
    assert (table["perturbation"] != CONTROL).all()  # control -> control pairs are left out
    # the reader prefers the real response under its own name, and naming a gene makes it drop it
    assert reading["sensitivity.name_swap_nats"] > 1.0 and reading["sensitivity.name_swap_nats_per_token"] > 0.1
    assert reading["sensitivity.name_to_control_nats"] > 1.0
    assert reading["sensitivity.target_logprob_shift"] < -0.5
    # the deaf model does not care which name the prompt holds
    assert abs(deaf["sensitivity.name_swap_nats"]) < 0.5
    assert abs(deaf["sensitivity.name_swap_nats"]) < reading["sensitivity.name_swap_nats"] / 5
    assert abs(deaf["sensitivity.name_to_control_nats"]) < 0.5
    assert abs(deaf["sensitivity.target_logprob_shift"]) < 0.5
    # both copy the control cell, so both read it
    assert reading["sensitivity.control_swap_nats"] > 5.0 and deaf["sensitivity.control_swap_nats"] > 5.0
    assert (table["swapped_perturbation"].str.upper() != table["perturbation"].str.upper()).all()


class _RecordingFormatter(PerturbationPromptFormatter):
    """Keeps what each ``format_dataset`` call read and wrote, to check the variants' templates."""

    def __init__(self, **options):
        super().__init__(**options)
        self.calls: list[tuple[Dataset, list[str]]] = []

    def format_dataset(self, dataset: Dataset, batch_size: int = 1000) -> Dataset:
        formatted = super().format_dataset(dataset, batch_size)
        self.calls.append((dataset, list(formatted["model_input"])))
        return formatted


def _template_index(prompt: str) -> int:
    """Which perturbation template wrote ``prompt`` (its literal parts, placeholders as wildcards)."""
    matches = []
    for index, template in enumerate(load_templates("perturbation_response").inputs):
        pattern = "".join(re.escape(literal) + ("(.*?)" if field is not None else "")
                          for literal, field, _, _ in string.Formatter().parse(template))
        if re.fullmatch(pattern, prompt, flags=re.DOTALL):
            matches.append(index)
    assert len(matches) == 1, prompt
    return matches[0]


def test_every_variant_of_a_pair_is_written_with_the_pair_s_template():
    language_model = _tiny_model()
    formatter = _RecordingFormatter(top_k_genes=None, seed=5, tokenizer=language_model.tokenizer, max_tokens=CONTEXT)
    _, table = input_sensitivity(language_model, _toy_pairs(200, seed=1), formatter, CONTROL, n_pairs=64)
    assert len(formatter.calls) == 4  # true, name swap, name -> control, control swap
    templates = np.array([[_template_index(prompt) for prompt in prompts] for _, prompts in formatter.calls])
    assert len(set(templates[0])) > 1  # the draws differ between pairs, so the match below means something
    assert (templates == templates[0]).all()
    true, name_swap, to_control, control_swap = (dataset.to_pandas() for dataset, _ in formatter.calls)
    assert true["perturbation"].tolist() == table["perturbation"].tolist()
    assert name_swap["perturbation"].tolist() == table["swapped_perturbation"].tolist()
    assert set(to_control["perturbation"]) == {CONTROL}
    assert (true["control_sentence"] != control_swap["control_sentence"]).all()
    assert (control_swap["perturbation"] == true["perturbation"]).all()


def test_scores_are_the_model_s_own_loss_on_each_response():
    language_model = _tiny_model()
    pairs = _toy_pairs(40, seed=2).map(lambda row, i: {"perturbed_sentence": " ".join(GENES[: 2 + i % 7])}, with_indices=True)
    _, table = input_sensitivity(language_model, pairs, _formatter(language_model), CONTROL, n_pairs=8, batch_size=3)
    formatted = _formatter(language_model).format_dataset(pairs.select(table["row"].tolist()))
    tokenized = tokenize_pairs(formatted[:], language_model.tokenizer)
    for row, (ids, labels) in enumerate(zip(tokenized["input_ids"], tokenized["labels"])):
        with torch.inference_mode():  # one unpadded sample: the mean loss over its response tokens
            loss = language_model.model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
        n_tokens = sum(label != IGNORE_INDEX for label in labels)
        assert table["n_response_tokens"][row] == n_tokens
        assert table["log_likelihood_true"][row] == pytest.approx(-float(loss) * n_tokens, rel=1e-4, abs=1e-4)
        # written-token mass: at each response position after the first, the probability of the
        # response's tokens already written, averaged over positions
        with torch.inference_mode():
            probs = language_model.model(input_ids=torch.tensor([ids])).logits[0].softmax(-1)
        at = [j for j, label in enumerate(labels) if label != IGNORE_INDEX]
        masses = [float(probs[j - 1, [labels[k] for k in at[:n]]].sum()) for n, j in enumerate(at) if n > 0]
        assert table["written_token_mass"][row] == pytest.approx(np.mean(masses), rel=1e-4, abs=1e-6)


def test_the_written_token_mass_is_left_out_where_response_tokens_repeat(caplog):
    # as byte-level BPE writes gene names in pieces that recur; here a gene written twice
    language_model = _tiny_model()
    pairs = _toy_pairs(20, seed=2).map(lambda row: {"perturbed_sentence": "G1 G2 G1 G3"})
    with caplog.at_level(logging.INFO):
        metrics, table = input_sensitivity(language_model, pairs, _formatter(language_model), CONTROL, n_pairs=8)
    assert table["written_token_mass"].isna().all()
    assert "sensitivity.written_token_mass" not in metrics and "written_token_mass is not measured" in caplog.text
    metrics, _ = input_sensitivity(language_model, _toy_pairs(20, seed=2), _formatter(language_model), CONTROL, n_pairs=8)
    assert 0 < metrics["sensitivity.written_token_mass"] < 1


@pytest.mark.parametrize("missing", ["perturbation", "control_sentence", "perturbed_sentence"])
def test_a_missing_column_is_named(missing):
    language_model = _tiny_model()
    with pytest.raises(KeyError, match=missing):
        input_sensitivity(language_model, _toy_pairs(10, seed=0).remove_columns(missing), _formatter(language_model), CONTROL)


def test_pairs_that_cannot_be_scored_are_refused():
    language_model = _tiny_model()
    pairs = _toy_pairs(10, seed=0)
    with pytest.raises(ValueError, match="no perturbation pairs"):
        input_sensitivity(language_model, pairs.select([]), _formatter(language_model), CONTROL)
    with pytest.raises(ValueError, match="control -> control"):
        input_sensitivity(language_model, pairs.map(lambda row: {"perturbation": CONTROL}), _formatter(language_model), CONTROL)
    long = pairs.map(lambda row: {"control_sentence": " ".join(GENES * 4)})
    with pytest.raises(ValueError, match="max_tokens"):  # a formatter that does not fit prompts to the context
        input_sensitivity(language_model, long, PerturbationPromptFormatter(top_k_genes=None), CONTROL)


def test_one_perturbation_leaves_the_name_swap_out_and_says_so(caplog):
    language_model = _tiny_model()
    pairs = _toy_pairs(30, seed=0).map(lambda row: {"perturbation": row["perturbation"] if row["perturbation"] == CONTROL
                                                    else "G3"})
    with caplog.at_level(logging.WARNING, logger="c2s_kedro.core.tasks.perturbation.diagnostics"):
        metrics, table = input_sensitivity(language_model, pairs, _formatter(language_model), CONTROL, n_pairs=8)
    assert not any(key.startswith("sensitivity.name_swap") for key in metrics)
    assert "swapped_perturbation" not in table.columns
    assert "name swap is not measured" in caplog.text
    expected = {"sensitivity.n_pairs", "sensitivity.name_to_control_nats", "sensitivity.name_to_control_nats_per_token",
                "sensitivity.control_swap_nats", "sensitivity.control_swap_nats_per_token",
                "sensitivity.target_logprob_shift", "sensitivity.n_target_pairs", "sensitivity.written_token_mass"}
    assert set(metrics) == expected
    assert all(isinstance(value, float) and np.isfinite(value) for value in metrics.values())
    assert metrics["sensitivity.n_target_pairs"] == 8  # G3 is one token of the vocabulary
