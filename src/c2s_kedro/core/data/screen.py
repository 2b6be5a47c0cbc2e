"""A Perturb-seq screen at the door: where it keeps what the pipeline reads (``ScreenColumns``), its
perturbation labels and the genes they target (``ScreenTargets``), and the checks of its layout and
labels before processing.

A screen is an AnnData with one row per cell and an ``.obs`` column naming the perturbation of
each cell (controls carry one label, ``non-targeting`` in Replogle-style screens). Every column
the code reads is named in ``ScreenColumns``. A perturbation names one target gene or, in a
combinatorial screen, several joined by a separator (``GENE1+GENE2``); ``ScreenTargets`` says
which genes of the screen each perturbation targets, for every step that needs its targets.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from c2s_kedro.core.errors import C2SError, C2SValueError
from c2s_kedro.core.data.validation import sentence_safe_gene_name, tidy_gene_names
from c2s_kedro.core.sentences.conversion import has_label

logger = logging.getLogger(__name__)

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
