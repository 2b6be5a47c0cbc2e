"""The finetuning nodes and pipeline, and the prompt formatting they use, on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict

from c2s_kedro.core.models.loading import build_gpt_neox
from c2s_kedro.core.models.tokenizer import build_gene_tokenizer
from c2s_kedro.core.models.training import IGNORE_INDEX, tokenize_dataset
from c2s_kedro.core.prompts.formatting import C2SPromptFormatter, build_formatter, template_words
from c2s_kedro.parameters import ParameterError
from c2s_kedro.pipelines.finetuning import create_pipeline
from c2s_kedro.pipelines.finetuning.nodes import finetune_model, format_finetuning_prompts, summarize_finetuning
from tests.helpers import load_parameters, params_entries, run_pipeline, tiny_cell_sentences

GENES = [f"GENE{i}" for i in range(300)]
ARCHITECTURE = {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 96}
CUSTOM = "c2s_kedro.core.prompts.example_formatters.TissueAwareCellTypeFormatter"
SPLIT = {"train": [f"c{i}" for i in range(8)], "val": ["c8", "c9"], "test": ["c10", "c11"]}


def _params(tmp_path=None, **changes) -> dict:
    """The conf/base finetuning parameters with a few steps of tiny training."""
    params = load_parameters("finetuning")["finetuning"]
    params["training_arguments"] = {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1e-2,
                                    "logging_steps": 1, "eval_strategy": "no", "save_strategy": "no", "use_cpu": True}
    if tmp_path is not None:
        params["checkpoint_dir"] = str(tmp_path / "checkpoints")
    return {**params, **changes}


@pytest.fixture(scope="module")
def tokenizer():
    return build_gene_tokenizer(GENES, template_words() + ["T cell", "B cell", "Homo sapiens", "blood"], model_max_length=96)


@pytest.fixture()
def cells():
    return tiny_cell_sentences(GENES)


def test_prediction_prompts_lose_genes_never_the_answer(tokenizer, cells):
    formatter = C2SPromptFormatter(task="cell_type_prediction", tokenizer=tokenizer, max_tokens=96, seed=1)
    formatted = formatter.format_dataset(cells)
    assert formatter.n_shortened > 0
    tokenized = tokenize_dataset(formatted, tokenizer, max_length=96)
    assert tokenized.num_rows == cells.num_rows  # nothing dropped: everything was fitted
    for row, label in zip(tokenized, cells["cell_type"]):
        assert len(row["input_ids"]) <= 96
        answer = [t for t, l in zip(row["input_ids"], row["labels"]) if l != IGNORE_INDEX]
        assert tokenizer.decode(answer[:-1]) == f" {label}." and answer[-1] == tokenizer.eos_token_id


def test_generation_samples_ask_for_the_genes_they_answer_with(tokenizer, cells):
    formatter = C2SPromptFormatter(task="cell_type_generation", tokenizer=tokenizer, max_tokens=96, seed=1)
    formatted = formatter.format_dataset(cells)
    for prompt, response in zip(formatted["model_input"], formatted["response"]):
        n_genes = len(response.rstrip(".").split())
        assert f" {n_genes} " in prompt
        assert len(tokenizer(prompt + " " + response)["input_ids"]) + 1 <= 96


def test_formatter_by_dotted_path_and_bad_paths(cells):
    custom = build_formatter(
        "cell_type_prediction", "c2s_kedro.core.prompts.example_formatters.TissueAwareCellTypeFormatter", {"top_k_genes": 5}
    )
    formatted = custom.format_dataset(cells)
    assert formatted.column_names == ["sample_type", "model_input", "response"]
    assert "blood" in formatted["model_input"][0] and formatted["response"][0] == "T cell."
    with pytest.raises(ValueError, match="cannot be imported"):
        build_formatter("cell_type_prediction", "no_such_module.Formatter")
    with pytest.raises(ValueError, match="not a subclass"):
        build_formatter("cell_type_prediction", "c2s_kedro.core.prompts.formatting.load_templates")
    with pytest.raises(ValueError, match="unknown prompt task"):
        build_formatter("tissue_folding")


def test_missing_label_column_names_the_setting(tokenizer, cells):
    model = build_gpt_neox(tokenizer, ARCHITECTURE)
    split = {"train": ["c0"], "val": ["c1"], "test": ["c2"]}
    params = _params(tasks=["cell_type_prediction"], label_column="annotation")
    with pytest.raises(KeyError, match="finetuning.label_column 'annotation'.*sentence_conversion.label_columns"):
        format_finetuning_prompts(cells, split, model, params)
    with pytest.raises(ParameterError, match="finetuning.label_colum\\b.*parameters_finetuning.yml"):
        format_finetuning_prompts(cells, split, model, {**_params(), "label_colum": "cell_type"})


def test_training_cells_of_one_label_are_refused_for_cell_type_prediction_before_any_training(tokenizer, cells):
    model = build_gpt_neox(tokenizer, ARCHITECTURE)
    one_label = [name for name, label in zip(cells["cell_name"], cells["cell_type"]) if label == cells["cell_type"][0]]
    split = {"train": one_label[:3], "val": one_label[3:4], "test": one_label[4:5]}
    with pytest.raises(ValueError, match=r"only the label .* needs at least two labels.*finetuning.label_column.*finetuning.tasks"):
        format_finetuning_prompts(cells, split, model, _params(tasks=["cell_type_prediction"], label_column="cell_type"))
    generation_only = format_finetuning_prompts(cells, split, model, _params(tasks=["cell_type_generation"], label_column="cell_type"))
    assert generation_only["train"].num_rows == 3


def test_prompts_follow_the_split(tokenizer, cells):
    model = build_gpt_neox(tokenizer, ARCHITECTURE)
    params = _params(tasks=["cell_type_prediction", "cell_type_generation"], label_column="cell_type", max_eval_samples=3)
    prompts = format_finetuning_prompts(cells, SPLIT, model, params)
    assert prompts["train"].num_rows == 16 and prompts["test"].num_rows == 4 and prompts["val"].num_rows == 3
    assert set(prompts["train"]["sample_type"]) == {"cell_type_prediction", "cell_type_generation"}


def test_a_custom_formatter_with_several_tasks_formats_each_cell_once(tokenizer, cells):
    model = build_gpt_neox(tokenizer, ARCHITECTURE)
    params = _params(tasks=["cell_type_prediction", "cell_type_generation"], formatter=CUSTOM,
                     formatter_options={"top_k_genes": 5})
    prompts = format_finetuning_prompts(cells, SPLIT, model, params)
    assert [prompts[part].num_rows for part in ("train", "val", "test")] == [8, 2, 2]  # not once per task
    assert len(set(prompts["train"]["model_input"])) == 8
    assert all("blood" in p for p in prompts["train"]["model_input"])  # the custom template, not the built-in
    with pytest.raises(ValueError, match="cannot be imported.*Change finetuning.formatter"):
        format_finetuning_prompts(cells, SPLIT, model, _params(formatter="no_such_module.Formatter"))
    with pytest.raises(ValueError, match=r"unknown prompt task[^\n]*perturbation_response\. Change finetuning.tasks"):
        format_finetuning_prompts(cells, SPLIT, model, _params(tasks=["tissue_folding"]))


def test_tissue_prediction_puts_cells_of_one_tissue_in_one_prompt_and_fits(tokenizer):
    rng = np.random.default_rng(2)
    cells = Dataset.from_dict({
        "cell_name": [f"c{i}" for i in range(7)],
        "cell_sentence": [" ".join(rng.permutation(GENES)[:60]) for _ in range(7)],
        "tissue": ["blood", "blood", "blood", "blood", "blood", "lung", "lung"],
    })
    formatter = build_formatter("tissue_prediction", options={"cells_per_prompt": 3}, tokenizer=tokenizer, max_tokens=96, seed=0)
    formatted = formatter.format_dataset(cells)
    assert sorted(formatted["response"]) == ["blood.", "blood.", "lung."]  # 3 + 2 blood cells, 2 lung cells
    for prompt, response in zip(formatted["model_input"], formatted["response"]):
        assert len(tokenizer(prompt + " " + response)["input_ids"]) + 1 <= 96
        assert prompt.count("\nCell ") in (2, 3) and set(formatted["sample_type"]) == {"tissue_prediction"}
    unfitted = build_formatter("tissue_prediction", options={"cells_per_prompt": 2}).format_dataset(cells)
    assert all(len(line.split(": ", 1)[1].rstrip(".").split()) == 60 for p in unfitted["model_input"] for line in p.split("\n") if line.startswith("Cell "))


def test_lora_finetuning_returns_a_plain_model_with_changed_weights(tokenizer, cells, tmp_path):
    from transformers import AutoModelForCausalLM, GPTNeoXForCausalLM

    from c2s_kedro.core.models.loading import save_model

    base = build_gpt_neox(tokenizer, ARCHITECTURE)
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    formatted = C2SPromptFormatter(task="cell_type_prediction", tokenizer=tokenizer, max_tokens=96).format_dataset(cells)
    params = _params(tmp_path, lora={"r": 2, "lora_alpha": 4, "target_modules": ["query_key_value"]})
    trained, history = finetune_model(base, DatasetDict({"train": formatted, "val": formatted.select(range(2))}), params)
    assert type(trained.model) is GPTNeoXForCausalLM  # adapters merged, no peft wrapper left
    after = trained.model.state_dict()
    changed = [k for k in before if not np.allclose(before[k], after[k])]
    assert changed and all("query_key_value" in k for k in changed)  # only the adapted layers moved
    assert [e["step"] for e in history if "loss" in e] == [1, 2, 3]
    save_model(trained, tmp_path / "model")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    ids = torch.tensor([tokenizer(formatted["model_input"][0])["input_ids"]])
    with torch.no_grad():  # the saved directory holds the merged weights
        torch.testing.assert_close(reloaded(ids).logits, trained.model(ids).logits)


def test_finetune_model_averages_the_loss_as_the_parameters_say(tokenizer, cells, tmp_path, monkeypatch):
    from c2s_kedro.core.models import training

    calls, original = [], training.sample_mean_loss

    def counting(logits, labels):
        calls.append(labels.shape[0])
        return original(logits, labels)

    monkeypatch.setattr(training, "sample_mean_loss", counting)
    formatted = C2SPromptFormatter(tokenizer=tokenizer, max_tokens=96).format_dataset(cells)
    prompts = DatasetDict({"train": formatted, "val": formatted.select(range(2))})
    assert load_parameters("finetuning")["finetuning"]["loss_average"] == "sample"
    finetune_model(build_gpt_neox(tokenizer, ARCHITECTURE), prompts, _params(tmp_path))
    assert calls == [4, 4, 4]  # every training batch of the 3 steps
    calls.clear()
    finetune_model(build_gpt_neox(tokenizer, ARCHITECTURE), prompts, _params(tmp_path, loss_average="token"))
    assert calls == []
    with pytest.raises(ValueError, match="TrainingArguments refused.*Change finetuning in your environment"):
        finetune_model(build_gpt_neox(tokenizer, ARCHITECTURE), prompts,
                       _params(tmp_path, training_arguments={"no_such_argument": 1}))


def test_the_finetuning_pipeline_runs_and_counts_its_samples(tokenizer, cells, tmp_path):
    params = {"finetuning": _params(tmp_path, max_eval_samples=3),
              **{name: load_parameters(name)[name] for name in ("data_processing", "sentence_conversion")},
              "annotation": {**load_parameters("annotation")["annotation"], "log_mlflow_model": False}}
    inputs = {"cell_sentences": cells, "data_split": SPLIT, "foundation_model": build_gpt_neox(tokenizer, ARCHITECTURE),
              **params_entries(params)}
    catalog = run_pipeline(create_pipeline(), inputs)
    metrics = catalog.load("finetuning_metrics")
    assert {k: metrics[k] for k in ("n_train_samples", "n_val_samples", "n_test_samples")} == {
        "n_train_samples": 16.0, "n_val_samples": 3.0, "n_test_samples": 4.0}
    assert [metrics[f"n_{part}_cells"] for part in ("train", "val", "test")] == [8.0, 2.0, 2.0]
    assert metrics["n_train_cells_without_label"] == 0.0
    losses = [e["loss"] for e in catalog.load("finetuning_log") if "loss" in e]
    assert metrics["global_step"] == 3.0 and [metrics["train_loss_first"], metrics["train_loss_last"]] == [losses[0], losses[-1]]
    assert catalog.load("finetuned_model").model.config.c2s_annotator["labels"] == ["B cell", "T cell"]
    assert catalog.load("annotator_mlflow_model")["logged"] is False  # switched off
    figure = catalog.load("finetuning_loss_plot")
    assert list(figure.axes[0].get_lines()[0].get_xdata()) == [1.0, 2.0, 3.0]  # the train loss of every logged step


def test_a_template_file_drives_the_saved_prompt_dataset(tokenizer, cells, tmp_path):
    import json

    from kedro_datasets.huggingface import ArrowDataset

    prediction = {"model_input": ["Zorp {num_genes} {organism} genes: {cell_sentence}.\nKind:"], "response": ["{cell_type}."]}
    generation = {"model_input": ["Blorb a {organism} {cell_type} cell of {num_genes} genes.\nGenes:"],
                  "response": ["{cell_sentence}.", "Here: {cell_sentence}."]}
    (tmp_path / "p.json").write_text(json.dumps(prediction))
    (tmp_path / "g.json").write_text(json.dumps(generation))
    files = {"cell_type_prediction": str(tmp_path / "p.json"), "cell_type_generation": str(tmp_path / "g.json")}
    model = build_gpt_neox(tokenizer, ARCHITECTURE)
    prompts = format_finetuning_prompts(cells, SPLIT, model, _params(prompt_templates=files))
    dataset = ArrowDataset(path=str(tmp_path / "finetuning_prompts"))
    dataset.save(prompts)
    saved = dataset.load()
    for part in ("train", "val", "test"):
        for row in saved[part]:
            if row["sample_type"] == "cell_type_prediction":
                assert row["model_input"].startswith("Zorp ") and row["response"] in ("T cell.", "B cell.")
            else:
                assert row["model_input"].startswith("Blorb a Homo sapiens ")
                assert row["response"].removeprefix("Here: ").split()[0].startswith("GENE")
    responses = saved["train"].filter(lambda r: r["sample_type"] == "cell_type_generation")["response"]
    assert {r.startswith("Here: ") for r in responses} == {True, False}  # one of the file's responses per sample
    (tmp_path / "p.json").write_text(json.dumps({"model_input": prediction["model_input"]}))
    with pytest.raises(ValueError, match=r"p.json has no field 'response'.*Change finetuning.prompt_templates"):
        format_finetuning_prompts(cells, SPLIT, model, _params(prompt_templates=files))


def test_cells_without_a_label_get_no_prompt_and_the_split_is_reported(tokenizer, caplog):
    import re

    cells = tiny_cell_sentences(GENES, n_cells=12)
    cells = cells.remove_columns("cell_type").add_column("cell_type", ["T cell", "B cell", None, "T cell", "nan", "B cell"] * 2)
    # 12 cells through fine-tuning: 6/3/3 where 80/10/10 was asked
    split = {"train": [f"c{i}" for i in range(6)], "val": ["c6", "c7", "c8"], "test": ["c9", "c10", "c11"],
             "fractions": {"train": 0.8, "val": 0.1, "test": 0.1}}
    prompts = format_finetuning_prompts(cells, split, build_gpt_neox(tokenizer, ARCHITECTURE), _params())
    for part, n_labelled in (("train", 4), ("val", 2), ("test", 2)):
        assert prompts[part].num_rows == 2 * n_labelled  # one sample per task and labelled cell
        texts = " ".join(list(prompts[part]["model_input"]) + list(prompts[part]["response"]))
        assert not re.search(r"\bNone\b|\bnan\b", texts)
    metrics = summarize_finetuning([], prompts, cells, split, _params())
    assert {key: metrics[key] for key in ("n_train_cells", "n_val_cells", "n_test_cells", "train_share", "test_share")} == {
        "n_train_cells": 6.0, "n_val_cells": 3.0, "n_test_cells": 3.0, "train_share": 0.5, "test_share": 0.25}
    assert [metrics[f"n_{part}_cells_without_label"] for part in ("train", "val", "test")] == [2.0, 1.0, 1.0]
    assert "the split of 12 cells cannot honour its fractions: 0.8/0.1/0.1 asked, 6/3/3 made" in caplog.text
    assert "the test part holds 3 cells, fewer than 20" in caplog.text
