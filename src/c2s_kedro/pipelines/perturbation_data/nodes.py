"""Nodes of the perturbation_data pipeline (workflow notes section 10). QC, normalization,
sentences and the rank fit are the atlas's nodes run under the ``perturbation`` namespace; these
are the screen's own steps around them. They read the settings once and wire core.data.screen (the
screen's checks) and core.tasks.perturbation.pairs (the split). The base model and the prompts in
its tokens are perturbation_finetuning's."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any


# each core module loads when a node first uses it (c2s_kedro/core/__init__.py): every run imports every
# pipeline's nodes (the registry composes each pipeline with its upstream) and pays only for what its nodes use
from c2s_kedro import core
from c2s_kedro.parameters import setting_hint
from c2s_kedro.parameters.perturbation import SECTION, perturbation_settings

if TYPE_CHECKING:
    import anndata as ad
    import pandas as pd

logger = logging.getLogger(__name__)

TRUTH_KEY = "perturbation_truth_log2fc"  # where the simulator stores its expected log2 fold changes
SCREEN_SETTINGS = {  # ScreenColumns field -> the setting that names it
    "perturbation": f"{SECTION}.perturbation_column", "control_label": f"{SECTION}.control_label",
    "batch": f"{SECTION}.batch_column", "gene_symbol": f"{SECTION}.data_processing.gene_symbol_column",
}


def check_screen_layout(perturbseq_raw: ad.AnnData, params: dict[str, Any]) -> tuple[ad.AnnData, pd.DataFrame]:
    """The screen's columns checked, cells without a perturbation label left out, perturbation labels
    written as the gene vocabulary writes genes (combinations parsed by ``combination_separator``; the
    control label in any case), what was left out or read as a control and the targets that are not
    among the screen's genes logged, and the simulator's truth taken out of ``.varm`` (no rows for a
    real screen)."""
    columns = perturbation_settings(params).columns()
    try:
        core.data.screen.check_screen(perturbseq_raw, columns)
    except core.data.screen.ScreenLayoutError as error:
        with setting_hint(SCREEN_SETTINGS[error.field], core.data.screen.ScreenLayoutError):
            raise
    genes = core.data.screen.screen_gene_names(perturbseq_raw, columns)
    screen, truth = core.data.screen.screen_for_processing(perturbseq_raw, columns, TRUTH_KEY, genes)
    core.data.screen.log_screen_label_checks(screen.uns[core.data.screen.SCREEN_CHECKS], columns)
    report = core.data.screen.screen_targets(screen.obs[columns.perturbation], genes, columns)
    core.data.screen.log_screen_targets(report, "the screen's genes")
    return screen, truth


def split_perturbation_screen(processed_adata: ad.AnnData, params: dict[str, Any]) -> dict[str, Any]:
    """Train/val/test cells: held-out perturbations or held-out cells (``split.mode``), with what the
    perturbations target among the processed genes (``targets``: ``core.data.screen.screen_targets``)
    and what the screen's checks counted (``screen_checks``: cells left out or read as controls at the
    door, and cells without a batch, which are paired with controls of any batch)."""
    settings = perturbation_settings(params)
    split = settings.split
    columns = settings.columns()
    with setting_hint(f"{SECTION}.split"):
        parts = core.tasks.perturbation.pairs.split_screen(
            processed_adata.obs, columns, mode=split.mode, fractions=split.fractions, seed=split.seed,
            test_perturbations=split.test_perturbations, seen_test_fraction=split.seen_test_fraction,
        )
    report = core.data.screen.screen_targets(processed_adata.obs[columns.perturbation], processed_adata.var_names, columns)
    if report["targets_not_among_genes"]:
        # a target among the screen's genes can still be gone after QC (detected in too few cells)
        core.data.screen.log_screen_targets(
            {**report, "combinations": {}},
            f"the screen's genes after QC ({SECTION}.data_processing.qc.min_cells_per_gene removes genes detected in "
            "fewer cells)")
    return {**parts, "targets": report, "screen_checks": core.data.screen.processed_screen_checks(processed_adata, columns)}


def summarize_screen(perturbation_split: dict[str, Any]) -> dict[str, float]:
    """Perturbations and cells of each part of the split, what the perturbations target: targets not
    among the genes and the cells that name one, combinations and their cells, and what the screen's
    checks counted (cells without a perturbation label or a batch, controls spelt another way)."""
    metrics: dict[str, float] = {}
    for part in ("train", "val", "test", "test_seen"):
        if part not in perturbation_split:
            continue
        metrics[f"n_{part}_perturbations"] = float(len(perturbation_split[f"{part}_perturbations"]))
        metrics[f"n_{part}_perturbed_cells"] = float(len(perturbation_split[part]))
        if f"control_{part}" in perturbation_split:  # test_seen pairs with control_test
            metrics[f"n_{part}_control_cells"] = float(len(perturbation_split[f"control_{part}"]))
    if "targets" in perturbation_split:  # a split made before targets were reported has none
        metrics.update(core.data.screen.target_metrics(perturbation_split["targets"]))
    metrics.update({key: float(value) for key, value in perturbation_split.get("screen_checks", {}).items()
                    if not isinstance(value, str)})
    return metrics
