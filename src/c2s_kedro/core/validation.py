"""Checks on user data that fail early with a message naming the problem and the fix."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import anndata as ad
import numpy as np
import scipy.sparse as sp

logger = logging.getLogger(__name__)

ENSEMBL_PATTERN = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")
_WHITESPACE = re.compile(r"\s+")
SYMBOL_COLUMNS = ("gene_symbols", "gene_symbol", "gene_name", "gene_names", "feature_name", "symbol")


class NotCountsError(ValueError):
    """The matrix is finite but not raw counts (negative or fractional values): normalized data."""


def require_obs_columns(adata: ad.AnnData, columns: Sequence[str]) -> None:
    """Raise ``KeyError`` naming every missing ``.obs`` column and the available ones."""
    missing = [c for c in columns if c not in adata.obs.columns]
    if missing:
        raise KeyError(
            f"obs column(s) {', '.join(repr(c) for c in missing)} not found; available: "
            f"{', '.join(map(str, adata.obs.columns)) or '(none)'}."
        )


def _stored_values(matrix) -> np.ndarray:
    if sp.issparse(matrix):
        return matrix.data
    return np.asarray(matrix).ravel()


_VALUE_CHUNK = 1 << 24  # stored values checked per step (64 MB of float32)


def check_raw_counts(adata: ad.AnnData, layer: str | None = None, tolerance: float = 1e-6) -> None:
    """Raise ``ValueError`` unless the matrix holds raw counts (finite, non-negative integers).

    NaN or infinite values are a plain ``ValueError`` (no setting makes them usable); negative or
    fractional values raise ``NotCountsError`` (the data looks normalized). The values are checked
    a chunk at a time: whole-matrix temporaries (``values - round(values)`` and its mask) cost a
    screen's counts twice over (GBs).
    """
    matrix = adata.X if layer is None else adata.layers[layer]
    values = _stored_values(matrix)
    hint = " Raw counts are required for QC and normalization."
    floating = np.issubdtype(values.dtype, np.floating)
    n_nan = n_negative = n_fractional = 0
    minimum, example = None, None
    for start in range(0, values.size, _VALUE_CHUNK):
        chunk = values[start : start + _VALUE_CHUNK]
        if floating:
            n_nan += int(np.count_nonzero(~np.isfinite(chunk)))
            if n_nan:
                continue  # reported as damaged below, whatever else the values hold
        negative = int(np.count_nonzero(chunk < 0))
        if negative:
            n_negative += negative
            low = chunk.min()
            minimum = low if minimum is None else min(minimum, low)
        if floating:
            fractional = np.abs(chunk - np.round(chunk)) > tolerance
            count = int(np.count_nonzero(fractional))
            if count and example is None:
                example = chunk[fractional][0]
            n_fractional += count
    if n_nan:
        raise ValueError(
            f"the expression matrix holds {n_nan} NaN or infinite values; counts are never NaN, so the file "
            "is damaged or was produced by a tool that writes NaN for missing values. Fix or drop those "
            "entries (e.g. adata.X.data[~np.isfinite(adata.X.data)] = 0) and save the h5ad again."
        )
    if n_negative:
        raise NotCountsError(
            f"the expression matrix holds {n_negative} negative values (min {minimum:.3g}); "
            f"this looks scaled, not counts.{hint}"
        )
    if n_fractional:
        raise NotCountsError(
            f"the expression matrix holds {n_fractional} non-integer values (e.g. {example:.4g}); "
            f"this looks normalized, not counts.{hint}"
        )


def sentence_safe_gene_name(name: str) -> str:
    """A gene name as one word of a cell sentence: each run of whitespace becomes ``_``
    (``"HES4 variant"`` -> ``"HES4_variant"``); sentences are split on whitespace, so a name with a
    space would read as two genes. The one mapping used for var names and perturbation targets."""
    return _WHITESPACE.sub("_", str(name).strip())


def looks_like_ensembl(names: Sequence[str], share: float = 0.5) -> bool:
    """True when at least ``share`` of the names are Ensembl gene IDs (ENSG00000..., ENSMUSG...)."""
    names = list(names)
    if not names:
        return False
    hits = sum(bool(ENSEMBL_PATTERN.match(str(n))) for n in names[:2000])
    return hits >= share * min(len(names), 2000)


def use_gene_symbols(adata: ad.AnnData, symbol_column: str | None = None) -> ad.AnnData:
    """Replace Ensembl-ID var names with gene symbols when a symbol column exists.

    ``symbol_column`` names the ``.var`` column explicitly; otherwise common names are tried. The
    IDs are kept in ``.var['gene_id']``. Without a symbol column a warning is logged: sentences
    would then be made of IDs, which C2S hub models never saw.
    """
    if symbol_column is not None and symbol_column not in adata.var.columns:
        raise KeyError(
            f"var column '{symbol_column}' not found; available: "
            f"{', '.join(map(str, adata.var.columns)) or '(none)'}; name the column holding gene symbols, "
            "or none to keep the var names."
        )
    if symbol_column is None:
        if not looks_like_ensembl(adata.var_names):
            return adata
        symbol_column = next((c for c in SYMBOL_COLUMNS if c in adata.var.columns), None)
        if symbol_column is None:
            logger.warning(
                "var names look like Ensembl IDs and no gene-symbol column was found in .var "
                "(tried %s); cell sentences will be made of IDs. Name the .var column holding symbols "
                "(gene_symbol_column of data_processing).",
                ", ".join(SYMBOL_COLUMNS),
            )
            return adata
    symbols = adata.var[symbol_column].astype(str)
    missing = symbols.isin(["", "nan", "None"]).to_numpy()
    adata = adata.copy() if adata.is_view else adata
    if "gene_id" not in adata.var.columns:
        adata.var["gene_id"] = adata.var_names.astype(str)
    new_names = np.where(missing, adata.var_names.astype(str), symbols.to_numpy())
    adata.var_names = new_names
    logger.info(
        "var names taken from .var['%s'] (%d without a symbol kept their ID)",
        symbol_column,
        int(missing.sum()),
    )
    return adata


def make_gene_names_unique(adata: ad.AnnData) -> ad.AnnData:
    """Suffix duplicated var names (-1, -2, ...) and log how many there were."""
    n_duplicated = int(adata.var_names.duplicated().sum())
    if n_duplicated:
        adata.var_names_make_unique()
        logger.warning("%d duplicated gene names made unique with numeric suffixes", n_duplicated)
    return adata


def make_cell_names_unique(adata: ad.AnnData) -> tuple[ad.AnnData, int]:
    """Cell names made unique as anndata does (``obs_names_make_unique``: a repeated ``AAAC-1``
    becomes ``AAAC-1-1``; 10x barcodes repeat across lanes when samples are concatenated), and how
    many were repeated. Splits and selections go by name, so a repeated name would put one name in
    two parts. Returns ``adata`` itself when the names are already unique."""
    n_repeated = int(adata.obs_names.duplicated().sum())
    if n_repeated:
        adata = adata.copy() if adata.is_view else adata
        adata.obs_names_make_unique()
        logger.warning("%d repeated cell names made unique with numeric suffixes (anndata's obs_names_make_unique)", n_repeated)
    return adata, n_repeated
