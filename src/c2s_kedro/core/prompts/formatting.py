"""Prompt templates and formatting of cell sentences into (model_input, response) pairs.

Templates are data (``prompt_templates/<task>.json``): several paraphrased inputs per task, one
chosen at random per sample with a seed, and one response pattern. Placeholders: ``{num_genes}``,
``{organism}``, ``{cell_sentence}``, ``{cell_type}``. The full training text of a sample is
``model_input + " " + response``.

A task may instead read a template file in the reference C2S format, ``{"model_input": [...],
"response": [...]}`` (``read_template_file``): the prompts a hub C2S model was trained with.
"""

from __future__ import annotations

import importlib
import json
import logging
import string
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from datasets import Dataset

from c2s_kedro.core.errors import C2SError, C2SIndexError, C2SKeyError, C2SValueError
from c2s_kedro.core.data.splitting import require_unique_names
from c2s_kedro.core.sentences.conversion import has_label

logger = logging.getLogger(__name__)

SUPPORTED_TASKS = ("cell_type_prediction", "cell_type_generation")
MULTICELL_TASKS = ("tissue_prediction",)
PERTURBATION_TASK = "perturbation_response"  # control cell + perturbation -> perturbed cell (prompts.perturbation)
PAIRED_TASKS = (PERTURBATION_TASK,)
FORMATTED_COLUMNS = ("sample_type", "model_input", "response")


_CELL_FIELDS = frozenset({"num_genes", "organism", "cell_sentence", "cell_type"})
# Per task and field of a template file: the placeholders it may use, and those it must hold (a
# prediction prompt without its cell, an answer without what it answers, say nothing).
PLACEHOLDERS = {
    "cell_type_prediction": {"model_input": (_CELL_FIELDS, {"cell_sentence"}), "response": (_CELL_FIELDS, {"cell_type"})},
    "cell_type_generation": {"model_input": (_CELL_FIELDS, {"cell_type"}), "response": (_CELL_FIELDS, {"cell_sentence"})},
    # the reference multi-cell files name the cells' lines {multi_cell_sentences}, ours {cell_sentences}
    "tissue_prediction": {
        "model_input": ({"num_cells", "num_genes", "organism", "cell_sentences", "multi_cell_sentences", "tissue"}, set()),
        "response": ({"organism", "tissue"}, {"tissue"}),
    },
}


class TemplateFileError(C2SError, ValueError):
    """A prompt template file is missing, not JSON, or not in the reference format."""


@dataclass(frozen=True)
class PromptTemplates:
    """The input paraphrases and the response patterns of one task, and where they were read from
    (``source``: None for the templates shipped with the package)."""

    task: str
    inputs: tuple[str, ...]
    responses: tuple[str, ...]
    source: str | None = None

    @property
    def response(self) -> str:
        """The first response pattern: the one inference sizes answers with."""
        return self.responses[0]

    def pick_responses(self, rng: np.random.Generator, n: int) -> list[str]:
        """One response pattern per sample: drawn with ``rng`` when there are several (right after
        the inputs are drawn), so a file of one response leaves ``rng`` where it was."""
        if len(self.responses) == 1:
            return [self.responses[0]] * n
        return [self.responses[i] for i in rng.integers(0, len(self.responses), size=n)]


@cache
def _packaged_templates(task: str) -> PromptTemplates:
    if task not in SUPPORTED_TASKS + MULTICELL_TASKS + PAIRED_TASKS:
        raise C2SValueError(
            f"unknown prompt task '{task}'; supported: {', '.join(SUPPORTED_TASKS + MULTICELL_TASKS + PAIRED_TASKS)}"
        )
    text = resources.files("c2s_kedro.core.prompts").joinpath("prompt_templates", f"{task}.json").read_text()
    data = json.loads(text)
    return PromptTemplates(task=data["task"], inputs=tuple(data["inputs"]), responses=(data["response"],))


def load_templates(task: str, source: str | None = None) -> PromptTemplates:
    """Templates of ``task``: those shipped with the package (``source`` None, the templates the
    models trained here learn), or a template file in the reference format (``read_template_file``)."""
    if source is None:
        return _packaged_templates(task)
    return read_template_file(task, source)


def read_template_files(sources: Mapping[str, str | None] | None) -> dict[str, PromptTemplates]:
    """The templates of every task that ``sources`` (task -> template file) gives a file for
    (``read_template_file``); a task mapped to None keeps ours. A task that takes no template
    file is an error."""
    sources = dict(sources or {})
    unknown = sorted(set(sources) - set(PLACEHOLDERS))
    if unknown:
        raise C2SValueError(
            f"template files given for unknown task(s) {', '.join(unknown)}; template files can be given for "
            f"{', '.join(PLACEHOLDERS)}"
        )
    return {task: read_template_file(task, source) for task, source in sources.items() if source is not None}


def task_templates(task: str, templates: Mapping[str, PromptTemplates] | None) -> PromptTemplates:
    """``templates[task]`` (from ``read_template_files``) where given, otherwise ours."""
    return (templates or {}).get(task) or load_templates(task)


def _template_text(source: str) -> str:
    """The text of a template file: ``package:relative/path.json`` inside an installed package
    (``importlib.resources``), otherwise a path on disk."""
    package, colon, relative = source.partition(":")
    if colon and package and all(part.isidentifier() for part in package.split(".")) and not Path(source).exists():
        try:
            location = resources.files(package).joinpath(*relative.split("/"))
        except ModuleNotFoundError as error:
            raise TemplateFileError(
                f"template file {source}: package '{package}' is not installed (pip install it, or give a path)"
            ) from error
        if not location.is_file():
            raise TemplateFileError(f"template file {source}: package '{package}' has no file '{relative}'")
        return location.read_text(encoding="utf-8")
    path = Path(source)
    if not path.is_file():
        raise TemplateFileError(
            f"template file {source} does not exist (absolute: {path.resolve()}); give a path or package:relative/path.json"
        )
    return path.read_text(encoding="utf-8")


def read_template_file(task: str, source: str) -> PromptTemplates:
    """Templates of ``task`` from a file in the reference C2S format: a JSON object with
    ``model_input`` (the input paraphrases) and ``response`` (one or more response patterns),
    lists of strings with placeholders among ``PLACEHOLDERS[task]``.

    ``source`` is a path or ``package:relative/path.json`` (a file inside an installed package).
    These are for hub models that learnt their authors' prompts (BPE tokenizers read any word): a
    gene-level model trained here knows only the words of its vocabulary, which pretraining builds
    from our templates (``template_words``), so it needs the file's words in its vocabulary first.
    Raises ``TemplateFileError`` naming the file and the field that is wrong.
    """
    if task not in PLACEHOLDERS:
        raise C2SValueError(f"template files can be given for {', '.join(PLACEHOLDERS)}, not for '{task}'")
    text = _template_text(source)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise TemplateFileError(f"template file {source} is not JSON ({error})") from error
    if not isinstance(data, dict):
        raise TemplateFileError(f"template file {source} must hold a JSON object with model_input and response")
    fields = {}
    for field, (allowed, needs) in PLACEHOLDERS[task].items():
        if field not in data:
            raise TemplateFileError(f"template file {source} has no field '{field}' (it has: {', '.join(data) or 'none'})")
        texts = data[field]
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise TemplateFileError(f"template file {source}: field '{field}' must be a list of strings")
        if not texts:
            raise TemplateFileError(f"template file {source}: field '{field}' is an empty list")
        for i, text in enumerate(texts):
            try:
                names = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
            except ValueError as error:
                raise TemplateFileError(f"template file {source}: {field}[{i}] is not a valid template ({error})") from error
            unknown = sorted(names - allowed)
            if unknown:
                raise TemplateFileError(
                    f"template file {source}: {field}[{i}] has unknown placeholder(s) "
                    f"{', '.join('{' + n + '}' for n in unknown)}; {task} fills {', '.join('{' + n + '}' for n in sorted(allowed))}"
                )
            missing = sorted(needs - names)
            if missing:
                raise TemplateFileError(
                    f"template file {source}: {field}[{i}] lacks {', '.join('{' + n + '}' for n in missing)}, "
                    f"which every {task} {field} needs"
                )
        fields[field] = tuple(texts)
    answer = load_templates("cell_type_prediction").response  # "{cell_type}.", as label scoring reads answers
    if task == "cell_type_prediction" and set(fields["response"]) != {answer}:
        raise TemplateFileError(
            f"template file {source}: field 'response' must be [\"{answer}\"] for cell_type_prediction "
            "(label scoring and answer matching read answers in that form)"
        )
    return PromptTemplates(task=task, inputs=fields["model_input"], responses=fields["response"], source=source)


def template_words(
    tasks: Sequence[str] = SUPPORTED_TASKS + MULTICELL_TASKS, sources: Mapping[str, str | None] | None = None
) -> list[str]:
    """Every whitespace-separated word of the templates, placeholders removed (for vocabularies);
    ``sources`` maps a task to a template file read instead of ours (``read_template_files``)."""
    files = read_template_files(sources)
    words: list[str] = []
    for task in tasks:
        templates = task_templates(task, files)
        for text in (*templates.inputs, *templates.responses):
            for word in text.replace("\n", " ").split():
                if "{" not in word and word not in words:
                    words.append(word)
    return words


def count_tokens(tokenizer, texts: Sequence[str]) -> np.ndarray:
    """Number of tokens of each text, without special tokens."""
    # texts longer than the model's context are expected here (they are counted to be shortened),
    # so the tokenizer's "sequence length is longer than the maximum" warning would only alarm
    encoded = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    return np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(texts))


class ContextTooSmallError(C2SError, ValueError):
    """The model's context cannot hold even the prompt's instruction."""


def word_tokens(tokenizer, words: Sequence[str]) -> np.ndarray:
    """Tokens each of ``words`` takes after a space, counted once per tokenizer and word.

    A guess of what each gene adds to a sentence (exact for tokenizers that split on whitespace
    first, as the byte-level BPEs of the hub models do) that lets ``fit_to_context`` start its
    search next to the answer; that search checks by tokenizing either way.
    """
    try:
        cache = _WORD_TOKENS.setdefault(tokenizer, {})
    except TypeError:  # an object that cannot be weakly referenced: count without remembering
        cache = {}
    missing = [w for w in dict.fromkeys(words) if w not in cache]
    if missing:
        cache.update(zip(missing, count_tokens(tokenizer, [" " + w for w in missing]).tolist()))
    return np.fromiter((cache[w] for w in words), dtype=np.int64, count=len(words))


_WORD_TOKENS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def gene_tokens_guess(tokenizer, genes: Sequence[str], max_tokens: int | None) -> np.ndarray:
    """``word_tokens`` of the genes that can fit ``max_tokens`` (each takes at least one token, so
    no more than ``max_tokens + 1``): the ``item_tokens`` guess for ``fit_to_context``."""
    return word_tokens(tokenizer, genes if max_tokens is None else genes[: max(max_tokens, 0) + 1])


def fit_to_context(
    render: Callable[[int], str],
    n_items: int,
    tokenizer,
    max_tokens: int | None,
    reserve: int = 0,
    what: str = "prompt",
    item_tokens: Sequence[int] | np.ndarray | None = None,
) -> int:
    """The largest ``k`` in ``[0, n_items]`` for which ``render(k)`` plus ``reserve`` tokens fits
    ``max_tokens``: the one routine that fits a text to a model's context.

    ``render(k)`` builds the text with ``k`` genes (per cell, per sentence: whatever the caller
    shortens); its token count must not decrease as ``k`` grows. ``reserve`` counts tokens that
    come after the text (an answer, EOS, tokens still to be generated). ``item_tokens`` (what
    each item adds, e.g. ``word_tokens`` of the genes) only guides the search: the answer is
    always checked by tokenizing ``render(k)`` and ``render(k + 1)``, so a wrong guess costs time,
    never a wrong ``k``. Without it, a binary search. Raises ``ContextTooSmallError`` when not even
    ``render(0)`` fits.
    """
    if max_tokens is None:
        return n_items
    budget = max_tokens - reserve

    def tokens(*ks: int) -> list[int]:
        return count_tokens(tokenizer, [render(k) for k in ks]).tolist()

    # The search keeps render(low) fitting (once tokenized: ``low_fits``) and render(high) not
    # (high = n_items + 1 is a text that does not exist)
    low, high, low_fits = 0, n_items + 1, False
    # Each gene takes at least one token, so max_tokens + 1 genes never fit: the first look is at
    # no more than that, not at a 2,300-gene sentence for a 512-token context (checked, not
    # assumed: if that many do fit, the search goes on above them)
    first = min(n_items, max(max_tokens, 0) + 1)
    at = tokens(first)[0]
    if at <= budget:
        if first == n_items:  # most prompts end here, after one tokenization
            return n_items
        low, low_fits = first, True
    else:
        high = first
    if item_tokens is not None and n_items:
        guessed = np.ones(n_items, dtype=np.int64)  # items without a guess: at least one token each
        given = np.asarray(item_tokens, dtype=np.int64)[:n_items]
        guessed[: len(given)] = given
        added = np.concatenate([[0], np.cumsum(guessed)])
        overhead = at - int(added[first])  # what the text takes besides its items, as measured
        for _ in range(3):  # the guess, corrected by what the last check measured
            if high - low <= 1:
                break
            guess = int(np.searchsorted(added + overhead, budget, side="right")) - 1
            guess = min(max(guess, low), high - 1)
            if guess == n_items:
                at = tokens(guess)[0]
                if at <= budget:
                    return n_items
                high, overhead = guess, at - int(added[guess])
                continue
            at, after = tokens(guess, guess + 1)
            if at <= budget < after:
                return guess
            if after <= budget:
                low, low_fits, overhead = guess + 1, True, after - int(added[guess + 1])
            else:
                high, overhead = guess, at - int(added[guess])
    while high - low > 1:
        middle = (low + high) // 2
        if tokens(middle)[0] <= budget:
            low, low_fits = middle, True
        else:
            high = middle
    if not low_fits:  # nothing fitted yet: does the instruction alone?
        overhead = tokens(0)[0]
        if overhead > budget:
            _raise_too_small(overhead, reserve, max_tokens, what)
    return low


def _raise_too_small(overhead: int, reserve: int, max_tokens: int, what: str) -> None:
    raise ContextTooSmallError(
        f"{what}: the instruction alone takes {overhead} tokens without genes (+{reserve} reserved for what "
        f"follows), but the model's context allows {max_tokens}; use a model with a longer context "
        "(max_position_embeddings) or a shorter template"
    )


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

    kept = fit_to_context(render, len(genes), tokenizer, max_tokens, reserve=reserve,
                          item_tokens=gene_tokens_guess(tokenizer, genes, max_tokens))
    return render(kept), kept


def fit_generation(
    template: str, response: str, genes: Sequence[str], fields: dict[str, Any], tokenizer, max_tokens: int | None
) -> int:
    """Most genes ``k`` for which a generation prompt asking for ``k`` genes, then ``" " + response``
    holding the first ``k`` of ``genes``, then EOS fit ``max_tokens`` (``fit_to_context``)."""

    def render(k: int) -> str:
        values = {**fields, "num_genes": k, "cell_sentence": " ".join(genes[:k])}
        return template.format(**values) + " " + response.format(**values)

    return fit_to_context(render, len(genes), tokenizer, max_tokens, reserve=1, what="cell_type_generation sample",
                          item_tokens=gene_tokens_guess(tokenizer, genes, max_tokens))


def response_tokens(tokenizer, responses: Sequence[str]) -> int:
    """Tokens of the longest of ``responses`` as it follows a prompt (``" " + response``), EOS not counted."""
    if not len(responses):
        raise C2SValueError("no responses to count")
    return int(count_tokens(tokenizer, [" " + r for r in responses]).max())


def label_answer_room(tokenizer, labels: Sequence[str], extra_new_tokens: int) -> int:
    """Tokens a cell-type-prediction prompt leaves free for its answer, however it is read: the
    longest ``" {label}."`` with its EOS (label scoring) and ``extra_new_tokens`` past it
    (generation may run on after the longest label)."""
    return response_tokens(tokenizer, [load_templates("cell_type_prediction").response.format(cell_type=label) for label in labels]) + 1 + extra_new_tokens


def _template(templates: PromptTemplates, index: int) -> str:
    inputs = templates.inputs
    if not 0 <= index < len(inputs):
        where = f" in {templates.source}" if templates.source else ""
        raise C2SIndexError(
            f"template index {index} does not exist: {templates.task} has {len(inputs)} templates{where} (0 to {len(inputs) - 1})"
        )
    return inputs[index]


def sentence_table(cell_sentences: Dataset, columns: Sequence[str], optional: Sequence[str] = ()) -> pd.DataFrame:
    """``cell_sentence`` and ``columns`` of a cell-sentence dataset (plus those of ``optional`` it
    has), indexed by ``cell_name``; a missing column of ``columns`` is a ``KeyError`` naming it, and
    repeated cell names a ``ValueError`` (``.loc`` by name would return every row of a name)."""
    missing = [c for c in columns if c not in cell_sentences.column_names]
    if missing:
        raise C2SKeyError(
            f"column(s) {', '.join(repr(c) for c in missing)} not in the cell-sentence dataset; available: "
            f"{', '.join(cell_sentences.column_names)}."
        )
    wanted = list(dict.fromkeys(["cell_name", "cell_sentence", *columns, *(c for c in optional if c in cell_sentences.column_names)]))
    table = cell_sentences.select_columns(wanted).to_pandas().set_index("cell_name")
    if not table.index.is_unique:
        require_unique_names(table.index, "the cell sentences")
    return table


def cell_type_prediction_prompts(
    sentences: Sequence[str | None],
    organisms: Sequence[str | None] | None,
    tokenizer,
    max_tokens: int | None,
    template_index: int | None = 0,
    top_k_genes: int | None = None,
    seed: int = 0,
    default_organism: str = "Homo sapiens",
    templates: PromptTemplates | None = None,
) -> tuple[list[str], list[int], list[int]]:
    """Cell-type-prediction prompts without their answer, each fitted to ``max_tokens`` tokens.

    ``template_index`` fixes the paraphrase (reproducible embeddings); ``None`` draws one per cell
    with ``seed``, as in training. ``templates`` (``load_templates``) default to ours. Returns the
    prompts, the genes kept and the genes available per cell; shortened prompts are counted in the log.
    """
    templates = templates or load_templates("cell_type_prediction")
    inputs = templates.inputs
    rng = np.random.default_rng(seed)
    prompts, kept, available = [], [], []
    for i, sentence in enumerate(sentences):
        genes = (sentence or "").split()[:top_k_genes]
        template = inputs[rng.integers(len(inputs))] if template_index is None else _template(templates, template_index)
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
    templates: PromptTemplates | None = None,
    max_genes: int | None = None,
) -> dict[str, Any]:
    """``n_per_type`` cell-type-conditioned generation prompts for each type of ``cell_types`` (one
    per cell of ``sentences``, the training cells), in sorted type order. Cells without a cell type
    (``has_label``) ask for nothing: no "a None cell" prompt.

    Each prompt asks for the median number of genes of its type's cells (at most ``max_genes``:
    a model fine-tuned on top-k sentences has only been asked for k), or for fewer when the
    prompt and its answer would not fit ``max_tokens``: the answer is sized on the type's median
    cell (the first with the fewest genes at or above the median), its first ``k`` genes, "." and
    EOS (``fit_generation``). Returns ``prompt``, ``cell_type``, ``genes_requested`` per prompt
    and ``max_new_tokens``, all the room the longest prompt leaves, and ``unconditional_prompt``:
    each prompt without its cell type (the template with ``{cell_type}`` and the space before it
    left out), what classifier-free guidance pushes away from. ``templates``
    (``load_templates``) default to ours; their first response sizes the answer.
    """
    if max_genes is not None and (isinstance(max_genes, bool) or not isinstance(max_genes, int) or max_genes < 1):
        raise C2SValueError(f"max_genes must be a whole number of at least 1 (or null for no cap), got {max_genes!r}")
    templates = templates or load_templates("cell_type_generation")
    template = _template(templates, template_index)
    response = templates.response
    labelled = has_label(cell_types)
    if not labelled.all():
        logger.info("%d of %d training cells have no cell type: no generation prompt is conditioned on them",
                    int((~labelled).sum()), len(labelled))
    table = pd.DataFrame({"cell_type": [str(t) for t in cell_types], "genes": [(s or "").split() for s in sentences]})[labelled]
    table["n_genes"] = table["genes"].str.len()
    prompts, types, requested, type_free = [], [], [], []
    without_type = template.replace(" {cell_type}", "").replace("{cell_type}", "")
    for cell_type, cells in table.groupby("cell_type", sort=True):
        median = int(cells["n_genes"].median())
        if max_genes is not None:
            median = min(median, max_genes)
        typical = cells.loc[cells["n_genes"] >= median].sort_values("n_genes", kind="stable")["genes"].iloc[0][:median]
        fields = {"cell_type": cell_type, "organism": organism}
        k = fit_generation(template, response, typical, fields, tokenizer, max_tokens)
        if k == 0:
            raise ContextTooSmallError(
                f"a {cell_type} cell_type_generation prompt leaves no room for a single gene of the answer in the "
                f"model's context of {max_tokens} tokens; use a model with a longer context or a shorter template"
            )
        prompts += [template.format(num_genes=k, **fields)] * n_per_type
        type_free += [without_type.format(num_genes=k, organism=organism)] * n_per_type
        types += [cell_type] * n_per_type
        requested += [k] * n_per_type
    if not prompts:
        raise C2SValueError("no training cell has a cell type: nothing to condition generation on")
    room = max_tokens - int(count_tokens(tokenizer, list(dict.fromkeys(prompts))).max())
    return {"prompt": prompts, "cell_type": types, "genes_requested": requested, "max_new_tokens": room,
            "unconditional_prompt": type_free}


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
            raise C2SKeyError(
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
    ``prompt_templates`` maps a task to templates read from a file (``read_template_files``);
    tasks it does not name use ours. Each
    sample draws its input paraphrase with the seeded rng and, when the file has several
    responses, its response right after. A cell without a label (``has_label``) gives no sample:
    neither the answer "None." nor "a None cell" is ever taught (``n_without_label`` counts them).
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
        prompt_templates: Mapping[str, PromptTemplates] | None = None,
    ) -> None:
        super().__init__(seed=seed)
        self.templates = task_templates(task, prompt_templates)
        self.task = task
        self.top_k_genes = top_k_genes
        self.label_column = label_column
        self.organism_column = organism_column
        self.default_organism = default_organism
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens if tokenizer is not None else None
        self.n_shortened = 0
        self.n_without_label = 0

    def required_columns(self) -> list[str]:
        return ["cell_sentence", self.label_column]

    def format_batch(self, batch: dict[str, list]) -> dict[str, list]:
        n = len(batch["cell_sentence"])
        organisms = batch.get(self.organism_column) or [self.default_organism] * n
        choices = self.rng.integers(0, len(self.templates.inputs), size=n)
        patterns = self.templates.pick_responses(self.rng, n)
        labelled = has_label(batch[self.label_column])
        self.n_without_label += int((~labelled).sum())
        inputs, responses = [], []
        for sentence, label, organism, choice, pattern, keep in zip(
            batch["cell_sentence"], batch[self.label_column], organisms, choices, patterns, labelled
        ):
            if not keep:
                continue
            genes = (sentence or "").split()[: self.top_k_genes]
            template = self.templates.inputs[choice]
            fields = {"organism": organism or self.default_organism, "cell_type": label}
            if self.max_tokens is not None:
                if self.task == "cell_type_prediction":  # the answer and its EOS follow the prompt
                    answer = response_tokens(self.tokenizer, [pattern.format(**fields)]) + 1
                    kept = fit_prompt(template, genes, fields, self.tokenizer, self.max_tokens, reserve=answer)[1]
                else:  # the answer holds the genes the prompt asks for
                    kept = fit_generation(template, pattern, genes, fields, self.tokenizer, self.max_tokens)
                self.n_shortened += kept < len(genes)
                genes = genes[:kept]
            values = {**fields, "num_genes": len(genes), "cell_sentence": " ".join(genes)}
            inputs.append(template.format(**values))
            responses.append(pattern.format(**values))
        return {"sample_type": [self.task] * len(inputs), "model_input": inputs, "response": responses}

    def format_dataset(self, dataset: Dataset, batch_size: int = 1000) -> Dataset:
        self.n_shortened = self.n_without_label = 0
        formatted = super().format_dataset(dataset, batch_size)
        if self.n_without_label:
            logger.info("%d of %d cells have no '%s' label: no %s sample for them",
                        self.n_without_label, dataset.num_rows, self.label_column, self.task)
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
        keep = {k: v for k, v in common.items()
                if k in ("seed", "top_k_genes", "organism_column", "tokenizer", "max_tokens", "prompt_templates")}
        return TissuePredictionFormatter(**keep, **options)
    if formatter is None:
        return C2SPromptFormatter(task=task, **common, **options)
    module_name, _, class_name = formatter.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as error:
        raise C2SValueError(
            f"prompt formatter '{formatter}' cannot be imported ({error}); give the dotted path of a "
            "PromptFormatter subclass, e.g. c2s_kedro.core.prompts.example_formatters.TissueAwareCellTypeFormatter"
        ) from error
    if not (isinstance(cls, type) and issubclass(cls, PromptFormatter)):
        raise C2SValueError(f"'{formatter}' is not a subclass of c2s_kedro.core.prompts.formatting.PromptFormatter")
    return cls(seed=common.get("seed", 0), **options)


class TissuePredictionFormatter(PromptFormatter):
    """Multi-cell ``tissue_prediction``: ``cells_per_prompt`` cells of one tissue in one prompt, one
    cell sentence per line; the answer is the tissue.

    Cells are grouped by tissue in a seeded random order (a tissue's last group may be smaller).
    With a ``tokenizer`` and ``max_tokens`` every cell's sentence is cut to the same number of
    genes so the whole prompt and its answer fit. ``prompt_templates`` as in ``C2SPromptFormatter``;
    a reference file's ``{multi_cell_sentences}`` receives the same lines as ``{cell_sentences}``.
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
        prompt_templates: Mapping[str, PromptTemplates] | None = None,
    ) -> None:
        super().__init__(seed=seed)
        self.templates = task_templates("tissue_prediction", prompt_templates)
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
        return template.format(num_cells=len(sentences), num_genes=k, cell_sentences=lines, multi_cell_sentences=lines, **fields)

    def _prompt(self, template: str, response: str, sentences: list[list[str]], fields: dict[str, Any]) -> str:
        longest = max((len(genes) for genes in sentences), default=0)
        if self.max_tokens is None:
            return self._render(template, sentences, longest, fields)
        answer = response_tokens(self.tokenizer, [response]) + 1  # and EOS
        k = fit_to_context(lambda k: self._render(template, sentences, k, fields), longest, self.tokenizer, self.max_tokens,
                           reserve=answer, what=f"tissue_prediction prompt of {len(sentences)} cells")
        return self._render(template, sentences, k, fields)

    def format_batch(self, batch: dict[str, list]) -> dict[str, list]:
        tissues = batch[self.tissue_column]
        organisms = batch.get(self.organism_column) or [self.default_organism] * len(tissues)
        order = self.rng.permutation(len(tissues))
        groups: dict[str, list[int]] = {}
        present = has_label(tissues)
        for i in order:
            if present[i]:
                groups.setdefault(str(tissues[i]), []).append(int(i))
        inputs, responses = [], []
        for tissue, members in groups.items():
            for start in range(0, len(members), self.cells_per_prompt):
                chosen = members[start : start + self.cells_per_prompt]
                sentences = [(batch["cell_sentence"][i] or "").split()[: self.top_k_genes] for i in chosen]
                fields = {"tissue": tissue, "organism": organisms[chosen[0]] or self.default_organism}
                template = self.templates.inputs[self.rng.integers(len(self.templates.inputs))]
                response = self.templates.pick_responses(self.rng, 1)[0].format(**fields)
                inputs.append(self._prompt(template, response, sentences, fields))
                responses.append(response)
        return {"sample_type": [self.task] * len(inputs), "model_input": inputs, "response": responses}
