"""Nodes of the evaluation pipeline."""

from __future__ import annotations

import logging
from typing import Any

import anndata as ad
import matplotlib.pyplot as plt
import pandas as pd
from datasets import Dataset
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from c2s_kedro.core import plotting
from c2s_kedro.core.inference import generate_texts, match_answer, predict_labels
from c2s_kedro.core.models import LanguageModel
from c2s_kedro.core.prompts import cell_type_prediction_prompts, count_tokens

logger = logging.getLogger(__name__)
SETTINGS = "conf/base/parameters_evaluation.yml"
METHODS = ("generation", "label_scoring", "baseline")


def build_evaluation_prompts(
    cell_sentences: Dataset, data_split: dict[str, Any], model: LanguageModel, params: dict[str, Any]
) -> dict[str, Any]:
    """Cell-type-prediction prompts of the test cells (templates drawn with the seed), fitted to
    the context with room for the longest answer, plus the known label set (train labels)."""
    label = params["label_column"]
    if label not in cell_sentences.column_names:
        raise KeyError(
            f"evaluation.label_column '{label}' is not a column of cell_sentences; available: "
            f"{', '.join(cell_sentences.column_names)}. Set it in {SETTINGS}."
        )
    table = cell_sentences.select_columns(["cell_name", "cell_sentence", label, *(
        [params["organism_column"]] if params.get("organism_column") in cell_sentences.column_names else [])]).to_pandas()
    table = table.set_index("cell_name")
    labels = sorted(table.loc[data_split["train"], label].dropna().astype(str).unique())
    test = table.loc[data_split["test"]]
    longest_answer = int(count_tokens(model.tokenizer, [f" {name}." for name in labels]).max()) + 1
    organism_column = params.get("organism_column")
    prompts, _, _ = cell_type_prediction_prompts(
        test["cell_sentence"].tolist(),
        test[organism_column].tolist() if organism_column in test.columns else None,
        model.tokenizer,
        model.context_length - longest_answer - params.get("extra_new_tokens", 2),
        template_index=None,
        top_k_genes=params.get("top_k_genes"),
        seed=params.get("seed", 0),
    )
    unseen = sorted(set(test[label].astype(str)) - set(labels))
    if unseen:
        logger.warning("test cells of types never seen in training: %s (they cannot be predicted right)", unseen)
    return {"cell_name": list(test.index), "label": test[label].astype(str).tolist(), "prompt": prompts, "labels": labels}


def predict_by_generation(evaluation_prompts: dict[str, Any], model: LanguageModel, params: dict[str, Any]) -> pd.DataFrame:
    """Greedy batched generation of the answer, normalized and matched to the label set (None
    when the answer is not a known label). The label answers are given to the decoder as expected
    answers: once the model has begun one, the rest is checked in a single pass instead of one pass
    per token; the model still writes whatever it would have written without them."""
    labels = evaluation_prompts["labels"]
    answers_in_training_form = [f" {name}." for name in labels]
    max_new = int(count_tokens(model.tokenizer, answers_in_training_form).max()) + params.get("extra_new_tokens", 2)
    answers = generate_texts(model, evaluation_prompts["prompt"], max_new_tokens=max_new, batch_size=params.get("batch_size", 16),
                             expected_answers=answers_in_training_form)
    return pd.DataFrame({
        "cell_name": evaluation_prompts["cell_name"],
        "label": evaluation_prompts["label"],
        "answer": answers,
        "prediction": [match_answer(answer, labels) for answer in answers],
    })


def predict_by_label_scoring(evaluation_prompts: dict[str, Any], model: LanguageModel, params: dict[str, Any]) -> pd.DataFrame:
    """The most likely known label of each cell, with the probability of every label."""
    labels = evaluation_prompts["labels"]
    predicted, probabilities = predict_labels(model, evaluation_prompts["prompt"], labels, batch_size=params.get("batch_size", 16))
    table = pd.DataFrame({"cell_name": evaluation_prompts["cell_name"], "label": evaluation_prompts["label"], "prediction": predicted})
    return pd.concat([table, pd.DataFrame(probabilities, columns=[f"p({name})" for name in labels])], axis=1)


def predict_by_baseline(processed_adata: ad.AnnData, data_split: dict[str, Any], params: dict[str, Any]) -> pd.DataFrame:
    """Logistic regression on the log-normalized expression, fit on train cells, applied to test."""
    label = params["label_column"]
    train, test = processed_adata[data_split["train"]], processed_adata[data_split["test"]]
    classifier = LogisticRegression(max_iter=params.get("baseline_max_iter", 2000), C=params.get("baseline_C", 1.0))
    classifier.fit(train.X, train.obs[label].astype(str))
    return pd.DataFrame({
        "cell_name": list(test.obs_names), "label": test.obs[label].astype(str).tolist(), "prediction": classifier.predict(test.X),
    })


def score_predictions(
    generation: pd.DataFrame, label_scoring: pd.DataFrame, baseline: pd.DataFrame, evaluation_prompts: dict[str, Any]
) -> tuple[dict[str, float], pd.DataFrame, dict[str, plt.Figure], pd.DataFrame]:
    """Accuracy and macro-F1 of each method on the same cells, a per-class table, confusion
    matrices, and all predictions side by side."""
    labels = evaluation_prompts["labels"]
    tables = {"generation": generation, "label_scoring": label_scoring, "baseline": baseline}
    metrics: dict[str, float] = {"n_test_cells": float(len(generation))}
    per_class, figures = [], {}
    for method, table in tables.items():
        truth = table["label"].astype(str)
        predicted = table["prediction"].fillna("<not a label>").astype(str)
        metrics[f"{method}_accuracy"] = float(accuracy_score(truth, predicted))
        metrics[f"{method}_macro_f1"] = float(f1_score(truth, predicted, labels=labels, average="macro", zero_division=0))
        precision, recall, f1, support = precision_recall_fscore_support(truth, predicted, labels=labels, zero_division=0)
        per_class.append(pd.DataFrame({"method": method, "cell_type": labels, "precision": precision, "recall": recall, "f1": f1, "support": support}))
        figures[f"{method}.png"] = plotting.confusion_matrix_plot(
            confusion_matrix(truth, predicted, labels=labels), labels, f"{method}: accuracy {metrics[f'{method}_accuracy']:.2f}"
        )
    metrics["generation_answers_not_a_label"] = float(generation["prediction"].isna().mean())
    combined = generation[["cell_name", "label"]].copy()
    for method, table in tables.items():
        combined[f"{method}_prediction"] = table["prediction"].to_numpy()
    combined["generation_answer"] = generation["answer"].to_numpy()
    logger.info(
        "test accuracy: generation %.3f, label scoring %.3f, baseline %.3f",
        metrics["generation_accuracy"], metrics["label_scoring_accuracy"], metrics["baseline_accuracy"],
    )
    return metrics, pd.concat(per_class, ignore_index=True), figures, combined
