"""Checks on user data that fail early with a message naming the problem and the fix.

``validate_input`` is the door every user's cells pass once (the atlas, a screen, cells to
annotate): where the counts are, declarations the data contradict, gene and cell names made
usable, with a report of what it did. The smaller checks it is made of are used on their own too."""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from c2s_kedro.core.errors import C2SError, C2SKeyError, C2SValueError
from c2s_kedro.core.data.preprocessing import shallow_copy

logger = logging.getLogger(__name__)

ENSEMBL_PATTERN = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")
_WHITESPACE = re.compile(r"\s+")
SYMBOL_COLUMNS = ("gene_symbols", "gene_symbol", "gene_name", "gene_names", "feature_name", "symbol")
# 10x's .var column of feature types (scanpy's read_10x_h5 with gex_only=False, CITE-seq, multiome) and its values;
# a column of the same name in another vocabulary (gene biotypes) is not this one
FEATURE_TYPE_COLUMNS = ("feature_types", "feature_type")
GENE_EXPRESSION = "Gene Expression"
TENX_FEATURE_TYPES = frozenset({GENE_EXPRESSION, "Antibody Capture", "CRISPR Guide Capture", "Multiplexing Capture",
                                "Peaks", "Custom"})


class NotCountsError(C2SError, ValueError):
    """The matrix is finite but not raw counts (negative or fractional values): normalized data."""


class InputError(C2SError, ValueError):
    """The data contradict the settings (counts declared normalized, counts where none are read, a
    ``counts_source`` that is not there); the message names the settings that fix it."""


def require_obs_columns(adata: ad.AnnData, columns: Sequence[str]) -> None:
    """Raise ``KeyError`` naming every missing ``.obs`` column and the available ones."""
    missing = [c for c in columns if c not in adata.obs.columns]
    if missing:
        raise C2SKeyError(
            f"obs column(s) {', '.join(repr(c) for c in missing)} not found; available: "
            f"{', '.join(map(str, adata.obs.columns)) or '(none)'}."
        )


def _stored_values(matrix) -> np.ndarray:
    if sp.issparse(matrix):
        return matrix.data
    return np.asarray(matrix).ravel()


_VALUE_CHUNK = 1 << 24  # stored values checked per step (64 MB of float32)

# No log-transformed expression reaches this value (ln(1 + 1e8) is 18.4, log2(1 + 1e5) is 16.6), while any
# real count matrix has genes with hundreds of molecules in a cell: non-integer values above it are counts.
LOG_VALUES_BELOW = 20.0


@dataclass(frozen=True)
class MatrixValues:
    """What one pass over a matrix's stored values found (``describe_values``)."""

    n_non_finite: int
    n_negative: int
    n_fractional: int
    minimum: float  # of the finite stored values (0 when none is stored)
    maximum: float
    fractional_example: float | None
    cell_totals_differ: bool  # only looked at for non-negative, non-integer values above LOG_VALUES_BELOW

    @property
    def kind(self) -> str:
        """``damaged`` (NaN or infinite values), ``counts`` (non-negative integers), ``scaled``
        (negative values), ``corrected_counts`` or ``normalized``.

        Non-negative non-integer values are taken for ambient-corrected counts (CellBender, SoupX,
        DecontX) when some exceed ``LOG_VALUES_BELOW`` and the cells' totals differ; otherwise they
        are normalized: log values stay small, and values scaled to one library size (normalize_total
        without the log) give every cell the same total."""
        if self.n_non_finite:
            return "damaged"
        if self.n_negative:
            return "scaled"
        if not self.n_fractional:
            return "counts"
        if self.maximum > LOG_VALUES_BELOW and self.cell_totals_differ:
            return "corrected_counts"
        return "normalized"


def describe_values(matrix, tolerance: float = 1e-6) -> MatrixValues:
    """NaN, negative and non-integer values of ``matrix`` counted, its range, and whether its cells'
    totals differ, a chunk of stored values at a time: whole-matrix temporaries
    (``values - round(values)`` and its mask) cost a screen's counts twice over (GBs)."""
    values = _stored_values(matrix)
    floating = np.issubdtype(values.dtype, np.floating)
    n_nan = n_negative = n_fractional = 0
    minimum, maximum, example = np.inf, -np.inf, None
    for start in range(0, values.size, _VALUE_CHUNK):
        chunk = values[start : start + _VALUE_CHUNK]
        if floating:
            n_nan += int(np.count_nonzero(~np.isfinite(chunk)))
            if n_nan:
                continue  # damaged, whatever else the values hold
        minimum, maximum = min(minimum, chunk.min()), max(maximum, chunk.max())
        n_negative += int(np.count_nonzero(chunk < 0))
        if floating:
            fractional = np.abs(chunk - np.round(chunk)) > tolerance
            count = int(np.count_nonzero(fractional))
            if count and example is None:
                example = float(chunk[fractional][0])
            n_fractional += count
    if n_nan or not np.isfinite(minimum):  # damaged, or no value stored
        minimum = maximum = 0.0
    totals_differ = False
    if not n_nan and not n_negative and n_fractional and maximum > LOG_VALUES_BELOW:
        totals = np.asarray(matrix.sum(axis=1), dtype=np.float64).ravel()
        totals_differ = bool(totals.size > 1 and np.ptp(totals) > 1e-3 * max(abs(float(np.median(totals))), 1e-12))
    return MatrixValues(n_nan, n_negative, n_fractional, float(minimum), float(maximum), example, totals_differ)


def _damaged(where: str, values: MatrixValues) -> ValueError:
    return ValueError(
        f"{where} holds {values.n_non_finite} NaN or infinite values; counts are never NaN, so the file "
        "is damaged or was produced by a tool that writes NaN for missing values. Fix or drop those "
        "entries (e.g. adata.X.data[~np.isfinite(adata.X.data)] = 0) and save the h5ad again."
    )


def check_raw_counts(adata: ad.AnnData, layer: str | None = None, tolerance: float = 1e-6) -> None:
    """Raise ``ValueError`` unless the matrix holds raw counts (finite, non-negative integers).

    NaN or infinite values are a plain ``ValueError`` (no setting makes them usable); negative or
    fractional values raise ``NotCountsError`` (the data looks normalized)."""
    values = describe_values(adata.X if layer is None else adata.layers[layer], tolerance)
    hint = " Raw counts are required for QC and normalization."
    if values.n_non_finite:
        raise _damaged("the expression matrix", values)
    if values.n_negative:
        raise NotCountsError(
            f"the expression matrix holds {values.n_negative} negative values (min {values.minimum:.3g}); "
            f"this looks scaled, not counts.{hint}"
        )
    if values.n_fractional:
        raise NotCountsError(
            f"the expression matrix holds {values.n_fractional} non-integer values (e.g. {values.fractional_example:.4g}); "
            f"this looks normalized, not counts.{hint}"
        )


def sentence_safe_gene_name(name: str) -> str:
    """A gene name as one word of a cell sentence: each run of whitespace becomes ``_``
    (``"HES4 variant"`` -> ``"HES4_variant"``); sentences are split on whitespace, so a name with a
    space would read as two genes. The one mapping used for var names and perturbation targets."""
    return _WHITESPACE.sub("_", unicodedata.normalize("NFC", str(name)).strip())


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
        raise C2SKeyError(
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
    symbols = adata.var[symbol_column].astype(str).str.strip()
    missing = symbols.isin(["", "nan", "None"]).to_numpy()  # a blank symbol is none: the gene keeps its ID
    if missing.all():
        logger.warning(".var['%s'] holds no gene symbol (every value is empty): cell sentences will be made of IDs. "
                       "Name the .var column holding symbols (gene_symbol_column of data_processing).", symbol_column)
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


def unique_ignoring_case(names: Sequence[str]) -> pd.Index:
    """``names`` with a numeric suffix (-1, -2, ..., anndata's ``make_index_unique``) on each name
    that repeats an earlier one once upper-cased: cell sentences upper-case gene names, so ``HES4``
    and ``Hes4`` would be one word for two genes. The one rule for gene words: the door renames
    var names with it and ``sentences.vocabulary_names`` applies it to names that did not pass the door."""
    names = pd.Index(np.asarray(names, dtype=str))
    upper = pd.Index(np.char.upper(names.to_numpy(dtype=str)))
    if upper.is_unique:
        return names
    from anndata.utils import make_index_unique

    unique_upper = make_index_unique(upper)
    return pd.Index([name + word[len(up):] for name, up, word in zip(names, upper, unique_upper)])


def make_gene_names_unique(adata: ad.AnnData) -> ad.AnnData:
    """Suffix repeated var names (-1, -2, ...), letter case ignored (``unique_ignoring_case``),
    and log how many there were."""
    names = adata.var_names.astype(str)
    unique = unique_ignoring_case(names)
    changed = np.flatnonzero(names != unique)
    if changed.size:
        n_case = changed.size - int(names.duplicated().sum())
        adata.var_names = unique
        logger.warning("%d duplicated gene names made unique with numeric suffixes (%d of them differ from another "
                       "only in letter case, e.g. %r -> %r: cell sentences upper-case gene names)",
                       changed.size, n_case, names[changed[0]], unique[changed[0]])
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


def cells_by_unique_name(adata: ad.AnnData, names: Sequence[str]) -> ad.AnnData:
    """The cells of ``adata`` that ``names`` name, in ``adata``'s order, as names are after
    ``make_cell_names_unique`` (a split of processed cells names them so): a name repeated in the raw
    file then picks the one cell it means. Cells are taken by position; ``adata`` stays as it is."""
    unique, _ = make_cell_names_unique(ad.AnnData(obs=adata.obs[[]]))  # the names only
    positions = unique.obs_names.get_indexer(list(names))
    positions = np.sort(positions[positions >= 0])
    if not positions.size:
        raise C2SValueError("none of the cells asked for is in the data: re-run sentence_conversion on the current raw data")
    cells = adata[positions].to_memory() if adata.isbacked else adata[positions].copy()
    cells.obs_names = unique.obs_names[positions]
    return cells


# ---- the door: every user's cells (the atlas, the screen, cells to annotate) pass here once ------------

INPUT_CHECKS = "input_checks"  # the .uns key of validate_input's report


@dataclass(frozen=True)
class InputReport:
    """What ``validate_input`` found and did; kept in ``.uns['input_checks']`` of the data it returns."""

    counts_source: str  # X, raw or a layer's name; "normalized X" when declared normalized
    non_integer_count_values: int  # non-integer values taken as counts (accept_non_integer_counts)
    genes_only_in_raw: int  # genes of .raw.X that .X lacked, when the counts came from .raw
    gene_names_with_whitespace: int  # made one word of a sentence (sentence_safe_gene_name)
    duplicated_gene_names: int  # made unique with numeric suffixes, letter case ignored
    duplicated_cell_names: int  # made unique as anndata's obs_names_make_unique does
    gene_names_differing_only_in_case: int = 0  # of duplicated_gene_names: HES4 and Hes4 (sentences upper-case names)
    features_not_gene_expression: int = 0  # dropped: antibody, guide or peak features (.var['feature_types'])
    genes_not_in_raw: int = 0  # genes of .X dropped because the counts came from a .raw without them

    def metrics(self) -> dict[str, float]:
        """The counts as metrics (the source is in the log and in ``.uns``)."""
        return {key: float(value) for key, value in dataclasses.asdict(self).items() if key != "counts_source"}


def input_check_metrics(adata: ad.AnnData) -> dict[str, float]:
    """The counts of the report ``validate_input`` left in ``adata.uns`` (none when it has no report)."""
    report = adata.uns.get(INPUT_CHECKS)
    if report is None:
        return {}
    return InputReport(**{f.name: report.get(f.name, 0) for f in dataclasses.fields(InputReport)}).metrics()


def _where(source: str) -> str:
    return {"X": ".X", "raw": ".raw.X"}.get(source, f"layers['{source}']")


def _count_sources(adata: ad.AnnData) -> list[str]:
    """Where counts may be, in the order ``auto`` looks: .X, .raw.X, the layer ``counts``, other layers."""
    layers = sorted(adata.layers.keys(), key=lambda name: (name != "counts", name))
    return ["X", *(["raw"] if adata.raw is not None else []), *layers]


def _matrix_of(adata: ad.AnnData, source: str):
    return adata.X if source == "X" else adata.raw.X if source == "raw" else adata.layers[source]


def _what(values: MatrixValues) -> str:
    """What a matrix holds, for messages."""
    kind = values.kind
    if kind == "counts":
        return f"non-negative integers (max {values.maximum:g})"
    if kind == "scaled":
        return f"{values.n_negative:,} negative values (min {values.minimum:.3g}): this looks scaled, not counts"
    example = f"{values.n_fractional:,} non-integer values (e.g. {values.fractional_example:.4g}"
    if kind == "corrected_counts":
        return f"{example}), none negative, up to {values.maximum:.4g}, with cell totals that differ"
    return f"{example}, max {values.maximum:.4g}): this looks normalized, not counts"


_SHORT = {"counts": "counts", "corrected_counts": "non-integer counts", "normalized": "normalized values",
          "scaled": "scaled values", "damaged": "NaN values"}


def _find_counts(
    adata: ad.AnnData, counts_source: str, accept_non_integer_counts: bool, prefix: str
) -> tuple[str, dict[str, MatrixValues]]:
    """The source of the counts and what each matrix looked at holds; raises naming the setting
    that fixes it when the counts are not where ``counts_source`` says or nowhere."""
    sources = _count_sources(adata)
    if counts_source != "auto" and counts_source not in sources:
        raise InputError(
            f"{prefix}.counts_source is '{counts_source}', but the data has no {_where(counts_source)} "
            f"(it has: {', '.join(_where(s) for s in sources)}). Set {prefix}.counts_source to auto, X, raw or a layer's name."
        )
    seen: dict[str, MatrixValues] = {}

    def values_of(source: str) -> MatrixValues:
        if source not in seen:
            seen[source] = describe_values(_matrix_of(adata, source))
        return seen[source]

    def holds_counts(source: str) -> bool:
        kind = values_of(source).kind
        return kind == "counts" or (accept_non_integer_counts and kind == "corrected_counts")

    first = "X" if counts_source == "auto" else counts_source
    values = values_of(first)
    if values.kind == "damaged":
        raise _damaged(_where(first), values)
    if holds_counts(first):
        return first, seen
    elsewhere = next((s for s in sources if s != first and holds_counts(s)), None)
    if counts_source == "auto" and elsewhere and values.kind != "corrected_counts":
        return elsewhere, seen  # the CELLxGENE convention: normalized .X, counts in .raw.X or a layer
    if values.kind == "corrected_counts":
        message = (
            f"{_where(first)} holds {_what(values)}: ambient-corrected counts (CellBender, SoupX, DecontX) by the look "
            f"of them, not normalized values. Set {prefix}.accept_non_integer_counts to true to QC-filter and normalize "
            "them as counts"
        )
        if elsewhere:
            message += f", or {prefix}.counts_source to '{elsewhere}' for the integer counts in {_where(elsewhere)}"
        raise InputError(message + ".")
    if elsewhere:
        raise NotCountsError(
            f"{_where(first)} ({prefix}.counts_source) holds {_what(values)}. Raw counts are required for QC and "
            f"normalization, and {_where(elsewhere)} holds them: set {prefix}.counts_source to '{elsewhere}' (or auto)."
        )
    checked = "; ".join(f"{_where(s)}: {_SHORT[values_of(s).kind]}" for s in sources if s != first)
    raise NotCountsError(
        f"{_where(first)} holds {_what(values)}. Raw counts are required for QC and normalization, and none were found "
        f"({checked or 'no .raw and no layers'}): set {prefix}.counts_source to where they are (X, raw or a layer's name)."
    )


def _check_declared_normalized(adata: ad.AnnData, counts_source: str, prefix: str) -> None:
    """Refuse ``input_is_normalized`` on an .X that holds counts: normalization would be skipped
    and every result computed on raw counts."""
    if counts_source not in ("auto", "X"):
        raise InputError(
            f"{prefix}.input_is_normalized is true, so .X is used as it is, but {prefix}.counts_source is "
            f"'{counts_source}': set input_is_normalized to false to read the counts from {_where(counts_source)}, "
            "or counts_source to auto."
        )
    values = describe_values(adata.X)
    if values.kind == "damaged":
        raise _damaged(".X", values)
    if values.kind in ("counts", "corrected_counts"):
        fix = f"set {prefix}.input_is_normalized to false"
        if values.kind == "corrected_counts":
            fix += f" and {prefix}.accept_non_integer_counts to true"
        raise InputError(
            f"{prefix}.input_is_normalized is true, but .X holds {_what(values)}: counts, not normalized values "
            f"(normalization would be skipped and every result computed on counts); {fix}."
        )
    logger.info(".X used as it is (%s.input_is_normalized): %s", prefix, _what(values))


def _with_counts_from(adata: ad.AnnData, source: str) -> tuple[ad.AnnData, int]:
    """A new AnnData whose .X is the counts of ``source`` (the matrices shared, not copied), and
    how many of its genes .X lacked. Counts from .raw bring .raw's genes: .X's layers and per-gene
    matrices are left out when those differ, and .X's text columns of .var (gene symbols) are
    carried over for the genes both have."""
    if source == "X":
        return shallow_copy(adata), 0
    if source != "raw":
        result = shallow_copy(adata)
        result.X = adata.layers[source]
        return result, 0
    raw = adata.raw
    var = raw.var.copy()
    if adata.var_names.is_unique and raw.var_names.is_unique:
        for column in adata.var.columns.difference(var.columns):
            values = adata.var[column]
            if isinstance(values.dtype, pd.CategoricalDtype) or pd.api.types.is_string_dtype(values):
                var[column] = values.astype(str).reindex(var.index).fillna("").to_numpy()
    same_genes = raw.var_names.equals(adata.var_names)
    if not same_genes and (adata.layers or adata.varm):
        logger.info("layers and varm of .X (%s) left out: they hold .X's genes, not .raw's",
                    ", ".join([*adata.layers.keys(), *adata.varm.keys()]))
    result = ad.AnnData(
        X=raw.X, obs=adata.obs.copy(), var=var, uns=copy.deepcopy(dict(adata.uns)), obsm=dict(adata.obsm),
        obsp=dict(adata.obsp), layers=dict(adata.layers) if same_genes else None,
        varm=dict(adata.varm) if same_genes else None,
    )
    return result, int(np.count_nonzero(~raw.var_names.isin(adata.var_names)))


FLOAT16_EXACT_INTEGERS = 2048  # float16 holds every integer only up to 2**11


def _warn_half_precision(matrix) -> None:
    """A float16 matrix holds counts above 2048 rounded (2049 is stored as 2048): say how many values
    are that large, since the integer check cannot see it."""
    values = _stored_values(matrix)
    if values.dtype != np.float16:
        return
    n_large = int(np.count_nonzero(values > FLOAT16_EXACT_INTEGERS))
    if n_large:
        logger.warning("the counts are stored as float16, which rounds integers above %d: %d values are above it and may "
                       "have lost precision; save the file with float32 or integer counts", FLOAT16_EXACT_INTEGERS, n_large)


def keep_gene_expression(adata: ad.AnnData) -> tuple[ad.AnnData, int]:
    """Only the ``Gene Expression`` features when ``.var['feature_types']`` (or ``feature_type``)
    marks others in 10x's vocabulary (antibody capture of CITE-seq, peaks of multiome, CRISPR
    guides): their counts would rank among the genes. Returns the data and how many features were
    dropped (ERCC spike-ins too, which 10x marks Gene Expression); a file with none of its features
    ``Gene Expression`` is refused, naming the column."""
    adata, n_spike_ins = _drop_spike_ins(adata)
    column = next((c for c in FEATURE_TYPE_COLUMNS if c in adata.var.columns), None)
    if column is None:
        return adata, n_spike_ins
    types = adata.var[column].astype(str).str.strip()
    found = types.value_counts()
    if not set(found.index) & TENX_FEATURE_TYPES:
        return adata, n_spike_ins
    genes = (types == GENE_EXPRESSION).to_numpy()
    described = ", ".join(f"{name}: {n:,}" for name, n in found.items())
    if not genes.any():
        raise InputError(
            f".var['{column}'] marks none of the {adata.n_vars:,} features '{GENE_EXPRESSION}' ({described}): cell sentences "
            f"are made of genes. Keep the file's gene-expression features (adata[:, adata.var['{column}'] == "
            f"'{GENE_EXPRESSION}']) and save it again, or drop the column if its features are genes."
        )
    if genes.all():
        return adata, n_spike_ins
    dropped = ", ".join(f"{name}: {n:,}" for name, n in found.items() if name != GENE_EXPRESSION)
    logger.warning("%d features that .var['%s'] does not mark '%s' dropped (%s): cell sentences rank genes, and protein, "
                   "guide or peak counts would rank among them", int((~genes).sum()), column, GENE_EXPRESSION, dropped)
    return adata[:, genes].copy(), int((~genes).sum()) + n_spike_ins


ERCC_SPIKE_IN = re.compile(r"^ERCC-\d{5}$")  # the ERCC RNA spike-in mix's names (10x marks them Gene Expression)


def _drop_spike_ins(adata: ad.AnnData) -> tuple[ad.AnnData, int]:
    """ERCC spike-in controls dropped: added RNA, not the cell's, whose counts would rank among its genes."""
    spike_ins = np.array([bool(ERCC_SPIKE_IN.match(str(name))) for name in adata.var_names])
    if not spike_ins.any():
        return adata, 0
    logger.warning("%d ERCC spike-in controls dropped (e.g. %s): added RNA, not the cells' genes", int(spike_ins.sum()),
                   adata.var_names[np.flatnonzero(spike_ins)[0]])
    return adata[:, ~spike_ins].copy(), int(spike_ins.sum())


def _report_raw_genes(adata: ad.AnnData, source: str, accept_non_integer_counts: bool, prefix: str) -> int:
    """Log what .raw has that the counts used lack, or the reverse: counts read from .X while .raw
    holds counts of more genes (a file subset to its variable genes), or .X's genes dropped because
    the counts come from a .raw without them. Returns the number of .X's genes dropped."""
    if adata.raw is None:
        return 0
    if source == "raw":
        n_dropped = int(np.count_nonzero(~adata.var_names.isin(adata.raw.var_names)))
        if n_dropped:
            logger.warning("%d of .X's %d genes are not in .raw and are dropped (the counts are .raw's)", n_dropped, adata.n_vars)
        return n_dropped
    n_more = int(np.count_nonzero(~adata.raw.var_names.isin(adata.var_names)))
    if source == "X" and n_more:
        kind = describe_values(adata.raw.X).kind
        if kind == "counts" or (accept_non_integer_counts and kind == "corrected_counts"):
            logger.warning(".raw holds counts of %d more genes than .X (%d); set %s.counts_source: raw to use them",
                           n_more, adata.n_vars, prefix)
    return 0


def make_gene_names_sentence_safe(adata: ad.AnnData) -> tuple[ad.AnnData, int]:
    """Var names made one word of a cell sentence (``sentence_safe_gene_name``), and how many held
    whitespace; ``adata`` is renamed in place."""
    names = adata.var_names.astype(str)
    safe = pd.Index([sentence_safe_gene_name(name) for name in names])
    changed = np.flatnonzero(names != safe)
    if changed.size:
        adata.var_names = safe
        logger.warning("%d gene names held whitespace and were made one word of a cell sentence with '_' (e.g. %r -> %r)",
                       changed.size, names[changed[0]], safe[changed[0]])
    return adata, int(changed.size)


def tidy_gene_names(adata: ad.AnnData, gene_symbol_column: str | None = None) -> tuple[ad.AnnData, int, int, int]:
    """Gene names as cell sentences need them: symbols for Ensembl IDs (``use_gene_symbols``), one
    word each (``sentence_safe_gene_name``), then unique letter case ignored (``make_gene_names_unique``:
    the mapping can make two names one, and sentences upper-case names). Returns the data, how many
    names held whitespace, how many were repeated (case ignored) and how many of those differed from
    another only in letter case."""
    adata = use_gene_symbols(adata, gene_symbol_column)
    adata, n_whitespace = make_gene_names_sentence_safe(adata)
    n_exact = int(adata.var_names.duplicated().sum())
    n_repeated = int(pd.Index(np.char.upper(adata.var_names.to_numpy(dtype=str))).duplicated().sum())
    return make_gene_names_unique(adata), n_whitespace, n_repeated, n_repeated - n_exact


def validate_input(
    adata: ad.AnnData,
    *,
    counts_source: str = "auto",
    accept_non_integer_counts: bool = False,
    input_is_normalized: bool = False,
    gene_symbol_column: str | None = None,
    setting_prefix: str = "data_processing",
) -> tuple[ad.AnnData, InputReport]:
    """Every property of a user's cells that would make a result wrong, checked once: the atlas,
    the screen and the cells to annotate all pass here.

    - Where the counts are: ``counts_source`` ``X``, ``raw`` (``.raw.X`` with ``.raw``'s genes) or a
      layer's name; ``auto`` takes .X if it holds counts, else .raw.X, else the layer ``counts``, else
      another layer of counts (the CELLxGENE convention: log-normalized .X, counts in .raw.X).
      Non-negative non-integer values that look like ambient-corrected counts (``MatrixValues.kind``)
      are counts when ``accept_non_integer_counts``; otherwise the error names that setting.
    - ``input_is_normalized``: .X is used as it is, refused when it holds counts.
    - NaN or infinite values: refused.
    - Features other than genes (``keep_gene_expression``: 10x's ``.var['feature_types']``) dropped.
    - Gene names (``tidy_gene_names``) and cell names (``make_cell_names_unique``) made usable.

    Errors name ``{setting_prefix}.<setting>`` that changes the outcome. The expression matrices are
    shared with ``adata``, not copied; ``adata`` is left as it was. Returns the tidied data, with the
    report in ``.uns['input_checks']``, and the report.
    """
    if adata.isbacked:
        adata = adata.to_memory()
    if input_is_normalized:
        _check_declared_normalized(adata, counts_source, setting_prefix)
        adata, source, n_non_integer, n_only_in_raw, n_not_in_raw = shallow_copy(adata), "normalized X", 0, 0, 0
    else:
        source, seen = _find_counts(adata, counts_source, accept_non_integer_counts, setting_prefix)
        n_non_integer = seen[source].n_fractional
        if source == "X":
            logger.info("raw counts read from .X: %s", _what(seen[source]))
        else:
            logger.warning("raw counts read from %s (%s.counts_source is %s; .X holds %s)", _where(source), setting_prefix,
                           counts_source, _what(seen["X"]) if "X" in seen else "other values")
        if n_non_integer:
            logger.warning("%d non-integer values of %s taken as counts (%s.accept_non_integer_counts)", n_non_integer,
                           _where(source), setting_prefix)
        n_genes_x = adata.n_vars
        n_not_in_raw = _report_raw_genes(adata, source, accept_non_integer_counts, setting_prefix)
        adata, n_only_in_raw = _with_counts_from(adata, source)
        if source == "raw":
            logger.warning("the genes are .raw's: %d, %d of them not among .X's %d", adata.n_vars, n_only_in_raw, n_genes_x)
    _warn_half_precision(adata.X)
    adata, n_not_genes = keep_gene_expression(adata)
    adata, n_whitespace, n_repeated_genes, n_case_only = tidy_gene_names(adata, gene_symbol_column)
    adata, n_repeated_cells = make_cell_names_unique(adata)
    report = InputReport(source, n_non_integer, n_only_in_raw, n_whitespace, n_repeated_genes, n_repeated_cells,
                         n_case_only, n_not_genes, n_not_in_raw)
    adata.uns[INPUT_CHECKS] = dataclasses.asdict(report)
    return adata, report
