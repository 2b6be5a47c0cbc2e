"""Prompt templates, formatters and the one routine that fits a prompt to the model's context."""

from __future__ import annotations

import importlib
import re

import pytest
from datasets import Dataset

from c2s_kedro.core.models.tokenizer import build_gene_tokenizer
from c2s_kedro.core.prompts.formatting import (
    word_tokens,
    C2SPromptFormatter,
    ContextTooSmallError,
    build_formatter,
    cell_generation_prompts,
    fit_generation,
    fit_prompt,
    fit_to_context,
    label_answer_room,
    load_templates,
    sentence_table,
    template_words,
)

from tests.helpers import TRICKY_GENES, byte_level_bpe_tokenizer

GENES = TRICKY_GENES
LABELS = ["T cell", "B cell", "CD14+ Monocyte"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_gene_tokenizer(GENES, template_words() + ["CD14+ Monocyte", "Homo sapiens"], model_max_length=128)


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """Several tokens per gene, and token counts that do not add up gene by gene."""
    corpus = [" ".join(GENES)] + list(load_templates("cell_type_prediction").inputs) + list(load_templates("cell_type_generation").inputs)
    return byte_level_bpe_tokenizer(corpus)


def _tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_fit_prompt_drops_genes_from_the_end_and_refuses_a_tiny_context(tokenizer):
    template = load_templates("cell_type_prediction").inputs[0]
    fields = {"organism": "Homo sapiens"}
    full, kept = fit_prompt(template, GENES, fields, tokenizer, max_tokens=None)
    assert kept == len(GENES)
    prompt, kept = fit_prompt(template, GENES, fields, tokenizer, max_tokens=100)
    assert 0 < kept < len(GENES)
    assert len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) <= 100
    assert " ".join(GENES[:kept]) + ".\n" in prompt and GENES[kept] not in prompt.split()
    assert f" {kept} most" in prompt  # the instruction states the number of genes kept
    assert prompt.endswith("The cell type corresponding to these genes is:")
    with pytest.raises(ContextTooSmallError, match="instruction alone takes"):
        fit_prompt(template, GENES, fields, tokenizer, max_tokens=10)


@pytest.mark.parametrize("name", ["tokenizer", "bpe_tokenizer"])
def test_fit_prompt_keeps_the_most_genes_that_fit_with_the_reserve(name, request):
    tokenizer = request.getfixturevalue(name)
    template = load_templates("cell_type_prediction").inputs[3]
    fields = {"organism": "Homo sapiens"}
    for max_tokens in (115, 150, 222):
        for reserve in (0, 4):
            prompt, kept = fit_prompt(template, GENES, fields, tokenizer, max_tokens, reserve=reserve)
            longer = template.format(num_genes=kept + 1, cell_sentence=" ".join(GENES[: kept + 1]), **fields)
            assert _tokens(tokenizer, prompt) + reserve <= max_tokens < _tokens(tokenizer, longer) + reserve


def test_fit_to_context_searches_only_when_the_whole_text_does_not_fit(tokenizer):
    rendered: list[int] = []

    def render(k: int) -> str:
        rendered.append(k)
        return " ".join(GENES[:k])

    assert fit_to_context(render, 50, tokenizer, max_tokens=60) == 50 and rendered == [50]
    assert fit_to_context(render, 50, tokenizer, max_tokens=30, reserve=5) == 25
    assert fit_to_context(render, 50, tokenizer, max_tokens=None) == 50
    with pytest.raises(ContextTooSmallError, match=r"sentence: the instruction alone takes 0 tokens without genes \(\+3 reserved"):
        fit_to_context(lambda k: "", 5, tokenizer, max_tokens=2, reserve=3, what="sentence")


def test_fit_to_context_never_tokenizes_more_genes_than_the_context_has_tokens(tokenizer, bpe_tokenizer):
    genes = GENES * 40  # a long sentence for a short context (an atlas cell's 2,300 genes, 512 tokens)
    for tok in (tokenizer, bpe_tokenizer):
        rendered: list[int] = []

        def render(k: int) -> str:
            rendered.append(k)
            return " ".join(genes[:k])

        kept = fit_to_context(render, len(genes), tok, max_tokens=64)
        assert _tokens(tok, " ".join(genes[:kept])) <= 64 < _tokens(tok, " ".join(genes[: kept + 1]))
        assert max(rendered) <= 65
    # items of no tokens past the cap: the search goes on above it (found, not assumed)
    padded = lambda k: " ".join(GENES[: min(k, 10)])
    assert fit_to_context(padded, 500, tokenizer, max_tokens=64) == 500


@pytest.mark.parametrize("name", ["tokenizer", "bpe_tokenizer"])
def test_a_guess_of_each_genes_tokens_changes_the_cost_of_fitting_never_the_answer(name, request):
    tok = request.getfixturevalue(name)
    genes = GENES * 8
    template = load_templates("cell_type_prediction").inputs[0]
    render = lambda k: template.format(num_genes=k, cell_sentence=" ".join(genes[:k]), organism="Homo sapiens")
    exact = word_tokens(tok, genes)
    overhead = _tokens(tok, render(0))
    for max_tokens in (overhead + 3, overhead + 37, overhead + 90, overhead + 300, 5000):
        for reserve in (0, 3):
            truth = fit_to_context(render, len(genes), tok, max_tokens, reserve=reserve)
            for guess in (exact, exact * 0, exact * 7, exact[:5], [1] * len(genes)):
                assert fit_to_context(render, len(genes), tok, max_tokens, reserve=reserve, item_tokens=guess) == truth
    with pytest.raises(ContextTooSmallError, match="instruction alone takes"):
        fit_to_context(render, len(genes), tok, overhead - 1, item_tokens=exact)
    assert fit_to_context(lambda k: " ".join(genes[:k]), 0, tok, 10, item_tokens=[]) == 0


def test_a_right_guess_fits_a_long_sentence_with_three_tokenizations(tokenizer):
    """The first look at max_tokens + 1 genes, then the guess and the one after it."""
    genes = GENES * 40
    rendered: list[int] = []

    def render(k: int) -> str:
        rendered.append(k)
        return " ".join(genes[:k])

    kept = fit_to_context(render, len(genes), tokenizer, 64, item_tokens=word_tokens(tokenizer, genes))
    assert _tokens(tokenizer, render(kept)) <= 64 < _tokens(tokenizer, render(kept + 1))
    assert rendered[:3] == [65, kept, kept + 1] and len(rendered) == 5  # the search's three, then the two checks above


def test_fitting_a_long_prompt_does_not_print_the_tokenizers_length_warning(bpe_tokenizer, capsys, caplog):
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()  # transformers' own handler writes to stderr; pytest sees both
    short = bpe_tokenizer.model_max_length
    bpe_tokenizer.model_max_length = 16
    bpe_tokenizer.deprecation_warnings.pop("sequence-length-is-longer-than-the-specified-maximum", None)  # warned once
    try:
        assert fit_to_context(lambda k: " ".join(GENES[:k]), len(GENES), bpe_tokenizer, max_tokens=16) < len(GENES)
    finally:
        bpe_tokenizer.model_max_length = short
        hf_logging.disable_propagation()
    assert "longer than the specified maximum" not in capsys.readouterr().err + caplog.text


def test_generation_samples_ask_for_and_answer_with_the_genes_that_fit(tokenizer):
    templates = load_templates("cell_type_generation")
    fields = {"organism": "Homo sapiens", "cell_type": "CD14+ Monocyte"}

    def sample(k: int) -> str:
        values = {**fields, "num_genes": k, "cell_sentence": " ".join(GENES[:k])}
        return templates.inputs[0].format(**values) + " " + templates.response.format(**values)

    kept = fit_generation(templates.inputs[0], templates.response, GENES, fields, tokenizer, max_tokens=128)
    assert _tokens(tokenizer, sample(kept)) + 1 <= 128 < _tokens(tokenizer, sample(kept + 1)) + 1  # EOS counted
    assert fit_generation(templates.inputs[0], templates.response, GENES[:10], fields, tokenizer, max_tokens=128) == 10
    formatted = C2SPromptFormatter(task="cell_type_generation", tokenizer=tokenizer, max_tokens=128).format_dataset(
        Dataset.from_dict({"cell_sentence": [" ".join(GENES)], "cell_type": ["CD14+ Monocyte"]})
    )
    prompt, response = formatted["model_input"][0], formatted["response"][0]
    answered = len(response.rstrip(".").split())
    assert response == " ".join(GENES[:answered]) + "." and f" {answered} " in prompt and answered < len(GENES)
    assert _tokens(tokenizer, prompt + " " + response) + 1 <= 128


def test_generation_prompts_ask_for_the_median_cell_or_what_fits(tokenizer):
    sentences = [" ".join(GENES[:n]) for n in (10, 30, 20, 200, 150, 160)]
    types = ["T cell", "T cell", "T cell", "B cell", "B cell", "B cell"]
    roomy = cell_generation_prompts(sentences, types, tokenizer, max_tokens=1000, n_per_type=2)
    assert roomy["cell_type"] == ["B cell", "B cell", "T cell", "T cell"]  # sorted by type
    assert roomy["genes_requested"] == [160, 160, 20, 20]  # the median number of genes of each type
    assert "Generate the 160 most" in roomy["prompt"][0] and roomy["prompt"][0] == roomy["prompt"][1]
    assert roomy["max_new_tokens"] == 1000 - max(_tokens(tokenizer, p) for p in roomy["prompt"])
    # what guidance pushes away from: the same prompt (same number of genes) without its cell type
    assert roomy["unconditional_prompt"][0] == roomy["prompt"][0].replace(" B cell", "")
    assert roomy["unconditional_prompt"][2] == roomy["prompt"][2].replace(" T cell", "")
    assert "cell" in roomy["unconditional_prompt"][0] and "B cell" not in roomy["unconditional_prompt"][0]

    tight = cell_generation_prompts(sentences, types, tokenizer, max_tokens=128, n_per_type=1, template_index=2)
    b_cell = tight["genes_requested"][0]
    assert b_cell < 160 and tight["genes_requested"][1] == 20
    prompt = tight["prompt"][0]
    assert prompt == load_templates("cell_type_generation").inputs[2].format(num_genes=b_cell, organism="Homo sapiens", cell_type="B cell")
    # the prompt, the first genes of the type's median cell, "." and EOS fit; one gene more would not
    answer = " " + " ".join(GENES[:b_cell]) + "."
    assert _tokens(tokenizer, prompt + answer) + 1 <= 128
    assert tight["max_new_tokens"] == 128 - max(_tokens(tokenizer, p) for p in tight["prompt"])
    assert tight["max_new_tokens"] >= _tokens(tokenizer, answer) + 1
    with pytest.raises(IndexError, match="template index 10 does not exist: cell_type_generation has 10 templates"):
        cell_generation_prompts(sentences, types, tokenizer, max_tokens=128, n_per_type=1, template_index=10)
    with pytest.raises(ContextTooSmallError, match="instruction alone takes"):
        cell_generation_prompts(sentences, types, tokenizer, max_tokens=20, n_per_type=1)


def test_generation_prompts_ask_at_most_the_fine_tuned_length(tokenizer):
    sentences = [" ".join(GENES[:n]) for n in (10, 30, 20, 200, 150, 160)]
    types = ["T cell", "T cell", "T cell", "B cell", "B cell", "B cell"]
    capped = cell_generation_prompts(sentences, types, tokenizer, max_tokens=1000, n_per_type=1, max_genes=100)
    # B cells' median (160) is cut to the cap; T cells' (20) is below it and stays
    assert capped["genes_requested"] == [100, 20]
    assert "Generate the 100 most" in capped["prompt"][0]
    assert cell_generation_prompts(sentences, types, tokenizer, max_tokens=1000, n_per_type=1,
                                   max_genes=None)["genes_requested"] == [160, 20]
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="max_genes must be a whole number"):
            cell_generation_prompts(sentences, types, tokenizer, max_tokens=1000, n_per_type=1, max_genes=bad)


def test_answer_room_is_the_longest_label_answer_with_eos_and_the_extra_tokens(tokenizer):
    longest = max(_tokens(tokenizer, f" {label}.") for label in LABELS)
    assert label_answer_room(tokenizer, LABELS, extra_new_tokens=2) == longest + 1 + 2
    assert label_answer_room(tokenizer, ["T cell"], 0) == _tokens(tokenizer, " T cell.") + 1


def test_sentence_table_names_a_missing_column_and_what_there_is():
    cells = Dataset.from_dict({"cell_name": ["a", "b"], "cell_sentence": ["CD3D", ""], "cell_type": ["T", "B"]})
    table = sentence_table(cells, ["cell_type"], optional=["organism"])
    assert list(table.index) == ["a", "b"] and list(table.columns) == ["cell_sentence", "cell_type"]
    with pytest.raises(KeyError, match=r"'annotation' not in the cell-sentence dataset; available: cell_name, cell_sentence, cell_type"):
        sentence_table(cells, ["annotation"])


def test_a_formatter_that_does_not_import_is_refused_with_an_example_that_does():
    with pytest.raises(ValueError, match="cannot be imported") as error:
        build_formatter("cell_type_prediction", "no_such_module.Formatter")
    example = re.search(r"e\.g\. ([\w.]+)", str(error.value)).group(1)
    module, _, name = example.rpartition(".")
    assert isinstance(getattr(importlib.import_module(module), name), type)


def test_tissue_prompts_that_cannot_hold_their_cells_are_refused(tokenizer):
    cells = Dataset.from_dict({"cell_sentence": [" ".join(GENES[:30])] * 3, "tissue": ["blood"] * 3})
    with pytest.raises(ContextTooSmallError, match="tissue_prediction prompt of 3 cells: the instruction alone takes"):
        build_formatter("tissue_prediction", options={"cells_per_prompt": 3}, tokenizer=tokenizer, max_tokens=20).format_dataset(cells)
    fitted = build_formatter("tissue_prediction", options={"cells_per_prompt": 3}, tokenizer=tokenizer, max_tokens=80).format_dataset(cells)
    genes_per_cell = {len(line.split(": ", 1)[1].rstrip(".").split()) for line in fitted["model_input"][0].split("\n") if line.startswith("Cell ")}
    assert len(genes_per_cell) == 1 and 0 < genes_per_cell.pop() < 30  # every cell cut to the same genes
    assert _tokens(tokenizer, fitted["model_input"][0] + " " + fitted["response"][0]) + 1 <= 80


def test_formatter_picks_templates_with_the_seed_and_needs_its_label_column():
    data = Dataset.from_dict({"cell_name": ["a", "b", "c"], "cell_sentence": ["CD3D CD8A", "MT-CO1", ""], "cell_type": ["T", "B", "T"]})
    formatter = C2SPromptFormatter(task="cell_type_prediction", top_k_genes=1, seed=3)
    first, second = formatter.format_dataset(data), formatter.format_dataset(data)
    assert first.column_names == ["sample_type", "model_input", "response"]
    assert first["model_input"] == second["model_input"]
    assert first["response"] == ["T.", "B.", "T."]
    assert "CD8A" not in first["model_input"][0] and "CD3D" in first["model_input"][0]
    with pytest.raises(KeyError, match="tissue"):
        C2SPromptFormatter(label_column="tissue").format_dataset(data)
    with pytest.raises(ValueError, match="unknown prompt task"):
        C2SPromptFormatter(task="protein_folding")


@pytest.mark.parametrize("task", ["cell_type_prediction", "cell_type_generation"])
def test_cells_without_a_label_give_no_sample_so_none_is_never_taught(task, tokenizer, caplog):
    # None as conversion stores a missing label; "nan" and "" as older datasets or a str() of a missing value hold them
    data = Dataset.from_dict({"cell_name": list("abcde"), "cell_sentence": ["CD3D CD8A", "MT-CO1", "CD3D", "CD8A", "CD3"],
                              "cell_type": ["T cell", None, "nan", "", "B cell"]})
    formatter = C2SPromptFormatter(task=task, seed=0, tokenizer=tokenizer, max_tokens=128)
    with caplog.at_level("INFO"):
        formatted = formatter.format_dataset(data, batch_size=2)  # the unlabelled cells span batches
    assert formatted.num_rows == 2 and formatter.n_without_label == 3
    texts = " ".join(list(formatted["model_input"]) + list(formatted["response"]))
    assert "T cell" in texts and "B cell" in texts
    assert not re.search(r"\bNone\b|\bnan\b", texts)
    assert f"3 of 5 cells have no 'cell_type' label: no {task} sample for them" in caplog.text


def test_generation_prompts_never_ask_for_a_cell_without_a_type(tokenizer):
    sentences = [" ".join(GENES[:n]) for n in (10, 30, 20, 40, 50)]
    prompts = cell_generation_prompts(sentences, ["T cell", None, "nan", "T cell", ""], tokenizer, max_tokens=1000, n_per_type=1)
    assert prompts["cell_type"] == ["T cell"] and prompts["genes_requested"] == [25]  # the median of the typed cells
    assert not any("None" in p or "nan" in p for p in prompts["prompt"])
    with pytest.raises(ValueError, match="no training cell has a cell type"):
        cell_generation_prompts(sentences[:2], [None, "nan"], tokenizer, max_tokens=1000, n_per_type=1)


def test_sentence_table_refuses_a_name_of_several_cells():
    cells = Dataset.from_dict({"cell_name": ["a", "b", "a"], "cell_sentence": ["CD3D", "", "CD8A"], "cell_type": ["T", "B", "T"]})
    with pytest.raises(ValueError, match=r"1 cell names occur more than once in the cell sentences \(e\.g\. a\)"):
        sentence_table(cells, ["cell_type"])
