"""Nodes of the evaluation pipeline: they read the settings once and call core."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pandas as pd

# each core module loads when a node first uses it (c2s_kedro/core/__init__.py): every run imports every
# pipeline's nodes (the registry composes each pipeline with its upstream) and pays only for what its nodes use
from c2s_kedro import core
from c2s_kedro.parameters import read_parameters, setting_hint
from c2s_kedro.parameters.inference import EvaluationParameters

if TYPE_CHECKING:
    import anndata as ad
    import matplotlib.pyplot as plt
    from datasets import Dataset

    from c2s_kedro.core.models.loading import LanguageModel


def build_evaluation_prompts(
    cell_sentences: Dataset, data_split: dict[str, Any], model: LanguageModel, params: dict[str, Any]
) -> dict[str, Any]:
    """Cell-type-prediction prompts of the test cells (templates, ours or ``prompt_templates``'s,
    drawn with the seed), fitted to the context with room for the longest answer, plus the known
    label set (train labels)."""
    settings = read_parameters(EvaluationParameters, params, "evaluation")
    with setting_hint("evaluation.label_column"):
        table = core.prompts.formatting.sentence_table(cell_sentences, [settings.label_column], optional=[settings.organism_column])
    with setting_hint("evaluation.prompt_templates"):
        templates = core.prompts.formatting.task_templates("cell_type_prediction", core.prompts.formatting.read_template_files(settings.prompt_templates))
    with setting_hint("evaluation.max_test_cells"):
        test = core.tasks.evaluation.evaluated_test_cells(data_split["test"], settings.max_test_cells, settings.seed)
    return core.tasks.evaluation.cell_type_test_prompts(
        table, data_split["train"], test, settings.label_column, settings.organism_column,
        model.tokenizer, model.context_length, settings.extra_new_tokens, settings.top_k_genes, settings.seed, templates,
    )


def predict_by_generation(evaluation_prompts: dict[str, Any], model: LanguageModel, params: dict[str, Any]) -> pd.DataFrame:
    """Greedy batched generation of the answer, normalized and matched to the label set (None
    when the answer is not a known label)."""
    settings = read_parameters(EvaluationParameters, params, "evaluation")
    answers, predictions = core.models.inference.generate_labels(
        model, evaluation_prompts["prompt"], evaluation_prompts["labels"], settings.extra_new_tokens, settings.batch_size
    )
    return pd.DataFrame({
        "cell_name": evaluation_prompts["cell_name"], "label": evaluation_prompts["label"], "answer": answers, "prediction": predictions,
    })


def predict_by_label_scoring(evaluation_prompts: dict[str, Any], model: LanguageModel, params: dict[str, Any]) -> pd.DataFrame:
    """The most likely known label of each cell, with the probability of every label."""
    settings = read_parameters(EvaluationParameters, params, "evaluation")
    labels = evaluation_prompts["labels"]
    predicted, probabilities = core.models.inference.predict_labels(model, evaluation_prompts["prompt"], labels, batch_size=settings.batch_size)
    table = pd.DataFrame({"cell_name": evaluation_prompts["cell_name"], "label": evaluation_prompts["label"], "prediction": predicted})
    return pd.concat([table, pd.DataFrame(probabilities, columns=[f"p({name})" for name in labels])], axis=1)


def predict_by_baseline(processed_adata: ad.AnnData, data_split: dict[str, Any], params: dict[str, Any]) -> pd.DataFrame:
    """Logistic regression on the log-normalized expression, fit on train cells, applied to test."""
    settings = read_parameters(EvaluationParameters, params, "evaluation")
    with setting_hint("evaluation.max_test_cells"):
        test = core.tasks.evaluation.evaluated_test_cells(data_split["test"], settings.max_test_cells, settings.seed)
    with setting_hint("evaluation.label_column"):
        return core.tasks.evaluation.logistic_regression_baseline(
            processed_adata, data_split["train"], test, settings.label_column,
            C=settings.baseline_C, max_iter=settings.baseline_max_iter,
        )


def predict_by_sentence_baseline(
    cell_sentences: Dataset, data_split: dict[str, Any], evaluation_prompts: dict[str, Any], vocabulary: dict[str, int],
    rank_fit: dict[str, float], params: dict[str, Any],
) -> pd.DataFrame:
    """Logistic regression on what each prompt's sentence carries (the ranks of its genes, through
    the rank fit), fit on train cells, applied to the prompts' test cells: the ceiling of a model
    reading the same sentences."""
    settings = read_parameters(EvaluationParameters, params, "evaluation")
    with setting_hint("evaluation.label_column"):
        table = core.prompts.formatting.sentence_table(cell_sentences, [settings.label_column])
    return core.tasks.evaluation.sentence_rank_baseline(
        table, data_split["train"], evaluation_prompts["cell_name"], evaluation_prompts["genes_in_prompt"],
        settings.label_column, list(vocabulary), core.sentences.rank_fit.RankFit.from_dict(rank_fit),
        C=settings.baseline_C, max_iter=settings.baseline_max_iter,
    )


def score_predictions(
    generation: pd.DataFrame, label_scoring: pd.DataFrame, baseline: pd.DataFrame, sentence_baseline: pd.DataFrame,
    evaluation_prompts: dict[str, Any], plot_baseline: bool = True,
) -> tuple[dict[str, float], pd.DataFrame, dict[str, plt.Figure], pd.DataFrame]:
    """Accuracy and macro-F1 of each method on the same cells (the model two ways, logistic
    regression on the full expression and on what the prompts' sentences carry), a per-class
    table, confusion matrices, and all predictions side by side. ``plot_baseline`` False leaves out
    the expression baseline's confusion matrix (another evaluation of the same cells draws it)."""
    labels = evaluation_prompts["labels"]
    metrics, per_class, matrices, combined = core.tasks.evaluation.score_predictions(
        {"generation": generation, "label_scoring": label_scoring, "baseline": baseline, "sentence_baseline": sentence_baseline},
        labels,
    )
    figures = {
        f"{method}.png": core.plotting.confusion_matrix_plot(matrix, labels, f"{method}: accuracy {metrics[f'{method}_accuracy']:.2f}")
        for method, matrix in matrices.items() if plot_baseline or method != "baseline"
    }
    return metrics, per_class, figures, combined


def score_beside_shared_baseline(
    generation: pd.DataFrame, label_scoring: pd.DataFrame, baseline: pd.DataFrame, sentence_baseline: pd.DataFrame,
    evaluation_prompts: dict[str, Any],
) -> tuple[dict[str, float], pd.DataFrame, dict[str, plt.Figure], pd.DataFrame]:
    """``score_predictions`` of an evaluation whose expression baseline another evaluation plots
    (the zero-shot one shares the fine-tuned one's baseline predictions)."""
    return score_predictions(generation, label_scoring, baseline, sentence_baseline, evaluation_prompts, plot_baseline=False)
