"""Metrics and baselines: representations of the same cells compared, cell-type predictions scored."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    silhouette_score,
)
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neighbors import KNeighborsClassifier

from c2s_kedro.core.errors import C2SValueError
from c2s_kedro.core.data.splitting import MIN_SCORED_CELLS
from c2s_kedro.core.data.validation import require_obs_columns
from c2s_kedro.core.prompts.formatting import PromptTemplates, cell_type_prediction_prompts, label_answer_room
from c2s_kedro.core.sentences.conversion import has_label
from c2s_kedro.core.sentences.rank_fit import RankFit, reconstruct_expression

logger = logging.getLogger(__name__)
NOT_A_LABEL = "<not a label>"


def report_scored_cells(n_cells: int, what: str) -> dict[str, float]:
    """``n_scored_cells`` for a stage's metrics, with a warning naming the number when it is below
    ``MIN_SCORED_CELLS``: scores on a handful of cells swing by many points with one cell."""
    if n_cells < MIN_SCORED_CELLS:
        logger.warning("%s scored on %d cells, fewer than %d: too few for the scores to be compared or trusted",
                       what, n_cells, MIN_SCORED_CELLS)
    return {"n_scored_cells": float(n_cells)}


def embedding_quality(
    embedding: np.ndarray, labels: np.ndarray, batches: np.ndarray | None = None, k: int = 15, seed: int = 0
) -> dict[str, float]:
    """How well an embedding separates labels (and mixes batches).

    ``silhouette_label``: mean silhouette of cells by label (higher: labels separate better).
    ``knn_label_accuracy``: share of cells whose label is the majority among their k nearest
    neighbours, in 5-fold cross-validation (kNN classifier). ``silhouette_batch``: silhouette by
    batch (lower: batches better mixed), when batches are given and there are at least two. Label
    scores read the labelled cells only, batch scores the cells with a batch (``has_label``).
    """
    scores: dict[str, float] = {}
    labelled = has_label(labels)
    embedding, labels = embedding[labelled], np.asarray(labels, dtype=object)[labelled].astype(str)
    if batches is not None:
        with_batch = has_label(batches)[labelled]
        embedding_b, batches = embedding[with_batch], np.asarray(batches, dtype=object)[labelled][with_batch].astype(str)
    if len(set(labels)) > 1:
        scores["silhouette_label"] = float(silhouette_score(embedding, labels))
        smallest = min(np.unique(labels, return_counts=True)[1])
        folds = max(2, min(5, smallest))
        classifier = KNeighborsClassifier(n_neighbors=min(k, len(labels) - 1))
        scores["knn_label_accuracy"] = float(
            cross_val_score(classifier, embedding, labels, cv=StratifiedKFold(folds, shuffle=True, random_state=seed)
                            if smallest >= 2 else 2).mean()
        )
    if batches is not None and len(set(batches)) > 1:
        scores["silhouette_batch"] = float(silhouette_score(embedding_b, batches))
    return scores


def embedding_scores(
    cell_embeddings: ad.AnnData, label_key: str, batch_key: str | None = None, k: int = 15, seed: int = 0
) -> dict[str, float]:
    """``embedding_quality`` of the C2S embedding (``obsm['X_c2s']``) and, where present, of the
    expression PCA (``obsm['X_pca_expression']``), as ``c2s_*`` and ``pca_*``; the batch metric
    only when ``batch_key`` is an obs column. Also the cell count, the embedding size, the mean
    number of genes in the prompts (``obs['genes_in_prompt']``), the cells without a label (left out
    of the scores: ``n_cells_without_label``) and those scored (``report_scored_cells``)."""
    require_obs_columns(cell_embeddings, [label_key])
    if batch_key and batch_key not in cell_embeddings.obs.columns:
        logger.info("no obs column '%s': batch metrics skipped", batch_key)
        batch_key = None
    metrics: dict[str, float] = {"n_cells": float(cell_embeddings.n_obs), "embedding_dim": float(cell_embeddings.obsm["X_c2s"].shape[1])}
    representations = {"c2s": cell_embeddings.obsm["X_c2s"]}
    if "X_pca_expression" in cell_embeddings.obsm:
        representations["pca"] = cell_embeddings.obsm["X_pca_expression"]
    labels = cell_embeddings.obs[label_key].to_numpy(dtype=object)
    batches = cell_embeddings.obs[batch_key].to_numpy(dtype=object) if batch_key else None
    labelled = int(has_label(labels).sum())
    metrics["n_cells_without_label"] = float(cell_embeddings.n_obs - labelled)
    if labelled < cell_embeddings.n_obs:
        logger.warning("%d of %d embedded cells have no '%s' label: left out of the label scores",
                       cell_embeddings.n_obs - labelled, cell_embeddings.n_obs, label_key)
    metrics.update(report_scored_cells(labelled, "the embedding is"))
    for name, matrix in representations.items():
        scores = embedding_quality(matrix, labels, batches, k=k, seed=seed)
        metrics.update({f"{name}_{key}": value for key, value in scores.items()})
    metrics["mean_genes_in_prompt"] = float(cell_embeddings.obs["genes_in_prompt"].mean())
    return metrics


def evaluated_test_cells(test_cells: Sequence[str], max_cells: int | None, seed: int = 0) -> list[str]:
    """The test cells an evaluation scores: all of them, or ``max_cells`` drawn with ``seed`` (in
    their split order), so that a large model on a slow machine is evaluated in minutes and every
    method still sees the same cells."""
    cells = list(test_cells)
    if max_cells is None or max_cells >= len(cells):
        return cells
    if max_cells < 1:
        raise C2SValueError(f"max_test_cells must be at least 1 (or null for all test cells), got {max_cells}")
    chosen = np.sort(np.random.default_rng(seed).permutation(len(cells))[:max_cells])
    logger.info("evaluating %d of %d test cells (max_test_cells)", max_cells, len(cells))
    return [cells[i] for i in chosen]


def cell_type_test_prompts(
    table: pd.DataFrame,
    train_cells: Sequence[str],
    test_cells: Sequence[str],
    label_column: str,
    organism_column: str | None,
    tokenizer,
    context_length: int,
    extra_new_tokens: int,
    top_k_genes: int | None = None,
    seed: int = 0,
    templates: PromptTemplates | None = None,
) -> dict[str, Any]:
    """Cell-type-prediction prompts of the test cells of ``table`` (``cell_sentence``, the label and
    optionally the organism, indexed by cell name), templates (ours, or ``templates`` read from a
    file) drawn with ``seed``, fitted to the
    context with room for the longest answer (``prompts.label_answer_room``), the genes each prompt
    carries (``genes_in_prompt``), and the label set: the labels of the train cells, sorted. Test
    cells of a type no train cell has are logged; a test cell without a label (``has_label``) is
    prompted (its prediction is written) with ``label`` None, and left out of the scores."""
    train_labels = table.loc[list(train_cells), label_column]
    labels = sorted(train_labels[has_label(train_labels)].astype(str).unique())
    if not labels:
        raise C2SValueError(f"no train cell has a '{label_column}' label: there is nothing to predict")
    test = table.loc[list(test_cells)]
    prompts, kept, _ = cell_type_prediction_prompts(
        test["cell_sentence"].tolist(),
        test[organism_column].tolist() if organism_column in test.columns else None,
        tokenizer,
        context_length - label_answer_room(tokenizer, labels, extra_new_tokens),
        template_index=None,
        top_k_genes=top_k_genes,
        seed=seed,
        templates=templates,
    )
    truth = known_labels(test[label_column])
    unseen = sorted({label for label in truth if label is not None} - set(labels))
    if unseen:
        logger.warning("test cells of types never seen in training: %s (they cannot be predicted right)", unseen)
    return {"cell_name": list(test.index), "label": truth, "prompt": prompts, "labels": labels,
            "genes_in_prompt": [int(k) for k in kept]}


def known_labels(values: pd.Series | Sequence[Any]) -> list[str | None]:
    """Each value as a label string, or None where there is no label (``has_label``): the truth of
    a prediction table, where a missing label must not read as the label "nan"."""
    present = has_label(values)
    return [str(value) if keep else None for value, keep in zip(values, present)]


def logistic_regression_baseline(
    adata: ad.AnnData, train_cells: Sequence[str], test_cells: Sequence[str], label_key: str, C: float = 1.0, max_iter: int = 2000
) -> pd.DataFrame:
    """Logistic regression on the expression of ``adata`` (log-normalized), fitted on the train
    cells with a label, predicting every test cell: ``cell_name``, ``label`` (None without one),
    ``prediction``."""
    require_obs_columns(adata, [label_key])
    train, test = adata[list(train_cells)], adata[list(test_cells)]
    train = train[has_label(train.obs[label_key])]
    classifier = LogisticRegression(max_iter=max_iter, C=C).fit(train.X, train.obs[label_key].astype(str))
    return pd.DataFrame({
        "cell_name": list(test.obs_names), "label": known_labels(test.obs[label_key]), "prediction": classifier.predict(test.X),
    })


def sentence_rank_baseline(
    table: pd.DataFrame, train_cells: Sequence[str], test_cells: Sequence[str], genes_in_prompt: Sequence[int],
    label_key: str, gene_names: Sequence[str], rank_fit: RankFit, C: float = 1.0, max_iter: int = 2000,
) -> pd.DataFrame:
    """Logistic regression on what a prompt's cell sentence carries: the ranks of its leading genes,
    as expression from the rank fit (absent genes 0), the representation the language model reads.
    Each test cell keeps the ``genes_in_prompt`` genes its prompt carries; the train cells keep as
    many as the longest prompt. ``table``: ``cell_sentence`` and ``label_key`` by cell name.
    Returns ``cell_name``, ``label``, ``prediction``; beside the expression baseline it tells what
    the sentences lose and what a model reading them could reach."""
    test_cells, kept = list(test_cells), [int(k) for k in genes_in_prompt]
    if len(kept) != len(test_cells):
        raise C2SValueError(f"{len(kept)} gene counts for {len(test_cells)} test cells: the prompts are not of these cells")
    train = table.loc[list(train_cells)]
    train = train[has_label(train[label_key])]
    test = table.loc[test_cells]
    room = max(kept, default=0)
    train_x, _ = reconstruct_expression(train["cell_sentence"].fillna("").tolist(), gene_names, rank_fit, top_k=room)
    test_x, _ = reconstruct_expression(test["cell_sentence"].fillna("").tolist(), gene_names, rank_fit, top_k=kept)
    classifier = LogisticRegression(max_iter=max_iter, C=C).fit(train_x, train[label_key].astype(str))
    return pd.DataFrame({
        "cell_name": test_cells, "label": known_labels(test[label_key]), "prediction": classifier.predict(test_x),
    })


def score_predictions(
    predictions: Mapping[str, pd.DataFrame], labels: Sequence[str]
) -> tuple[dict[str, float], pd.DataFrame, dict[str, np.ndarray], pd.DataFrame]:
    """Accuracy and macro-F1 of each method's predictions (tables of ``cell_name``, ``label``,
    ``prediction``, all on the same cells; ``prediction`` None for an answer that is no label, and
    an ``answer`` column for methods that write their answer), scored against ``labels``. Cells
    without a label (``has_label``) keep their predictions in the side-by-side table but are left
    out of every score: never a class.

    Returns the metrics (``n_test_cells``, ``n_cells_without_label``, ``n_scored_cells``,
    ``<method>_accuracy``, ``<method>_macro_f1`` and, for methods with answers,
    ``<method>_answers_not_a_label``), a per-class table, the confusion matrix of each method
    (rows: truth, columns: prediction, both in ``labels`` order) and every prediction side by side.
    """
    labels = list(labels)
    first = next(iter(predictions.values()))
    for method, table in predictions.items():  # as strings: a CSV reads names such as "17" back as numbers
        if table["cell_name"].astype(str).tolist() != first["cell_name"].astype(str).tolist():
            raise C2SValueError(f"the {method} predictions are not of the same cells as the others: every method is scored on the same cells")
    labelled = has_label(first["label"])
    n_without = int((~labelled).sum())
    if not labelled.any():
        raise C2SValueError(f"none of the {len(first)} test cells has a label: there is nothing to score them against")
    if n_without:
        logger.warning("%d of %d test cells have no label: their predictions are written but not scored", n_without, len(first))
    metrics: dict[str, float] = {"n_test_cells": float(len(first)), "n_cells_without_label": float(n_without),
                                 **report_scored_cells(int(labelled.sum()), "the cell-type predictions are")}
    per_class, matrices = [], {}
    for method, table in predictions.items():
        table = table[labelled]
        truth = table["label"].astype(str)
        predicted = table["prediction"].fillna(NOT_A_LABEL).astype(str)
        metrics[f"{method}_accuracy"] = float(accuracy_score(truth, predicted))
        metrics[f"{method}_macro_f1"] = float(f1_score(truth, predicted, labels=labels, average="macro", zero_division=0))
        precision, recall, f1, support = precision_recall_fscore_support(truth, predicted, labels=labels, zero_division=0)
        per_class.append(pd.DataFrame({"method": method, "cell_type": labels, "precision": precision, "recall": recall, "f1": f1, "support": support}))
        matrices[method] = confusion_matrix(truth, predicted, labels=labels)
    answered = {method: table for method, table in predictions.items() if "answer" in table.columns}
    for method, table in answered.items():
        metrics[f"{method}_answers_not_a_label"] = float(table["prediction"][labelled].isna().mean())
    combined = first[["cell_name", "label"]].copy()
    for method, table in predictions.items():
        combined[f"{method}_prediction"] = table["prediction"].to_numpy()
    for method, table in answered.items():
        combined[f"{method}_answer"] = table["answer"].to_numpy()
    logger.info("test accuracy: %s", ", ".join(f"{method} {metrics[f'{method}_accuracy']:.3f}" for method in predictions))
    return metrics, pd.concat(per_class, ignore_index=True), matrices, combined
