"""The baselines scored on every held-out perturbation from their means (a screen holds hundreds):
the same numbers as cell-eval's on the same cells, and what evaluate_posterior reports of them."""

import numpy as np
import pytest

from c2s_kedro.core.tasks.perturbation.evaluation import (
    MEAN_METRICS,
    _used_genes,
    baseline_mean_scores,
    baseline_predictions,
    evaluate_posterior,
    score_methods,
)
from tests.core.test_perturbation import _posterior_case


def test_mean_scores_of_the_baselines_equal_cell_evals_on_the_same_cells():
    _, real, train, truth = _posterior_case(np.random.default_rng(3))
    truth = truth.set_index("gene")
    labels = real.obs["gene"].astype(str)
    controls = real[(labels == "non-targeting").to_numpy()].copy()
    counts = {name: int((labels == name).sum()) for name in ("A", "B", "D")}
    keep = real.var_names[_used_genes(real.X, train.X)]
    predictions = baseline_predictions(train, controls, counts, "gene", "non-targeting", seed=0, n_components=3)
    expected = score_methods(real[:, keep], {m: p[:, keep] for m, p in predictions.items()}, "gene", "non-targeting",
                             top_n_de=5, truth=truth, threads=1)
    got = baseline_mean_scores(real, train, "gene", "non-targeting", truth=truth, seed=0, n_components=3)
    key = ["method", "perturbation"]
    merged = expected.merge(got, on=key, suffixes=("_cell_eval", "_means"))
    assert len(merged) == len(expected) == 15  # 5 baselines x 3 held-out perturbations
    for metric in (*MEAN_METRICS, "calibration", "pearson_delta_simulated_truth", "n_predicted_cells"):
        np.testing.assert_allclose(merged[f"{metric}_means"], merged[f"{metric}_cell_eval"], rtol=1e-4, atol=1e-7,
                                   err_msg=metric)


def test_the_posterior_reports_the_baselines_on_every_heldout_perturbation():
    """Two of the three held-out perturbations have samples: the comparison is on those two, the
    baselines' all_heldout metrics on all three."""
    samples, real, train, truth = _posterior_case(np.random.default_rng(0))
    _, summary, metrics, _ = evaluate_posterior(samples, real, train, "gene", "non-targeting", truth=truth, top_n_de=5,
                                             baseline_pca_components=3, threads=1)
    assert metrics["n_heldout_perturbations"] == 2 and metrics["all_heldout.n_perturbations"] == 3
    assert metrics["all_heldout.control_mean.n_perturbations"] == 3
    every = baseline_mean_scores(real, train, "gene", "non-targeting", truth=truth.set_index("gene"), n_components=3)
    for method in ("control_mean", "train_perturbed_mean", "linear_additive"):
        assert metrics[f"all_heldout.{method}.mse"] == pytest.approx(every.loc[every["method"] == method, "mse"].mean())
        assert f"all_heldout.{method}.discrimination_score_l1" in metrics
    assert not any(key.startswith("all_heldout.model") for key in metrics)
    assert set(summary["method"]) >= {"model_T0.7", "control_mean"}  # the sampled comparison is unchanged
