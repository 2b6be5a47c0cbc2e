"""Scoring predicted perturbation responses against held-out cells, and the baselines a model
must beat.

Every method delivers predicted *cells* for each held-out perturbation (the model: its posterior
samples; a baseline: the cells it would predict), in the same expression space as the real cells.
`cell-eval` computes the metrics it has (Pearson of the change, MSE, DE-gene overlap, ...); the
top-20-DE Pearson, the posterior's calibration and the agreement with a simulator's truth are
computed here.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.decomposition import PCA
from sklearn.linear_model import Ridge

logger = logging.getLogger(__name__)

CELL_EVAL_METRICS = ("pearson_delta", "mse", "mse_delta", "overlap_at_N", "de_direction_match", "discrimination_score_l1")


def _dense(matrix) -> np.ndarray:
    return np.asarray(matrix.todense() if sp.issparse(matrix) else matrix, dtype=np.float64)


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
    rng = np.random.default_rng(seed)
    genes = list(train.var_names)
    labels = train.obs[column].astype(str).to_numpy()
    is_control = labels == control_label
    if not is_control.any() or is_control.all():
        raise ValueError("the training part needs both control and perturbed cells to build the baselines")
    train_x = _dense(train.X)
    control_mean = train_x[is_control].mean(axis=0)
    deltas = {name: train_x[labels == name].mean(axis=0) - control_mean for name in np.unique(labels[~is_control])}
    linear = LinearAdditiveBaseline(n_components=n_components).fit(train_x[is_control], deltas, genes)
    controls_x = _dense(test_controls.X)
    perturbed_x = train_x[~is_control]
    parts: dict[str, list[ad.AnnData]] = {"control_mean": [], "train_perturbed_mean": [], "linear_additive": []}
    for name, n in test_counts.items():
        drawn = controls_x[rng.integers(0, len(controls_x), size=n)]
        parts["control_mean"].append(labelled_cells(drawn, name, genes, f"control_mean-{name}", column))
        pooled = perturbed_x[rng.integers(0, len(perturbed_x), size=n)]
        parts["train_perturbed_mean"].append(labelled_cells(pooled, name, genes, f"train_mean-{name}", column))
        shifted = np.maximum(drawn + linear.predict(name)[None, :], 0.0)
        parts["linear_additive"].append(labelled_cells(shifted, name, genes, f"linear-{name}", column))
    return {method: ad.concat(cells + [test_controls]) for method, cells in parts.items()}


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 2 or np.std(a) == 0 or np.std(b) == 0:
        return float("nan")  # undefined for a constant prediction (e.g. "no change")
    return float(np.corrcoef(a, b)[0, 1])


def _means(adata: ad.AnnData, column: str) -> dict[str, np.ndarray]:
    labels = adata.obs[column].astype(str).to_numpy()
    x = adata.X
    return {name: np.asarray(x[labels == name].mean(axis=0)).ravel() for name in np.unique(labels)}


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

    with tempfile.TemporaryDirectory() as scratch:
        evaluator = MetricsEvaluator(
            adata_pred=pred, adata_real=real, de_real=de_real, control_pert=control_label, pert_col=column,
            num_threads=threads, outdir=os.path.join(scratch, "cell-eval"),
        )
        # clustering_agreement and pearson_edistance need many cells per perturbation; not reported here
        results, _ = evaluator.compute(profile="full", write_csv=False,
                                       skip_metrics=["clustering_agreement", "pearson_edistance"])
    return results.to_pandas().set_index("perturbation"), evaluator.de_comparison.real.data


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
    real_means = _means(real, column)
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
        predicted_means = _means(predicted, column)
        labels = predicted.obs[column].astype(str).to_numpy()
        for name in perturbations:
            true_delta = real_means[name] - real_means[control_label]
            predicted_delta = predicted_means[name] - predicted_means[control_label]
            top = [real.var_names.get_loc(g) for g in _top_de_genes(de_table, name, top_n_de)]
            row = {"method": method, "perturbation": name}
            for metric in CELL_EVAL_METRICS:
                row[metric] = float(results.at[name, metric]) if metric in results.columns and name in results.index else float("nan")
            row["pearson_delta_top_de"] = _pearson(predicted_delta[top], true_delta[top])
            row["calibration"] = calibration(_dense(predicted.X[labels == name]), real_means[name], interval)
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
