"""Prompt templates and formatting of cell sentences into (model_input, response) pairs.

Templates are data (``prompt_templates/<task>.json``): several paraphrased inputs per task, one
chosen at random per sample with a seed, and one response pattern. Placeholders: ``{num_genes}``,
``{organism}``, ``{cell_sentence}``, ``{cell_type}``. The full training text of a sample is
``model_input + " " + response``.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import numpy as np
import pandas as pd
from datasets import Dataset

logger = logging.getLogger(__name__)

SUPPORTED_TASKS = ("cell_type_prediction", "cell_type_generation")
MULTICELL_TASKS = ("tissue_prediction",)
PAIRED_TASKS = ("perturbation_response",)  # control cell + perturbation -> perturbed cell (core.perturbation)
FORMATTED_COLUMNS = ("sample_type", "model_input", "response")


@dataclass(frozen=True)
class PromptTemplates:
    """The input paraphrases and the response pattern of one task."""

    task: str
    inputs: tuple[str, ...]
    response: str


@cache
def load_templates(task: str) -> PromptTemplates:
    """Templates shipped with the package for ``task``."""
    if task not in SUPPORTED_TASKS + MULTICELL_TASKS + PAIRED_TASKS:
        raise ValueError(
            f"unknown prompt task '{task}'; supported: {', '.join(SUPPORTED_TASKS + MULTICELL_TASKS + PAIRED_TASKS)}"
        )
    text = resources.files("c2s_kedro.core").joinpath("prompt_templates", f"{task}.json").read_text()
    data = json.loads(text)
    return PromptTemplates(task=data["task"], inputs=tuple(data["inputs"]), response=data["response"])


def template_words(tasks: Sequence[str] = SUPPORTED_TASKS + MULTICELL_TASKS) -> list[str]:
    """Every whitespace-separated word of the templates, placeholders removed (for vocabularies)."""
    words: list[str] = []
    for task in tasks:
        templates = load_templates(task)
        for text in (*templates.inputs, templates.response):
            for word in text.replace("\n", " ").split():
                if "{" not in word and word not in words:
                    words.append(word)
    return words


def count_tokens(tokenizer, texts: Sequence[str]) -> np.ndarray:
    """Number of tokens of each text, without special tokens."""
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(texts))


class ContextTooSmallError(ValueError):
    """The model's context cannot hold even the prompt's instruction."""


def fit_to_context(
    render: Callable[[int], str], n_items: int, tokenizer, max_tokens: int | None, reserve: int = 0, what: str = "prompt"
) -> int:
    """The largest ``k`` in ``[0, n_items]`` for which ``render(k)`` plus ``reserve`` tokens fits
    ``max_tokens``: the one routine that fits a text to a model's context.

    ``render(k)`` builds the text with ``k`` genes (per cell, per sentence: whatever the caller
    shortens); its token count must not decrease as ``k`` grows. ``reserve`` counts tokens that
    come after the text (an answer, EOS, tokens still to be generated). The common case (all
    ``n_items`` fit) costs one tokenization, otherwise a binary search. Raises
    ``ContextTooSmallError`` when not even ``render(0)`` fits.
    """
    if max_tokens is None:
        return n_items

    def fits(k: int) -> bool:
        return int(count_tokens(tokenizer, [render(k)])[0]) + reserve <= max_tokens

    if fits(n_items):
        return n_items
    if not fits(0):
        overhead = int(count_tokens(tokenizer, [render(0)])[0])
        raise ContextTooSmallError(
            f"{what}: the instruction alone takes {overhead} tokens without genes (+{reserve} reserved for what "
            f"follows), but the model's context allows {max_tokens}; use a model with a longer context "
            "(max_position_embeddings) or a shorter template"
        )
    low, high = 0, n_items  # fits(low), not fits(high)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def fit_prompt(
    template: str, genes: Sequence[str], fields: dict[str, Any], tokenizer, max_tokens: int | None, reserve: int = 0
) -> tuple[str, int]:
    """Fill ``template`` with as many leading genes as fit, with ``reserve`` tokens after it, in
    ``max_tokens`` tokens (``fit_to_context`` on a one-sentence template).

    Genes are dropped from the end of the sentence (the least expressed), never the instruction
    or the answer cue; ``{num_genes}`` states the number actually kept. Returns the prompt and the
    number of genes kept. Raises ``ContextTooSmallError`` when not even the instruction fits.
    """

    def render(k: int) -> str:
        return template.format(num_genes=k, cell_sentence=" ".join(genes[:k]), **fields)

    kept = fit_to_context(render, len(genes), tokenizer, max_tokens, reserve=reserve)
    return render(kept), kept


def fit_generation(
    template: str, response: str, genes: Sequence[str], fields: dict[str, Any], tokenizer, max_tokens: int | None
) -> int:
    """Most genes ``k`` for which a generation prompt asking for ``k`` genes, then ``" " + response``
    holding the first ``k`` of ``genes``, then EOS fit ``max_tokens`` (``fit_to_context``)."""

    def render(k: int) -> str:
        values = {**fields, "num_genes": k, "cell_sentence": " ".join(genes[:k])}
        return template.format(**values) + " " + response.format(**values)

    return fit_to_context(render, len(genes), tokenizer, max_tokens, reserve=1, what="cell_type_generation sample")


def response_tokens(tokenizer, responses: Sequence[str]) -> int:
    """Tokens of the longest of ``responses`` as it follows a prompt (``" " + response``), EOS not counted."""
    if not len(responses):
        raise ValueError("no responses to count")
    return int(count_tokens(tokenizer, [" " + r for r in responses]).max())


def label_answer_room(tokenizer, labels: Sequence[str], extra_new_tokens: int) -> int:
    """Tokens a cell-type-prediction prompt leaves free for its answer, however it is read: the
    longest ``" {label}."`` with its EOS (label scoring) and ``extra_new_tokens`` past it
    (generation may run on after the longest label)."""
    return response_tokens(tokenizer, [load_templates("cell_type_prediction").response.format(cell_type=label) for label in labels]) + 1 + extra_new_tokens


def _template(task: str, index: int) -> str:
    inputs = load_templates(task).inputs
    if not 0 <= index < len(inputs):
        raise IndexError(f"template index {index} does not exist: {task} has {len(inputs)} templates (0 to {len(inputs) - 1})")
    return inputs[index]


def sentence_table(cell_sentences: Dataset, columns: Sequence[str], optional: Sequence[str] = ()) -> pd.DataFrame:
    """``cell_sentence`` and ``columns`` of a cell-sentence dataset (plus those of ``optional`` it
    has), indexed by ``cell_name``; a missing column of ``columns`` is a ``KeyError`` naming it."""
    missing = [c for c in columns if c not in cell_sentences.column_names]
    if missing:
        raise KeyError(
            f"column(s) {', '.join(repr(c) for c in missing)} not in the cell-sentence dataset; available: "
            f"{', '.join(cell_sentences.column_names)}."
        )
    wanted = list(dict.fromkeys(["cell_name", "cell_sentence", *columns, *(c for c in optional if c in cell_sentences.column_names)]))
    return cell_sentences.select_columns(wanted).to_pandas().set_index("cell_name")


def cell_type_prediction_prompts(
    sentences: Sequence[str | None],
    organisms: Sequence[str | None] | None,
    tokenizer,
    max_tokens: int | None,
    template_index: int | None = 0,
    top_k_genes: int | None = None,
    seed: int = 0,
    default_organism: str = "Homo sapiens",
) -> tuple[list[str], list[int], list[int]]:
    """Cell-type-prediction prompts without their answer, each fitted to ``max_tokens`` tokens.

    ``template_index`` fixes the paraphrase (reproducible embeddings); ``None`` draws one per cell
    with ``seed``, as in training. Returns the prompts, the genes kept and the genes available
    per cell; shortened prompts are counted in the log.
    """
    templates = load_templates("cell_type_prediction").inputs
    rng = np.random.default_rng(seed)
    prompts, kept, available = [], [], []
    for i, sentence in enumerate(sentences):
        genes = (sentence or "").split()[:top_k_genes]
        template = templates[rng.integers(len(templates))] if template_index is None else _template("cell_type_prediction", template_index)
        organism = (organisms[i] if organisms is not None else None) or default_organism
        prompt, n_kept = fit_prompt(template, genes, {"organism": organism}, tokenizer, max_tokens)
        prompts.append(prompt)
        kept.append(n_kept)
        available.append(len(genes))
    shortened = sum(k < a for k, a in zip(kept, available))
    if shortened:
        logger.info(
            "%d of %d prompts shortened to %d tokens (median %d genes kept of %d)",
            shortened, len(prompts), max_tokens, int(np.median(kept)), int(np.median(available)),
        )
    return prompts, kept, available


def cell_generation_prompts(
    sentences: Sequence[str | None],
    cell_types: Sequence[str],
    tokenizer,
    max_tokens: int,
    n_per_type: int,
    template_index: int = 0,
    organism: str = "Homo sapiens",
) -> dict[str, Any]:
    """``n_per_type`` cell-type-conditioned generation prompts for each type of ``cell_types`` (one
    per cell of ``sentences``, the training cells), in sorted type order.

    Each prompt asks for the median number of genes of its type's cells, or for fewer when the
    prompt and its answer would not fit ``max_tokens``: the answer is sized on the type's median
    cell (the first with the fewest genes at or above the median), its first ``k`` genes, "." and
    EOS (``fit_generation``). Returns ``prompt``, ``cell_type``, ``genes_requested`` per prompt
    and ``max_new_tokens``, all the room the longest prompt leaves.
    """
    template = _template("cell_type_generation", template_index)
    response = load_templates("cell_type_generation").response
    table = pd.DataFrame({"cell_type": [str(t) for t in cell_types], "genes": [(s or "").split() for s in sentences]})
    table["n_genes"] = table["genes"].str.len()
    prompts, types, requested = [], [], []
    for cell_type, cells in table.groupby("cell_type", sort=True):
        median = int(cells["n_genes"].median())
        typical = cells.loc[cells["n_genes"] >= median].sort_values("n_genes", kind="stable")["genes"].iloc[0][:median]
        fields = {"cell_type": cell_type, "organism": organism}
        k = fit_generation(template, response, typical, fields, tokenizer, max_tokens)
        if k == 0:
            raise ContextTooSmallError(
                f"a {cell_type} cell_type_generation prompt leaves no room for a single gene of the answer in the "
                f"model's context of {max_tokens} tokens; use a model with a longer context or a shorter template"
            )
        prompts += [template.format(num_genes=k, **fields)] * n_per_type
        types += [cell_type] * n_per_type
        requested += [k] * n_per_type
    if not prompts:
        raise ValueError("no training cell has a cell type: nothing to condition generation on")
    room = max_tokens - int(count_tokens(tokenizer, list(dict.fromkeys(prompts))).max())
    return {"prompt": prompts, "cell_type": types, "genes_requested": requested, "max_new_tokens": room}


class PromptFormatter:
    """Base class of formatters: turn a cell-sentence dataset into ``sample_type``, ``model_input``,
    ``response`` columns.

    Subclasses implement ``format_batch`` (a batch is a dict of column -> list, as
    ``datasets.Dataset.map(batched=True)`` passes it) and may read ``self.rng``. A custom formatter
    is named by dotted path in parameters and built with keyword arguments from parameters.
    """

    task: str = "custom"

    def __init__(self, seed: int = 0, **kwargs: Any) -> None:
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.options = kwargs

    def format_batch(self, batch: dict[str, list]) -> dict[str, list]:
        raise NotImplementedError

    def required_columns(self) -> list[str]:
        return ["cell_sentence"]

    def format_dataset(self, dataset: Dataset, batch_size: int = 1000) -> Dataset:
        """Batched ``map`` over ``dataset``; input columns are replaced by the formatted ones."""
        missing = [c for c in self.required_columns() if c not in dataset.column_names]
        if missing:
            raise KeyError(
                f"{type(self).__name__} needs column(s) {missing} in the cell-sentence dataset; "
                f"available: {', '.join(dataset.column_names)}. Copy them into the sentences when converting the "
                "cells, or change the formatter's column settings."
            )
        self.rng = np.random.default_rng(self.seed)
        return dataset.map(
            self.format_batch,
            batched=True,
            batch_size=batch_size,
            remove_columns=dataset.column_names,
            load_from_cache_file=False,
            keep_in_memory=True,
            desc=f"formatting {self.task} prompts",
        )


class C2SPromptFormatter(PromptFormatter):
    """The built-in C2S tasks on single cells: ``cell_type_prediction`` and
    ``cell_type_generation``.

    ``top_k_genes`` cuts each sentence to its first k genes (None keeps all); ``label_column``
    holds the cell type and ``organism_column`` the organism (``default_organism`` when absent).
    With a ``tokenizer`` and ``max_tokens``, every sample fits ``max_tokens`` tokens including the
    response and EOS: a prediction prompt loses genes from the end of its sentence (the answer is
    never cut); a generation sample asks for, and answers with, as many genes as fit.
    """

    def __init__(
        self,
        task: str = "cell_type_prediction",
        top_k_genes: int | None = None,
        label_column: str = "cell_type",
        organism_column: str = "organism",
        default_organism: str = "Homo sapiens",
        seed: int = 0,
        tokenizer=None,
        max_tokens: int | None = None,
    ) -> None:
        super().__init__(seed=seed)
        self.templates = load_templates(task)
        self.task = task
        self.top_k_genes = top_k_genes
        self.label_column = label_column
        self.organism_column = organism_column
        self.default_organism = default_organism
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens if tokenizer is not None else None
        self.n_shortened = 0

    def required_columns(self) -> list[str]:
        return ["cell_sentence", self.label_column]

    def format_batch(self, batch: dict[str, list]) -> dict[str, list]:
        n = len(batch["cell_sentence"])
        organisms = batch.get(self.organism_column) or [self.default_organism] * n
        choices = self.rng.integers(0, len(self.templates.inputs), size=n)
        inputs, responses = [], []
        for sentence, label, organism, choice in zip(batch["cell_sentence"], batch[self.label_column], organisms, choices):
            genes = (sentence or "").split()[: self.top_k_genes]
            template = self.templates.inputs[choice]
            fields = {"organism": organism or self.default_organism, "cell_type": label}
            if self.max_tokens is not None:
                if self.task == "cell_type_prediction":  # the answer and its EOS follow the prompt
                    answer = response_tokens(self.tokenizer, [self.templates.response.format(**fields)]) + 1
                    kept = fit_prompt(template, genes, fields, self.tokenizer, self.max_tokens, reserve=answer)[1]
                else:  # the answer holds the genes the prompt asks for
                    kept = fit_generation(template, self.templates.response, genes, fields, self.tokenizer, self.max_tokens)
                self.n_shortened += kept < len(genes)
                genes = genes[:kept]
            values = {**fields, "num_genes": len(genes), "cell_sentence": " ".join(genes)}
            inputs.append(template.format(**values))
            responses.append(self.templates.response.format(**values))
        return {"sample_type": [self.task] * n, "model_input": inputs, "response": responses}

    def format_dataset(self, dataset: Dataset, batch_size: int = 1000) -> Dataset:
        self.n_shortened = 0
        formatted = super().format_dataset(dataset, batch_size)
        if self.n_shortened:
            logger.info(
                "%d of %d %s samples lost genes from the end of their sentence to fit %d tokens",
                self.n_shortened, dataset.num_rows, self.task, self.max_tokens,
            )
        return formatted


def build_formatter(
    task: str, formatter: str | None = None, options: dict[str, Any] | None = None, **common: Any
) -> PromptFormatter:
    """The built-in formatter for ``task``, or a user subclass of ``PromptFormatter`` named by
    dotted path (``my_package.prompts.MyFormatter``) and built with ``options``."""
    options = dict(options or {})
    if formatter is None and task in MULTICELL_TASKS:
        keep = {k: v for k, v in common.items() if k in ("seed", "top_k_genes", "organism_column", "tokenizer", "max_tokens")}
        return TissuePredictionFormatter(**keep, **options)
    if formatter is None:
        return C2SPromptFormatter(task=task, **common, **options)
    module_name, _, class_name = formatter.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(
            f"prompt formatter '{formatter}' cannot be imported ({error}); give the dotted path of a "
            "PromptFormatter subclass, e.g. c2s_kedro.core.example_formatters.TissueAwareCellTypeFormatter"
        ) from error
    if not (isinstance(cls, type) and issubclass(cls, PromptFormatter)):
        raise ValueError(f"'{formatter}' is not a subclass of c2s_kedro.core.prompts.PromptFormatter")
    return cls(seed=common.get("seed", 0), **options)


class TissuePredictionFormatter(PromptFormatter):
    """Multi-cell ``tissue_prediction``: ``cells_per_prompt`` cells of one tissue in one prompt, one
    cell sentence per line; the answer is the tissue.

    Cells are grouped by tissue in a seeded random order (a tissue's last group may be smaller).
    With a ``tokenizer`` and ``max_tokens`` every cell's sentence is cut to the same number of
    genes so the whole prompt and its answer fit.
    """

    task = "tissue_prediction"

    def __init__(
        self,
        seed: int = 0,
        cells_per_prompt: int = 3,
        top_k_genes: int | None = 100,
        tissue_column: str = "tissue",
        organism_column: str = "organism",
        default_organism: str = "Homo sapiens",
        tokenizer=None,
        max_tokens: int | None = None,
    ) -> None:
        super().__init__(seed=seed)
        self.templates = load_templates("tissue_prediction")
        self.cells_per_prompt = cells_per_prompt
        self.top_k_genes = top_k_genes
        self.tissue_column = tissue_column
        self.organism_column = organism_column
        self.default_organism = default_organism
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens if tokenizer is not None else None

    def required_columns(self) -> list[str]:
        return ["cell_sentence", self.tissue_column]

    def _render(self, template: str, sentences: list[list[str]], k: int, fields: dict[str, Any]) -> str:
        lines = "\n".join(f"Cell {i + 1}: {' '.join(genes[:k])}." for i, genes in enumerate(sentences))
        return template.format(num_cells=len(sentences), num_genes=k, cell_sentences=lines, **fields)

    def _prompt(self, template: str, sentences: list[list[str]], fields: dict[str, Any]) -> str:
        longest = max((len(genes) for genes in sentences), default=0)
        if self.max_tokens is None:
            return self._render(template, sentences, longest, fields)
        answer = response_tokens(self.tokenizer, [self.templates.response.format(**fields)]) + 1  # and EOS
        k = fit_to_context(lambda k: self._render(template, sentences, k, fields), longest, self.tokenizer, self.max_tokens,
                           reserve=answer, what=f"tissue_prediction prompt of {len(sentences)} cells")
        return self._render(template, sentences, k, fields)

    def format_batch(self, batch: dict[str, list]) -> dict[str, list]:
        tissues = batch[self.tissue_column]
        organisms = batch.get(self.organism_column) or [self.default_organism] * len(tissues)
        order = self.rng.permutation(len(tissues))
        groups: dict[str, list[int]] = {}
        for i in order:
            if tissues[i] is not None:
                groups.setdefault(str(tissues[i]), []).append(int(i))
        inputs, responses = [], []
        for tissue, members in groups.items():
            for start in range(0, len(members), self.cells_per_prompt):
                chosen = members[start : start + self.cells_per_prompt]
                sentences = [(batch["cell_sentence"][i] or "").split()[: self.top_k_genes] for i in chosen]
                fields = {"tissue": tissue, "organism": organisms[chosen[0]] or self.default_organism}
                template = self.templates.inputs[self.rng.integers(len(self.templates.inputs))]
                inputs.append(self._prompt(template, sentences, fields))
                responses.append(self.templates.response.format(**fields))
        return {"sample_type": [self.task] * len(inputs), "model_input": inputs, "response": responses}
