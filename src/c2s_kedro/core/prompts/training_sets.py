"""The prompts a model learns from: a split's cells formatted by each task's formatter
(``prompt_formatters`` + ``format_split_prompts``, the cells of rare labels repeated by
``balanced_rows``), one task's part of them (``task_prompts``) and the texts of pretraining
(``pretraining_corpus``). ``models.training.finetune`` trains on them."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from datasets import Dataset, DatasetDict, concatenate_datasets

from c2s_kedro.core.errors import C2SKeyError, C2SValueError
from c2s_kedro.core.prompts.formatting import (
    C2SPromptFormatter,
    PromptFormatter,
    build_formatter,
    fit_to_context,
    gene_tokens_guess,
)
from c2s_kedro.core.sentences.conversion import has_label, select_cells

logger = logging.getLogger(__name__)


def prompt_formatters(
    tasks: Sequence[str], formatter: str | None = None, options: dict[str, Any] | None = None, **common: Any
) -> list[PromptFormatter]:
    """The formatters that build a training set: one built-in formatter per task, or the custom
    ``formatter`` (dotted path) once.

    A custom formatter decides itself which samples a cell gives, so it formats each cell once
    whatever ``tasks`` holds (building it once per task would repeat every sample). ``common``
    (``seed``, ``top_k_genes``, ``label_column``, ``tokenizer``, ``max_tokens``, ...) goes to the
    built-in formatters; a custom one takes ``seed`` and ``options``.
    """
    if formatter is not None:
        if len(tasks) > 1:
            logger.info("custom formatter %s formats each cell once; the tasks %s apply to the built-in formatters",
                        formatter, ", ".join(tasks))
        return [build_formatter(tasks[0] if tasks else PromptFormatter.task, formatter, options, **common)]
    if not tasks:
        raise C2SValueError("no prompt task given: name at least one task (e.g. cell_type_prediction)")
    return [build_formatter(task, None, options, **common) for task in tasks]


def balanced_rows(labels: Sequence[Any], min_per_label: int) -> list[int]:
    """Row indices that repeat every row of a label with fewer than ``min_per_label`` rows until
    it has at least that many (whole copies: ``ceil(min_per_label / n)`` of each row); rows of
    other labels, and rows without a label, once. Class-balanced sampling for rare labels."""
    if min_per_label < 1:
        raise C2SValueError(f"min_per_label must be at least 1, got {min_per_label}")
    present = has_label(labels)
    counts: dict[Any, int] = {}
    for label, known in zip(labels, present):
        if known:
            counts[label] = counts.get(label, 0) + 1
    rows: list[int] = []
    for i, (label, known) in enumerate(zip(labels, present)):
        n = counts.get(label, 0) if known else 0
        rows.extend([i] * (-(-min_per_label // n) if 0 < n < min_per_label else 1))
    return rows


def _repeated(cells: Dataset, n: int) -> Dataset:
    """Every row ``n`` times (whole copies, in order)."""
    return cells if n == 1 else cells.select(list(range(cells.num_rows)) * n, keep_in_memory=True)


def format_split_prompts(
    cell_sentences: Dataset,
    data_split: dict[str, Sequence[str]],
    formatters: Sequence[PromptFormatter],
    seed: int,
    max_eval_samples: int | None = None,
    min_train_cells_per_label: int | None = None,
    label_column: str | None = None,
    task_repeats: Mapping[str, int] | None = None,
) -> DatasetDict:
    """The prompts of every formatter for the ``train``, ``val`` and ``test`` cells of
    ``data_split``, each part shuffled with ``seed``; ``val`` keeps at most ``max_eval_samples``.
    With ``min_train_cells_per_label``, train cells of a ``label_column`` value with fewer cells
    are repeated (``balanced_rows``; each copy draws its own template), val and test unchanged.
    ``task_repeats`` (task -> n) gives each train cell n prompts of that task per epoch, each with
    its own template draw (more passes of one task inside the same run); val and test unchanged."""
    if min_train_cells_per_label is not None and (label_column is None or label_column not in cell_sentences.column_names):
        raise C2SKeyError(f"class-balanced sampling needs the label column '{label_column}' in cell_sentences; "
                       f"available: {', '.join(cell_sentences.column_names)}")
    repeats = dict(task_repeats or {})
    unknown = sorted(set(repeats) - {formatter.task for formatter in formatters})
    if unknown:
        raise C2SValueError(f"task_repeats names {unknown}, which no prompt formatter trains; "
                         f"tasks here: {sorted({formatter.task for formatter in formatters})}")
    bad = {task: n for task, n in repeats.items() if isinstance(n, bool) or not isinstance(n, int) or n < 1}
    if bad:
        raise C2SValueError(f"task_repeats must be whole numbers of at least 1 per task, got {bad}")
    parts = {}
    for part in ("train", "val", "test"):
        cells = select_cells(cell_sentences, data_split[part])
        if part == "train" and min_train_cells_per_label is not None:
            rows = balanced_rows(cells[label_column], min_train_cells_per_label)
            logger.info("class-balanced train cells: %d rows for %d cells (each label at least %d)",
                        len(rows), cells.num_rows, min_train_cells_per_label)
            cells = cells.select(rows, keep_in_memory=True)
        formatted = concatenate_datasets([
            formatter.format_dataset(_repeated(cells, repeats.get(formatter.task, 1) if part == "train" else 1))
            for formatter in formatters
        ])
        parts[part] = formatted.shuffle(seed=seed, keep_in_memory=True).flatten_indices(keep_in_memory=True)
    if max_eval_samples is not None and parts["val"].num_rows > max_eval_samples:
        parts["val"] = parts["val"].select(range(max_eval_samples), keep_in_memory=True)
    return DatasetDict(parts)


def task_prompts(prompts: DatasetDict, task: str, parts: Sequence[str] = ("train", "val")) -> DatasetDict:
    """The ``parts`` of ``prompts`` (``format_split_prompts``) kept to the prompts of one ``task``.
    Raises ``ValueError`` when the train part has none (the prompts were made for other tasks)."""
    kept = {}
    for part in parts:
        if part in prompts:
            kept[part] = prompts[part].filter(lambda kinds: [k == task for k in kinds], input_columns="sample_type",
                                              batched=True, keep_in_memory=True)
    if "train" in parts and (not kept.get("train") or kept["train"].num_rows == 0):
        made = sorted(set(prompts["train"]["sample_type"])) if "train" in prompts else []
        raise C2SValueError(f"the prompts have no {task} train prompts (they hold {made or 'no train part'}); "
                         f"format them with {task} among the tasks")
    return DatasetDict(kept)


def pretraining_corpus(
    cell_sentences: Dataset,
    tokenizer,
    max_tokens: int,
    max_genes: int,
    label_column: str,
    organism_column: str,
    seed: int,
) -> Dataset:
    """Texts a foundation model learns from: each cell's sentence (its first ``max_genes`` genes,
    as many as fit ``max_tokens`` with the EOS) and, for cells with a ``label_column`` value, a
    cell-type-conditioned generation prompt fitted to the context. Without that column, plain
    sentences only."""

    def plain(batch: dict[str, list]) -> dict[str, list]:
        responses = []
        for sentence in batch["cell_sentence"]:
            genes = (sentence or "").split()[:max_genes]
            # tokenize_pairs reads an empty prompt and " " + the response; one token more for the EOS
            kept = fit_to_context(lambda k: " " + " ".join(genes[:k]) if k else "", len(genes), tokenizer, max_tokens,
                                  reserve=1, what="cell sentence", item_tokens=gene_tokens_guess(tokenizer, genes, max_tokens))
            responses.append(" ".join(genes[:kept]))
        n = len(responses)
        return {"sample_type": ["cell_sentence"] * n, "model_input": [""] * n, "response": responses}

    sentences = cell_sentences.map(
        plain, batched=True, remove_columns=cell_sentences.column_names, keep_in_memory=True, desc="plain sentences",
    )
    if label_column not in cell_sentences.column_names:
        logger.info("no '%s' column: pretraining on plain cell sentences only", label_column)
        return sentences
    labelled = cell_sentences.filter(
        lambda values: has_label(values).tolist(), input_columns=label_column, batched=True, keep_in_memory=True
    )
    formatter = C2SPromptFormatter(
        task="cell_type_generation", top_k_genes=max_genes, label_column=label_column, organism_column=organism_column,
        seed=seed, tokenizer=tokenizer, max_tokens=max_tokens,
    )
    return concatenate_datasets([sentences, formatter.format_dataset(labelled)])
