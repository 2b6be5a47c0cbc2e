"""Atlas-like single-cell count simulator: cell types, tissues, donors, mitochondrial genes.

Counts are negative binomial per gene and cell, ``NB(mean = library_size * profile, shape =
dispersion)``, where the profile is a baseline gene abundance times the cell type's marker
program, times the tissue's and the donor's gene-wise shifts (batch effects). Library sizes are
log-normal and mitochondrial genes get an extra per-cell factor.

Sampling never builds a dense cells x genes matrix. Within a group of cells sharing a profile,
genes with a mean of at least one count are drawn densely (gamma-Poisson), cells x those genes
only. Every other gene is drawn through the compound-Poisson form of the negative binomial,
``NB = sum of Poisson(shape * log(1 + mean / shape)) logarithmic variables``: candidate events
of a Poisson process with rate ``mean`` are drawn per gene and spread over cells by library size,
thinned to the compound-Poisson rate, and each kept event adds a logarithmic count. The cost is
proportional to the low genes' counts, not to the number of genes.

Cells are generated in fixed blocks, each with its own seeded random streams, so one seed gives
the same matrix whether it is built in memory or written to disk in chunks of any size.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.optimize import brentq
from tqdm.auto import tqdm

from c2s_kedro.core.errors import C2STypeError, C2SValueError

logger = logging.getLogger(__name__)

MITOCHONDRIAL_GENES = (
    "MT-ND1", "MT-ND2", "MT-CO1", "MT-ATP8", "MT-ATP6", "MT-CO2", "MT-CO3",
    "MT-ND3", "MT-ND4L", "MT-ND4", "MT-ND5", "MT-ND6", "MT-CYB",
)  # fmt: skip

# Symbol-like family prefixes (none ends in a digit, none is another plus digits, so
# prefix + number is unique).
_GENE_FAMILIES = (
    "ZNF", "SLC", "TMEM", "CCDC", "FAM", "KRT", "RPL", "RPS", "CD", "IL", "KLHL", "ANKRD",
    "LRRC", "TRIM", "PCDH", "OR", "ABCA", "ADAM", "ARHGAP", "ATP", "C1orf", "CDH", "CYP",
    "DNAJC", "EIF", "FBXO", "GPR", "KIF", "LINC", "MAP", "MYO", "NDUF", "NUP", "PPP", "PRR",
    "RAB", "RBM", "SEC", "SNORD", "SPATA", "SYT", "TBC1D", "TNFRSF", "TTC", "UBE", "USP",
    "WDR", "ZBTB", "ZC", "PLEKH", "SERPIN", "COL", "DOCK", "HLA-D", "GOLGA", "KCN", "SCN",
    "SH", "CXCL", "CCL", "PTP", "NKG", "GZM", "LY", "ITG", "HOX", "SOX", "FOX", "PAX", "GAT",
)  # fmt: skip

_CELL_TYPES = (
    "CD4 T cell", "CD8 T cell", "B cell", "NK cell", "classical monocyte", "plasma cell",
    "dendritic cell", "macrophage", "mast cell", "regulatory T cell", "gamma-delta T cell",
    "non-classical monocyte", "plasmacytoid dendritic cell", "innate lymphoid cell",
)  # fmt: skip
_TISSUES = (
    "blood", "spleen", "lung", "bone marrow", "liver", "lymph node", "jejunum", "thymus",
    "skeletal muscle", "omentum",
)  # fmt: skip

# Cells per internal block: each block has its own random streams, so the matrix does not
# depend on how callers chunk the work.
_BLOCK_SIZE = 2048
# A gene whose mean in a group is at least this is drawn densely for that group's cells.
_DENSE_MEAN = 1.0
_LIBRARY_SIGMA = 0.45
_BASELINE_SIGMA = 2.0
_MITO_FRACTION = 0.05
_MITO_CELL_SIGMA = 0.4
_DEFAULT_MEDIAN_LIBRARY_SIZE = 5000.0


@dataclass(frozen=True)
class _AtlasModel:
    """Gene- and group-level parameters shared by every cell of one simulation."""

    seed: int
    gene_names: np.ndarray
    is_mito: np.ndarray
    baseline: np.ndarray  # gene weights, sum 1
    dispersion: np.ndarray  # NB shape per gene
    marker_fold_change: np.ndarray  # cell types x genes (1 off the markers)
    marker_genes: dict[str, list[str]]
    tissue_shift: np.ndarray  # tissues x genes
    donor_shift: np.ndarray  # donors x genes
    cell_types: tuple[str, ...]
    tissues: tuple[str, ...]
    donors: tuple[str, ...]
    donor_sex: tuple[str, ...]
    type_composition: np.ndarray  # tissues x cell types, rows sum 1
    median_library_size: float

    def profile(self, cell_type: int, tissue: int, donor: int) -> np.ndarray:
        """Expected fraction of a cell's counts per gene in one (type, tissue, donor) group."""
        weights = (
            self.baseline
            * self.marker_fold_change[cell_type]
            * self.tissue_shift[tissue]
            * self.donor_shift[donor]
        )
        return weights / weights.sum()


def _names(pool: tuple[str, ...], n: int, fallback: str) -> tuple[str, ...]:
    return tuple(pool[i] if i < len(pool) else f"{fallback} {i + 1}" for i in range(n))


def gene_symbols(n_genes: int, n_mito: int, rng: np.random.Generator) -> np.ndarray:
    """``n_mito`` real mitochondrial symbols followed by unique symbol-like names, shuffled."""
    n_other = n_genes - n_mito
    families = np.asarray(_GENE_FAMILIES)
    family = np.arange(n_other) % len(families)
    number = np.arange(n_other) // len(families) + 1
    others = np.char.add(families[family], number.astype(str))
    names = np.concatenate([np.asarray(MITOCHONDRIAL_GENES[:n_mito]), others]).astype(object)
    names = names[rng.permutation(n_genes)]
    if len(set(names)) != n_genes:
        raise AssertionError("simulated gene names are not unique")
    return names


def _expected_expressed_genes(
    median_library_size: float, profiles: np.ndarray, type_weights: np.ndarray, dispersion
) -> float:
    """Mean number of non-zero genes per cell, averaged over log-normal library sizes
    (Gauss-Hermite nodes) and cell types."""
    nodes, node_weights = np.polynomial.hermite_e.hermegauss(9)
    node_weights = node_weights / node_weights.sum()
    total = 0.0
    for z, node_weight in zip(nodes, node_weights):
        library = median_library_size * np.exp(_LIBRARY_SIGMA * z)
        p_zero = (dispersion / (dispersion + library * profiles)) ** dispersion
        expressed = (1.0 - p_zero).sum(axis=1)
        total += node_weight * float(type_weights @ expressed)
    return total


def _median_library_for_target(
    target: float, profiles: np.ndarray, type_weights: np.ndarray, dispersion: np.ndarray
) -> float:
    """Median library size at which a cell expresses ``target`` genes on average."""
    n_genes = profiles.shape[1]
    if not 0 < target < n_genes:
        raise C2SValueError(
            f"expressed_genes_per_cell={target} must lie between 0 and n_genes={n_genes} "
            "(exclusive)"
        )

    def gap(log_library: float) -> float:
        return (
            _expected_expressed_genes(np.exp(log_library), profiles, type_weights, dispersion)
            - target
        )

    low, high = np.log(1e-3), np.log(1e12)
    if gap(high) < 0:
        raise C2SValueError(
            f"expressed_genes_per_cell={target} is out of reach with {n_genes} genes; "
            f"ask for fewer than {int(target + gap(high))}"
        )
    return float(np.exp(brentq(gap, low, high, xtol=1e-4)))


def _build_model(
    n_genes: int,
    n_cell_types: int,
    n_tissues: int,
    n_donors: int,
    expressed_genes_per_cell: int | None,
    seed: int,
) -> _AtlasModel:
    if n_genes < 2 or n_cell_types < 1 or n_tissues < 1 or n_donors < 1:
        raise C2SValueError(
            "simulate_atlas needs n_genes >= 2 and at least one cell type, tissue and donor; "
            f"got n_genes={n_genes}, n_cell_types={n_cell_types}, n_tissues={n_tissues}, "
            f"n_donors={n_donors}"
        )
    rng = np.random.default_rng([seed, 0])
    n_mito = min(len(MITOCHONDRIAL_GENES), n_genes // 10)
    gene_names = gene_symbols(n_genes, n_mito, rng)
    is_mito = np.char.startswith(gene_names.astype(str), "MT-")

    baseline = rng.lognormal(0.0, _BASELINE_SIGMA, n_genes)
    if is_mito.any():
        # Mitochondrial transcripts are abundant: a fixed share of the baseline counts.
        mito = rng.lognormal(0.0, 0.5, int(is_mito.sum()))
        other_total = baseline[~is_mito].sum()
        baseline[is_mito] = mito / mito.sum() * other_total * _MITO_FRACTION / (1 - _MITO_FRACTION)
    baseline /= baseline.sum()
    dispersion = np.where(is_mito, 5.0, rng.lognormal(np.log(1.5), 0.5, n_genes))

    # Markers come from the upper half of baseline abundance so that they are detectable, and
    # are disjoint between types.
    candidates = np.flatnonzero(~is_mito & (baseline >= np.median(baseline[~is_mito])))
    candidates = rng.permutation(candidates)
    n_markers = max(1, min(200, len(candidates) // (2 * n_cell_types)))
    cell_types = _names(_CELL_TYPES, n_cell_types, "cell type")
    marker_fold_change = np.ones((n_cell_types, n_genes))
    marker_genes: dict[str, list[str]] = {}
    for index, cell_type in enumerate(cell_types):
        markers = candidates[index * n_markers : (index + 1) * n_markers]
        marker_fold_change[index, markers] = rng.lognormal(np.log(8.0), 0.5, markers.size)
        marker_genes[cell_type] = [str(name) for name in gene_names[markers]]

    def gene_wise_shift(n_batches: int, sigma: float) -> np.ndarray:
        # Mean-one log-normal factors: a batch changes genes, not the overall depth.
        return rng.lognormal(-(sigma**2) / 2, sigma, (n_batches, n_genes))

    tissue_shift = gene_wise_shift(n_tissues, 0.3)
    donor_shift = gene_wise_shift(n_donors, 0.25)
    tissues = _names(_TISSUES, n_tissues, "tissue")
    donors = tuple(f"D{index + 1}" for index in range(n_donors))
    donor_sex = tuple(rng.choice(["female", "male"], size=n_donors).tolist())
    type_composition = rng.dirichlet(np.full(n_cell_types, 2.0), size=n_tissues)

    if expressed_genes_per_cell is None:
        median_library_size = _DEFAULT_MEDIAN_LIBRARY_SIZE
    else:
        type_profiles = baseline * marker_fold_change
        type_profiles /= type_profiles.sum(axis=1, keepdims=True)
        median_library_size = _median_library_for_target(
            float(expressed_genes_per_cell),
            type_profiles,
            type_composition.mean(axis=0),
            dispersion,
        )
        logger.info(
            "median library size %.0f targets %d expressed genes per cell",
            median_library_size,
            expressed_genes_per_cell,
        )
    return _AtlasModel(
        seed=seed,
        gene_names=gene_names,
        is_mito=is_mito,
        baseline=baseline,
        dispersion=dispersion,
        marker_fold_change=marker_fold_change,
        marker_genes=marker_genes,
        tissue_shift=tissue_shift,
        donor_shift=donor_shift,
        cell_types=cell_types,
        tissues=tissues,
        donors=donors,
        donor_sex=donor_sex,
        type_composition=type_composition,
        median_library_size=median_library_size,
    )


@dataclass
class _BlockCells:
    """Per-cell draws of one block: group membership and latent size factors."""

    cell_type: np.ndarray
    tissue: np.ndarray
    donor: np.ndarray
    library_size: np.ndarray
    mito_factor: np.ndarray


def _block_cells(model: _AtlasModel, block: int, n_cells: int) -> _BlockCells:
    rng = np.random.default_rng([model.seed, 1, block])
    tissue = rng.integers(0, len(model.tissues), n_cells)
    donor = rng.integers(0, len(model.donors), n_cells)
    # Inverse-CDF draw of each cell's type from its tissue's composition.
    cumulative = np.cumsum(model.type_composition, axis=1)
    cell_type = (rng.random(n_cells)[:, None] > cumulative[tissue]).sum(axis=1)
    cell_type = np.minimum(cell_type, len(model.cell_types) - 1)
    library_size = model.median_library_size * rng.lognormal(0.0, _LIBRARY_SIGMA, n_cells)
    mito_factor = rng.lognormal(0.0, _MITO_CELL_SIGMA, n_cells)
    return _BlockCells(cell_type, tissue, donor, library_size, mito_factor)


def _group_counts(
    model: _AtlasModel, profile: np.ndarray, library: np.ndarray, mito: np.ndarray, rng
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NB counts of one group's cells, as COO ``(row, gene, count)`` (rows local to the group)."""
    dense = (profile * model.median_library_size >= _DENSE_MEAN) | model.is_mito
    dense_genes = np.flatnonzero(dense)
    shape = model.dispersion[dense_genes]
    mean = library[:, None] * profile[dense_genes]
    mean[:, model.is_mito[dense_genes]] *= mito[:, None]
    counts = rng.poisson(rng.gamma(shape, mean / shape))
    dense_rows, dense_columns = np.nonzero(counts)
    dense_values = counts[dense_rows, dense_columns]

    # Sparse genes: Poisson events of rate ``mean`` per (cell, gene), drawn per gene over the
    # group's cells and placed on cells in proportion to library size.
    sparse_genes = np.flatnonzero(~dense)
    rate = profile[sparse_genes]
    n_events = rng.poisson(rate * library.sum())
    event_gene = np.repeat(sparse_genes, n_events)
    cumulative_library = np.cumsum(library)
    event_row = np.searchsorted(
        cumulative_library, rng.random(event_gene.size) * cumulative_library[-1], side="right"
    )
    np.minimum(event_row, library.size - 1, out=event_row)
    event_mean = library[event_row] * profile[event_gene]
    event_shape = model.dispersion[event_gene]
    # Thinning to the compound-Poisson rate shape * log(1 + mean / shape) <= mean.
    keep = rng.random(event_gene.size) * event_mean < event_shape * np.log1p(
        event_mean / event_shape
    )
    event_gene, event_row = event_gene[keep], event_row[keep]
    event_mean, event_shape = event_mean[keep], event_shape[keep]
    event_counts = rng.logseries(event_mean / (event_mean + event_shape))

    rows = np.concatenate([dense_rows, event_row])
    genes = np.concatenate([dense_genes[dense_columns], event_gene])
    values = np.concatenate([dense_values, event_counts]).astype(np.float32)
    return rows, genes, values


def _block_counts(model: _AtlasModel, block: int, cells: _BlockCells) -> sp.csr_matrix:
    rng = np.random.default_rng([model.seed, 2, block])
    n_cells = cells.cell_type.size
    group_key = (
        cells.cell_type * len(model.tissues) + cells.tissue
    ) * len(model.donors) + cells.donor
    rows, genes, values = [], [], []
    for key in np.unique(group_key):
        members = np.flatnonzero(group_key == key)
        cell_type, rest = divmod(int(key), len(model.tissues) * len(model.donors))
        tissue, donor = divmod(rest, len(model.donors))
        local_rows, group_genes, group_values = _group_counts(
            model,
            model.profile(cell_type, tissue, donor),
            cells.library_size[members],
            cells.mito_factor[members],
            rng,
        )
        rows.append(members[local_rows])
        genes.append(group_genes)
        values.append(group_values)
    # COO -> CSR sums the repeated (cell, gene) events of the sparse genes.
    matrix = sp.coo_matrix(
        (np.concatenate(values), (np.concatenate(rows), np.concatenate(genes))),
        shape=(n_cells, len(model.gene_names)),
    ).tocsr()
    matrix.sort_indices()
    return matrix


def _cell_barcodes(start: int, end: int, seed: int) -> np.ndarray:
    """Unique 16-nt barcodes: a bijective 32-bit integer hash of the cell index, as 16 bases."""
    mask = np.uint64(0xFFFFFFFF)
    offset = (seed * 0x9E3779B9 + 0x7F4A7C15) & 0xFFFFFFFF
    code = (np.arange(start, end, dtype=np.uint64) + np.uint64(offset)) & mask
    # xor-shift and odd multipliers are each invertible modulo 2**32, so distinct cells keep
    # distinct codes.
    for _ in range(2):
        code ^= code >> np.uint64(16)
        code = (code * np.uint64(0x45D9F3B)) & mask
    code ^= code >> np.uint64(16)
    digits = (code[:, None] >> (2 * np.arange(16, dtype=np.uint64))) & np.uint64(3)
    bases = np.ascontiguousarray(np.array(list("ACGT"))[digits.astype(np.int64)])
    return np.char.add(bases.view("<U16").ravel(), "-1")


def _block_obs(model: _AtlasModel, cells: _BlockCells, start: int) -> pd.DataFrame:
    n_cells = cells.cell_type.size
    donor_sex = np.asarray(model.donor_sex)
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical.from_codes(cells.cell_type, model.cell_types),
            "tissue": pd.Categorical.from_codes(cells.tissue, model.tissues),
            "batch_condition": pd.Categorical.from_codes(cells.donor, model.donors),
            "organism": pd.Categorical(["Homo sapiens"] * n_cells),
            "sex": pd.Categorical(donor_sex[cells.donor], categories=sorted(set(donor_sex))),
        },
        index=pd.Index(_cell_barcodes(start, start + n_cells, model.seed)),
    )
    return obs


def _concat_obs(parts: list[pd.DataFrame]) -> pd.DataFrame:
    obs = pd.concat(parts)
    for column in obs.columns:
        obs[column] = obs[column].astype("category").cat.remove_unused_categories()
    return obs


def _blocks(n_cells: int):
    for block, start in enumerate(range(0, n_cells, _BLOCK_SIZE)):
        yield block, start, min(start + _BLOCK_SIZE, n_cells)


def _atlas(counts: sp.csr_matrix, obs: pd.DataFrame, model: _AtlasModel) -> ad.AnnData:
    """AnnData of simulated counts, with the gene names and the ground truth kept beside them."""
    simulation = {
        "seed": model.seed,
        "median_library_size": model.median_library_size,
        "marker_genes": model.marker_genes,
    }
    var = pd.DataFrame(index=pd.Index(model.gene_names.astype(str)))
    return ad.AnnData(X=counts, obs=obs, var=var, uns={"simulation": simulation})


def _check_cells(n_cells: int) -> None:
    if n_cells < 1:
        raise C2SValueError(f"n_cells must be at least 1, got {n_cells}")


def simulate_atlas(
    n_cells: int = 3000,
    n_genes: int = 2000,
    n_cell_types: int = 8,
    n_tissues: int = 3,
    n_donors: int = 2,
    expressed_genes_per_cell: int | None = None,
    seed: int = 0,
) -> ad.AnnData:
    """Simulate an atlas of raw UMI counts.

    Args:
        n_cells, n_genes: matrix size.
        n_cell_types: cell types, each with its own up-regulated marker genes.
        n_tissues, n_donors: tissues (each with its own cell-type composition) and donors
            (``batch_condition``); both shift genes multiplicatively.
        expressed_genes_per_cell: mean number of non-zero genes per cell to aim for, reached by
            scaling the library size; by default the median library is 5,000 counts.
        seed: the same seed gives the same matrix.

    Returns:
        AnnData with raw counts (float32 CSR) in ``.X``; ``.obs`` columns ``cell_type``,
        ``tissue``, ``batch_condition``, ``organism``, ``sex``; gene symbols (including ``MT-``
        genes) as ``.var_names``; ground truth (marker genes per type) in ``.uns["simulation"]``.
    """
    _check_cells(n_cells)
    model = _build_model(
        n_genes, n_cell_types, n_tissues, n_donors, expressed_genes_per_cell, seed
    )
    matrices, obs_parts = [], []
    for block, start, end in tqdm(
        list(_blocks(n_cells)), desc="simulated blocks", unit="block", leave=False
    ):
        cells = _block_cells(model, block, end - start)
        matrices.append(_block_counts(model, block, cells))
        obs_parts.append(_block_obs(model, cells, start))
    return _atlas(sp.vstack(matrices, format="csr"), _concat_obs(obs_parts), model)


def write_atlas_h5ad(
    path: str | Path, n_cells: int, n_genes: int, chunk_size: int = 10_000, **kwargs
) -> Path:
    """Simulate an atlas straight into an ``.h5ad`` file, ``chunk_size`` cells at a time.

    Only one chunk of counts is held in memory: the file is created from the first chunk and
    later chunks are appended to ``X`` on disk. The matrix equals
    ``simulate_atlas(n_cells, n_genes, **kwargs).X`` for the same arguments.

    Args:
        path: the ``.h5ad`` file to write (overwritten).
        n_cells, n_genes: matrix size.
        chunk_size: cells generated and appended per write (rounded up to whole internal blocks).
        **kwargs: the other arguments of ``simulate_atlas``.
    """
    _check_cells(n_cells)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # simulate_atlas's signature checks the names and supplies the defaults.
    try:
        settings = inspect.signature(simulate_atlas).bind(
            n_cells=n_cells, n_genes=n_genes, **kwargs
        )
    except TypeError as error:
        raise C2STypeError(
            f"write_atlas_h5ad {error}; it takes the arguments of simulate_atlas"
        ) from None
    settings.apply_defaults()
    model_settings = {k: v for k, v in settings.arguments.items() if k != "n_cells"}
    model = _build_model(**model_settings)

    obs_parts: list[pd.DataFrame] = []
    pending: list[sp.csr_matrix] = []
    pending_cells = 0
    written = 0
    progress = tqdm(total=n_cells, desc="simulated cells", unit="cell", leave=False)

    def flush() -> None:
        nonlocal pending, pending_cells, written
        chunk = sp.vstack(pending, format="csr")
        if written == 0:
            # A 64-bit indptr lets later appends pass 2**31 stored values.
            chunk.indptr = chunk.indptr.astype(np.int64)
            _atlas(chunk, _concat_obs(obs_parts), model).write_h5ad(path)
        else:
            with h5py.File(path, "r+") as store:
                ad.io.sparse_dataset(store["X"]).append(chunk)
        written += chunk.shape[0]
        progress.update(chunk.shape[0])
        pending, pending_cells = [], 0

    for block, start, end in _blocks(n_cells):
        cells = _block_cells(model, block, end - start)
        obs_parts.append(_block_obs(model, cells, start))
        pending.append(_block_counts(model, block, cells))
        pending_cells += end - start
        if pending_cells >= chunk_size:
            flush()
    if pending:
        flush()
    progress.close()

    obs = _concat_obs(obs_parts)
    with h5py.File(path, "r+") as store:
        del store["obs"]
        ad.io.write_elem(store, "obs", obs)
    logger.info("wrote %d cells x %d genes to %s", n_cells, n_genes, path)
    return path
