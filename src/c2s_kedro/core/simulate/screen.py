"""Perturb-seq-like count simulator in the Jurkat CRISPRi schema (GEO GSE264667, Replogle style).

One cell line, low MOI: every cell carries one guide pair, either against one target gene or
``non-targeting``. Counts are negative binomial per gene and cell, ``NB(mean, shape =
dispersion)``, with

    mean = library size * baseline * gem-group gene factor * 2 ** truth[perturbation]
           * module activity * complex activity (targets only) * mito factor (MT- genes only)

- ``baseline`` is a log-normal gene abundance (sum 1); ``library size`` is log-normal around
  ``median_umi`` times a per-gem-group depth factor (the batch effect, with a small mean-one
  per-gene factor per gem group). Control cells spread over all gem groups like perturbed cells.
- Genes are grouped into modules (programs) whose activity varies a little from cell to cell.
- Each perturbation knocks its target down to a residual of 5-40% of baseline. Perturbations with
  a downstream effect come in complexes: the members of a complex shift the same module in the
  same direction (log2 fold change 0.5-2 per perturbation, times a per-gene loading), and their
  targets co-vary slightly across cells. The others ("no effect") knock down their target only.
- A fraction of cells are doublet-like (a second cell of the same gem group adds its counts) and a
  fraction have a high mitochondrial share (20-50%, with fewer nuclear counts), for QC to remove.
- Optionally (``n_double_perturbations``, off by default) some cells carry two targeting guide
  pairs: a double perturbation ``A+B`` of two of the single perturbations, whose truth is the sum
  of its singles' log2 fold changes (both targets knocked down, both downstream shifts applied).
  Singles are simulated the same way with or without doubles.

Cell-level factors (module and complex activity, library size, mito factor) are drawn the same
way whatever the cell's perturbation, so the expected log2 fold change of a gene's mean between a
perturbation's cells and control cells (doublets and high-mito cells aside) is exactly the truth
kept in ``.varm["perturbation_truth_log2fc"]``.
"""

from __future__ import annotations

import inspect
import logging
import numbers
from dataclasses import dataclass, field, replace
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from c2s_kedro.core.errors import C2STypeError, C2SValueError
from c2s_kedro.core.simulate.atlas import MITOCHONDRIAL_GENES, _cell_barcodes, gene_symbols

logger = logging.getLogger(__name__)

CONTROL_LABEL = "non-targeting"
DOUBLE_SEPARATOR = "+"  # a double perturbation's label: its singles' labels joined (GEARS / Norman et al. 2019)

_BASELINE_SIGMA = 1.8
_LIBRARY_SIGMA = 0.45
_MITO_SHARE = 0.06  # expected share of counts in MT- genes of a healthy cell
_MITO_CELL_SIGMA = 0.3
_HIGH_MITO_PERCENT = (20.0, 50.0)
_HIGH_MITO_LIBRARY_FACTOR = 0.25  # dying cells lose nuclear transcripts
_GEM_LIBRARY_SIGMA = 0.15
_GEM_GENE_SIGMA = 0.1
_N_MODULES = 12
_MODULE_SIZE = 30
_MIN_MODULE_SIZE = 3
_MODULE_ACTIVITY_SIGMA = 0.15
_MODULE_LOADING = (0.7, 1.3)
_COMPLEX_SIZE = 3
_COMPLEX_ACTIVITY_SIGMA = 0.25
_EFFECT_LOG2FC = (0.5, 2.0)
_KNOCKDOWN_RESIDUAL = (0.05, 0.40)
# Targets are drawn from the most abundant genes (the top 200, or as many as there are
# perturbations), so that a cell's top-ranked genes include them.
_TARGET_RANK_LIMIT = 200
_CELLS_PER_CONTROL_GUIDE = 40
_MAX_CONTROL_GUIDES = 20
# Dense sampling block: cells x genes entries held at once.
_BLOCK_ENTRIES = 2**21
# Cells gathered before one append to the file (write_perturbseq_h5ad).
_WRITE_CHUNK_CELLS = 10_000


@dataclass(frozen=True)
class _ScreenModel:
    """Gene- and perturbation-level parameters shared by every cell of one simulation."""

    gene_ids: np.ndarray
    gene_names: np.ndarray
    is_mito: np.ndarray
    baseline: np.ndarray  # gene weights, sum 1
    dispersion: np.ndarray  # NB shape per gene
    gem_library_factor: np.ndarray  # per gem group
    gem_gene_factor: np.ndarray  # gem groups x genes, mean one
    gene_module: np.ndarray  # module per gene, -1 for none
    target: np.ndarray  # gene index per perturbation
    knockdown_residual: np.ndarray
    module: np.ndarray  # downstream module per perturbation, -1 for none
    complex: np.ndarray  # complex per perturbation, -1 for none
    module_log2fc: np.ndarray  # signed shift of the module per perturbation, 0 for none
    log2fc: np.ndarray  # perturbations x genes: the truth
    guides: np.ndarray  # sgID_AB per perturbation
    control_guides: np.ndarray
    n_complexes: int
    module_size: int
    double_pairs: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))  # singles of each double

    @property
    def perturbations(self) -> np.ndarray:
        return self.gene_names[self.target]

    @property
    def labels(self) -> np.ndarray:
        """Every perturbation's label, singles first, then the doubles (``A+B``)."""
        singles = self.perturbations.astype(str)
        doubles = [f"{singles[a]}{DOUBLE_SEPARATOR}{singles[b]}" for a, b in self.double_pairs]
        return np.concatenate([singles, np.asarray(doubles, dtype=str)]).astype(object)

    @property
    def label_log2fc(self) -> np.ndarray:
        """The truth of every label (``labels`` x genes): a double's is the sum of its singles'."""
        return np.vstack([self.log2fc, self.log2fc[self.double_pairs[:, 0]] + self.log2fc[self.double_pairs[:, 1]]])

    @property
    def label_guides(self) -> np.ndarray:
        doubles = [f"{self.guides[a]};{self.guides[b]}" for a, b in self.double_pairs]
        return np.concatenate([self.guides, np.asarray(doubles, dtype=object)]).astype(object)

    @property
    def label_gene_ids(self) -> np.ndarray:
        ids = self.gene_ids[self.target].astype(str)
        doubles = [f"{ids[a]}{DOUBLE_SEPARATOR}{ids[b]}" for a, b in self.double_pairs]
        return np.concatenate([ids, np.asarray(doubles, dtype=str)]).astype(object)


def _check_arguments(**arguments) -> None:
    sizes = ("n_genes", "n_perturbations", "cells_per_perturbation", "n_control_cells")
    for name in (*sizes, "n_gem_groups", "seed"):
        value = arguments[name]
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise C2SValueError(f"{name} must be an integer, got {value!r}")
    for name in (*sizes, "n_gem_groups"):
        if arguments[name] < 1:
            raise C2SValueError(f"{name} must be at least 1, got {arguments[name]}")
    if arguments["seed"] < 0:
        raise C2SValueError(f"seed must be a non-negative integer, got {arguments['seed']}")
    for name in ("fraction_no_effect", "doublet_fraction", "high_mito_fraction"):
        if not 0.0 <= arguments[name] <= 1.0:
            raise C2SValueError(f"{name} must lie in [0, 1], got {arguments[name]}")
    if arguments["doublet_fraction"] + arguments["high_mito_fraction"] > 1.0:
        raise C2SValueError(
            "doublet_fraction + high_mito_fraction must not exceed 1, got "
            f"{arguments['doublet_fraction']} + {arguments['high_mito_fraction']}"
        )
    if not arguments["median_umi"] > 0:
        raise C2SValueError(f"median_umi must be positive, got {arguments['median_umi']}")
    doubles, singles = arguments["n_double_perturbations"], arguments["n_perturbations"]
    if not isinstance(doubles, numbers.Integral) or isinstance(doubles, bool) or doubles < 0:
        raise C2SValueError(f"n_double_perturbations must be an integer of at least 0, got {doubles!r}")
    if doubles > singles * (singles - 1) // 2:
        raise C2SValueError(
            f"n_double_perturbations={doubles} is more than the {singles * (singles - 1) // 2} pairs of "
            f"n_perturbations={singles} single perturbations; ask for fewer doubles or more perturbations"
        )


def _choose_doubles(model: _ScreenModel, n_doubles: int, seed: int) -> _ScreenModel:
    """The model with ``n_doubles`` distinct pairs of its single perturbations, from their own
    seeded stream (the singles' draws do not depend on it)."""
    if n_doubles == 0:
        return model
    n = model.target.size
    pairs = np.array([(a, b) for a in range(n) for b in range(a + 1, n)], dtype=np.int64)
    chosen = np.sort(np.random.default_rng([seed, 3]).choice(len(pairs), size=n_doubles, replace=False))
    return replace(model, double_pairs=pairs[chosen])


def _ensembl_ids(n_genes: int, rng: np.random.Generator) -> np.ndarray:
    """Unique, sorted ``ENSG``-style identifiers."""
    serial = np.sort(rng.choice(900_000, size=n_genes, replace=False)) + 100_000
    return np.char.add("ENSG", np.char.zfill(serial.astype(str), 11)).astype(object)


def _guide_pair(name: str, position: int) -> str:
    return f"{name}_+_{position}.23-P1P2|{name}_-_{position + 41}.23-P1P2"


def _build_model(
    n_genes: int,
    n_perturbations: int,
    n_control_cells: int,
    n_gem_groups: int,
    fraction_no_effect: float,
    seed: int,
) -> _ScreenModel:
    rng = np.random.default_rng([seed, 0])
    n_mito = min(len(MITOCHONDRIAL_GENES), n_genes // 10)
    gene_names = gene_symbols(n_genes, n_mito, rng)
    is_mito = np.char.startswith(gene_names.astype(str), "MT-")
    gene_ids = _ensembl_ids(n_genes, rng)

    baseline = rng.lognormal(0.0, _BASELINE_SIGMA, n_genes)
    if is_mito.any():
        mito = rng.lognormal(0.0, 0.5, int(is_mito.sum()))
        baseline[is_mito] = mito / mito.sum() * baseline[~is_mito].sum() * (
            _MITO_SHARE / (1 - _MITO_SHARE)
        )
    baseline /= baseline.sum()
    dispersion = np.where(is_mito, 10.0, rng.lognormal(np.log(3.0), 0.5, n_genes))

    # Abundance rank among nuclear genes (0 = most abundant).
    nuclear = np.flatnonzero(~is_mito)
    by_abundance = nuclear[np.argsort(-baseline[nuclear], kind="stable")]
    # A large screen reaches further down the abundance ranking, never below a quarter of genes.
    n_eligible = min(max(_TARGET_RANK_LIMIT, n_perturbations), max(1, n_genes // 4))
    eligible = by_abundance[:n_eligible]
    if n_perturbations > eligible.size:
        raise C2SValueError(
            f"n_perturbations={n_perturbations} is more than the {eligible.size} genes eligible as "
            f"targets with n_genes={n_genes} (targets are drawn from the most abundant "
            f"max({_TARGET_RANK_LIMIT}, n_perturbations) nuclear genes, at most a quarter of the "
            "genes); ask for fewer perturbations or more genes (at least 4 per perturbation)"
        )
    target = rng.choice(eligible, size=n_perturbations, replace=False)

    # Modules come from the upper half of abundance (outside the very top), never a target.
    pool = by_abundance[n_genes // 20 : max(n_genes // 2, 1)]
    pool = rng.permutation(pool[~np.isin(pool, target)])
    module_size = min(_MODULE_SIZE, pool.size // _N_MODULES)
    if module_size < _MIN_MODULE_SIZE:
        raise C2SValueError(
            f"n_genes={n_genes} is too small for {_N_MODULES} gene modules of at least "
            f"{_MIN_MODULE_SIZE} genes besides {n_perturbations} targets; use more genes"
        )
    gene_module = np.full(n_genes, -1)
    gene_module[pool[: _N_MODULES * module_size]] = np.repeat(np.arange(_N_MODULES), module_size)
    loading = np.where(gene_module >= 0, rng.uniform(*_MODULE_LOADING, n_genes), 0.0)

    # Perturbations with an effect are dealt round-robin into complexes of about _COMPLEX_SIZE.
    n_no_effect = int(round(fraction_no_effect * n_perturbations))
    has_effect = np.ones(n_perturbations, dtype=bool)
    has_effect[rng.choice(n_perturbations, size=n_no_effect, replace=False)] = False
    effect_members = rng.permutation(np.flatnonzero(has_effect))
    n_complexes = -(-effect_members.size // _COMPLEX_SIZE)
    complex_ = np.full(n_perturbations, -1)
    complex_[effect_members] = np.arange(effect_members.size) % max(n_complexes, 1)

    # Each complex has its own module while modules last, and signs alternate.
    complex_module = np.concatenate(
        [
            rng.permutation(_N_MODULES)[: min(n_complexes, _N_MODULES)],
            rng.integers(0, _N_MODULES, max(0, n_complexes - _N_MODULES)),
        ]
    ).astype(int)
    complex_sign = rng.permutation(np.resize([1.0, -1.0], n_complexes))
    complex_magnitude = rng.uniform(*_EFFECT_LOG2FC, n_complexes)
    # Members differ a little in strength around their complex's magnitude.
    member_complex = complex_[has_effect]
    member_magnitude = np.clip(
        complex_magnitude[member_complex] * rng.lognormal(0.0, 0.1, member_complex.size),
        *_EFFECT_LOG2FC,
    )
    module = np.full(n_perturbations, -1)
    module[has_effect] = complex_module[member_complex]
    module_log2fc = np.zeros(n_perturbations)
    module_log2fc[has_effect] = complex_sign[member_complex] * member_magnitude

    knockdown_residual = rng.uniform(*_KNOCKDOWN_RESIDUAL, n_perturbations)
    log2fc = np.zeros((n_perturbations, n_genes))
    for index in np.flatnonzero(has_effect):
        genes = gene_module == module[index]
        log2fc[index, genes] = module_log2fc[index] * loading[genes]
    log2fc[np.arange(n_perturbations), target] = np.log2(knockdown_residual)

    gem_library_factor = rng.lognormal(0.0, _GEM_LIBRARY_SIGMA, n_gem_groups)
    gem_gene_factor = rng.lognormal(
        -(_GEM_GENE_SIGMA**2) / 2, _GEM_GENE_SIGMA, (n_gem_groups, n_genes)
    )

    positions = rng.integers(1_000_000, 240_000_000, n_perturbations)
    guides = np.array(
        [_guide_pair(str(gene_names[t]), int(p)) for t, p in zip(target, positions)], dtype=object
    )
    n_control_guides = int(
        np.clip(n_control_cells // _CELLS_PER_CONTROL_GUIDE, 1, _MAX_CONTROL_GUIDES)
    )
    control_numbers = rng.choice(10_000, size=2 * n_control_guides, replace=False)
    control_guides = np.array(
        [
            f"{CONTROL_LABEL}_{a:05d}|{CONTROL_LABEL}_{b:05d}"
            for a, b in control_numbers.reshape(-1, 2)
        ],
        dtype=object,
    )
    return _ScreenModel(
        gene_ids=gene_ids,
        gene_names=gene_names,
        is_mito=is_mito,
        baseline=baseline,
        dispersion=dispersion,
        gem_library_factor=gem_library_factor,
        gem_gene_factor=gem_gene_factor,
        gene_module=gene_module,
        target=target,
        knockdown_residual=knockdown_residual,
        module=module,
        complex=complex_,
        module_log2fc=module_log2fc,
        log2fc=log2fc,
        guides=guides,
        control_guides=control_guides,
        n_complexes=n_complexes,
        module_size=module_size,
    )


@dataclass
class _ScreenCells:
    """Per-cell labels and latent factors, cells sorted by gem group and barcode."""

    barcode: np.ndarray
    label: np.ndarray  # index into the model's labels (singles, then doubles); their number for controls
    guide: np.ndarray
    gem_group: np.ndarray  # 0-based
    library_size: np.ndarray
    mito_factor: np.ndarray
    module_activity: np.ndarray  # cells x modules, mean one
    complex_activity: np.ndarray  # cells x complexes, mean one
    is_doublet: np.ndarray
    is_high_mito: np.ndarray
    partner_label: np.ndarray  # the second cell of a doublet
    partner_library_size: np.ndarray


def _mean_one_lognormal(rng: np.random.Generator, sigma: float, size) -> np.ndarray:
    return rng.lognormal(-(sigma**2) / 2, sigma, size)


def _draw_cells(
    model: _ScreenModel,
    cells_per_perturbation: int,
    n_control_cells: int,
    doublet_fraction: float,
    high_mito_fraction: float,
    median_umi: float,
    seed: int,
) -> _ScreenCells:
    rng = np.random.default_rng([seed, 1])
    n_labels = model.labels.size  # singles, then doubles; controls are label n_labels
    label = np.concatenate(
        [
            np.repeat(np.arange(n_labels), cells_per_perturbation),
            np.full(n_control_cells, n_labels),
        ]
    )
    n_cells = label.size
    label = rng.permutation(label)
    is_control = label == n_labels
    guide = np.empty(n_cells, dtype=object)
    guide[~is_control] = model.label_guides[label[~is_control]]
    guide[is_control] = rng.choice(model.control_guides, size=int(is_control.sum()))
    n_gem_groups = model.gem_library_factor.size
    gem_group = rng.integers(0, n_gem_groups, n_cells)

    # Doublets and high-mito cells are disjoint sets of fixed size.
    n_doublets = int(round(doublet_fraction * n_cells))
    n_high_mito = int(round(high_mito_fraction * n_cells))
    flagged = rng.permutation(n_cells)
    is_doublet = np.zeros(n_cells, dtype=bool)
    is_doublet[flagged[:n_doublets]] = True
    is_high_mito = np.zeros(n_cells, dtype=bool)
    is_high_mito[flagged[n_doublets : n_doublets + n_high_mito]] = True

    depth = median_umi * model.gem_library_factor[gem_group]
    library_size = depth * rng.lognormal(0.0, _LIBRARY_SIGMA, n_cells)
    partner_library_size = depth * rng.lognormal(0.0, _LIBRARY_SIGMA, n_cells)
    partner_label = label[rng.integers(0, n_cells, n_cells)]

    mito_factor = rng.lognormal(0.0, _MITO_CELL_SIGMA, n_cells)
    # A mito factor k moves the MT- share from s to k s / (k s + 1 - s); solve for the target.
    high_share = rng.uniform(*_HIGH_MITO_PERCENT, n_cells) / 100.0
    high_factor = high_share * (1 - _MITO_SHARE) / (_MITO_SHARE * (1 - high_share))
    mito_factor = np.where(is_high_mito, high_factor, mito_factor)
    library_size = np.where(
        is_high_mito, library_size * _HIGH_MITO_LIBRARY_FACTOR, library_size
    )

    module_activity = _mean_one_lognormal(rng, _MODULE_ACTIVITY_SIGMA, (n_cells, _N_MODULES))
    complex_activity = _mean_one_lognormal(
        rng, _COMPLEX_ACTIVITY_SIGMA, (n_cells, model.n_complexes)
    )

    # Barcodes carry their gem group as suffix, as 10x writes them when lanes are aggregated.
    nucleotides = np.char.partition(_cell_barcodes(0, n_cells, seed), "-")[:, 0]
    barcode = np.char.add(np.char.add(nucleotides, "-"), (gem_group + 1).astype(str))
    order = np.lexsort((barcode, gem_group))
    return _ScreenCells(
        barcode=barcode[order].astype(object),
        label=label[order],
        guide=guide[order],
        gem_group=gem_group[order],
        library_size=library_size[order],
        mito_factor=mito_factor[order],
        module_activity=module_activity[order],
        complex_activity=complex_activity[order],
        is_doublet=is_doublet[order],
        is_high_mito=is_high_mito[order],
        partner_label=partner_label[order],
        partner_library_size=partner_library_size[order],
    )


def _block_counts(
    model: _ScreenModel,
    cells: _ScreenCells,
    fold: np.ndarray,
    rows: slice,
    rng: np.random.Generator,
) -> sp.csr_matrix:
    """NB counts of the cells in ``rows``, drawn densely over all genes (gamma-Poisson).

    ``fold`` is the multiplicative effect per label: perturbations, then controls (all ones).
    """
    gene_profile = model.baseline * model.gem_gene_factor[cells.gem_group[rows]]
    mean = cells.library_size[rows, None] * gene_profile * fold[cells.label[rows]]

    in_module = np.flatnonzero(model.gene_module >= 0)
    mean[:, in_module] *= cells.module_activity[rows][:, model.gene_module[in_module]]
    in_complex = np.flatnonzero(model.complex >= 0)
    mean[:, model.target[in_complex]] *= cells.complex_activity[rows][
        :, model.complex[in_complex]
    ]

    doublets = np.flatnonzero(cells.is_doublet[rows])
    if doublets.size:
        partner = rows.start + doublets
        mean[doublets] += (
            cells.partner_library_size[partner, None]
            * gene_profile[doublets]
            * fold[cells.partner_label[partner]]
        )
    mean[:, model.is_mito] *= cells.mito_factor[rows, None]

    shape = model.dispersion
    counts = rng.poisson(rng.gamma(shape, mean / shape)).astype(np.float32)
    return sp.csr_matrix(counts)


def _cell_sums(model: _ScreenModel, counts: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """UMI and MT- counts per cell (row by row, so a block gives its rows' values)."""
    umi_count = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    mito_count = np.asarray(counts[:, model.is_mito].sum(axis=1), dtype=np.float64).ravel()
    return umi_count, mito_count


def _screen_obs(
    model: _ScreenModel, cells: _ScreenCells, umi_count: np.ndarray, mito_count: np.ndarray
) -> pd.DataFrame:
    is_control = cells.label == model.labels.size
    target_names = np.append(model.labels, CONTROL_LABEL).astype(object)
    target_ids = np.append(model.label_gene_ids, CONTROL_LABEL).astype(object)

    mitopercent = 100.0 * mito_count / np.maximum(umi_count, 1.0)

    # Depth normalised across gem groups, on the control cells' medians (all cells of a gem
    # group that has no control cell).
    gem_group = cells.gem_group + 1
    reference = np.median(umi_count[is_control])
    scale = np.ones_like(umi_count)
    for group in np.unique(gem_group):
        members = gem_group == group
        controls = members & is_control
        scale[members] = reference / np.median(umi_count[controls if controls.any() else members])

    return pd.DataFrame(
        {
            "gene": pd.Categorical(target_names[cells.label]),
            "gene_id": pd.Categorical(target_ids[cells.label]),
            "sgID_AB": pd.Categorical(cells.guide),
            "gem_group": gem_group.astype(np.int64),
            "UMI_count": umi_count,
            "core_adjusted_UMI_count": umi_count * scale,
            "mitopercent": mitopercent,
        },
        index=pd.Index(cells.barcode.astype(str)),
    )


def simulate_perturbseq(
    n_genes: int = 2000,
    n_perturbations: int = 24,
    cells_per_perturbation: int = 80,
    n_control_cells: int = 800,
    n_gem_groups: int = 4,
    fraction_no_effect: float = 0.25,
    doublet_fraction: float = 0.02,
    high_mito_fraction: float = 0.03,
    median_umi: float = 8000,
    seed: int = 0,
    n_double_perturbations: int = 0,
) -> ad.AnnData:
    """Simulate a CRISPRi Perturb-seq screen of raw UMI counts with its ground truth.

    Args:
        n_genes: genes measured (13 of them ``MT-`` genes when n_genes >= 130).
        n_perturbations: targeted genes, one perturbation each, drawn from the most abundant genes.
        cells_per_perturbation, n_control_cells: cells carrying each targeting guide pair, and
            cells carrying ``non-targeting`` guides.
        n_gem_groups: 10x lanes, each with its own depth and a small per-gene batch effect.
        fraction_no_effect: share of perturbations that knock down their target and nothing else.
        doublet_fraction, high_mito_fraction: shares of doublet-like cells (about twice the UMI
            and more genes) and of cells with 20-50% mitochondrial counts.
        median_umi: median library size of a single healthy cell.
        seed: the same seed gives the same counts and obs.
        n_double_perturbations: double perturbations ``A+B`` of two single perturbations, each
            pair drawn at random (seeded) and given ``cells_per_perturbation`` cells; 0 (the
            default) simulates singles only, the same screen as before doubles existed.

    Returns:
        AnnData with raw counts (float32 CSR) in ``.X``; ``.obs`` columns ``gene`` (target symbol
        or ``non-targeting``), ``gene_id``, ``sgID_AB``, ``gem_group`` (1-based), ``UMI_count``,
        ``core_adjusted_UMI_count``, ``mitopercent``; Ensembl-like ``.var_names`` with symbols
        in ``.var["gene_name"]`` and program membership in ``.var["module"]`` (-1 for none).
        The truth: ``.varm["perturbation_truth_log2fc"]`` (genes x perturbations, expected log2
        fold change of each gene's mean against control cells, target knockdown included; a
        double's column is the sum of its singles'),
        ``.uns["perturbation_truth"]`` (per perturbation: ``perturbation``, ``target_gene_id``,
        ``knockdown_residual``, ``module``, ``module_log2fc``, ``complex``,
        ``has_downstream_effect``; singles only), ``.uns["double_perturbations"]`` (with doubles:
        each double's ``perturbation`` label and its two ``singles``), ``.uns["qc_truth"]``
        (barcodes of the ``doublet`` and ``high_mito`` cells) and the parameters in
        ``.uns["simulation"]``.
    """
    parameters = {
        "n_genes": n_genes,
        "n_perturbations": n_perturbations,
        "cells_per_perturbation": cells_per_perturbation,
        "n_control_cells": n_control_cells,
        "n_gem_groups": n_gem_groups,
        "fraction_no_effect": fraction_no_effect,
        "doublet_fraction": doublet_fraction,
        "high_mito_fraction": high_mito_fraction,
        "median_umi": median_umi,
        "seed": seed,
        "n_double_perturbations": n_double_perturbations,
    }
    model, cells = _screen_design(parameters)
    counts = sp.vstack(list(_count_blocks(model, cells, seed)), format="csr")
    counts.sort_indices()
    adata = _screen_adata(counts, _screen_obs(model, cells, *_cell_sums(model, counts)), model, cells, parameters)
    _log_screen(model, cells)
    return adata


def _screen_design(parameters: dict) -> tuple[_ScreenModel, _ScreenCells]:
    """The checked settings -> gene/perturbation parameters and per-cell factors."""
    _check_arguments(**parameters)
    model = _build_model(
        parameters["n_genes"], parameters["n_perturbations"], parameters["n_control_cells"],
        parameters["n_gem_groups"], parameters["fraction_no_effect"], parameters["seed"],
    )
    model = _choose_doubles(model, parameters["n_double_perturbations"], parameters["seed"])
    cells = _draw_cells(
        model, parameters["cells_per_perturbation"], parameters["n_control_cells"],
        parameters["doublet_fraction"], parameters["high_mito_fraction"], parameters["median_umi"],
        parameters["seed"],
    )
    return model, cells


def _count_blocks(model: _ScreenModel, cells: _ScreenCells, seed: int):
    """The counts, block after block of cells (each block has its own seeded stream, so the
    matrix does not depend on how the blocks are gathered)."""
    n_cells, n_genes = cells.label.size, model.gene_names.size
    block_cells = max(1, _BLOCK_ENTRIES // n_genes)
    blocks = list(enumerate(range(0, n_cells, block_cells)))
    fold = np.vstack([np.exp2(model.label_log2fc), np.ones(n_genes)])
    for block, start in tqdm(blocks, desc="simulated blocks", unit="block", leave=False):
        rows = slice(start, min(start + block_cells, n_cells))
        rng = np.random.default_rng([seed, 2, block])
        yield _block_counts(model, cells, fold, rows, rng)


def _screen_adata(
    counts: sp.csr_matrix, obs: pd.DataFrame, model: _ScreenModel, cells: _ScreenCells, parameters: dict
) -> ad.AnnData:
    """Counts, obs, gene annotations and the truth as one AnnData."""
    perturbations = model.perturbations.astype(str)
    var_names = pd.Index(model.gene_ids.astype(str))
    var = pd.DataFrame(
        {"gene_name": model.gene_names.astype(str), "module": model.gene_module.astype(np.int64)},
        index=var_names,
    )
    truth = pd.DataFrame(model.label_log2fc.T, index=var_names, columns=pd.Index(model.labels.astype(str)))
    uns = {
        "perturbation_truth": {
            "perturbation": perturbations.tolist(),
            "target_gene_id": model.gene_ids[model.target].astype(str).tolist(),
            "knockdown_residual": model.knockdown_residual.tolist(),
            "module": model.module.astype(int).tolist(),
            "module_log2fc": model.module_log2fc.tolist(),
            "complex": model.complex.astype(int).tolist(),
            "has_downstream_effect": (model.module >= 0).tolist(),
        },
        "qc_truth": {
            "doublet": cells.barcode[cells.is_doublet].astype(str).tolist(),
            "high_mito": cells.barcode[cells.is_high_mito].astype(str).tolist(),
        },
        "simulation": {
            **parameters,
            "n_modules": _N_MODULES,
            "module_size": model.module_size,
            "n_complexes": model.n_complexes,
        },
    }
    if model.double_pairs.size:
        uns["double_perturbations"] = {
            "perturbation": model.labels[perturbations.size:].astype(str).tolist(),
            "singles": [[str(perturbations[a]), str(perturbations[b])] for a, b in model.double_pairs],
        }
    return ad.AnnData(X=counts, obs=obs, var=var, varm={"perturbation_truth_log2fc": truth}, uns=uns)


def _log_screen(model: _ScreenModel, cells: _ScreenCells) -> None:
    logger.info(
        "simulated a Perturb-seq screen: %d cells x %d genes, %d perturbations in %d complexes%s",
        cells.label.size, model.gene_names.size, model.target.size, model.n_complexes,
        f", and {len(model.double_pairs)} double perturbations" if model.double_pairs.size else "",
    )


def write_perturbseq_h5ad(path: str | Path, **kwargs) -> Path:
    """Simulate a screen straight into an ``.h5ad`` file, ``_WRITE_CHUNK_CELLS`` cells at a time.

    Only one chunk of counts is held in memory (plus the per-cell factors): the file is created
    from the first chunk and later chunks are appended to ``X`` on disk; ``.obs`` (which needs
    every cell's UMI count) is written last. The file equals ``simulate_perturbseq(**kwargs)``.

    Args:
        path: the ``.h5ad`` file to write (overwritten).
        **kwargs: the arguments of ``simulate_perturbseq``.
    """
    try:
        settings = inspect.signature(simulate_perturbseq).bind(**kwargs)
    except TypeError as error:
        raise C2STypeError(f"write_perturbseq_h5ad {error}; it takes the arguments of simulate_perturbseq") from None
    settings.apply_defaults()
    parameters = dict(settings.arguments)
    model, cells = _screen_design(parameters)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    umi_parts, mito_parts, pending = [], [], []
    written = 0

    def flush() -> None:
        nonlocal pending, written
        chunk = sp.vstack(pending, format="csr")
        chunk.sort_indices()
        pending = []
        if written == 0:
            # A 64-bit indptr lets later appends pass 2**31 stored values.
            chunk.indptr = chunk.indptr.astype(np.int64)
            placeholder = pd.DataFrame(index=pd.Index(cells.barcode[: chunk.shape[0]].astype(str)))
            _screen_adata(chunk, placeholder, model, cells, parameters).write_h5ad(path)
        else:
            with h5py.File(path, "r+") as store:
                ad.io.sparse_dataset(store["X"]).append(chunk)
        written += chunk.shape[0]

    pending_cells = 0
    for block in _count_blocks(model, cells, parameters["seed"]):
        umi, mito = _cell_sums(model, block)
        umi_parts.append(umi)
        mito_parts.append(mito)
        pending.append(block)
        pending_cells += block.shape[0]
        if pending_cells >= _WRITE_CHUNK_CELLS:
            flush()
            pending_cells = 0
    if pending:
        flush()
    obs = _screen_obs(model, cells, np.concatenate(umi_parts), np.concatenate(mito_parts))
    with h5py.File(path, "r+") as store:
        del store["obs"]
        ad.io.write_elem(store, "obs", obs)
    _log_screen(model, cells)
    return path


def default_perturbseq() -> ad.AnnData:
    """The default simulated screen (``simulate_perturbseq()``), for ``create_if_missing``."""
    return simulate_perturbseq()
