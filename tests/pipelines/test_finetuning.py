"""Prompt fitting, formatter selection, tokenization limits and resumable training on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
from datasets import Dataset
from transformers import TrainerCallback

from c2s_kedro.core.models import build_gpt_neox
from c2s_kedro.core.prompts import C2SPromptFormatter, build_formatter, template_words
from c2s_kedro.core.tokenizer import build_gene_tokenizer
from c2s_kedro.core.training import IGNORE_INDEX, tokenize_dataset, train_causal_lm, training_arguments
from c2s_kedro.pipelines.finetuning.nodes import format_finetuning_prompts

GENES = [f"GENE{i}" for i in range(300)]
ARCHITECTURE = {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 96}


@pytest.fixture(scope="module")
def tokenizer():
    return build_gene_tokenizer(GENES, template_words() + ["T cell", "B cell", "Homo sapiens", "blood"], model_max_length=96)


@pytest.fixture()
def cells():
    rng = np.random.default_rng(0)
    return Dataset.from_dict({
        "cell_name": [f"c{i}" for i in range(12)],
        "cell_sentence": [" ".join(rng.permutation(GENES)[: 20 + 25 * i]) for i in range(12)],
        "cell_type": ["T cell", "B cell"] * 6,
        "tissue": ["blood"] * 12,
        "organism": ["Homo sapiens"] * 12,
    })


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


def test_samples_that_do_not_fit_are_dropped_not_cut(tokenizer, cells, caplog):
    unfitted = C2SPromptFormatter(task="cell_type_prediction").format_dataset(cells)
    tokenized = tokenize_dataset(unfitted, tokenizer, max_length=96)
    assert 0 < tokenized.num_rows < cells.num_rows
    assert "exceed the model's context of 96" in caplog.text
    with pytest.raises(ValueError, match="no sample fits"):
        tokenize_dataset(unfitted.select([11]), tokenizer, max_length=96)


def test_formatter_by_dotted_path_and_bad_paths(cells):
    custom = build_formatter(
        "cell_type_prediction", "c2s_kedro.core.example_formatters.TissueAwareCellTypeFormatter", {"top_k_genes": 5}
    )
    formatted = custom.format_dataset(cells)
    assert formatted.column_names == ["sample_type", "model_input", "response"]
    assert "blood" in formatted["model_input"][0] and formatted["response"][0] == "T cell."
    with pytest.raises(ValueError, match="cannot be imported"):
        build_formatter("cell_type_prediction", "no_such_module.Formatter")
    with pytest.raises(ValueError, match="not a subclass"):
        build_formatter("cell_type_prediction", "c2s_kedro.core.prompts.load_templates")
    with pytest.raises(ValueError, match="unknown prompt task"):
        build_formatter("tissue_folding")


def test_missing_label_column_names_the_setting(tokenizer, cells):
    model = build_gpt_neox(tokenizer, ARCHITECTURE)
    split = {"train": ["c0"], "val": ["c1"], "test": ["c2"]}
    params = {"tasks": ["cell_type_prediction"], "label_column": "annotation"}
    with pytest.raises(KeyError, match="finetuning.label_column 'annotation'.*sentence_conversion.label_columns"):
        format_finetuning_prompts(cells, split, model, params)


def test_prompts_follow_the_split(tokenizer, cells):
    model = build_gpt_neox(tokenizer, ARCHITECTURE)
    split = {"train": [f"c{i}" for i in range(8)], "val": ["c8", "c9"], "test": ["c10", "c11"]}
    params = {"tasks": ["cell_type_prediction", "cell_type_generation"], "label_column": "cell_type", "max_eval_samples": 3}
    prompts = format_finetuning_prompts(cells, split, model, params)
    assert prompts["train"].num_rows == 16 and prompts["test"].num_rows == 4 and prompts["val"].num_rows == 3
    assert set(prompts["train"]["sample_type"]) == {"cell_type_prediction", "cell_type_generation"}


class StopAt(TrainerCallback):
    """Simulates a killed run: raises once training reaches ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            raise KeyboardInterrupt


class CountSteps(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def test_an_interrupted_training_resumes_from_its_checkpoint(tokenizer, cells, tmp_path):
    formatted = C2SPromptFormatter(task="cell_type_prediction", tokenizer=tokenizer, max_tokens=96).format_dataset(cells)
    data = tokenize_dataset(formatted, tokenizer, max_length=96)
    settings = {"max_steps": 6, "per_device_train_batch_size": 4, "save_strategy": "steps", "save_steps": 2,
                "logging_steps": 1, "learning_rate": 1e-3, "use_cpu": True}
    arguments = training_arguments(settings, str(tmp_path / "checkpoints"))
    with pytest.raises(KeyboardInterrupt):
        train_causal_lm(build_gpt_neox(tokenizer, ARCHITECTURE), data, None, arguments, "test", callbacks=[StopAt(3)])
    assert (tmp_path / "checkpoints" / "checkpoint-2").is_dir()

    counter = CountSteps()
    _, history = train_causal_lm(build_gpt_neox(tokenizer, ARCHITECTURE), data, None, arguments, "test", callbacks=[counter])
    assert counter.steps == [3, 4, 5, 6]  # continued after step 2 instead of starting over
    assert [e["step"] for e in history if "loss" in e][:2] == [1, 2]  # the first run's log is kept
    assert not list((tmp_path / "checkpoints").glob("checkpoint-*"))  # removed once complete


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
    from datasets import DatasetDict
    from transformers import AutoModelForCausalLM, GPTNeoXForCausalLM

    from c2s_kedro.core.models import save_model
    from c2s_kedro.pipelines.finetuning.nodes import finetune_model

    base = build_gpt_neox(tokenizer, ARCHITECTURE)
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    formatted = C2SPromptFormatter(task="cell_type_prediction", tokenizer=tokenizer, max_tokens=96).format_dataset(cells)
    params = {
        "lora": {"r": 2, "lora_alpha": 4, "target_modules": ["query_key_value"]},
        "checkpoint_dir": str(tmp_path / "checkpoints"),
        "training_arguments": {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "logging_steps": 1},
    }
    trained, history = finetune_model(base, DatasetDict({"train": formatted, "val": formatted.select(range(2))}), params)
    assert type(trained.model) is GPTNeoXForCausalLM  # adapters merged, no peft wrapper left
    after = trained.model.state_dict()
    changed = [k for k in before if not np.allclose(before[k], after[k])]
    assert changed and all("query_key_value" in k for k in changed)  # only the adapted layers moved
    save_model(trained, tmp_path / "model")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "model") is not None
