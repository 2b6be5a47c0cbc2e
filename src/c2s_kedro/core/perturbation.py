"""Perturbation-response prediction (workflow notes sections 10-11): pair perturbed cells with
control cells, split a screen, format "control cell + perturbation -> perturbed cell" prompts,
sample a posterior over responses and summarise it as expression.

A screen is an AnnData with one row per cell and an ``.obs`` column naming the perturbation of
each cell (controls carry one label, ``non-targeting`` in Replogle-style screens). Every column
the code reads is named in ``ScreenColumns``. A perturbation names one target gene or, in a
combinatorial screen, several joined by a separator (``GENE1+GENE2``); ``ScreenTargets`` says
which genes of the screen each perturbation targets, for every step that needs its targets.
"""

from __future__ import annotations

import itertools
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow.compute as pc
import scanpy as sc
import scipy.sparse as sp
from datasets import Dataset, DatasetDict, concatenate_datasets
from tqdm.auto import tqdm

from c2s_kedro.core.errors import C2SError, C2SKeyError, C2SValueError
from c2s_kedro.core.data.splitting import split_names
from c2s_kedro.core.data.validation import sentence_safe_gene_name, tidy_gene_names
from c2s_kedro.core.models.constraints import GeneVocabularyConstraint, postprocess_sentence
from c2s_kedro.core.models.inference import sample_continuations
from c2s_kedro.core.models.loading import LanguageModel
from c2s_kedro.core.models.tokenizer import build_gene_tokenizer
from c2s_kedro.core.prompts.formatting import (
    ContextTooSmallError,
    PromptFormatter,
    count_tokens,
    fit_prompt,
    load_templates,
    response_tokens,
    template_words,
)
from c2s_kedro.core.sentences.conversion import has_label
from c2s_kedro.core.sentences.rank_fit import RankFit, reconstruct_expression

logger = logging.getLogger(__name__)

PERTURBATION_TASK = "perturbation_response"
MISSING_GENE_CAVEAT = (
    "A sample is a cell sentence cut to the genes the model wrote (at most top_k_genes); a gene "
    "absent from a sample is counted as expression 0 in that sample, although in the cell it may "
    "be expressed below the top k. Means are therefore biased towards 0 for genes outside the "
    "typical top k, and variances include the present/absent spread."
)
# Control cells of a part (train, test) below which its pairs reuse a handful of control cells: warned
FEW_CONTROLS = 20
SCREEN_CHECKS = "screen_checks"  # the screen's door: what it dropped and read as controls (.uns, the split, metrics)


@dataclass(frozen=True)
class ScreenColumns:
    """Where a screen keeps what the pipeline reads.

    ``batch`` (e.g. ``gem_group``) pairs controls within the same batch when set; ``gene_symbol``
    names the ``.var`` column holding gene symbols when ``var_names`` are Ensembl ids (None:
    ``var_names`` are symbols already); ``combination_separator`` joins the targets of a
    combinatorial perturbation (``GENE1+GENE2``; None: every label is one target).
    """

    perturbation: str = "gene"
    control_label: str = "non-targeting"
    batch: str | None = "gem_group"
    gene_symbol: str | None = "gene_name"
    combination_separator: str | None = "+"


def gene_key(name: str) -> str:
    """A gene or target name as cell sentences write it: one word (``sentence_safe_gene_name``,
    the mapping the data's gene names go through), upper-cased like the sentences' vocabulary."""
    return sentence_safe_gene_name(name).upper()


def is_control_label(name: str, columns: ScreenColumns) -> bool:
    """Whether a label is the control label, matched as targets are (``gene_key``: surrounding
    whitespace and case ignored), so that ``Non-Targeting`` from one lane is ``non-targeting``; a
    numbered control guide (``non-targeting_1``, ``non-targeting-02``: screens with several control
    guides) is a control too."""
    key, control = gene_key(name), gene_key(columns.control_label)
    return key == control or bool(re.fullmatch(re.escape(control) + r"[_\-.]?\d+", key))


def perturbation_targets(name: str, columns: ScreenColumns) -> tuple[str, ...]:
    """The target genes a perturbation label names, as sentences write genes (``gene_key``): the
    parts between ``columns.combination_separator`` (``"A+B"`` -> ``("A", "B")``; empty parts
    skipped). The control label names none and is never split; a part equal to it (``GENE+ctrl``,
    as GEARS-style screens write single perturbations) is no target."""
    label = str(name)
    if is_control_label(label, columns):
        return ()
    separator = columns.combination_separator
    parts = label.split(separator) if separator else [label]
    control = gene_key(columns.control_label)
    return tuple(key for key in (gene_key(part) for part in parts) if key and key != control)


def perturbation_label(name: str, columns: ScreenColumns) -> str:
    """A perturbation's label as the pipelines write it: its targets (``perturbation_targets``)
    joined by the separator, so that ``"hes4 variant"`` and ``"HES4_variant"`` are one label and
    ``"CBL+ctrl"`` is ``"CBL"``. The control label, and a label naming no target, are kept
    (the latter upper-cased); the control label's other spellings (``is_control_label``) are written
    as the control label."""
    label = str(name)
    if is_control_label(label, columns):
        return columns.control_label
    targets = perturbation_targets(label, columns)
    return (columns.combination_separator or "").join(targets) if targets else label.upper()


class ScreenTargets:
    """Which genes of ``genes`` each perturbation targets (``perturbation_targets``): genes are
    matched as sentences write them (``gene_key``), so ``HES4 variant`` finds the gene
    ``HES4_variant`` and ``C1ORF112`` the gene ``C1orf112``."""

    def __init__(self, genes: Sequence[str], columns: ScreenColumns) -> None:
        self.columns = columns
        self.position: dict[str, int] = {}
        for i, gene in enumerate(genes):
            self.position.setdefault(gene_key(gene), i)

    def targets(self, name: str) -> tuple[str, ...]:
        return perturbation_targets(name, self.columns)

    def positions(self, name: str) -> list[int | None]:
        """Each target's column among the genes (None for a target that is not a gene)."""
        return [self.position.get(target) for target in self.targets(name)]

    def not_genes(self, name: str) -> list[str]:
        """The targets of ``name`` that are not among the genes."""
        return [target for target in self.targets(name) if target not in self.position]

    def is_combination(self, name: str) -> bool:
        return len(self.targets(name)) > 1


def screen_targets(labels: pd.Series, genes: Sequence[str], columns: ScreenColumns) -> dict[str, Any]:
    """What a screen's perturbation labels (one per cell) target, against its ``genes``: the targets
    that are not among the genes with the cells of the perturbations naming each
    (``targets_not_among_genes``), how many cells name at least one
    (``n_cells_target_not_among_genes``), and the combinatorial perturbations with their cells
    (``combinations``). JSON-ready."""
    counts = labels.astype(str).value_counts()
    resolver = ScreenTargets(genes, columns)
    missing: dict[str, int] = {}
    n_missing_cells = 0
    combinations: dict[str, int] = {}
    targets: set[str] = set()
    for name, n in sorted(counts.items()):
        if is_control_label(name, columns):
            continue
        targets.update(resolver.targets(name) or [str(name)])
        absent = resolver.not_genes(name) or ([] if resolver.targets(name) else [str(name)])
        for target in absent:
            missing[target] = missing.get(target, 0) + int(n)
        n_missing_cells += int(n) if absent else 0
        if resolver.is_combination(name):
            combinations[str(name)] = int(n)
    return {"targets_not_among_genes": missing, "n_cells_target_not_among_genes": n_missing_cells,
            "combinations": combinations, "n_targets": len(targets)}


def target_metrics(report: dict[str, Any]) -> dict[str, float]:
    """``screen_targets``' report as flat metrics."""
    return {"n_targets_not_among_genes": float(len(report["targets_not_among_genes"])),
            "n_cells_target_not_among_genes": float(report["n_cells_target_not_among_genes"]),
            "n_combination_perturbations": float(len(report["combinations"])),
            "n_combination_cells": float(sum(report["combinations"].values()))}


def _listed(counts: dict[str, int], limit: int = 20) -> str:
    items = [f"{name} ({n} cells)" for name, n in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def log_screen_targets(report: dict[str, Any], genes: str, level: int = logging.WARNING) -> None:
    """One log line each (at ``level``) for the targets not among ``genes`` (what they are: e.g.
    "the screen's genes") and for the combinatorial perturbations of ``screen_targets``' report."""
    missing = report["targets_not_among_genes"]
    if missing:
        logger.log(level,
            "perturbation targets not among %s (%d): %s. Their %d cells stay in training and evaluation: prompts "
            "name the target, the baselines and knockdown diagnostics that need the target's gene say what they do "
            "instead (perturbation_posterior_metrics)", genes, len(missing), _listed(missing),
            report["n_cells_target_not_among_genes"],
        )
    if missing and 2 * len(missing) > report.get("n_targets", 0):
        logger.warning(
            "most perturbation targets (%d of %d) are not among %s: the perturbation column may hold guide IDs "
            "(TP53_g1, TP53_g2: the guides of one gene would be split between training and test) or Ensembl IDs. "
            "Set perturbation.perturbation_column to the column of target gene symbols.",
            len(missing), report.get("n_targets", 0), genes)
    if report["combinations"]:
        logger.info("combinatorial perturbations, each read as its targets (%d): %s", len(report["combinations"]),
                    _listed(report["combinations"]))


class ScreenLayoutError(C2SError, KeyError):
    """The screen lacks a column or label of ``ScreenColumns``; ``field`` names which one."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field

    def __str__(self) -> str:
        return str(self.args[0])


def check_screen(adata: ad.AnnData, columns: ScreenColumns) -> None:
    """Fail early when the screen lacks what the pipeline reads (``ScreenLayoutError.field`` says
    which of ``columns`` is wrong). Cells without a perturbation label (``has_label``) are not
    counted: ``screen_for_processing`` leaves them out."""
    if columns.perturbation not in adata.obs.columns:
        raise ScreenLayoutError(
            f"perturbation column '{columns.perturbation}' is not in the screen's .obs (columns: "
            f"{', '.join(map(str, adata.obs.columns))}).", "perturbation",
        )
    column = adata.obs[columns.perturbation]
    labels = column[has_label(column)].astype(str)
    written = labels.map({name: perturbation_label(name, columns) for name in labels.unique()})
    if not (written == columns.control_label).any():
        common = ", ".join(labels.value_counts().index[:8]) or "none: every value is empty"
        raise ScreenLayoutError(
            f"no cell has the control label '{columns.control_label}' in .obs['{columns.perturbation}'] "
            f"(most common values: {common}).", "control_label",
        )
    if written.nunique() < 2:
        raise C2SValueError(f"the screen holds only control cells ('{columns.control_label}'); there is nothing to predict")
    if columns.batch is not None and columns.batch not in adata.obs.columns:
        raise ScreenLayoutError(
            f"batch column '{columns.batch}' is not in the screen's .obs (columns: "
            f"{', '.join(map(str, adata.obs.columns))}); name one, or none to pair with any control.", "batch",
        )
    if columns.gene_symbol is not None and columns.gene_symbol not in adata.var.columns:
        raise ScreenLayoutError(
            f"gene symbol column '{columns.gene_symbol}' is not in the screen's .var (columns: "
            f"{', '.join(map(str, adata.var.columns)) or 'none'}); name it, or none when var_names are gene symbols.",
            "gene_symbol",
        )


def screen_gene_names(adata: ad.AnnData, columns: ScreenColumns) -> pd.Index:
    """The screen's gene names as processing will name them (``tidy_gene_names``: symbols from
    ``columns.gene_symbol``, one word of a sentence each, duplicates suffixed). Reads ``.var`` only."""
    return tidy_gene_names(ad.AnnData(var=adata.var.copy()), columns.gene_symbol)[0].var_names.astype(str)


def screen_label_checks(labels: pd.Series, columns: ScreenColumns) -> dict[str, Any]:
    """What the screen's door finds in its perturbation labels (one per cell): cells without one
    (``has_label`` false, e.g. no guide assigned: ``n_cells_without_perturbation``), and cells whose
    label is the control label written another way (``is_control_label``: ``n_controls_other_spelling``,
    the spellings listed with their cells in ``control_spellings``). JSON- and h5ad-ready."""
    present = has_label(labels)
    counts = labels[present].astype(str).value_counts()
    spellings = {str(name): int(n) for name, n in counts.items()
                 if n and str(name) != columns.control_label and is_control_label(name, columns)}
    return {"n_cells_without_perturbation": int((~present).sum()),
            "n_controls_other_spelling": int(sum(spellings.values())), "control_spellings": _listed(spellings)}


def log_screen_label_checks(checks: dict[str, Any], columns: ScreenColumns) -> None:
    """A warning for each thing ``screen_label_checks`` found."""
    if checks.get("n_cells_without_perturbation"):
        logger.warning(
            "%d cells have no perturbation label (.obs['%s'] empty, e.g. no guide assigned): left out of the screen, "
            "never a perturbation (perturbation_data_metrics: n_cells_without_perturbation)",
            checks["n_cells_without_perturbation"], columns.perturbation,
        )
    if checks.get("n_controls_other_spelling"):
        logger.warning(
            "%d control cells write the control label '%s' another way: %s. Read as controls (case and surrounding "
            "whitespace ignored, a control guide's number too) (perturbation_data_metrics: n_controls_other_spelling)",
            checks["n_controls_other_spelling"], columns.control_label, checks["control_spellings"],
        )


def screen_for_processing(
    adata: ad.AnnData, columns: ScreenColumns, truth_key: str, genes: pd.Index | None = None,
) -> tuple[ad.AnnData, pd.DataFrame]:
    """The screen ready for the atlas's processing: cells without a perturbation label left out,
    perturbation labels written as the pipelines write them (``perturbation_label``: targets
    upper-cased like the gene vocabulary and made one word each, combinations joined by the
    separator; the control label in any spelling written as the setting writes it) and the
    simulator's truth (``varm[truth_key]``, genes x perturbations, expected log2 fold change) taken
    out as a table with one row per gene, named as processing will name it; no rows for a real
    screen. What the labels held (``screen_label_checks``) is in ``.uns[SCREEN_CHECKS]``. The counts
    are shared, not copied, unless cells are left out. ``genes``: ``screen_gene_names`` when the
    caller has them."""
    checks = screen_label_checks(adata.obs[columns.perturbation], columns)
    if checks["n_cells_without_perturbation"]:
        adata = adata[has_label(adata.obs[columns.perturbation])].to_memory()
    labels = adata.obs[columns.perturbation].astype(str)
    obs = adata.obs.copy()
    obs[columns.perturbation] = labels.map({name: perturbation_label(name, columns) for name in labels.unique()})
    varm = {key: value for key, value in adata.varm.items() if key != truth_key}
    screen = ad.AnnData(X=adata.X, obs=obs, var=adata.var.copy(), varm=varm, layers=dict(adata.layers),
                        uns={**adata.uns, SCREEN_CHECKS: checks})
    truth = pd.DataFrame({"gene": pd.Series([], dtype=str)})  # a real screen: no rows (still a readable CSV)
    if truth_key in adata.varm:
        table = pd.DataFrame(adata.varm[truth_key])
        genes = screen_gene_names(adata, columns) if genes is None else genes
        truth = pd.DataFrame(np.asarray(table), index=pd.Index(genes, name="gene"),
                             columns=[perturbation_label(c, columns) for c in table.columns]).reset_index()
    return screen, truth


def cells_without_batch(obs: pd.DataFrame, columns: ScreenColumns) -> int:
    """Cells whose batch is empty (``has_label``); ``pair_with_controls`` pairs them with controls of any batch."""
    return 0 if columns.batch is None else int((~has_label(obs[columns.batch])).sum())


def processed_screen_checks(processed: ad.AnnData, columns: ScreenColumns) -> dict[str, Any]:
    """What the screen's checks counted (``.uns[SCREEN_CHECKS]``, JSON-ready) and the cells without a
    batch, logged: they are paired with controls of any batch."""
    checks = {key: value if isinstance(value, str) else int(value)  # h5ad gives numpy numbers back
              for key, value in dict(processed.uns.get(SCREEN_CHECKS, {})).items()}
    checks["n_cells_without_batch"] = cells_without_batch(processed.obs, columns)
    if checks["n_cells_without_batch"]:
        logger.warning("%d cells have no batch (.obs['%s'] empty): they are paired with controls of any batch "
                       "(perturbation_data_metrics: n_cells_without_batch)", checks["n_cells_without_batch"], columns.batch)
    return checks


def control_pairs(
    obs: pd.DataFrame, split: dict[str, Any], part: str, columns: ScreenColumns, seed: int, controls_per_cell: int = 1,
    include_control_pairs: bool = True,
) -> pd.DataFrame:
    """The pairs of a part of the split: each perturbed cell with controls of its batch and, in the
    train and val parts, control -> control pairs labelled with the control label (they teach the model
    that "no perturbation" means "the same state")."""
    controls = split[f"control_{'test' if part == 'test_seen' else part}"]  # both test sets pair with the test controls
    pairs = pair_with_controls(obs, split[part], controls, columns, seed=seed, controls_per_cell=controls_per_cell)
    if part in ("train", "val") and include_control_pairs:
        pairs = pd.concat([pairs, pair_with_controls(obs, controls, controls, columns, seed=seed + 1)], ignore_index=True)
    return pairs


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


def knockdown_drop_share(obs: pd.DataFrame, split: dict[str, Any], columns: ScreenColumns, sentences: dict[str, str]) -> float:
    """How often a knockdown takes its target out of a top-k sentence, measured on the training
    cells: 1 - (share of perturbed cells whose sentence holds their target) / (share of control
    cells whose sentence holds it), pooled over the targets of the training perturbations (each
    target of a combination) that are genes of the sentences (0 when none is). CRISPRi on the
    default screen: about 0.97."""
    labels = obs[columns.perturbation].astype(str)
    perturbed = pd.Index(split["train"])
    controls = [set(sentences[c].split()) for c in split["control_train"]]
    held, expected = 0.0, 0.0
    for name, cells in pd.Series(perturbed, index=perturbed).groupby(labels.loc[perturbed].to_numpy()):
        for target in perturbation_targets(name, columns):
            in_controls = float(np.mean([target in genes for genes in controls])) if controls else 0.0
            if in_controls == 0.0:
                continue  # not a gene of the sentences, or never in a control's top k: nothing to measure
            held += sum(target in sentences[c].split() for c in cells)
            expected += in_controls * len(cells)
    return float(np.clip(1.0 - held / expected, 0.0, 1.0)) if expected else 0.0


def synthetic_knockdown_pairs(
    obs: pd.DataFrame, controls: Sequence[str], sentences: dict[str, str], columns: ScreenColumns, per_control: int,
    drop_share: float, seed: int = 0, same_cell: bool = False,
) -> Dataset:
    """Synthetic CRISPRi pairs: each control cell paired ``per_control`` times (with itself when
    ``same_cell``, else with another control of its batch by ``pair_with_controls``, as a real
    pair) with a target drawn from the response cell's genes; the response is that cell's sentence with the target taken out (with probability
    ``drop_share``, the screen's own rate; otherwise left as it is). Many targets with a few cells
    each, so that a model learns to knock down whatever gene is named rather than the few targets of
    the screen. Columns as ``paired_sentences``."""
    if per_control < 0:
        raise C2SValueError(f"synthetic pairs per control cell must be 0 or more, got {per_control}")
    rng = np.random.default_rng(seed)
    if same_cell:  # the control cell itself, knocked down: its sentence is the answer but for the target
        cells = [str(c) for c in controls for _ in range(per_control)]
        pairs = pd.DataFrame({"control_cell": cells, "perturbed_cell": cells})
    else:
        pairs = pd.concat([pair_with_controls(obs, controls, controls, columns, seed=seed + k) for k in range(per_control)],
                          ignore_index=True)
    rows: dict[str, list[str]] = {key: [] for key in ("perturbation", "control_cell", "perturbed_cell", "control_sentence",
                                                       "perturbed_sentence")}
    for control, response in zip(pairs["control_cell"], pairs["perturbed_cell"]):
        genes = sentences[response].split()
        if not genes:
            continue
        target = int(rng.integers(len(genes)))
        name = genes[target]
        if rng.random() < drop_share:
            genes = genes[:target] + genes[target + 1 :]
        rows["perturbation"].append(name)
        rows["control_cell"].append(str(control))
        rows["perturbed_cell"].append(str(response))
        rows["control_sentence"].append(sentences[control])
        rows["perturbed_sentence"].append(" ".join(genes))
    logger.info("%d synthetic knockdown pairs (%d targets; target dropped with probability %.2f)",
                len(rows["perturbation"]), len(set(rows["perturbation"])), drop_share)
    return Dataset.from_dict(rows)


def top_k_sentences(sentences: Dataset, top_k_genes: int | None, batch_size: int = 8192) -> dict[str, str]:
    """Each cell's sentence cut to its first ``top_k_genes`` genes (None: whole), by cell name.
    Prompts never use more (``PerturbationPromptFormatter`` cuts both sentences there), and a
    screen's whole sentences as Python strings are GBs: the cut runs in Arrow, a batch at a time."""
    table = sentences.select_columns(["cell_name", "cell_sentence"]).with_format("arrow")
    lookup: dict[str, str] = {}
    for start in range(0, table.num_rows, batch_size):
        batch = table[start : start + batch_size]
        text = pc.fill_null(batch.column("cell_sentence"), "")
        if top_k_genes is not None:
            text = pc.binary_join(pc.list_slice(pc.split_pattern(text, " "), 0, top_k_genes), " ")
        lookup.update(zip(batch.column("cell_name").to_pylist(), text.to_pylist()))
    return lookup


def pair_with_controls(
    obs: pd.DataFrame, perturbed: Sequence[str], controls: Sequence[str], columns: ScreenColumns, seed: int = 0,
    controls_per_cell: int = 1,
) -> pd.DataFrame:
    """Pair each perturbed cell with ``controls_per_cell`` control cells drawn at random (seeded),
    from the same batch when ``columns.batch`` is set.

    A perturbed cell whose batch has no control in ``controls`` is paired with a control from any
    batch, and so is a cell without a batch (``has_label``; its ``batch`` written empty); such pairs
    are counted in the log and flagged in the ``same_batch`` column. Returns one
    row per pair: ``perturbed_cell``, ``control_cell``, ``perturbation``, ``batch``, ``same_batch``.
    """
    if controls_per_cell < 1:
        raise C2SValueError(f"controls_per_cell must be at least 1, got {controls_per_cell}")
    controls = pd.Index(controls)
    if len(controls) == 0:
        raise C2SValueError("no control cell to pair with: the control part of the split is empty")
    rng = np.random.default_rng(seed)
    perturbed = pd.Index(perturbed)
    if columns.batch is not None:
        batch_of = obs[columns.batch].astype(str)
        known = pd.Series(has_label(obs[columns.batch]), index=obs.index)
    else:
        batch_of, known = pd.Series("all", index=obs.index), pd.Series(True, index=obs.index)
    batched = controls[known.loc[controls].to_numpy()]  # a control without a batch is in no batch's pool
    by_batch = {batch: np.asarray(names) for batch, names in pd.Series(batched, index=batched).groupby(batch_of.loc[batched].to_numpy())}
    everywhere = np.asarray(controls)
    rows = []
    outside = unbatched = 0
    for cell in perturbed:
        batch = batch_of.loc[cell]
        has_batch = bool(known.loc[cell])
        pool = by_batch.get(batch) if has_batch else None
        same = pool is not None
        if not same:
            pool = everywhere
            outside += has_batch
            unbatched += not has_batch
        for control in rng.choice(pool, size=controls_per_cell, replace=len(pool) < controls_per_cell):
            rows.append((cell, str(control), str(obs.at[cell, columns.perturbation]), batch if has_batch else "", same))
    if outside:
        logger.warning("%d perturbed cells have no control in their batch: paired with controls of other batches", outside)
    if unbatched:  # split_perturbation_screen warns once with the screen's count
        logger.info("%d cells have no batch (.obs['%s'] empty): paired with controls of any batch", unbatched,
                       columns.batch)
    return pd.DataFrame(rows, columns=["perturbed_cell", "control_cell", "perturbation", "batch", "same_batch"])


SPLIT_PARTS = ("train", "val", "test")
# The screen cuts each permutation test first, then val, then train (the atlas: train, val, test),
# so a screen's held-out perturbations stay those it had before the splitters were merged.
_SCREEN_CUT_ORDER = ("test", "val", "train")


def split_screen(
    obs: pd.DataFrame,
    columns: ScreenColumns,
    mode: str = "perturbations",
    fractions: dict[str, float] | None = None,
    seed: int = 0,
    test_perturbations: Sequence[str] | None = None,
    seen_test_fraction: float = 0.0,
) -> dict[str, Any]:
    """Train/val/test parts of a screen's cells, cut by ``core.data.splitting.split_names`` from one
    seeded generator (controls of each batch in sorted batch order, then the perturbations).

    ``mode="perturbations"``: whole perturbations are held out (``test_perturbations`` when given,
    else a random ``fractions["test"]`` of them), so test perturbations are never seen in training.
    ``mode="cells"``: every perturbation's cells are split by ``fractions``, so the test asks for
    held-out cells of perturbations seen in training. Control cells are always split by cells,
    within each batch, so that every part can pair its cells with controls of their own batch.
    Every list is sorted, except the controls: sorted within each batch, batches in sorted order.

    ``seen_test_fraction`` (held-out perturbations only) also holds out that share of each training
    perturbation's cells as ``test_seen``, the second evaluation: held-out cells of perturbations
    seen in training (``test_seen_perturbations``). Both test sets pair with ``control_test``.
    """
    fractions = dict(fractions or {"train": 0.8, "val": 0.1, "test": 0.1})
    if mode not in ("perturbations", "cells"):
        raise C2SValueError(f"split mode must be 'perturbations' or 'cells', got '{mode}'")
    if sorted(fractions) != sorted(SPLIT_PARTS):
        raise C2SValueError(f"split fractions must name exactly train, val and test; got {fractions}")
    fractions = {part: float(fractions[part]) for part in SPLIT_PARTS}
    if isinstance(seen_test_fraction, bool) or not 0.0 <= float(seen_test_fraction) < 1.0:
        raise C2SValueError(f"seen_test_fraction must be at least 0 and below 1, got {seen_test_fraction!r}")
    if seen_test_fraction and mode != "perturbations":
        raise C2SValueError("seen_test_fraction holds out cells of seen perturbations beside held-out perturbations: it needs "
                         "mode 'perturbations' (mode 'cells' already tests held-out cells of seen perturbations); set it to 0")
    cut = {part: fractions[part] for part in _SCREEN_CUT_ORDER}
    labels = obs[columns.perturbation].astype(str)
    rng = np.random.default_rng(seed)
    is_control = (labels == columns.control_label).to_numpy()
    control_obs = obs[is_control]
    control_parts: dict[str, list[str]] = {part: [] for part in SPLIT_PARTS}
    batches = control_obs[columns.batch].astype(str) if columns.batch is not None else pd.Series("all", index=control_obs.index)
    for _, cells in control_obs.groupby(batches.to_numpy(), sort=True):  # every batch keeps controls in every part
        for part, names in split_names(cells.index, cut, rng).items():
            control_parts[part] += sorted(names)
    names = sorted(labels[~is_control].unique())
    parts: dict[str, list[str]] = {part: [] for part in SPLIT_PARTS}
    if mode == "perturbations":
        if test_perturbations:
            test_perturbations = sorted({perturbation_label(name, columns) for name in test_perturbations})
            unknown = sorted(set(test_perturbations) - set(names))
            if unknown:
                raise C2SValueError(f"test_perturbations {unknown} are not perturbations of the screen")
            rest = [n for n in names if n not in set(test_perturbations)]
            val = min(1.0, fractions["val"] / max(1e-9, 1.0 - fractions["test"]))  # of the perturbations not held out
            chosen = split_names(rest, {"val": val, "train": 1.0 - val}, rng)
            chosen["test"] = sorted(test_perturbations)
        else:
            if len(names) < 3:
                raise C2SValueError(
                    f"holding out perturbations needs at least 3 of them (train, val, test); the screen has {len(names)}. "
                    "Hold out cells instead (mode 'cells')."
                )
            chosen = split_names(names, cut, rng)
        for part in parts:
            keep = labels.isin(chosen[part]).to_numpy() & ~is_control
            parts[part] = sorted(obs.index[keep])
        perturbations = {part: sorted(chosen[part]) for part in SPLIT_PARTS}
        if seen_test_fraction:
            seen = {"test_seen": seen_test_fraction, "train": 1.0 - seen_test_fraction}
            train, held = [], []
            for name in perturbations["train"]:
                cells = split_names(obs.index[(labels == name).to_numpy()], seen, rng)
                train += cells["train"]
                held += cells["test_seen"]
            parts["train"], parts["test_seen"] = sorted(train), sorted(held)
            perturbations["test_seen"] = sorted(labels.loc[held].unique())
    else:
        for name in names:
            cells = split_names(obs.index[(labels == name).to_numpy()], cut, rng)
            for part in parts:
                parts[part] += cells[part]
        perturbations = {part: sorted(labels.loc[parts[part]].unique()) for part in parts}
    parts = {part: sorted(cells) for part, cells in parts.items()}
    if not parts["test"] or not parts["train"]:
        raise C2SValueError("the split left no training or no test cells; use more cells or other fractions")
    for part in ("train", "test"):
        if parts[part] and len(control_parts[part]) < FEW_CONTROLS:
            logger.warning(
                "only %d %s control cells (fewer than %d) for %d %s perturbed cells: their pairs reuse these few controls, "
                "so a prediction starts from a handful of control states. The screen has %d control cells; use a screen "
                "with more, or raise split.fractions.%s", len(control_parts[part]), part, FEW_CONTROLS, len(parts[part]),
                part, int(is_control.sum()), part,
            )
    if seen_test_fraction and not parts["test_seen"]:
        raise C2SValueError(f"seen_test_fraction {seen_test_fraction} holds out no cell of the seen perturbations (too few "
                         "cells each); raise it, or set it to 0")
    return {
        "mode": mode,
        "seed": seed,
        "fractions": fractions,
        **({"seen_test_fraction": float(seen_test_fraction)} if seen_test_fraction else {}),
        **parts,
        **{f"control_{part}": cells for part, cells in control_parts.items()},
        **{f"{part}_perturbations": list(values) for part, values in perturbations.items()},
    }


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


def target_words(perturbations: Sequence[str], vocabulary: Sequence[str], columns: ScreenColumns) -> list[str]:
    """The targets of ``perturbations`` that are not words of ``vocabulary`` (the sentences'
    genes), sorted: a gene-level tokenizer needs them as words of their own."""
    known = set(vocabulary)
    return sorted({target for name in perturbations for target in perturbation_targets(name, columns)} - known)


def screen_tokenizer(vocabulary: Sequence[str], perturbations: Sequence[str], columns: ScreenColumns,
                     model_max_length: int):
    """The offline base model's gene-level tokenizer for a screen: a token per gene of ``vocabulary``,
    per word of the perturbation templates, the control label, "and" (which joins a combination's
    targets in prompts) and each target of ``perturbations`` that is not a gene (``target_words``: a
    token of its own, never spelt in letters). Returns the tokenizer and those targets."""
    targets = target_words(perturbations, vocabulary, columns)
    words = template_words((PERTURBATION_TASK,)) + [str(columns.control_label).upper(), "and"] + targets
    return build_gene_tokenizer(vocabulary, words, model_max_length=model_max_length), targets


class TargetTokenError(C2SError, LookupError):
    """A gene-level tokenizer has no token for a perturbation target (no setting changes that: the
    model's tokenizer does)."""


def check_target_tokens(tokenizer, perturbations: Sequence[str], columns: ScreenColumns, genes: Sequence[str]) -> None:
    """Refuse a gene-level tokenizer (each of ``genes`` one token, as the offline base model's) that
    would spell a target of ``perturbations`` in characters: such a model would read the name as
    letters. A subword tokenizer (a hub model's) reads genes and targets alike in pieces: nothing
    to check."""
    sample = list(dict.fromkeys(genes))[:50]
    if not sample or (count_tokens(tokenizer, [" " + gene for gene in sample]) != 1).any():
        return
    targets = sorted({target for name in perturbations for target in perturbation_targets(name, columns)})
    if not targets:
        return
    spelled = [target for target, n in zip(targets, count_tokens(tokenizer, [" " + t for t in targets])) if n != 1]
    if spelled:
        raise TargetTokenError(
            f"the model's tokenizer has a token for every gene but not for perturbation target(s) "
            f"{', '.join(spelled[:10])}{' ...' if len(spelled) > 10 else ''} ({len(spelled)} of {len(targets)}): it would "
            "read them letter by letter. Rebuild the base model from this screen (the offline base model's tokenizer "
            "gives every target a token of its own), or start from a model with a subword tokenizer"
        )


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


def sample_posterior(
    language_model: LanguageModel,
    prompts: Sequence[str],
    genes: Sequence[str],
    n_samples: int = 100,
    temperatures: Sequence[float] = (0.7, 1.0, 1.3),
    max_new_tokens: int = 202,
    seed: int = 0,
    batch_size: int | None = None,
    min_genes: int | None = None,
) -> pd.DataFrame:
    """``n_samples`` responses per prompt at each temperature, with constrained decoding (only
    genes of ``genes``, none twice; with ``min_genes``, at least that many before the end) and
    one pass over each prompt shared by all its samples.

    Refuses (before sampling anything) a prompt whose length plus ``max_new_tokens`` exceeds the
    model's context. Returns one row per sample: ``prompt_index``, ``temperature``,
    ``sample_index``, ``sentence`` (genes only), ``n_genes``, ``n_unknown`` and ``n_repeated``
    (words post-processing would have removed; 0 under the constraint).
    """
    if n_samples < 1:
        raise C2SValueError(f"n_samples must be at least 1, got {n_samples}")
    if not temperatures or any(t <= 0 for t in temperatures):
        raise C2SValueError(f"temperatures must be positive, got {list(temperatures)}")
    tokenizer = language_model.tokenizer
    lengths = count_tokens(tokenizer, prompts)
    context = language_model.context_length
    too_long = np.flatnonzero(lengths + max_new_tokens > context)
    if too_long.size:
        first = int(too_long[0])
        raise ContextTooSmallError(
            f"prompt {first} has {int(lengths[first])} tokens and {max_new_tokens} new tokens are requested: "
            f"{int(lengths[first]) + max_new_tokens} > the model's context of {context} ({too_long.size} prompts). "
            "Nothing was sampled. Format the prompts with response_budget=max_new_tokens so the control sentence "
            "is shortened to fit, or lower top_k_genes"
        )
    if min_genes is not None:
        constraint = GeneVocabularyConstraint(tokenizer, genes, min_genes=min_genes)
        needed = int(np.ceil(constraint.min_genes * constraint.tokens_per_gene)) + 1  # and EOS
        if needed > max_new_tokens:
            raise C2SValueError(
                f"min_genes={min_genes} needs about {needed} new tokens ({constraint.tokens_per_gene:.2f} per gene and "
                f"EOS) but max_new_tokens is {max_new_tokens}: samples would be cut short. Nothing was sampled. Raise "
                "max_new_tokens or lower min_genes"
            )
    vocabulary = set(genes)
    rows = []
    jobs = [(i, t) for i in range(len(prompts)) for t in temperatures]
    for job, (index, temperature) in enumerate(tqdm(jobs, desc="posterior samples", unit="prompt x temperature")):
        constraint = GeneVocabularyConstraint(tokenizer, genes, min_genes=min_genes)
        texts = sample_continuations(
            language_model, prompts[index], n_samples, max_new_tokens, temperature=temperature,
            seed=seed + job, logits_processor=constraint, batch_size=batch_size,
        )
        for sample, text in enumerate(texts):
            sentence, unknown, repeated = postprocess_sentence(text, vocabulary)
            rows.append((index, float(temperature), sample, sentence, len(sentence.split()), unknown, repeated))
    return pd.DataFrame(rows, columns=["prompt_index", "temperature", "sample_index", "sentence", "n_genes",
                                       "n_unknown", "n_repeated"])


def choose_perturbations(
    available: Sequence[str], which: int | Sequence[str] | None, seed: int = 0, columns: ScreenColumns = ScreenColumns(),
) -> list[str]:
    """The held-out perturbations to sample, sorted: all of ``available`` (``which`` None), that many
    drawn at random (an integer; seeded), or the ones named (a list; matched as the screen's labels
    are written, ``perturbation_label``: upper-cased, combinations by ``columns``' separator)."""
    available = sorted({str(name) for name in available})
    if which is None:
        return available
    if isinstance(which, bool) or not isinstance(which, int | list | tuple):
        raise C2SValueError(f"the perturbations to sample must be null (all), a number or a list of names, got {which!r}")
    if isinstance(which, int):
        if which < 1:
            raise C2SValueError(f"the number of perturbations to sample must be at least 1, got {which}")
        if which >= len(available):
            return available
        # its own stream, so that the prompts drawn for a perturbation do not depend on this choice
        return sorted(np.random.default_rng([seed, 7]).choice(available, size=which, replace=False).tolist())
    names = sorted({perturbation_label(str(name), columns) for name in which})
    unknown = [name for name in names if name not in set(available)]
    if unknown or not names:
        raise C2SValueError(
            f"perturbations {unknown or '[]'} are not among the {len(available)} held-out perturbations with test prompts "
            f"(e.g. {', '.join(available[:5])}); name held-out ones, or give a number or null"
        )
    return names


def choose_posterior_prompts(
    posterior_prompts: Dataset, seed: int = 0, perturbations: int | Sequence[str] | None = None,
    seen_perturbations: int | Sequence[str] | None = None, columns: ScreenColumns = ScreenColumns(),
) -> pd.DataFrame:
    """The rows of the ``posterior`` prompts to sample: the held-out perturbations that
    ``choose_perturbations`` picks with ``perturbations`` (None: every one), the seen ones it picks
    with ``seen_perturbations`` (its own draw), and every control-label row."""
    needed = ["evaluation", "perturbation", "control_cell", "model_input", "n_control_genes", "max_new_tokens"]
    missing = [c for c in needed if c not in posterior_prompts.column_names]
    if missing:
        raise C2SKeyError(f"the posterior prompts lack column(s) {missing}; they have {', '.join(posterior_prompts.column_names)}. "
                       "Rerun perturbation_data so its prompts have a posterior part")
    table = posterior_prompts.select_columns(needed).to_pandas()
    if not (table["evaluation"] == "heldout").any():
        raise C2SValueError("there are no held-out perturbation prompts to sample from")
    keep = table["evaluation"] == "control"
    for evaluation, which, stream in (("heldout", perturbations, seed), ("seen", seen_perturbations, seed + 1)):
        rows = table["evaluation"] == evaluation
        if rows.any():
            keep |= rows & table["perturbation"].isin(choose_perturbations(table.loc[rows, "perturbation"], which, stream,
                                                                           columns))
    return table[keep].reset_index(drop=True)


def sample_test_posterior(
    language_model: LanguageModel,
    posterior_prompts: Dataset,
    genes: Sequence[str],
    n_samples: int = 100,
    temperatures: Sequence[float] = (0.7, 1.0),
    seed: int = 0,
    batch_size: int | None = None,
    perturbations: int | Sequence[str] | None = None,
    seen_perturbations: int | Sequence[str] | None = None,
    min_genes: int | None = None,
    columns: ScreenColumns = ScreenColumns(),
) -> pd.DataFrame:
    """``sample_posterior`` on the ``posterior`` prompts that ``choose_posterior_prompts`` picks
    (held-out perturbations, seen ones, and the control label on the same control cells),
    generating the prompts' ``max_new_tokens`` (at least ``min_genes`` genes each, when set); each
    sample row also names its ``evaluation``, ``perturbation``, ``control_cell``, the prompt's
    ``n_control_genes`` and the run's wall seconds per sample (``seconds_per_sample``)."""
    prompts = choose_posterior_prompts(posterior_prompts, seed, perturbations, seen_perturbations, columns)
    logger.info("sampling %d prompts: %s", len(prompts),
                ", ".join(f"{n} {e}" for e, n in prompts.groupby("evaluation")["perturbation"].nunique().items()))
    started = time.perf_counter()
    samples = sample_posterior(
        language_model, prompts["model_input"].tolist(), list(genes), n_samples=n_samples, temperatures=temperatures,
        max_new_tokens=int(prompts["max_new_tokens"].iloc[0]), seed=seed, batch_size=batch_size, min_genes=min_genes,
    )
    samples = samples.join(prompts[["evaluation", "perturbation", "control_cell", "n_control_genes"]], on="prompt_index")
    samples["seconds_per_sample"] = (time.perf_counter() - started) / max(1, len(samples))
    if samples["n_unknown"].sum() or samples["n_repeated"].sum():
        logger.warning("constrained samples contained %d unknown and %d repeated genes", samples["n_unknown"].sum(),
                       samples["n_repeated"].sum())
    logger.info("%d posterior samples, median %d genes each", len(samples), int(samples["n_genes"].median()))
    return samples


def posterior_statistics(
    expression: sp.spmatrix | np.ndarray, groups: pd.DataFrame
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, np.ndarray]:
    """Per group of samples (rows of ``groups``, e.g. perturbation x temperature, in order of first
    appearance): the mean, the variance (ddof=1; 0 for a single sample) and the share of samples
    in which each gene is present, over the rows of ``expression`` (samples x genes; an absent
    gene is 0), with scanpy's ``sc.get.aggregate`` on the sparse samples.

    Returns the groups (one row each, with ``n_samples``), mean, variance, present share.
    """
    matrix = sp.csr_matrix(expression, dtype=np.float64)  # float64: aggregate's variance keeps its precision
    if matrix.shape[0] != len(groups):
        raise C2SValueError(f"{matrix.shape[0]} samples but {len(groups)} group rows")
    keys = groups.reset_index(drop=True)
    codes, uniques = pd.MultiIndex.from_frame(keys.astype(str)).factorize()
    n_groups = len(uniques)
    by_group = ad.AnnData(matrix, obs=pd.DataFrame({"group": pd.Categorical.from_codes(codes, categories=range(n_groups))},
                                                   index=[str(i) for i in range(len(codes))]))
    aggregated = sc.get.aggregate(by_group, by="group", func=["mean", "var", "count_nonzero"], dof=0)
    counts = np.bincount(codes, minlength=n_groups)
    mean = np.asarray(aggregated.layers["mean"])
    scale = np.where(counts > 1, counts / np.maximum(counts - 1, 1), 0.0)[:, None]  # ddof=1, and 0 for one sample
    variance = np.maximum(np.asarray(aggregated.layers["var"]) * scale, 0.0)
    present = np.asarray(aggregated.layers["count_nonzero"], dtype=np.float64) / counts[:, None]
    first = pd.Series(np.arange(len(codes))).groupby(codes).first().to_numpy()
    table = keys.iloc[first].reset_index(drop=True)
    table["n_samples"] = counts.astype(int)
    return table, mean, variance, present


def posterior_expression(samples: pd.DataFrame, genes: Sequence[str], rank_fit: RankFit) -> tuple[ad.AnnData, ad.AnnData]:
    """The posterior samples as expression and their statistics per perturbation and temperature.

    Each sample's sentence becomes expression with ``rank_fit`` (a gene absent from a sample is 0):
    one row per sample, ``.obs`` the sample's columns (``sentence`` last). The statistics
    (``posterior_statistics``): one row ``<perturbation>@T<temperature>`` per group, the mean in
    ``X``, ``layers["variance"]`` and ``layers["present_share"]``. Both carry the caveat about
    absent genes in ``.uns["caveat"]``; the samples also the rank fit in ``.uns["rank_fit"]``.
    """
    missing = [c for c in ("sentence", "perturbation", "temperature") if c not in samples.columns]
    if missing:
        raise C2SKeyError(f"the posterior samples lack column(s) {missing}; they have {', '.join(map(str, samples.columns))}")
    genes = list(genes)
    sentences = samples["sentence"].fillna("")
    matrix, n_unknown = reconstruct_expression(sentences.tolist(), genes, rank_fit)
    if n_unknown:
        logger.warning("%d words of the samples are not genes of the screen", n_unknown)
    obs = samples.drop(columns=["sentence"]).astype({"temperature": float}).reset_index(drop=True)
    obs.index = [f"sample-{i}" for i in range(len(obs))]
    obs["sentence"] = sentences.to_numpy()
    expression = ad.AnnData(matrix, obs=obs, var=pd.DataFrame(index=genes))
    expression.uns["caveat"] = MISSING_GENE_CAVEAT
    expression.uns["rank_fit"] = rank_fit.to_dict()
    groups, mean, variance, present = posterior_statistics(matrix, obs[["perturbation", "temperature"]])
    groups.index = [f"{p}@T{t}" for p, t in zip(groups["perturbation"], groups["temperature"])]
    statistics = ad.AnnData(mean.astype(np.float32), obs=groups, var=pd.DataFrame(index=genes))
    statistics.layers["variance"] = variance.astype(np.float32)
    statistics.layers["present_share"] = present.astype(np.float32)
    statistics.uns["caveat"] = MISSING_GENE_CAVEAT
    statistics.uns["variance"] = "sample variance over a group's samples (ddof=1), absent genes counted as 0"
    return expression, statistics
