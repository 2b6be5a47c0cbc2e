"""Evaluation nodes on tiny data: prompts, baseline, scoring, and bad parameters."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from datasets import Dataset

from c2s_kedro.core.models.loading import build_gpt_neox
from c2s_kedro.core.models.tokenizer import build_gene_tokenizer
from c2s_kedro.core.prompts.formatting import template_words
from c2s_kedro.parameters import ParameterError
from c2s_kedro.pipelines.evaluation.nodes import (
    build_evaluation_prompts,
    predict_by_baseline,
    predict_by_generation,
    predict_by_label_scoring,
    predict_by_sentence_baseline,
    score_predictions,
)
from tests.helpers import load_parameters, make_counts_adata

GENES = [f"GENE{i}" for i in range(60)]


def _params(**changes) -> dict:
    return {**load_parameters("evaluation")["evaluation"], **changes}


@pytest.fixture()
def setting():
    rng = np.random.default_rng(0)
    cells = Dataset.from_dict({
        "cell_name": [f"c{i}" for i in range(10)],
        "cell_sentence": [" ".join(rng.permutation(GENES)[:40]) for _ in range(10)],
        "cell_type": ["T cell", "B cell"] * 5,
        "organism": ["Homo sapiens"] * 10,
    })
    tokenizer = build_gene_tokenizer(GENES, template_words() + ["T cell", "B cell", "Homo sapiens"], model_max_length=80)
    model = build_gpt_neox(tokenizer, {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "max_position_embeddings": 80})
    split = {"train": [f"c{i}" for i in range(6)], "val": ["c6"], "test": ["c7", "c8", "c9"]}
    return cells, model, split


def test_prompts_fit_with_room_for_the_answer_and_labels_come_from_train(setting):
    cells, model, split = setting
    prompts = build_evaluation_prompts(cells, split, model, _params())
    assert prompts["cell_name"] == ["c7", "c8", "c9"] and prompts["labels"] == ["B cell", "T cell"]
    longest_answer = len(model.tokenizer(" T cell.")["input_ids"]) + 1
    for prompt in prompts["prompt"]:
        assert len(model.tokenizer(prompt)["input_ids"]) + longest_answer + 2 <= 80
    scored = predict_by_label_scoring(prompts, model, _params())
    assert set(scored["prediction"]) <= {"B cell", "T cell"}
    assert np.allclose(scored[["p(B cell)", "p(T cell)"]].sum(axis=1), 1.0)
    picked = scored[["p(B cell)", "p(T cell)"]].to_numpy().argmax(axis=1)
    assert scored["prediction"].tolist() == [prompts["labels"][i] for i in picked]


def test_generation_answers_are_matched_to_the_labels_or_left_unmatched(setting):
    cells, model, split = setting
    prompts = build_evaluation_prompts(cells, split, model, _params())
    generated = predict_by_generation(prompts, model, _params(batch_size=2))
    assert list(generated.columns) == ["cell_name", "label", "answer", "prediction"]
    assert generated["cell_name"].tolist() == prompts["cell_name"] and generated["label"].tolist() == prompts["label"]
    for answer, prediction in zip(generated["answer"], generated["prediction"]):
        named = answer.strip().rstrip(".").casefold()
        assert prediction == next((label for label in prompts["labels"] if label.casefold() == named), None)


def test_sentence_baseline_reads_the_prompts_genes_of_the_prompts_cells(setting):
    cells, model, split = setting
    prompts = build_evaluation_prompts(cells, split, model, _params())
    assert len(prompts["genes_in_prompt"]) == 3 and all(0 < k <= 40 for k in prompts["genes_in_prompt"])
    for prompt, k in zip(prompts["prompt"], prompts["genes_in_prompt"]):
        assert len(prompt.split("Cell sentence: ")[1].split(".\n")[0].split()) == k  # the genes the prompt carries
    fit = {"slope": -0.5, "intercept": 2.0, "r2": 1.0, "pearson_r": -1.0, "spearman_r": -1.0, "n_cells": 1, "n_points": 1,
           "log_rank_cutoff": 3.0}
    predicted = predict_by_sentence_baseline(cells, split, prompts, {g: 1 for g in GENES}, fit, _params())
    assert predicted["cell_name"].tolist() == prompts["cell_name"] and predicted["label"].tolist() == prompts["label"]
    assert set(predicted["prediction"]) <= {"B cell", "T cell"}
    with pytest.raises(KeyError, match=r"'annotation' not in the cell-sentence dataset.*Change evaluation\.label_column"):
        predict_by_sentence_baseline(cells, split, prompts, {g: 1 for g in GENES}, fit, _params(label_column="annotation"))


def test_missing_label_column_names_the_setting(setting):
    cells, model, split = setting
    with pytest.raises(KeyError, match=r"'annotation' not in the cell-sentence dataset.*Change evaluation\.label_column"):
        build_evaluation_prompts(cells, split, model, _params(label_column="annotation"))


def test_parameters_are_read_once_and_checked(setting):
    cells, model, split = setting
    with pytest.raises(ParameterError, match="unknown parameter.*evaluation.batchsize"):
        build_evaluation_prompts(cells, split, model, _params(batchsize=4))
    with pytest.raises(ParameterError, match="evaluation.baseline_C missing"):
        build_evaluation_prompts(cells, split, model, {k: v for k, v in _params().items() if k != "baseline_C"})
    assert load_parameters("evaluation")["evaluation"]["batch_size"] == 8  # the YAML's value is the only default


def test_baseline_and_scores_on_the_same_cells():
    from c2s_kedro.core.data.preprocessing import normalize_log10

    adata = normalize_log10(make_counts_adata())
    names = list(adata.obs_names)
    split = {"train": names[::2], "val": [], "test": names[1::2]}
    baseline = predict_by_baseline(adata, split, _params())
    assert list(baseline["cell_name"]) == split["test"]
    assert (baseline["prediction"] == baseline["label"]).mean() > 0.8  # two clearly separated types
    labels = sorted(adata.obs["cell_type"].astype(str).unique())
    wrong = baseline.assign(prediction=None, answer="Cell sentence")  # a model answering nonsense
    metrics, per_class, figures, combined = score_predictions(wrong, baseline, baseline, wrong.drop(columns="answer"),
                                                              {"labels": labels})
    assert metrics["generation_accuracy"] == 0.0 and metrics["generation_answers_not_a_label"] == 1.0
    assert metrics["baseline_accuracy"] == pytest.approx((baseline["prediction"] == baseline["label"]).mean())
    assert metrics["sentence_baseline_accuracy"] == 0.0 and "sentence_baseline_macro_f1" in metrics
    assert set(per_class["method"]) == {"generation", "label_scoring", "baseline", "sentence_baseline"}
    assert set(figures) == {"generation.png", "label_scoring.png", "baseline.png", "sentence_baseline.png"}
    assert list(combined.columns[:2]) == ["cell_name", "label"] and len(combined) == len(baseline)
    assert figures["baseline.png"].axes[0].get_title() == f"baseline: accuracy {metrics['baseline_accuracy']:.2f}"
    with pytest.raises(KeyError, match=r"'annotation' not found.*Change evaluation\.label_column"):
        predict_by_baseline(adata, split, _params(label_column="annotation"))


def test_evaluation_prompts_use_the_template_file(setting, tmp_path):
    import json

    cells, model, split = setting
    path = tmp_path / "prediction.json"
    path.write_text(json.dumps({"model_input": ["Zorp {num_genes} {organism} genes: {cell_sentence}.\nKind:",
                                                "Quux {cell_sentence}.\nKind:"], "response": ["{cell_type}."]}))
    prompts = build_evaluation_prompts(cells, split, model, _params(prompt_templates={"cell_type_prediction": str(path)}))
    assert prompts["cell_name"] == ["c7", "c8", "c9"] and prompts["labels"] == ["B cell", "T cell"]
    assert all(p.startswith(("Zorp ", "Quux ")) and p.endswith(".\nKind:") for p in prompts["prompt"])
    longest_answer = len(model.tokenizer(" T cell.")["input_ids"]) + 1
    for prompt in prompts["prompt"]:
        assert len(model.tokenizer(prompt)["input_ids"]) + longest_answer + 2 <= 80
    scored = predict_by_label_scoring(prompts, model, _params())
    assert set(scored["prediction"]) <= {"B cell", "T cell"}
    path.write_text(json.dumps({"model_input": ["Zorp {cell_sentence} {tissue}"], "response": ["{cell_type}."]}))
    with pytest.raises(ValueError, match=r"unknown placeholder\(s\) \{tissue\}.*Change evaluation.prompt_templates"):
        build_evaluation_prompts(cells, split, model, _params(prompt_templates={"cell_type_prediction": str(path)}))


def test_test_cells_without_a_label_are_predicted_not_scored_and_few_cells_say_so(setting, caplog):
    from c2s_kedro.core.data.preprocessing import normalize_log10

    cells, model, split = setting
    cells = cells.remove_columns("cell_type").add_column("cell_type", ["T cell", "B cell", None, "B cell", "nan"] * 2)
    prompts = build_evaluation_prompts(cells, split, model, _params())
    assert prompts["labels"] == ["B cell", "T cell"]  # train cells c2 and c4 add no label
    assert prompts["cell_name"] == ["c7", "c8", "c9"] and prompts["label"] == [None, "B cell", None]
    scored = predict_by_label_scoring(prompts, model, _params())
    adata = normalize_log10(make_counts_adata(n_cells=10))
    adata.obs_names = [f"c{i}" for i in range(10)]
    adata.obs["cell_type"] = pd.Categorical(cells["cell_type"])
    baseline = predict_by_baseline(adata, split, _params())
    assert set(baseline["prediction"]) <= {"B cell", "T cell"}
    metrics, per_class, _, combined = score_predictions(scored.assign(answer="x"), scored, baseline, baseline, prompts)
    assert metrics["n_test_cells"] == 3 and metrics["n_cells_without_label"] == 2 and metrics["n_scored_cells"] == 1
    assert set(per_class["cell_type"]) == {"B cell", "T cell"} and per_class.groupby("method")["support"].sum().eq(1).all()
    assert combined["cell_name"].tolist() == ["c7", "c8", "c9"]
    assert "the cell-type predictions are scored on 1 cells, fewer than 20" in caplog.text
