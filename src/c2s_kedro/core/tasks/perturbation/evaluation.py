"""Scoring predicted perturbation responses against held-out cells, and the baselines a model
must beat.

Every method delivers predicted *cells* for each held-out perturbation (the model: its posterior
samples; a baseline: the cells it would predict), in the same expression space as the real cells.
Real cells enter that space as the model sees them (``sentence_space_cells``: top-k sentences
turned back into expression). `cell-eval` computes the metrics it has (Pearson of the change,
MSE, DE-gene overlap, ...); the top-20-DE Pearson, the posterior's calibration and the agreement
with a simulator's truth are computed here, and the diagnostics that tell a model that listens to
the perturbation from one that writes the same cell whatever it is asked: changes centred on the
mean perturbed cell (Systema), changes against the model's own samples for "no perturbation"
(``scores_vs_own_control``), the E-distance between predicted and real cells (``energy_distance``)
and whether the target's own knockdown is reproduced (``knockdown_diagnostics``).
``evaluate_posterior`` scores the model and the baselines; ``posterior_embedding`` puts samples and
real cells in one PCA/UMAP space for plotting.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from typing import NamedTuple

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
from datasets import Dataset
from sklearn.decomposition import PCA
from sklearn.linear_model import Ridge

from c2s_kedro.core.errors import C2SKeyError, C2SValueError
from c2s_kedro.core.data.preprocessing import embed_expression
from c2s_kedro.core.data.screen import ScreenColumns, ScreenTargets
from c2s_kedro.core.sentences.conversion import CELL_NAME, CELL_SENTENCE
from c2s_kedro.core.sentences.rank_fit import RankFit, reconstruct_expression

logger = logging.getLogger(__name__)

CELL_EVAL_METRICS = ("pearson_delta", "mse", "mse_delta", "overlap_at_N", "de_direction_match", "discrimination_score_l1")
# clustering_agreement and pearson_edistance need many cells per perturbation; not reported here
CELL_EVAL_SKIPPED = ["clustering_agreement", "pearson_edistance"]
MEAN_BASELINE = "train_perturbed_mean"  # VCC's baseline: the mean of the training perturbed cells
SAMPLE_PERTURBATION = "perturbation"  # the posterior samples' .obs column naming their perturbation
EMBEDDING_CELLS = 4000  # training controls (at most) whose PCA gives the linear baseline's gene embedding


def _dense_rows(matrix) -> np.ndarray:
    """A few rows (one perturbation's cells) as float64 numbers, for row draws and quantiles."""
    return np.asarray(matrix.toarray() if sp.issparse(matrix) else matrix, dtype=np.float64)


def labelled_cells(matrix, perturbation: str | Sequence[str], genes: Sequence[str], prefix: str,
                   column: str) -> ad.AnnData:
    """An AnnData of cells labelled with their perturbation (unique cell names ``prefix-i``)."""
    n = matrix.shape[0]
    labels = [perturbation] * n if isinstance(perturbation, str) else list(perturbation)
    obs = pd.DataFrame({column: pd.Categorical(labels)}, index=[f"{prefix}-{i}" for i in range(n)])
    return ad.AnnData(sp.csr_matrix(matrix, dtype=np.float32), obs=obs, var=pd.DataFrame(index=list(genes)))


# How a baseline predicted a perturbation (``rule``), as the predicted cells' ``.obs[RULE_COLUMN]`` say
RULE_COLUMN = "baseline_rule"
# the rules that fall back from what a baseline does for a single target among the genes
FALLBACK_RULES = {
    "linear_additive": ("sum_of_trained_singles", "sum_with_untrained_singles", "mean_change_target_not_a_gene"),
    "knockdown_only": ("no_gene_to_knock_down", "some_targets_not_genes"),
    "coexpression_neighbours": ("sum_over_targets", "mean_change_target_not_a_gene", "mean_change_no_coexpression"),
}
RULE_WORDS = {
    "sum_of_trained_singles": "the sum of its single targets' training changes",
    "sum_with_untrained_singles": "the sum of its single targets' changes, some not trained as singles (predicted as "
                                  "unseen singles are)",
    "mean_change_target_not_a_gene": "the mean training change (its target is not among the genes)",
    "no_gene_to_knock_down": "no change (no target among the genes to knock down)",
    "some_targets_not_genes": "only the targets among the genes knocked down",
    "sum_over_targets": "the sum of each target's neighbours' change",
    "mean_change_no_coexpression": "the mean training change (its target does not vary in the controls)",
}


def _single_targets(deltas: dict[str, np.ndarray], targets: ScreenTargets) -> dict[str, str]:
    """Training perturbations of one target: target -> its perturbation's label (the label is the
    target itself, or e.g. ``CBL+ctrl``)."""
    singles: dict[str, str] = {}
    for name in deltas:
        names = targets.targets(name)
        if len(names) == 1:
            singles.setdefault(names[0], name)
    return singles


class LinearAdditiveBaseline:
    """Predicted change of a perturbation = its training change when it was seen in training
    (additive); otherwise, for one target, a ridge regression from the target gene's embedding
    (its loadings on the principal components of the control cells) to the change, plus the
    average knockdown of a target on itself; a target not among the genes gets the average
    change. A combination (several targets, ``ScreenTargets``) gets the sum of its single targets'
    changes: their training changes where each was trained alone (the additive baseline of double
    perturbations, Norman et al. 2019), otherwise each predicted as an unseen single. ``rule`` says
    which of these a perturbation gets."""

    def __init__(self, n_components: int = 10, alpha: float = 1.0) -> None:
        self.n_components = n_components
        self.alpha = alpha

    def fit(self, controls: np.ndarray, deltas: dict[str, np.ndarray], genes: Sequence[str],
            columns: ScreenColumns = ScreenColumns()) -> LinearAdditiveBaseline:
        self.genes = list(genes)
        self.targets = ScreenTargets(self.genes, columns)
        self.deltas = deltas
        self.singles = _single_targets(deltas, self.targets)
        n_components = max(1, min(self.n_components, controls.shape[0] - 1, controls.shape[1] - 1))
        self.embedding = PCA(n_components=n_components, random_state=0).fit(controls).components_.T  # genes x k
        names = [name for name in deltas if not self.targets.is_combination(name)]
        self.ridge = None
        if names:
            features = np.array([self._features(self.targets.targets(name)) for name in names])
            self.ridge = Ridge(alpha=self.alpha).fit(features, np.array([deltas[n] for n in names]))
        genes_of = {n: self._gene(self.targets.targets(n)) for n in names}
        self_effects = [deltas[n][genes_of[n]] for n in names if genes_of[n] is not None]
        self.self_effect = float(np.mean(self_effects)) if self_effects else 0.0
        self.mean_delta = np.mean([deltas[n] for n in deltas], axis=0)
        return self

    def _gene(self, targets: tuple[str, ...]) -> int | None:
        """The column of a single target among the genes (None: not a gene, or no single target)."""
        return self.targets.position.get(targets[0]) if len(targets) == 1 else None

    def _features(self, targets: tuple[str, ...]) -> np.ndarray:
        i = self._gene(targets)
        return self.embedding[i] if i is not None else np.zeros(self.embedding.shape[1])

    def _single(self, target: str) -> np.ndarray:
        """One target's change: its training change when trained alone, else the unseen single's."""
        if target in self.singles:
            return self.deltas[self.singles[target]]
        i = self.targets.position.get(target)
        if i is None or self.ridge is None:
            return self.mean_delta
        delta = self.ridge.predict(self._features((target,))[None, :])[0]
        delta[i] = self.self_effect
        return delta

    def predict(self, name: str) -> np.ndarray:
        if name in self.deltas:
            return self.deltas[name]
        targets = self.targets.targets(name)
        if len(targets) < 2:
            return self._single(targets[0]) if targets else self.mean_delta
        return np.sum([self._single(target) for target in targets], axis=0)

    def rule(self, name: str) -> str:
        """How ``predict`` treats ``name``: training_change, ridge, mean_change_target_not_a_gene,
        sum_of_trained_singles or sum_with_untrained_singles."""
        if name in self.deltas:
            return "training_change"
        targets = self.targets.targets(name)
        if len(targets) > 1:
            trained = all(target in self.singles for target in targets)
            return "sum_of_trained_singles" if trained else "sum_with_untrained_singles"
        if targets and targets[0] in self.singles:
            return "training_change"
        if not targets or targets[0] not in self.targets.position:
            return "mean_change_target_not_a_gene"
        return "ridge" if self.ridge is not None else "mean_change_target_not_a_gene"


class KnockdownOnlyBaseline:
    """The target genes changed, nothing else (every target of a combination): a target by its
    mean training self-effect in this perturbation (mean of the target in the perturbation's
    training cells minus the training control mean) when the perturbation was seen in training,
    else by its own single perturbation's when that was; an unseen target is scaled by the screen's
    average *ratio* (target's mean in its single perturbation's training cells / its training
    control mean, over the seen single targets a control expresses). A ratio, not a difference,
    because targets differ in abundance, and not a log change, because a target knocked out of
    every cell has mean 0 (log -inf) while its ratio is 0. A target not among the genes has no gene
    to knock down: left as it is (``rule`` says so). Values are clipped at 0."""

    def fit(self, control_mean: np.ndarray, means: dict[str, np.ndarray], genes: Sequence[str],
            columns: ScreenColumns = ScreenColumns()) -> KnockdownOnlyBaseline:
        self.targets = ScreenTargets(genes, columns)
        self.self_effects = {(name, i): float(means[name][i] - control_mean[i])
                             for name in means for i in self.targets.positions(name) if i is not None}
        singles = _single_targets(means, self.targets)
        self.single_effects: dict[int, float] = {}  # gene column -> self-effect of its single perturbation
        ratios = []
        for target, name in singles.items():
            i = self.targets.position.get(target)
            if i is None:
                continue
            self.single_effects[i] = self.self_effects[name, i]
            if control_mean[i] > 0:
                ratios.append(means[name][i] / control_mean[i])
        self.mean_ratio = float(np.mean(ratios)) if ratios else 1.0  # nothing to learn a ratio from: no change
        return self

    def rule(self, name: str) -> str:
        """knocked_down, some_targets_not_genes or no_gene_to_knock_down."""
        positions = self.targets.positions(name)
        if not any(i is not None for i in positions):
            return "no_gene_to_knock_down"
        return "knocked_down" if all(i is not None for i in positions) else "some_targets_not_genes"

    def predict_cells(self, cells, name: str) -> sp.csr_matrix:
        """``cells`` (control cells, cells x genes) with only the targets' columns changed."""
        cells = sp.csr_matrix(cells, dtype=np.float32, copy=True)
        positions = [i for i in self.targets.positions(name) if i is not None]
        if not positions:
            return cells
        cells = cells.tolil()  # a few columns of a few cells: lil sets them without densifying the rest
        for i in positions:
            target = cells[:, i].toarray().ravel()
            effect = self.self_effects.get((name, i), self.single_effects.get(i))
            changed = target + effect if effect is not None else target * self.mean_ratio
            cells[:, i] = np.maximum(changed, 0.0)[:, None]
        cells = cells.tocsr()
        cells.eliminate_zeros()
        return cells


class CoexpressionNeighboursBaseline:
    """Predicted change of a perturbation = the mean training change of the ``n_neighbours`` seen
    training perturbations of one target (itself excluded) whose targets are most co-expressed
    with its target: highest Pearson correlation over the training control cells. A target that is
    not a gene, or that does not vary in the controls (its correlation is undefined), gets the
    mean training change. A combination gets the sum of its targets' changes, each predicted so.
    Correlations are computed on the sparse controls (never densified)."""

    def __init__(self, n_neighbours: int = 3) -> None:
        if n_neighbours < 1:
            raise C2SValueError(f"n_neighbours must be at least 1, not {n_neighbours}")
        self.n_neighbours = n_neighbours

    def fit(self, controls, deltas: dict[str, np.ndarray], genes: Sequence[str],
            columns: ScreenColumns = ScreenColumns()) -> CoexpressionNeighboursBaseline:
        self.targets = ScreenTargets(genes, columns)
        self.deltas = deltas
        self.mean_delta = np.mean([deltas[name] for name in deltas], axis=0)
        self.controls = sp.csc_matrix(controls, dtype=np.float64)  # columns are read one target at a time
        n = self.controls.shape[0]
        self.gene_mean = np.asarray(self.controls.mean(axis=0)).ravel()
        squares = np.asarray(self.controls.multiply(self.controls).mean(axis=0)).ravel()
        self.gene_std = np.sqrt(np.maximum(squares - self.gene_mean**2, 0.0))
        self.candidates = sorted(name for name in deltas if self._column(name) is not None)
        candidate_columns = [self._column(name) for name in self.candidates]
        self.candidate_cells = self.controls[:, candidate_columns].tocsr() if candidate_columns else sp.csr_matrix((n, 0))
        self.candidate_columns = np.array(candidate_columns, dtype=np.int64)
        return self

    def _column(self, name: str) -> int | None:
        """The gene column of a perturbation of one target among the genes (else None)."""
        positions = self.targets.positions(name)
        return positions[0] if len(positions) == 1 else None

    def correlations(self, name: str) -> pd.Series:
        """Pearson correlation over the training controls of ``name``'s target with each seen
        training target (NaN where a gene does not vary); empty when ``name`` is not one gene."""
        i = self._column(name)
        if i is None or not self.candidates:
            return pd.Series(dtype=float)
        target = self.controls[:, i].toarray().ravel()
        covariance = self.candidate_cells.T @ target / self.controls.shape[0] - self.gene_mean[self.candidate_columns] * self.gene_mean[i]
        with np.errstate(divide="ignore", invalid="ignore"):
            correlation = covariance / (self.gene_std[self.candidate_columns] * self.gene_std[i])
        correlation[self.gene_std[self.candidate_columns] * self.gene_std[i] == 0] = np.nan
        return pd.Series(correlation, index=self.candidates)

    def neighbours(self, name: str) -> list[str]:
        """The seen training perturbations whose change is borrowed (most co-expressed first; ties
        by name); empty when there is no defined correlation."""
        correlation = self.correlations(name).drop(labels=[name], errors="ignore").dropna()
        order = sorted(correlation.index, key=lambda other: (-correlation[other], other))
        return order[: self.n_neighbours]

    def predict(self, name: str) -> np.ndarray:
        targets = self.targets.targets(name)
        if len(targets) > 1:
            return np.sum([self.predict(target) for target in targets], axis=0)
        chosen = self.neighbours(name)
        return np.mean([self.deltas[other] for other in chosen], axis=0) if chosen else self.mean_delta

    def rule(self, name: str) -> str:
        """neighbours, sum_over_targets, mean_change_target_not_a_gene or mean_change_no_coexpression."""
        if self.targets.is_combination(name):
            return "sum_over_targets"
        if self._column(name) is None:
            return "mean_change_target_not_a_gene"
        return "neighbours" if self.neighbours(name) else "mean_change_no_coexpression"


def sentence_space_cells(
    cell_sentences: Dataset, names: Sequence[str], column: str, genes: Sequence[str], rank_fit: RankFit,
    top_k_genes: int | None, prefix: str, batch_size: int = 4096,
) -> ad.AnnData:
    """The cells ``names`` as the model sees them: each cell sentence cut to its first
    ``top_k_genes`` genes (None: every gene) and turned back into expression with ``rank_fit``,
    labelled with the sentences' ``column`` (cell names ``prefix-i``). Read ``batch_size`` rows at
    a time from the Arrow table (a screen's whole sentences as Python strings are GBs)."""
    missing = [c for c in (CELL_NAME, CELL_SENTENCE, column) if c not in cell_sentences.column_names]
    if missing:
        raise C2SKeyError(f"column(s) {missing} are not in the cell sentences (columns: {', '.join(cell_sentences.column_names)})")
    index = pd.Index(cell_sentences.select_columns([CELL_NAME]).with_format("arrow")[:].column(CELL_NAME).to_pylist())
    positions = index.get_indexer(list(names))
    if (positions < 0).any():
        absent = [name for name, at in zip(names, positions) if at < 0]
        raise C2SValueError(
            f"{len(absent)} of the {len(names)} cells asked for have no cell sentence (e.g. {', '.join(absent[:3])}): "
            "the split and the sentences are not of the same cells"
        )
    table = cell_sentences.select_columns([CELL_SENTENCE, column]).with_format("arrow")
    matrices, labels = [], []
    for start in range(0, len(positions), batch_size):
        rows = table[positions[start : start + batch_size].tolist()]
        matrices.append(reconstruct_expression(rows.column(CELL_SENTENCE), genes, rank_fit, top_k=top_k_genes)[0])
        labels += [str(label) for label in rows.column(column).to_pylist()]
    matrix = sp.vstack(matrices, format="csr") if matrices else sp.csr_matrix((0, len(genes)), dtype=np.float32)
    return labelled_cells(matrix, labels, genes, prefix, column)


def group_means(adata: ad.AnnData, column: str) -> dict[str, np.ndarray]:
    """Mean expression (float64) of the cells of each value of ``.obs[column]``, on sparse data."""
    labels = ad.AnnData(adata.X, obs=pd.DataFrame({column: adata.obs[column].astype(str).to_numpy()}, index=adata.obs_names))
    means = sc.get.aggregate(labels, by=column, func="mean")
    return {str(name): np.asarray(row, dtype=np.float64) for name, row in zip(means.obs_names, means.layers["mean"])}


BASELINE_PREFIXES = {"control_mean": "control_mean", "train_perturbed_mean": "train_mean", "linear_additive": "linear",
                     "knockdown_only": "knockdown", "coexpression_neighbours": "coexpression"}


class FittedBaselines(NamedTuple):
    """The baselines fitted on a training part (``fit_baselines``)."""

    linear: LinearAdditiveBaseline
    knockdown: KnockdownOnlyBaseline
    coexpression: CoexpressionNeighboursBaseline
    perturbed: sp.csr_matrix  # the training perturbed cells, which train_perturbed_mean draws from
    columns: ScreenColumns  # how perturbation labels name their targets


def fit_baselines(
    train: ad.AnnData, column: str, control_label: str, seed: int = 0, n_components: int = 10,
    n_coexpression_neighbours: int = 3, combination_separator: str | None = "+",
) -> FittedBaselines:
    """The baselines of ``baseline_predictions`` fitted on the training cells ``train`` (perturbed
    and control), a perturbation's targets read with ``combination_separator``."""
    genes = list(train.var_names)
    columns = ScreenColumns(perturbation=column, control_label=control_label, batch=None, gene_symbol=None,
                            combination_separator=combination_separator)
    labels = train.obs[column].astype(str).to_numpy()
    is_control = labels == control_label
    if not is_control.any() or is_control.all():
        raise C2SValueError("the training part needs both control and perturbed cells to build the baselines")
    means = group_means(train, column)
    control_mean = means[control_label]
    deltas = {name: means[name] - control_mean for name in np.unique(labels[~is_control])}
    # The gene embedding is scikit-learn's PCA of the training controls; on dense input it picks the
    # randomized solver (sparse input would switch it to ARPACK and change the baseline's numbers),
    # so at most EMBEDDING_CELLS of them are densified: a sample when a screen has more.
    controls = np.flatnonzero(is_control)
    if controls.size > EMBEDDING_CELLS:
        controls = np.sort(np.random.default_rng([seed, 3]).choice(controls, size=EMBEDDING_CELLS, replace=False))
    return FittedBaselines(
        linear=LinearAdditiveBaseline(n_components=n_components).fit(_dense_rows(train.X[controls]), deltas, genes, columns),
        knockdown=KnockdownOnlyBaseline().fit(control_mean, {name: means[name] for name in deltas}, genes, columns),
        coexpression=CoexpressionNeighboursBaseline(n_coexpression_neighbours).fit(
            sp.csr_matrix(train.X)[is_control], deltas, genes, columns),
        perturbed=sp.csr_matrix(train.X)[~is_control],
        columns=columns,
    )


def _baseline_cells(baselines: FittedBaselines, test_controls: ad.AnnData, test_counts: dict[str, int], seed: int = 0):
    """(method, perturbation, predicted cells) of the baselines, one perturbation at a time in the
    order of ``test_counts`` (``baseline_predictions`` describes them)."""
    rng = np.random.default_rng(seed)
    controls_x = sp.csr_matrix(test_controls.X)
    perturbed_x = baselines.perturbed
    for name, n in test_counts.items():
        drawn = controls_x[rng.integers(0, controls_x.shape[0], size=n)]  # sparse, as the cells are
        yield "control_mean", name, drawn
        yield "train_perturbed_mean", name, perturbed_x[rng.integers(0, perturbed_x.shape[0], size=n)]
        # a shift of every gene: these cells are dense by nature, one perturbation's at a time
        yield "linear_additive", name, np.maximum(_dense_rows(drawn) + baselines.linear.predict(name)[None, :], 0.0)
        # the same control cells as the others (no further draws: the first three keep their numbers)
        yield "knockdown_only", name, baselines.knockdown.predict_cells(drawn, name)
        yield "coexpression_neighbours", name, np.maximum(
            _dense_rows(drawn) + baselines.coexpression.predict(name)[None, :], 0.0)


def baseline_rules(baselines: FittedBaselines, names: Sequence[str]) -> pd.DataFrame:
    """How each target-aware baseline predicts each of ``names``: one row per perturbation and
    method (``linear_additive``, ``knockdown_only``, ``coexpression_neighbours``) with its ``rule``
    (the classes' ``rule``; ``FALLBACK_RULES`` are those that differ from a single target among the
    genes)."""
    rows = [(name, method, model.rule(name)) for name in names
            for method, model in (("linear_additive", baselines.linear), ("knockdown_only", baselines.knockdown),
                                  ("coexpression_neighbours", baselines.coexpression))]
    return pd.DataFrame(rows, columns=["perturbation", "method", "rule"])


def report_baseline_rules(rules: pd.DataFrame) -> dict[str, float]:
    """Log, for each baseline, the perturbations it predicts by a fallback rule (a combination, a
    target not among the genes), and count them: ``<method>.n_perturbations_<rule>`` for each
    fallback rule that some perturbation gets."""
    metrics: dict[str, float] = {}
    for method, fallbacks in FALLBACK_RULES.items():
        chosen = rules[(rules["method"] == method) & rules["rule"].isin(fallbacks)]
        if chosen.empty:
            continue
        parts = []
        for rule, rows in chosen.groupby("rule", sort=True):
            names = sorted(rows["perturbation"])
            metrics[f"{method}.n_perturbations_{rule}"] = float(len(names))
            parts.append(f"{', '.join(names[:10])}{f' and {len(names) - 10} more' if len(names) > 10 else ''} as "
                         f"{RULE_WORDS[rule]}")
        logger.info("%s predicts %s", method, "; ".join(parts))
    return metrics


def baseline_predictions(
    train: ad.AnnData, test_controls: ad.AnnData, test_counts: dict[str, int], column: str, control_label: str,
    seed: int = 0, n_components: int = 10, n_coexpression_neighbours: int = 3, combination_separator: str | None = "+",
    baselines: FittedBaselines | None = None,
) -> dict[str, ad.AnnData]:
    """Predicted cells of each held-out perturbation (``test_counts``: name -> cells to predict)
    for the baselines, each with ``test_controls`` as its control cells:

    - ``control_mean``: no change; control cells stand in for the perturbed ones.
    - ``train_perturbed_mean``: cells drawn from every perturbed cell of the training part.
    - ``linear_additive``: control cells shifted by ``LinearAdditiveBaseline``'s change (a
      combination: the sum of its single targets' changes).
    - ``knockdown_only``: the same control cells with only the target genes changed
      (``KnockdownOnlyBaseline``): the rule "knock the targets down, change nothing else".
    - ``coexpression_neighbours``: the same control cells shifted by the mean training change of the
      ``n_coexpression_neighbours`` perturbations whose targets are most co-expressed with this
      one's (``CoexpressionNeighboursBaseline``).

    A perturbation seen in training (held-out cells of a seen perturbation) uses its own training
    change in ``linear_additive`` and its own self-effect in ``knockdown_only``. The baselines are
    fitted on ``train`` (``fit_baselines``) unless ``baselines`` gives them fitted.
    """
    genes = list(train.var_names)
    if baselines is None:
        baselines = fit_baselines(train, column, control_label, seed, n_components, n_coexpression_neighbours,
                                  combination_separator)
    parts: dict[str, list[ad.AnnData]] = {method: [] for method in BASELINE_PREFIXES}
    for method, name, cells in _baseline_cells(baselines, test_controls, test_counts, seed):
        parts[method].append(labelled_cells(cells, name, genes, f"{BASELINE_PREFIXES[method]}-{name}", column))
    return {method: ad.concat(cells + [test_controls]) for method, cells in parts.items()}


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 2 or not (np.isfinite(a).all() and np.isfinite(b).all()) or np.std(a) == 0 or np.std(b) == 0:
        return float("nan")  # undefined for a constant prediction (e.g. "no change") or an undefined change
    return float(np.corrcoef(a, b)[0, 1])


def calibration(predicted: np.ndarray, true_mean: np.ndarray, level: float = 0.9) -> float:
    """Share of genes whose true mean lies inside the central ``level`` interval of the predicted
    cells' values of that gene (samples x genes)."""
    low, high = np.quantile(predicted, [(1 - level) / 2, 1 - (1 - level) / 2], axis=0)
    return float(np.mean((true_mean >= low - 1e-9) & (true_mean <= high + 1e-9)))


def _top_de_genes(de_real: pd.DataFrame, perturbation: str, n: int) -> list[str]:
    rows = de_real[de_real["target"] == perturbation].sort_values(["fdr", "abs_log2_fold_change"], ascending=[True, False])
    return rows["feature"].head(n).astype(str).tolist()


def _cell_eval(pred: ad.AnnData, real: ad.AnnData, column: str, control_label: str, de_real, threads: int):
    from cell_eval import MetricsEvaluator

    # cell-eval takes the sparse cells as they are (it densifies per-perturbation bulks itself)
    with tempfile.TemporaryDirectory() as scratch:
        evaluator = MetricsEvaluator(
            adata_pred=pred, adata_real=real, de_real=de_real, control_pert=control_label, pert_col=column,
            num_threads=threads, outdir=os.path.join(scratch, "cell-eval"),
        )
        results, _ = evaluator.compute(profile="full", write_csv=False, skip_metrics=CELL_EVAL_SKIPPED)
    return results.to_pandas().set_index("perturbation"), evaluator.de_comparison.real.data


def cell_eval_ceiling(real: ad.AnnData, column: str, control_label: str, threads: int = 1, seed: int = 0) -> dict[str, float]:
    """cell-eval's data ceiling of its metrics on the held-out cells ``real`` (perturbed and
    control cells): each perturbation's cells split in two disjoint halves, one scored as the
    prediction of the other, corrected to full depth (Spearman-Brown). The most any method could
    reach given the cells' own noise; cell-eval defines it for the agreement metrics only
    (``pearson_delta``, ``overlap_at_N``, ``de_direction_match``, ``discrimination_score_l1``), not
    for errors such as MSE, and not where the halves do not agree at all. Returns
    ``cell_eval_ceiling.<metric>`` for the metrics it defines."""
    from cell_eval import MetricsEvaluator

    with tempfile.TemporaryDirectory() as scratch:
        evaluator = MetricsEvaluator(adata_pred=None, adata_real=real, control_pert=control_label, pert_col=column,
                                     num_threads=threads, outdir=os.path.join(scratch, "cell-eval"))
        _, ceiling = evaluator.compute_ceiling(profile="full", write_csv=False, skip_metrics=CELL_EVAL_SKIPPED, seed=seed)
    row = ceiling.row(0, named=True)
    return {f"cell_eval_ceiling.{metric}": float(row[metric]) for metric in CELL_EVAL_METRICS
            if row.get(metric) is not None and np.isfinite(row[metric])}


def normalized_scores(summary: pd.DataFrame, baseline: str = MEAN_BASELINE) -> dict[str, float]:
    """VCC-style scores of every method but ``baseline`` (a ``summarize_scores`` table): each
    cell-eval metric's mean against the baseline's, with cell-eval's own scoring
    (``score_agg_metrics``). A metric best at 1 (``pearson_delta``, ...) scores
    (u - b) / (1 - b); an error best at 0 (``mse``, ``mse_delta``) scores 1 - u / b, the share of
    the baseline's error the method removes. Both are clipped at 0 (no better than the baseline)
    and 1 is perfect; an undefined metric (the Pearson of "no change") scores 0. Returns
    ``<method>.<metric>_normalized`` and their mean, ``<method>.mean_normalized_score``."""
    import polars as pl
    from cell_eval import score_agg_metrics

    table = summary.set_index("method")
    if baseline not in table.index:
        raise C2SValueError(f"no '{baseline}' among the methods ({', '.join(map(str, table.index))}): nothing to normalize to")
    metrics = [metric for metric in CELL_EVAL_METRICS if metric in table.columns]

    def aggregate(method: str) -> pl.DataFrame:  # the shape cell-eval's aggregate results have
        return pl.DataFrame({"statistic": ["mean"], **{metric: [float(table.at[method, metric])] for metric in metrics}})

    reference = aggregate(baseline)
    scores: dict[str, float] = {}
    for method in table.index:
        if method == baseline:
            continue
        with np.errstate(divide="ignore", invalid="ignore"):  # an error of 0 or a NaN in the baseline scores 0
            scored = score_agg_metrics(aggregate(method), reference)
        for metric, value in zip(scored["metric"], scored["from_baseline"]):
            name = "mean_normalized_score" if metric == "avg_score" else f"{metric}_normalized"
            scores[f"{method}.{name}"] = float(value)
    return scores


def score_methods(
    real: ad.AnnData,
    predictions: dict[str, ad.AnnData],
    column: str,
    control_label: str,
    top_n_de: int = 20,
    interval: float = 0.9,
    truth: pd.DataFrame | None = None,
    threads: int = 1,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per (method, held-out perturbation) with the metrics.

    ``real``: held-out perturbed cells and control cells; each prediction: predicted cells of
    those perturbations plus control cells, same genes. Metrics: cell-eval's ``pearson_delta``
    (Pearson of predicted vs true mean change from control, all genes), ``mse`` (of the mean
    expression), ``mse_delta``, ``overlap_at_N`` (overlap of predicted and true DE genes),
    ``de_direction_match`` and ``discrimination_score_l1``; here: ``pearson_delta_top_de`` (the
    same Pearson on the ``top_n_de`` genes most DE in the real cells), ``calibration`` (share of
    genes whose true mean falls in the predicted cells' central ``interval``), and with a
    simulator's ``truth`` (genes x perturbations, expected log2 fold change)
    ``pearson_delta_simulated_truth``. Beside them: ``centered_pearson_delta`` (Systema: the Pearson
    of the predicted vs the real mean, each minus its centroid over the scored perturbations,
    ``centred_means``; a shift every perturbation shares cannot pass as signal; NaN with one
    perturbation), ``centered_pearson_delta_simulated_truth`` (the same against the truth centred
    on its mean over those perturbations) and ``energy_distance`` (predicted vs real cells of the
    perturbation, ``energy_distance``).
    """
    real = real[:, sorted(real.var_names)].copy()
    real_means = group_means(real, column)
    perturbations = sorted(set(real_means) - {control_label})
    real_labels = real.obs[column].astype(str).to_numpy()
    real_centred = centred_means(real_means, perturbations)
    if truth is not None:
        truth_genes = [real.var_names.get_loc(g) for g in real.var_names if g in truth.index]
        truth_values = truth.loc[real.var_names[truth_genes]]
        in_truth = [name for name in perturbations if name in truth.columns]
        truth_centred = truth_values[in_truth].sub(truth_values[in_truth].mean(axis=1), axis=0)
    rows = []
    de_real = None
    for method, predicted in predictions.items():
        predicted = predicted[:, list(real.var_names)].copy()
        missing = sorted(set(perturbations) - set(predicted.obs[column].astype(str)))
        if missing:
            raise C2SValueError(f"method '{method}' has no predicted cells for {missing}")
        results, de_real = _cell_eval(predicted, real, column, control_label, de_real, threads)
        de_table = de_real.to_pandas()
        predicted_means = group_means(predicted, column)
        predicted_centred = centred_means(predicted_means, perturbations)
        labels = predicted.obs[column].astype(str).to_numpy()
        for name in perturbations:
            true_delta = real_means[name] - real_means[control_label]
            predicted_delta = predicted_means[name] - predicted_means[control_label]
            top = [real.var_names.get_loc(g) for g in _top_de_genes(de_table, name, top_n_de)]
            row = {"method": method, "perturbation": name}
            for metric in CELL_EVAL_METRICS:
                row[metric] = float(results.at[name, metric]) if metric in results.columns and name in results.index else float("nan")
            row["pearson_delta_top_de"] = _pearson(predicted_delta[top], true_delta[top])
            row["calibration"] = calibration(_dense_rows(predicted.X[labels == name]), real_means[name], interval)
            row["centered_pearson_delta"] = _pearson(predicted_centred[name], real_centred[name])
            if truth is not None and name in truth.columns:
                row["pearson_delta_simulated_truth"] = _pearson(predicted_delta[truth_genes], truth_values[name].to_numpy())
                row["centered_pearson_delta_simulated_truth"] = _pearson(predicted_centred[name][truth_genes],
                                                                         truth_centred[name].to_numpy())
            row["energy_distance"] = energy_distance(predicted.X[labels == name], real.X[real_labels == name], seed=seed)
            row["n_predicted_cells"] = int(np.count_nonzero(labels == name))
            rows.append(row)
    return pd.DataFrame(rows)


def centred_means(means: dict[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
    """Each of ``names``' mean minus the mean of their means (Systema's centring on the perturbed
    centroid: a shift common to every perturbation cancels). Each perturbation weighs once, so the
    centroid of a method that predicts 30 cells of one perturbation and 3 of another is comparable
    with the real cells' one. With fewer than two perturbations the centred change is undefined:
    NaN vectors."""
    stacked = np.vstack([means[name] for name in names])
    if len(names) < 2:
        return {name: np.full(stacked.shape[1], np.nan) for name in names}
    centroid = stacked.mean(axis=0)
    return {name: row - centroid for name, row in zip(names, stacked)}


ENERGY_DISTANCE_COMPONENTS = 50  # scPerturb computes E-distances on (at most) 50 principal components


def energy_distance(predicted, real, n_comps: int = ENERGY_DISTANCE_COMPONENTS, seed: int = 0) -> float:
    """E-distance between ``predicted`` and ``real`` cells of one perturbation (cells x genes,
    sparse or dense), as scPerturb computes it (``scperturb.edist``: squared Euclidean distances,
    sample-corrected within-group means) on a PCA (scanpy) of both sets of cells together with at
    most ``n_comps`` components. 0 for identical distributions (up to sampling noise, which can
    make it slightly negative), larger the further apart; NaN when either side has fewer than two
    cells (its within-group spread is undefined)."""
    import scperturb

    cells = np.vstack([_dense_rows(predicted), _dense_rows(real)])  # one perturbation's cells: small
    n_predicted = predicted.shape[0]
    if min(n_predicted, real.shape[0]) < 2:
        return float("nan")
    if not np.any(cells != cells[0]):
        return 0.0  # every cell the same: no spread to take components of
    groups = pd.DataFrame({"group": ["predicted"] * n_predicted + ["real"] * real.shape[0]},
                          index=[f"cell-{i}" for i in range(cells.shape[0])])
    both = ad.AnnData(cells.astype(np.float32), obs=groups)
    n_comps = min(n_comps, both.n_obs - 1, both.n_vars - 1)
    if n_comps >= 1:
        sc.pp.pca(both, n_comps=n_comps, random_state=seed)
    else:
        both.obsm["X_pca"] = cells  # a single gene: the cells are their own coordinates
    distances = scperturb.edist(both, obs_key="group", obsm_key="X_pca", n_jobs=1, verbose=False)
    return float(distances.loc["predicted", "real"])


def summarize_scores(scores: pd.DataFrame) -> pd.DataFrame:
    """Mean of each metric over the held-out perturbations, one row per method (NaN-aware: a
    metric undefined for a method, e.g. Pearson of a constant "no change", stays NaN)."""
    numeric = scores.drop(columns=["perturbation"]).groupby("method", sort=False)
    summary = numeric.mean(numeric_only=True)
    summary["n_perturbations"] = scores.groupby("method", sort=False)["perturbation"].nunique()
    return summary.reset_index()


MEAN_METRICS = ("pearson_delta", "mse", "mse_delta", "discrimination_score_l1")  # cell-eval's, from group means


def _used_genes(*matrices) -> np.ndarray:
    """Positions of the genes some cell of ``matrices`` expresses (all have the same genes)."""
    used = sum(np.asarray((m != 0).sum(axis=0)).ravel() for m in matrices)
    return np.flatnonzero(used > 0)


def baseline_mean_scores(
    real: ad.AnnData, train: ad.AnnData, column: str, control_label: str, truth: pd.DataFrame | None = None,
    interval: float = 0.9, seed: int = 0, n_components: int = 10, n_coexpression_neighbours: int = 3,
    combination_separator: str | None = "+", baselines: FittedBaselines | None = None,
) -> pd.DataFrame:
    """The baselines on every held-out perturbation of ``real`` (its perturbed and control cells),
    with the metrics that need only each perturbation's mean: cell-eval's ``pearson_delta``,
    ``mse``, ``mse_delta`` and ``discrimination_score_l1`` computed as cell-eval does (pseudobulk
    means, the change from the controls' mean, L1 ranks without the target gene), ``calibration``
    and, with ``truth`` (indexed by gene), ``pearson_delta_simulated_truth``; and
    ``centered_pearson_delta`` (with the truth: ``centered_pearson_delta_simulated_truth``) as
    ``score_methods`` computes it. Predicted cells are
    made and reduced one perturbation at a time, so a screen's hundreds of held-out perturbations
    never hold every baseline's cells (the linear baseline's are dense) at once; cell-eval's
    DE-based metrics (a test per gene and perturbation) are not computed here. One row per
    (method, perturbation), on the genes some real test or training cell expresses. The baselines
    are fitted on ``train`` unless ``baselines`` gives them fitted (``fit_baselines``)."""
    labels = real.obs[column].astype(str)
    is_control = (labels == control_label).to_numpy()
    if not is_control.any():
        raise C2SValueError(f"the real test cells have no control cell ('{control_label}')")
    names = sorted(set(labels[~is_control]))
    counts = labels.value_counts()
    keep = _used_genes(real.X, train.X)
    genes = real.var_names[keep].astype(str)
    real_means = group_means(real[:, keep], column)
    control = real_means[control_label]  # the baselines' controls are these cells too, as in evaluate_posterior
    real_delta = np.vstack([real_means[name] - control for name in names])
    position = {name: i for i, name in enumerate(names)}
    predicted: dict[str, np.ndarray] = {}
    rows: dict[tuple[str, str], dict] = {}
    controls = real[is_control]
    if baselines is None:
        baselines = fit_baselines(train, column, control_label, seed, n_components, n_coexpression_neighbours,
                                  combination_separator)
    for method, name, cells in _baseline_cells(baselines, controls, {n: int(counts[n]) for n in names}, seed):
        cells = _dense_rows(cells[:, keep])  # one perturbation's predicted cells
        mean = cells.mean(axis=0)
        delta = mean - control
        predicted.setdefault(method, np.zeros_like(real_delta))[position[name]] = delta
        row = {"method": method, "perturbation": name,
               "pearson_delta": _pearson(delta, real_delta[position[name]]),
               "mse": float(np.mean((mean - real_means[name]) ** 2)),
               "mse_delta": float(np.mean((delta - real_delta[position[name]]) ** 2)),
               "calibration": calibration(cells, real_means[name], interval)}
        if truth is not None and name in truth.columns:
            shared = [i for i, g in enumerate(genes) if g in truth.index]
            row["pearson_delta_simulated_truth"] = _pearson(delta[shared], truth.loc[genes[shared], name].to_numpy())
        row["n_predicted_cells"] = int(cells.shape[0])
        rows[method, name] = row
    # centred on the perturbed centroid (score_methods): the control mean cancels, so the changes serve
    real_centred = centred_means(dict(zip(names, real_delta)), names)
    truth_names = [name for name in names if truth is not None and name in truth.columns]
    if truth_names:
        shared = [i for i, g in enumerate(genes) if g in truth.index]
        truth_values = truth.loc[genes[shared], truth_names]
        truth_centred = truth_values.sub(truth_values.mean(axis=1), axis=0)
    targets = ScreenTargets(genes, baselines.columns)
    for method, deltas in predicted.items():
        predicted_centred = centred_means(dict(zip(names, deltas)), names)
        for name in names:
            # as cell-eval: without the target gene (each target of a combination)
            include = np.flatnonzero(~np.isin(np.arange(len(genes)), [i for i in targets.positions(name) if i is not None]))
            distances = np.abs(real_delta[:, include] - deltas[position[name], include]).sum(axis=1)
            rank = int(np.flatnonzero(np.argsort(distances) == position[name])[0])
            rows[method, name]["discrimination_score_l1"] = 1.0 - rank / len(names)
            rows[method, name]["centered_pearson_delta"] = _pearson(predicted_centred[name], real_centred[name])
            if name in truth_names:
                rows[method, name]["centered_pearson_delta_simulated_truth"] = _pearson(
                    predicted_centred[name][shared], truth_centred[name].to_numpy())
    return pd.DataFrame(list(rows.values()))


def _truth_by_gene(truth: pd.DataFrame | None) -> pd.DataFrame | None:
    """The simulator's truth (a ``gene`` column, one column per perturbation) indexed by gene; None
    for a real screen (no rows)."""
    if truth is None or truth.empty:
        return None
    if "gene" not in truth.columns:
        raise C2SKeyError(f"the simulated truth needs a 'gene' column; it has {', '.join(map(str, truth.columns))}")
    return truth.set_index("gene")


def model_method(temperature: float) -> str:
    """The method name of the model's samples at ``temperature`` (``model_T0.7``)."""
    return f"model_T{float(temperature):g}"


def _require_sample_columns(samples: ad.AnnData, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in samples.obs.columns]
    if missing:
        raise C2SKeyError(f"the posterior samples lack .obs column(s) {missing}; they have {', '.join(map(str, samples.obs.columns))}"
                       " (posterior_expression writes them from the samples table)")


def _column_means(matrix) -> np.ndarray:
    """Mean of each column (float64) of a sparse or dense matrix."""
    return np.asarray(matrix.mean(axis=0, dtype=np.float64)).ravel()


OWN_CONTROL_METRICS = ("pearson_delta_vs_own_control", "pearson_delta_vs_own_control_simulated_truth",
                       "own_control_on_same_prompts", "n_own_control_samples")


def scores_vs_own_control(
    samples: ad.AnnData, real: ad.AnnData, column: str, control_label: str, truth: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """The model's changes against its own samples for "no perturbation", one row per model
    method and perturbation.

    ``samples``: posterior samples as expression, among them rows whose ``perturbation`` is
    ``control_label`` (the model asked for no perturbation, on the same control prompts); ``real``:
    the real test cells (perturbed and controls), same genes. For each temperature that has such
    rows and each perturbation p sampled at it: ``pearson_delta_vs_own_control``, the Pearson of
    (mean of p's samples − mean of the control-label samples on p's prompts: those whose
    ``control_cell`` is one of p's samples'; every control-label sample of that temperature when
    none is, or when there is no ``control_cell`` column) vs (real mean of p − real control mean);
    with ``truth`` (indexed by gene) ``pearson_delta_vs_own_control_simulated_truth``;
    ``own_control_on_same_prompts`` (1 when the reference was on p's prompts) and
    ``n_own_control_samples``. A model that writes the same cells whatever it is asked scores ~0
    here (NaN when its samples do not change at all), while its delta against the real controls
    can still reward a shift shared by every perturbation. Without control-label rows: no rows."""
    _require_sample_columns(samples, (SAMPLE_PERTURBATION, "temperature"))
    if list(real.var_names) != list(samples.var_names):
        raise C2SValueError("the samples and the real test cells must have the same genes")
    labels = samples.obs[SAMPLE_PERTURBATION].astype(str).to_numpy()
    temperatures = samples.obs["temperature"].to_numpy(dtype=float)
    prompts = samples.obs["control_cell"].astype(str).to_numpy() if "control_cell" in samples.obs.columns else None
    matrix = sp.csr_matrix(samples.X)
    real_means = group_means(real, column)
    if control_label not in real_means:
        raise C2SValueError(f"the real test cells have no control cell ('{control_label}')")
    if truth is not None:
        truth_genes = [i for i, g in enumerate(samples.var_names) if g in truth.index]
        truth_values = truth.loc[samples.var_names[truth_genes]]
    rows = []
    for temperature in sorted(set(temperatures[labels == control_label])):
        at_t = temperatures == temperature
        own = at_t & (labels == control_label)
        for name in sorted(set(labels[at_t]) - {control_label}):
            if name not in real_means:
                raise C2SValueError(f"perturbation '{name}' has samples but no real test cells")
            mine = at_t & (labels == name)
            same_prompts = own & np.isin(prompts, prompts[mine]) if prompts is not None else np.zeros_like(own)
            reference = same_prompts if same_prompts.any() else own
            delta = _column_means(matrix[mine]) - _column_means(matrix[reference])
            row = {"method": model_method(temperature), "perturbation": name,
                   "pearson_delta_vs_own_control": _pearson(delta, real_means[name] - real_means[control_label])}
            if truth is not None and name in truth.columns:
                row["pearson_delta_vs_own_control_simulated_truth"] = _pearson(delta[truth_genes], truth_values[name].to_numpy())
            row["own_control_on_same_prompts"] = float(same_prompts.any())
            row["n_own_control_samples"] = int(np.count_nonzero(reference))
            rows.append(row)
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=["method", "perturbation"])


KNOCKDOWN_STATISTICS = ("target_presence", "target_rank", "target_expression")
KNOCKDOWN_GROUPS = ("control", "real", "model", "reference")


def _target_statistics(matrix, index: int, top_k: int) -> dict[str, float]:
    """Of the target gene (column ``index``) in ``matrix`` (cells rebuilt from sentences, so a
    larger value means an earlier position): the share of cells it is present in (non-zero and
    among the first ``top_k`` genes: a sample longer than the real cells' top-k sentences must not
    count genes the real cells cannot show), its mean 0-based position (the genes with a larger
    value come before it; absent counts as ``top_k``), its mean expression and the number of
    cells."""
    matrix = sp.csr_matrix(matrix)
    n = matrix.shape[0]
    if n == 0:
        return {"target_presence": float("nan"), "target_rank": float("nan"), "target_expression": float("nan"), "n_cells": 0}
    target = matrix[:, index].toarray().ravel()
    rows = np.repeat(np.arange(n), np.diff(matrix.indptr))
    ahead = np.bincount(rows[matrix.data > target[rows]], minlength=n)
    present = (target != 0) & (ahead < top_k)
    rank = np.where(present, ahead, top_k)
    return {"target_presence": float(present.mean()), "target_rank": float(rank.mean()),
            "target_expression": float(target.mean()), "n_cells": n}


def knockdown_diagnostics(
    samples: ad.AnnData, real: ad.AnnData, column: str, control_label: str, top_k: int | None = None,
    min_real_drop: float = 0.1, reproduced_fraction: float = 0.5, combination_separator: str | None = "+",
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Does the model knock the target down? For each temperature (``model_T<t>``), each
    perturbation p of the samples and each of its targets (one; several for a combination, read
    with ``combination_separator``), the target gene's presence share (non-zero among the first
    ``top_k`` genes, the real cells' sentence length; None: every gene), mean position (absent =
    ``top_k``) and mean expression in (control) the real test control cells, (real) the real cells
    of p, (model) the samples for p and (reference) the model's own control-label samples on p's
    prompts (same ``control_cell``; all of that temperature's when none match) or, when the samples
    have no control-label rows, its samples for the other perturbations. Presence, rank and expression are read from the rebuilt
    expression alike in every group, so a gene past the rank fit's zero counts as absent
    everywhere.

    A knockdown counts as reproduced when the model's drop in presence (reference − model) is at
    least ``reproduced_fraction`` of the real drop (control − real), and only where the real drop
    is clear (≥ ``min_real_drop``); targets whose real knockdown is not clear, or that are not
    among the genes (skipped, and logged), are counted apart and left out of the share. Counts and
    means are over (perturbation, target) pairs: a single perturbation is one.

    Returns the table (one row per method, perturbation and ``target``: ``<group>_<statistic>``,
    ``<group>_n_cells``, the drops, ``reference``, ``status``: scored, real_knockdown_not_clear,
    target_not_a_gene or no_reference, and ``reproduced`` 1/0 where scored; for a plot of on-target
    presence per perturbation) and the flat metrics, means over the perturbations whose target is a
    gene: ``knockdown.control.<statistic>``, ``knockdown.real.<statistic>``,
    ``knockdown.<method>.<statistic>``, ``knockdown.<method>.own_control_<statistic>`` (or
    ``other_perturbations_<statistic>`` without control-label samples),
    ``knockdown.<method>.reproduced_share`` (NaN when nothing is scored) and the counts
    ``knockdown.n_perturbations_scored``, ``knockdown.n_perturbations_real_knockdown_not_clear``,
    ``knockdown.n_perturbations_target_not_a_gene``; statistics are ``target_presence``,
    ``target_rank`` and ``target_expression``."""
    _require_sample_columns(samples, (SAMPLE_PERTURBATION, "temperature"))
    genes = list(samples.var_names)
    if list(real.var_names) != genes:
        raise C2SValueError("the samples and the real test cells must have the same genes")
    top_k = len(genes) if top_k is None else int(top_k)
    targets = ScreenTargets(genes, ScreenColumns(perturbation=column, control_label=control_label, batch=None,
                                                 gene_symbol=None, combination_separator=combination_separator))
    labels = samples.obs[SAMPLE_PERTURBATION].astype(str).to_numpy()
    temperatures = samples.obs["temperature"].to_numpy(dtype=float)
    prompts = samples.obs["control_cell"].astype(str).to_numpy() if "control_cell" in samples.obs.columns else None
    matrix = sp.csr_matrix(samples.X)
    real_labels = real.obs[column].astype(str).to_numpy()
    real_matrix = sp.csr_matrix(real.X)
    real_controls = real_matrix[real_labels == control_label]
    if real_controls.shape[0] == 0:
        raise C2SValueError(f"the real test cells have no control cell ('{control_label}')")
    names = sorted(set(labels) - {control_label})
    absent = [name for name in names if name not in set(real_labels)]
    if absent:
        raise C2SValueError(f"perturbations {absent} have samples but no real test cells")
    # each target of each perturbation and its gene's column (None: not among the genes)
    pairs = {name: list(zip(targets.targets(name), targets.positions(name))) or [(name, None)] for name in names}
    real_statistics = {(name, target): (_target_statistics(real_controls, i, top_k),
                                        _target_statistics(real_matrix[real_labels == name], i, top_k))
                       for name in names for target, i in pairs[name] if i is not None}
    skipped = sorted({f"{target} (of {name})" if target != name else target
                      for name in names for target, i in pairs[name] if i is None})
    if skipped:
        logger.info("the knockdown diagnostics skip the targets not among the genes (%d): %s (counted in "
                    "knockdown.n_perturbations_target_not_a_gene)", len(skipped), ", ".join(skipped))
    rows = []
    for temperature in sorted(set(temperatures[labels != control_label])):
        at_t = temperatures == temperature
        own = at_t & (labels == control_label)
        for name in sorted(set(labels[at_t]) - {control_label}):
            mine = at_t & (labels == name)
            if own.any():
                same_prompts = own & np.isin(prompts, prompts[mine]) if prompts is not None else np.zeros_like(own)
                reference, kind = (same_prompts, "own_control_same_prompts") if same_prompts.any() else (own, "own_control")
            else:
                reference, kind = at_t & ~mine, "other_perturbations"
            for target, i in pairs[name]:
                row = {"method": model_method(temperature), "temperature": temperature, "perturbation": name,
                       "target": target, "target_is_gene": i is not None, "reference": kind}
                if i is None:
                    row["status"] = "target_not_a_gene"
                    rows.append(row)
                    continue
                groups = (*real_statistics[name, target], _target_statistics(matrix[mine], i, top_k),
                          _target_statistics(matrix[reference], i, top_k))
                for group, statistics in zip(KNOCKDOWN_GROUPS, groups):
                    row.update({f"{group}_{key}": value for key, value in statistics.items()})
                row["real_presence_drop"] = row["control_target_presence"] - row["real_target_presence"]
                row["model_presence_drop"] = row["reference_target_presence"] - row["model_target_presence"]
                if row["real_presence_drop"] < min_real_drop:
                    row["status"] = "real_knockdown_not_clear"
                elif not np.isfinite(row["model_presence_drop"]):
                    row["status"] = "no_reference"  # one perturbation and no control-label samples: nothing to compare with
                else:
                    row["status"] = "scored"
                    row["reproduced"] = float(row["model_presence_drop"] >= reproduced_fraction * row["real_presence_drop"])
                rows.append(row)
    statistic_columns = [f"{group}_{key}" for group in KNOCKDOWN_GROUPS for key in (*KNOCKDOWN_STATISTICS, "n_cells")]
    table = pd.DataFrame(rows, columns=["method", "temperature", "perturbation", "target", "target_is_gene", "reference",
                                        "status", "reproduced", "real_presence_drop", "model_presence_drop",
                                        *statistic_columns])
    table["target_is_gene"] = table["target_is_gene"].astype(bool)
    table["reproduced"] = table["reproduced"].astype(float)

    # counts over the (perturbation, target) pairs, whatever the temperature: whether a gene, and the real drop, do
    # not depend on it
    by_perturbation = table.drop_duplicates(["perturbation", "target"])
    is_gene = by_perturbation["target_is_gene"].to_numpy()
    clear = is_gene & (by_perturbation["real_presence_drop"].to_numpy(dtype=float) >= min_real_drop)
    metrics = {"knockdown.n_perturbations_scored": float(clear.sum()),
               "knockdown.n_perturbations_real_knockdown_not_clear": float((is_gene & ~clear).sum()),
               "knockdown.n_perturbations_target_not_a_gene": float((~is_gene).sum())}
    gene_rows = table[table["target_is_gene"]]
    if gene_rows.empty:
        return table, metrics
    for statistic in KNOCKDOWN_STATISTICS:
        for group in ("control", "real"):
            metrics[f"knockdown.{group}.{statistic}"] = float(
                gene_rows.drop_duplicates(["perturbation", "target"])[f"{group}_{statistic}"].mean())
    for method, part in gene_rows.groupby("method", sort=False):
        reference = "other_perturbations" if (part["reference"] == "other_perturbations").all() else "own_control"
        for statistic in KNOCKDOWN_STATISTICS:
            metrics[f"knockdown.{method}.{statistic}"] = float(part[f"model_{statistic}"].mean())
            metrics[f"knockdown.{method}.{reference}_{statistic}"] = float(part[f"reference_{statistic}"].mean())
        scored = part.loc[part["status"] == "scored", "reproduced"]
        metrics[f"knockdown.{method}.reproduced_share"] = float(scored.mean()) if len(scored) else float("nan")
    return table, metrics


class PosteriorEvaluation(NamedTuple):
    """What ``evaluate_posterior`` returns: the scores (one row per method and perturbation), their
    summary (one row per method), the flat metrics (``<method>.<metric>``, ...) and the on-target
    knockdown table of ``knockdown_diagnostics`` (one row per model method and perturbation)."""

    scores: pd.DataFrame
    summary: pd.DataFrame
    metrics: dict[str, float]
    knockdown: pd.DataFrame


def evaluate_posterior(
    samples: ad.AnnData,
    real: ad.AnnData,
    train: ad.AnnData,
    column: str,
    control_label: str,
    truth: pd.DataFrame | None = None,
    top_n_de: int = 20,
    interval: float = 0.9,
    baseline_pca_components: int = 10,
    seed: int = 0,
    threads: int | None = None,
    top_k_genes: int | None = None,
    n_coexpression_neighbours: int = 3,
    combination_separator: str | None = "+",
) -> PosteriorEvaluation:
    """The model (one method ``model_T<t>`` per sampling temperature) and the baselines scored on
    the same held-out perturbations.

    ``samples``: posterior samples as expression (``.obs`` ``perturbation`` and ``temperature``;
    ``control_cell`` ties a sample to its prompt); ``real`` / ``train``: the test and training cells
    with their controls (``sentence_space_cells``), in the same space. Samples whose perturbation
    is ``control_label`` are the model's own "no perturbation" answers: they are neither real
    controls nor a perturbation to score, only the reference of ``scores_vs_own_control`` and of
    ``knockdown_diagnostics``. Only the perturbations that have samples are scored, on the genes
    that some real or sampled (perturbed) cell expresses (genes absent everywhere would add (0, 0)
    points). With the simulator's ``truth`` (a ``gene`` column and one column per perturbation) the
    held-out cells themselves are scored against it too: the ceiling of
    ``pearson_delta_simulated_truth`` in this space. Beside the raw metrics (``score_methods``,
    with the centred ``centered_pearson_delta`` and ``energy_distance``): cell-eval's data ceiling
    of the held-out cells (``cell_eval_ceiling.<metric>``) and every method's VCC-style score
    against the mean baseline (``<method>.<metric>_normalized``, ``normalized_scores``). With
    control-label samples, the model methods also get ``<method>.pearson_delta_vs_own_control``
    (and ``..._simulated_truth``, ``own_control_on_same_prompts``, ``n_own_control_samples``);
    without them these are absent. The knockdown diagnostics (``knockdown.*``, ``top_k_genes``:
    the sentences' length, None for every gene) are in the metrics and their table is returned.
    The baselines are also scored on every held-out perturbation, sampled or not, with their
    mean-based metrics (``baseline_mean_scores``: ``all_heldout.<method>.<metric>``,
    ``all_heldout.n_perturbations``). A perturbation's targets are read with
    ``combination_separator`` (``ScreenTargets``); how many of the scored perturbations are
    combinations (``targets.n_combination_perturbations``) or name a target not among the genes
    (``targets.n_perturbations_target_not_a_gene``) is counted, and each baseline's fallbacks for them are
    logged and counted (``report_baseline_rules``). Returns a ``PosteriorEvaluation``.
    """
    threads = threads or min(2, os.cpu_count() or 1)
    genes = list(samples.var_names)
    if list(real.var_names) != genes or list(train.var_names) != genes:
        raise C2SValueError("the samples, the real test cells and the training cells must have the same genes")
    _require_sample_columns(samples, (SAMPLE_PERTURBATION, "temperature"))
    is_own_control = (samples.obs[SAMPLE_PERTURBATION].astype(str) == control_label).to_numpy()
    perturbed = samples[~is_own_control]
    evaluated = sorted(set(perturbed.obs[SAMPLE_PERTURBATION].astype(str)))
    if not evaluated:
        raise C2SValueError(f"the posterior samples hold only the control label '{control_label}': no perturbation to score")
    labels = real.obs[column].astype(str)
    unseen = sorted(set(evaluated) - set(labels))
    if unseen:
        raise C2SValueError(f"perturbations {unseen} have samples but no real test cells")
    every_heldout = real
    real = real[labels.isin(evaluated + [control_label]).to_numpy()].copy()
    is_control = (real.obs[column].astype(str) == control_label).to_numpy()
    if not is_control.any():
        raise C2SValueError(f"the real test cells have no control cell ('{control_label}')")
    controls = real[is_control].copy()
    counts = real.obs[column].astype(str).value_counts()
    predictions: dict[str, ad.AnnData] = {}
    for temperature in sorted(perturbed.obs["temperature"].unique()):
        part = perturbed[(perturbed.obs["temperature"] == temperature).to_numpy()]
        cells = labelled_cells(part.X, part.obs[SAMPLE_PERTURBATION].astype(str).tolist(), genes, f"model-T{temperature}", column)
        predictions[model_method(temperature)] = ad.concat([cells, controls])
    baselines = fit_baselines(train, column, control_label, seed=seed, n_components=baseline_pca_components,
                              n_coexpression_neighbours=n_coexpression_neighbours,
                              combination_separator=combination_separator)
    predictions.update(baseline_predictions(
        train, controls, {name: int(counts[name]) for name in evaluated}, column, control_label, seed=seed,
        baselines=baselines,
    ))
    # the genes scored do not depend on the control-label samples: the scores of the rest stay as they were
    used = np.asarray((real.X != 0).sum(axis=0)).ravel() + np.asarray((train.X != 0).sum(axis=0)).ravel()
    used += np.asarray((perturbed.X != 0).sum(axis=0)).ravel()
    keep = [g for g, n in zip(genes, used) if n > 0]
    truth = _truth_by_gene(truth)
    scores = score_methods(
        real[:, keep], {m: p[:, keep] for m, p in predictions.items()}, column, control_label,
        top_n_de=top_n_de, interval=interval, truth=truth, threads=threads, seed=seed,
    )
    own_control = scores_vs_own_control(samples[:, keep], real[:, keep], column, control_label, truth=truth)
    if not own_control.empty:
        scores = scores.merge(own_control, on=["method", "perturbation"], how="left")
    summary = summarize_scores(scores)
    metrics = {"n_genes_scored": float(len(keep)), "n_heldout_perturbations": float(len(evaluated)),
               "n_heldout_perturbations_not_sampled": float(len(set(labels) - set(evaluated) - {control_label}))}
    targets = ScreenTargets(genes, baselines.columns)
    metrics["targets.n_combination_perturbations"] = float(sum(targets.is_combination(name) for name in evaluated))
    metrics["targets.n_perturbations_target_not_a_gene"] = float(
        sum(bool(targets.not_genes(name)) or not targets.targets(name) for name in evaluated))
    metrics.update(report_baseline_rules(baseline_rules(baselines, evaluated)))
    if "seconds_per_sample" in samples.obs.columns:  # the sampling run's cost, as sample_test_posterior records it
        metrics["posterior.seconds_per_sample"] = float(samples.obs["seconds_per_sample"].astype(float).mean())
        metrics["posterior.n_samples"] = float(samples.n_obs)
    if is_own_control.any():
        metrics["posterior.n_own_control_samples"] = float(is_own_control.sum())
    if truth is not None:
        # top-k sentences hide genes below rank k, so even the real cells do not reach the truth
        observed = score_methods(real[:, keep], {"observed": real[:, keep]}, column, control_label,
                                 top_n_de=top_n_de, truth=truth, threads=threads, seed=seed)
        metrics["observed_cells.pearson_delta_simulated_truth"] = float(observed["pearson_delta_simulated_truth"].mean())
    metrics.update(cell_eval_ceiling(real[:, keep].copy(), column, control_label, threads=threads, seed=seed))
    metrics.update(normalized_scores(summary))
    own_control_methods = set(own_control["method"]) if not own_control.empty else set()
    for _, row in summary.iterrows():
        for metric, value in row.items():
            # a baseline has no own control: its empty cells in the table are not metrics
            if metric != "method" and (metric not in OWN_CONTROL_METRICS or row["method"] in own_control_methods):
                metrics[f"{row['method']}.{metric}"] = float(value)
    knockdown, knockdown_metrics = knockdown_diagnostics(samples, real, column, control_label, top_k=top_k_genes,
                                                         combination_separator=combination_separator)
    metrics.update(knockdown_metrics)
    # the baselines on every held-out perturbation, sampled or not (their mean-based metrics)
    every = baseline_mean_scores(every_heldout, train, column, control_label, truth=truth, interval=interval, seed=seed,
                                 baselines=baselines)
    metrics["all_heldout.n_perturbations"] = float(every["perturbation"].nunique())
    for method, row in summarize_scores(every).set_index("method").iterrows():
        for metric, value in row.items():
            metrics[f"all_heldout.{method}.{metric}"] = float(value)
    return PosteriorEvaluation(scores, summary, metrics, knockdown)


def posterior_embedding(
    samples: ad.AnnData, real: ad.AnnData, column: str, control_label: str, max_perturbations: int = 6,
    seed: int = 0, n_neighbors: int = 15,
) -> ad.AnnData:
    """Posterior samples and real cells in one shared space (PCA, then kNN and UMAP with
    ``preprocessing.embed_expression``), fitted on the samples of the first ``max_perturbations``
    perturbations (sorted), their real cells and the real control cells.

    Returns those cells (sparse, samples first) with ``.obs`` ``perturbation``, ``temperature``
    (NaN for a real cell) and ``is_sample``, and ``.obsm`` ``X_pca`` and ``X_umap``.
    """
    sample_labels = samples.obs[SAMPLE_PERTURBATION].astype(str)
    names = sorted(set(sample_labels))[:max_perturbations]
    if not names:
        raise C2SValueError("there are no posterior samples to embed")
    chosen = samples[sample_labels.isin(names).to_numpy()]
    real_labels = real.obs[column].astype(str)
    chosen_real = real[real_labels.isin(names + [control_label]).to_numpy()]
    obs = pd.DataFrame({
        SAMPLE_PERTURBATION: np.concatenate([chosen.obs[SAMPLE_PERTURBATION].astype(str).to_numpy(),
                                             chosen_real.obs[column].astype(str).to_numpy()]),
        "temperature": np.concatenate([chosen.obs["temperature"].to_numpy(dtype=float), np.full(chosen_real.n_obs, np.nan)]),
        "is_sample": np.arange(chosen.n_obs + chosen_real.n_obs) < chosen.n_obs,
    })
    obs.index = [f"sample-{i}" for i in range(chosen.n_obs)] + [f"real-{i}" for i in range(chosen_real.n_obs)]
    matrix = sp.vstack([sp.csr_matrix(chosen.X), sp.csr_matrix(chosen_real.X)]).tocsr().astype(np.float32)
    combined = ad.AnnData(matrix, obs=obs, var=pd.DataFrame(index=samples.var_names.astype(str)))
    return embed_expression(combined, n_comps=max(2, min(30, combined.n_obs - 1, combined.n_vars - 1)),
                            n_neighbors=n_neighbors, seed=seed)


def lowest_temperature_knockdown(knockdown: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The knockdown table's rows of the lowest temperature's method, one per target and indexed by it
    (a combination's targets as ``"A (A+B)"``), and that method's name: what the presence plot draws."""
    first = sorted(knockdown["method"].unique(), key=lambda m: float(m.split("_T")[-1]) if "_T" in m else 0.0)[0]
    table = knockdown[knockdown["method"] == first]
    if "target" not in table.columns:
        return table.set_index("perturbation"), first
    names, targets = table["perturbation"].astype(str), table["target"].astype(str)
    return table.set_axis(names.where(targets == names, targets + " (" + names + ")").to_numpy(), axis=0), first
