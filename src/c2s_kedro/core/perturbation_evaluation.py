"""Scoring predicted perturbation responses against held-out cells, and the baselines a model
must beat.

Every method delivers predicted *cells* for each held-out perturbation (the model: its posterior
samples; a baseline: the cells it would predict), in the same expression space as the real cells.
Real cells enter that space as the model sees them (``sentence_space_cells``: top-k sentences
turned back into expression). `cell-eval` computes the metrics it has (Pearson of the change,
MSE, DE-gene overlap, ...); the top-20-DE Pearson, the posterior's calibration and the agreement
with a simulator's truth are computed here. ``evaluate_posterior`` scores the model and the
baselines; ``posterior_embedding`` puts samples and real cells in one PCA/UMAP space for plotting.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
from datasets import Dataset
from sklearn.decomposition import PCA
from sklearn.linear_model import Ridge

from c2s_kedro.core.preprocessing import embed_expression
from c2s_kedro.core.sentences import CELL_NAME, CELL_SENTENCE, RankFit, reconstruct_expression

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


class LinearAdditiveBaseline:
    """Predicted change of a perturbation = its training change when it was seen in training
    (additive); otherwise a ridge regression from the target gene's embedding (its loadings on the
    principal components of the control cells) to the change, plus the average knockdown of a
    target on itself. A target not among the genes gets the average change."""

    def __init__(self, n_components: int = 10, alpha: float = 1.0) -> None:
        self.n_components = n_components
        self.alpha = alpha

    def fit(self, controls: np.ndarray, deltas: dict[str, np.ndarray], genes: Sequence[str]) -> LinearAdditiveBaseline:
        self.genes = list(genes)
        self.index = {g: i for i, g in enumerate(self.genes)}
        self.deltas = deltas
        n_components = max(1, min(self.n_components, controls.shape[0] - 1, controls.shape[1] - 1))
        self.embedding = PCA(n_components=n_components, random_state=0).fit(controls).components_.T  # genes x k
        names = list(deltas)
        targets = np.array([self._features(name) for name in names])
        self.ridge = Ridge(alpha=self.alpha).fit(targets, np.array([deltas[n] for n in names]))
        self_effects = [deltas[n][self.index[n]] for n in names if n in self.index]
        self.self_effect = float(np.mean(self_effects)) if self_effects else 0.0
        self.mean_delta = np.mean([deltas[n] for n in names], axis=0)
        return self

    def _features(self, name: str) -> np.ndarray:
        i = self.index.get(name)
        return self.embedding[i] if i is not None else np.zeros(self.embedding.shape[1])

    def predict(self, name: str) -> np.ndarray:
        if name in self.deltas:
            return self.deltas[name]
        if name not in self.index:
            return self.mean_delta
        delta = self.ridge.predict(self._features(name)[None, :])[0]
        delta[self.index[name]] = self.self_effect
        return delta


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
        raise KeyError(f"column(s) {missing} are not in the cell sentences (columns: {', '.join(cell_sentences.column_names)})")
    index = pd.Index(cell_sentences.select_columns([CELL_NAME]).with_format("arrow")[:].column(CELL_NAME).to_pylist())
    positions = index.get_indexer(list(names))
    if (positions < 0).any():
        absent = [name for name, at in zip(names, positions) if at < 0]
        raise ValueError(
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


BASELINE_PREFIXES = {"control_mean": "control_mean", "train_perturbed_mean": "train_mean", "linear_additive": "linear"}


def _baseline_cells(
    train: ad.AnnData, test_controls: ad.AnnData, test_counts: dict[str, int], column: str, control_label: str,
    seed: int = 0, n_components: int = 10,
):
    """(method, perturbation, predicted cells) of the three baselines, one perturbation at a time
    in the order of ``test_counts`` (``baseline_predictions`` describes them)."""
    rng = np.random.default_rng(seed)
    genes = list(train.var_names)
    labels = train.obs[column].astype(str).to_numpy()
    is_control = labels == control_label
    if not is_control.any() or is_control.all():
        raise ValueError("the training part needs both control and perturbed cells to build the baselines")
    means = group_means(train, column)
    control_mean = means[control_label]
    deltas = {name: means[name] - control_mean for name in np.unique(labels[~is_control])}
    # The gene embedding is scikit-learn's PCA of the training controls; on dense input it picks the
    # randomized solver (sparse input would switch it to ARPACK and change the baseline's numbers),
    # so at most EMBEDDING_CELLS of them are densified: a sample when a screen has more.
    controls = np.flatnonzero(is_control)
    if controls.size > EMBEDDING_CELLS:
        controls = np.sort(np.random.default_rng([seed, 3]).choice(controls, size=EMBEDDING_CELLS, replace=False))
    linear = LinearAdditiveBaseline(n_components=n_components).fit(_dense_rows(train.X[controls]), deltas, genes)
    controls_x = sp.csr_matrix(test_controls.X)
    perturbed_x = sp.csr_matrix(train.X)[~is_control]
    for name, n in test_counts.items():
        drawn = controls_x[rng.integers(0, controls_x.shape[0], size=n)]  # sparse, as the cells are
        yield "control_mean", name, drawn
        yield "train_perturbed_mean", name, perturbed_x[rng.integers(0, perturbed_x.shape[0], size=n)]
        # a shift of every gene: these cells are dense by nature, one perturbation's at a time
        yield "linear_additive", name, np.maximum(_dense_rows(drawn) + linear.predict(name)[None, :], 0.0)


def baseline_predictions(
    train: ad.AnnData, test_controls: ad.AnnData, test_counts: dict[str, int], column: str, control_label: str,
    seed: int = 0, n_components: int = 10,
) -> dict[str, ad.AnnData]:
    """Predicted cells of each held-out perturbation (``test_counts``: name -> cells to predict)
    for the three baselines, each with ``test_controls`` as its control cells:

    - ``control_mean``: no change; control cells stand in for the perturbed ones.
    - ``train_perturbed_mean``: cells drawn from every perturbed cell of the training part.
    - ``linear_additive``: control cells shifted by ``LinearAdditiveBaseline``'s change.
    """
    genes = list(train.var_names)
    parts: dict[str, list[ad.AnnData]] = {method: [] for method in BASELINE_PREFIXES}
    for method, name, cells in _baseline_cells(train, test_controls, test_counts, column, control_label, seed, n_components):
        parts[method].append(labelled_cells(cells, name, genes, f"{BASELINE_PREFIXES[method]}-{name}", column))
    return {method: ad.concat(cells + [test_controls]) for method, cells in parts.items()}


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 2 or np.std(a) == 0 or np.std(b) == 0:
        return float("nan")  # undefined for a constant prediction (e.g. "no change")
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
        raise ValueError(f"no '{baseline}' among the methods ({', '.join(map(str, table.index))}): nothing to normalize to")
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
    ``pearson_delta_simulated_truth``.
    """
    real = real[:, sorted(real.var_names)].copy()
    real_means = group_means(real, column)
    perturbations = sorted(set(real_means) - {control_label})
    rows = []
    de_real = None
    for method, predicted in predictions.items():
        predicted = predicted[:, list(real.var_names)].copy()
        missing = sorted(set(perturbations) - set(predicted.obs[column].astype(str)))
        if missing:
            raise ValueError(f"method '{method}' has no predicted cells for {missing}")
        results, de_real = _cell_eval(predicted, real, column, control_label, de_real, threads)
        de_table = de_real.to_pandas()
        predicted_means = group_means(predicted, column)
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
            if truth is not None and name in truth.columns:
                shared = [g for g in real.var_names if g in truth.index]
                index = [real.var_names.get_loc(g) for g in shared]
                row["pearson_delta_simulated_truth"] = _pearson(predicted_delta[index], truth.loc[shared, name].to_numpy())
            row["n_predicted_cells"] = int(np.count_nonzero(labels == name))
            rows.append(row)
    return pd.DataFrame(rows)


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
    interval: float = 0.9, seed: int = 0, n_components: int = 10,
) -> pd.DataFrame:
    """The baselines on every held-out perturbation of ``real`` (its perturbed and control cells),
    with the metrics that need only each perturbation's mean: cell-eval's ``pearson_delta``,
    ``mse``, ``mse_delta`` and ``discrimination_score_l1`` computed as cell-eval does (pseudobulk
    means, the change from the controls' mean, L1 ranks without the target gene), ``calibration``
    and, with ``truth`` (indexed by gene), ``pearson_delta_simulated_truth``. Predicted cells are
    made and reduced one perturbation at a time, so a screen's hundreds of held-out perturbations
    never hold every baseline's cells (the linear baseline's are dense) at once; cell-eval's
    DE-based metrics (a test per gene and perturbation) are not computed here. One row per
    (method, perturbation), on the genes some real test or training cell expresses."""
    labels = real.obs[column].astype(str)
    is_control = (labels == control_label).to_numpy()
    if not is_control.any():
        raise ValueError(f"the real test cells have no control cell ('{control_label}')")
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
    for method, name, cells in _baseline_cells(train, controls, {n: int(counts[n]) for n in names}, column, control_label,
                                               seed, n_components):
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
    for method, deltas in predicted.items():
        for name in names:
            include = np.flatnonzero(genes != name)  # as cell-eval: without the target gene
            distances = np.abs(real_delta[:, include] - deltas[position[name], include]).sum(axis=1)
            rank = int(np.flatnonzero(np.argsort(distances) == position[name])[0])
            rows[method, name]["discrimination_score_l1"] = 1.0 - rank / len(names)
    return pd.DataFrame(list(rows.values()))


def _truth_by_gene(truth: pd.DataFrame | None) -> pd.DataFrame | None:
    """The simulator's truth (a ``gene`` column, one column per perturbation) indexed by gene; None
    for a real screen (no rows)."""
    if truth is None or truth.empty:
        return None
    if "gene" not in truth.columns:
        raise KeyError(f"the simulated truth needs a 'gene' column; it has {', '.join(map(str, truth.columns))}")
    return truth.set_index("gene")


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
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, float]]:
    """The model (one method ``model_T<t>`` per sampling temperature) and the baselines scored on
    the same held-out perturbations.

    ``samples``: posterior samples as expression (``.obs`` ``perturbation`` and ``temperature``);
    ``real`` / ``train``: the test and training cells with their controls (``sentence_space_cells``),
    in the same space. Only the perturbations that have samples are scored, on the genes that some
    real or sampled cell expresses (genes absent everywhere would add (0, 0) points). With the
    simulator's ``truth`` (a ``gene`` column and one column per perturbation) the held-out cells
    themselves are scored against it too: the ceiling of ``pearson_delta_simulated_truth`` in this
    space. Beside the raw metrics: cell-eval's data ceiling of the held-out cells
    (``cell_eval_ceiling.<metric>``) and every method's VCC-style score against the mean baseline
    (``<method>.<metric>_normalized``, ``normalized_scores``). The baselines are also scored on
    every held-out perturbation, sampled or not, with their mean-based metrics
    (``baseline_mean_scores``: ``all_heldout.<method>.<metric>``, ``all_heldout.n_perturbations``).
    Returns the scores (method x
    perturbation), their summary per method and the flat metrics (``<method>.<metric>``).
    """
    threads = threads or min(2, os.cpu_count() or 1)
    genes = list(samples.var_names)
    if list(real.var_names) != genes or list(train.var_names) != genes:
        raise ValueError("the samples, the real test cells and the training cells must have the same genes")
    evaluated = sorted(set(samples.obs[SAMPLE_PERTURBATION].astype(str)))
    labels = real.obs[column].astype(str)
    unseen = sorted(set(evaluated) - set(labels))
    if unseen:
        raise ValueError(f"perturbations {unseen} have samples but no real test cells")
    every_heldout = real
    real = real[labels.isin(evaluated + [control_label]).to_numpy()].copy()
    is_control = (real.obs[column].astype(str) == control_label).to_numpy()
    if not is_control.any():
        raise ValueError(f"the real test cells have no control cell ('{control_label}')")
    controls = real[is_control].copy()
    counts = real.obs[column].astype(str).value_counts()
    predictions: dict[str, ad.AnnData] = {}
    for temperature in sorted(samples.obs["temperature"].unique()):
        part = samples[(samples.obs["temperature"] == temperature).to_numpy()]
        cells = labelled_cells(part.X, part.obs[SAMPLE_PERTURBATION].astype(str).tolist(), genes, f"model-T{temperature}", column)
        predictions[f"model_T{temperature:g}"] = ad.concat([cells, controls])
    predictions.update(baseline_predictions(
        train, controls, {name: int(counts[name]) for name in evaluated}, column, control_label,
        seed=seed, n_components=baseline_pca_components,
    ))
    used = np.asarray((real.X != 0).sum(axis=0)).ravel() + np.asarray((train.X != 0).sum(axis=0)).ravel()
    used += np.asarray((samples.X != 0).sum(axis=0)).ravel()
    keep = [g for g, n in zip(genes, used) if n > 0]
    truth = _truth_by_gene(truth)
    scores = score_methods(
        real[:, keep], {m: p[:, keep] for m, p in predictions.items()}, column, control_label,
        top_n_de=top_n_de, interval=interval, truth=truth, threads=threads,
    )
    summary = summarize_scores(scores)
    metrics = {"n_genes_scored": float(len(keep)), "n_heldout_perturbations": float(len(evaluated)),
               "n_heldout_perturbations_not_sampled": float(len(set(labels) - set(evaluated) - {control_label}))}
    if "seconds_per_sample" in samples.obs.columns:  # the sampling run's cost, as sample_test_posterior records it
        metrics["posterior.seconds_per_sample"] = float(samples.obs["seconds_per_sample"].astype(float).mean())
        metrics["posterior.n_samples"] = float(samples.n_obs)
    if truth is not None:
        # top-k sentences hide genes below rank k, so even the real cells do not reach the truth
        observed = score_methods(real[:, keep], {"observed": real[:, keep]}, column, control_label,
                                 top_n_de=top_n_de, truth=truth, threads=threads)
        metrics["observed_cells.pearson_delta_simulated_truth"] = float(observed["pearson_delta_simulated_truth"].mean())
    metrics.update(cell_eval_ceiling(real[:, keep].copy(), column, control_label, threads=threads, seed=seed))
    metrics.update(normalized_scores(summary))
    for _, row in summary.iterrows():
        for metric, value in row.items():
            if metric != "method":
                metrics[f"{row['method']}.{metric}"] = float(value)
    # the baselines on every held-out perturbation, sampled or not (their mean-based metrics)
    every = baseline_mean_scores(every_heldout, train, column, control_label, truth=truth, interval=interval, seed=seed,
                                 n_components=baseline_pca_components)
    metrics["all_heldout.n_perturbations"] = float(every["perturbation"].nunique())
    for method, row in summarize_scores(every).set_index("method").iterrows():
        for metric, value in row.items():
            metrics[f"all_heldout.{method}.{metric}"] = float(value)
    return scores, summary, metrics


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
        raise ValueError("there are no posterior samples to embed")
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
