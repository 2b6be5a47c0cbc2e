"""Perturbation-response prompts, "control cell + perturbation -> perturbed cell"
(``PerturbationPromptFormatter``): the train, val, test and posterior prompts of a screen
(``perturbation_prompts``) and the pairs of sentences they are made of."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from datasets import Dataset, DatasetDict, concatenate_datasets

from c2s_kedro.core.errors import C2SKeyError, C2SValueError
from c2s_kedro.core.data.screen import ScreenColumns, perturbation_targets
from c2s_kedro.core.prompts.formatting import (
    PERTURBATION_TASK,
    ContextTooSmallError,
    PromptFormatter,
    count_tokens,
    fit_prompt,
    load_templates,
    response_tokens,
)
from c2s_kedro.core.tasks.perturbation.pairs import (
    control_pairs,
    knockdown_drop_share,
    synthetic_knockdown_pairs,
    top_k_sentences,
)
from c2s_kedro.core.tasks.perturbation.tokens import check_target_tokens

logger = logging.getLogger(__name__)


def perturbation_prompts(
    sentences: Dataset, split: dict[str, Any], columns: ScreenColumns, tokenizer, max_tokens: int,
    top_k_genes: int | None, seed: int, controls_per_cell: int = 1, include_control_pairs: bool = True,
    max_new_tokens: int | None = None, on_overflow: str = "shorten", max_eval_samples: int | None = None,
    control_top_k_genes: int | None = None, template: int | None = None, synthetic_pairs_per_control: int = 0,
    synthetic_drop_share: float | None = None, synthetic_same_cell: bool = False, posterior_controls: int = 2,
) -> DatasetDict:
    """Train, val and test prompts of the screen: pairs (perturbed cell, control of its batch) as
    "control sentence + perturbation -> perturbed sentence". Training samples keep their response
    whole; test prompts leave room for ``max_new_tokens`` (default: the longest training response
    and its EOS), shortening the control sentence or refusing (``on_overflow``). ``sentences`` must
    hold the perturbation (and batch) columns.

    ``control_top_k_genes`` cuts the control sentence shorter than the response (None: ``top_k_genes``);
    ``template`` uses one prompt template for every pair (its index; None: one drawn per pair).
    ``synthetic_pairs_per_control`` adds that many synthetic knockdown pairs per training control
    cell (``synthetic_knockdown_pairs``; the drop share estimated from the training cells unless
    ``synthetic_drop_share`` is given; the control cell itself as the response with
    ``synthetic_same_cell``).

    Beside ``test`` (pairs of held-out perturbations' cells with test controls) and, when the split
    has one, ``test_seen`` (the same for held-out cells of seen perturbations), the ``posterior``
    part holds the prompts to sample (``posterior_prompt_pairs``): every perturbation of both test
    sets, and the control label, on the same ``posterior_controls`` test control cells. Prompts
    name a combination's targets one by one (``perturbation_phrase``); a gene-level ``tokenizer``
    without a token for some target is refused (``check_target_tokens``)."""
    keep = [c for c in ("cell_name", columns.perturbation, columns.batch) if c]
    missing = [c for c in keep if c not in sentences.column_names]
    if missing:
        raise C2SKeyError(f"column(s) {missing} are not in the screen's cell sentences; convert them with the sentences")
    obs = sentences.select_columns(keep).to_pandas().set_index("cell_name")
    lookup = top_k_sentences(sentences, top_k_genes)
    perturbations = sorted({name for part in ("train", "val", "test", "test_seen") for name in split.get(f"{part}_perturbations", [])})
    check_target_tokens(tokenizer, perturbations, columns,
                        [gene for sentence in itertools.islice(lookup.values(), 20) for gene in sentence.split()])
    options = {"top_k_genes": top_k_genes, "control_top_k_genes": control_top_k_genes, "template": template, "seed": seed,
               "tokenizer": tokenizer, "max_tokens": max_tokens, "columns": columns}
    parts = {}
    for offset, part in enumerate(("train", "val")):
        pairs = paired_sentences(control_pairs(obs, split, part, columns, seed + 10 * offset, controls_per_cell,
                                               include_control_pairs), lookup)
        if part == "train" and synthetic_pairs_per_control:
            drop = synthetic_drop_share if synthetic_drop_share is not None else knockdown_drop_share(obs, split, columns, lookup)
            synthetic = synthetic_knockdown_pairs(obs, split["control_train"], lookup, columns, synthetic_pairs_per_control,
                                                  drop, seed=seed + 5, same_cell=synthetic_same_cell)
            pairs = concatenate_datasets([pairs, synthetic])
        # shuffled before formatting, so that only the val pairs kept are formatted
        pairs = pairs.shuffle(seed=seed, keep_in_memory=True)
        if part == "val" and max_eval_samples is not None and pairs.num_rows > max_eval_samples:
            pairs = pairs.select(range(max_eval_samples), keep_in_memory=True)
        parts[part] = PerturbationPromptFormatter(**options).format_dataset(pairs.flatten_indices(keep_in_memory=True))
    budget = max_new_tokens or response_token_budget(tokenizer, parts["train"]["response"])
    tests = {part: paired_sentences(control_pairs(obs, split, part, columns, seed + 10 * offset, controls_per_cell,
                                                  include_control_pairs), lookup)
             for offset, part in ((2, "test"), (3, "test_seen")) if part in split}
    tests["posterior"] = posterior_prompt_pairs(split, columns, lookup, posterior_controls, seed)
    for part, pairs in tests.items():
        formatter = PerturbationPromptFormatter(**options, response_budget=budget, on_overflow=on_overflow)
        formatted = formatter.format_dataset(pairs)
        parts[part] = formatted.add_column("max_new_tokens", [budget] * formatted.num_rows)
    return DatasetDict(parts)


EVALUATIONS = {"heldout": "test", "seen": "test_seen"}  # evaluation -> the part of the split it scores


def posterior_prompt_pairs(split: dict[str, Any], columns: ScreenColumns, sentences: dict[str, str], n_controls: int,
                           seed: int = 0) -> Dataset:
    """What the posterior samples: each perturbation of the held-out perturbations (``evaluation``
    ``heldout``) and of the seen ones with held-out cells (``seen``, when the split has them), and
    the control label (``control``: the model's own "no perturbation" answer), each on the same
    ``n_controls`` test control cells drawn at random (seeded). Sharing the control cells makes a
    perturbation's samples comparable with the control label's: the difference is the name alone.
    Columns as ``paired_sentences`` (no perturbed cell) plus ``evaluation``."""
    if isinstance(n_controls, bool) or not isinstance(n_controls, int) or n_controls < 1:
        raise C2SValueError(f"the control cells of the posterior prompts must be a positive number, got {n_controls!r}")
    pool = list(split["control_test"])
    if not pool:
        raise C2SValueError("the split has no test control cell to build posterior prompts on")
    rng = np.random.default_rng([seed, 11])
    controls = [pool[i] for i in np.sort(rng.choice(len(pool), size=min(n_controls, len(pool)), replace=False))]
    names = [(evaluation, name) for evaluation, part in EVALUATIONS.items() if part in split
             for name in split[f"{part}_perturbations"]] + [("control", columns.control_label)]
    rows = [(evaluation, name, control) for evaluation, name in names for control in controls]
    return Dataset.from_dict({
        "evaluation": [r[0] for r in rows], "perturbation": [r[1] for r in rows], "control_cell": [r[2] for r in rows],
        "perturbed_cell": [""] * len(rows), "control_sentence": [sentences[r[2]] for r in rows],
        "perturbed_sentence": [""] * len(rows),
    })


class PerturbationPromptFormatter(PromptFormatter):
    """``perturbation_response`` prompts: a control cell's sentence and the perturbation's name in
    the input, the perturbed cell's sentence as the response.

    Input columns: ``control_sentence``, ``perturbed_sentence``, ``perturbation`` (the others, e.g.
    cell names, are kept). ``top_k_genes`` cuts both sentences (None keeps every expressed gene),
    ``control_top_k_genes`` the control sentence shorter still; ``template`` picks one template for
    every sample (its index) instead of one drawn per sample. The perturbation is named as
    ``perturbation_phrase`` writes it with ``columns`` (a combination's targets as "A and B").
    With a ``tokenizer`` and ``max_tokens`` every sample fits the context: with ``response_budget``
    None (training) the response is kept whole and the control sentence loses genes from its end;
    with ``response_budget`` set (generation: ``max_new_tokens``) the prompt is fitted to
    ``max_tokens - response_budget``. ``on_overflow="error"`` refuses to shorten instead.
    """

    task = PERTURBATION_TASK

    def __init__(
        self,
        top_k_genes: int | None = 200,
        seed: int = 0,
        tokenizer=None,
        max_tokens: int | None = None,
        response_budget: int | None = None,
        on_overflow: str = "shorten",
        control_top_k_genes: int | None = None,
        template: int | None = None,
        columns: ScreenColumns = ScreenColumns(),
    ) -> None:
        super().__init__(seed=seed)
        if on_overflow not in ("shorten", "error"):
            raise C2SValueError(f"on_overflow must be 'shorten' or 'error', got '{on_overflow}'")
        self.templates = load_templates(PERTURBATION_TASK)
        if template is not None and not (isinstance(template, int) and 0 <= template < len(self.templates.inputs)):
            raise C2SValueError(f"template must be null or the index of one of the {len(self.templates.inputs)} "
                             f"{PERTURBATION_TASK} templates (0-{len(self.templates.inputs) - 1}), got {template!r}")
        for name, value in (("top_k_genes", top_k_genes), ("control_top_k_genes", control_top_k_genes)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise C2SValueError(f"{name} must be null or a positive number of genes, got {value!r}")
        self.template = template
        self.columns = columns
        self.top_k_genes = top_k_genes
        self.control_top_k_genes = control_top_k_genes if control_top_k_genes is not None else top_k_genes
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens if tokenizer is not None else None
        self.response_budget = response_budget
        self.on_overflow = on_overflow
        self.n_shortened = 0

    def required_columns(self) -> list[str]:
        return ["control_sentence", "perturbed_sentence", "perturbation"]

    def _budgets(self, responses: list[str]) -> list[int]:
        """Tokens left for each prompt: the context less the response and its EOS (or less
        ``response_budget``); a batch's responses are counted in one call."""
        if self.response_budget is not None:
            return [self.max_tokens - self.response_budget] * len(responses)
        if not responses:
            return []
        return (self.max_tokens - count_tokens(self.tokenizer, [" " + r for r in responses]) - 1).tolist()  # EOS

    def format_batch(self, batch: dict[str, list]) -> dict[str, list]:
        n = len(batch["control_sentence"])
        choices = self.rng.integers(0, len(self.templates.inputs), size=n)  # drawn even for one template: same stream
        if self.template is not None:
            choices[:] = self.template
        inputs, kept = [], []
        responses = [self.templates.response.format(perturbed_sentence=" ".join((perturbed or "").split()[: self.top_k_genes]))
                     for perturbed in batch["perturbed_sentence"]]
        budgets = self._budgets(responses) if self.max_tokens is not None else [None] * n
        for control, response, budget, name, choice in zip(batch["control_sentence"], responses, budgets,
                                                           batch["perturbation"], choices):
            genes = (control or "").split()[: self.control_top_k_genes]
            template = self.templates.inputs[choice]
            fields = {"perturbation": perturbation_phrase(name, self.columns)}
            if self.max_tokens is None:
                prompt, n_kept = template.format(num_genes=len(genes), cell_sentence=" ".join(genes), **fields), len(genes)
            else:
                prompt, n_kept = fit_prompt(template, genes, fields, self.tokenizer, budget)
                if n_kept < len(genes) and self.on_overflow == "error":
                    raise ContextTooSmallError(
                        f"a {self.task} prompt with {len(genes)} control genes does not fit the model's context of "
                        f"{self.max_tokens} tokens with {budget} tokens left for it; only {n_kept} genes "
                        "fit. Lower top_k_genes (or max_new_tokens), or set on_overflow: shorten"
                    )
            self.n_shortened += n_kept < len(genes)
            inputs.append(prompt)
            kept.append(n_kept)
        return {"sample_type": [self.task] * n, "model_input": inputs, "response": responses, "n_control_genes": kept}

    def format_dataset(self, dataset: Dataset, batch_size: int = 1000) -> Dataset:
        missing = [c for c in self.required_columns() if c not in dataset.column_names]
        if missing:
            raise C2SKeyError(f"{type(self).__name__} needs column(s) {missing}; available: {', '.join(dataset.column_names)}")
        self.rng = np.random.default_rng(self.seed)
        self.n_shortened = 0
        formatted = dataset.map(
            self.format_batch, batched=True, batch_size=batch_size,
            remove_columns=["control_sentence", "perturbed_sentence"],
            load_from_cache_file=False, keep_in_memory=True, desc="formatting perturbation prompts",
        )
        if self.n_shortened:
            logger.info(
                "%d of %d perturbation prompts lost control genes from the end of their sentence to fit %d tokens",
                self.n_shortened, dataset.num_rows, self.max_tokens,
            )
        return formatted


def perturbation_phrase(name: str, columns: ScreenColumns) -> str:
    """How a prompt names a perturbation: its label upper-cased, and a combination as the list of
    its targets ("A and B", "A, B and C"), so that a model reads each target as a word of its own."""
    targets = perturbation_targets(name, columns)
    if len(targets) < 2:
        return str(name).upper()
    return f"{', '.join(targets[:-1])} and {targets[-1]}"


def paired_sentences(pairs: pd.DataFrame, sentences: dict[str, str]) -> Dataset:
    """The pairs with both cells' sentences (``control_sentence``, ``perturbed_sentence``)."""
    return Dataset.from_dict({
        "perturbation": pairs["perturbation"].astype(str).tolist(),
        "control_cell": pairs["control_cell"].astype(str).tolist(),
        "perturbed_cell": pairs["perturbed_cell"].astype(str).tolist(),
        "control_sentence": [sentences[c] for c in pairs["control_cell"]],
        "perturbed_sentence": [sentences[c] for c in pairs["perturbed_cell"]],
    })


def response_token_budget(tokenizer, responses: Sequence[str]) -> int:
    """Tokens to generate so the longest of ``responses`` and its EOS fit (``max_new_tokens``)."""
    return response_tokens(tokenizer, responses) + 1
