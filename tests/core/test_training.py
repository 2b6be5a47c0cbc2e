"""Tokenization with label masking, the sample-mean loss, the one fine-tuning routine and the
training sets it learns from, on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict
from transformers import TrainerCallback

from c2s_kedro.core.models.loading import build_gpt_neox
from c2s_kedro.core.models.tokenizer import build_gene_tokenizer, label_words
from c2s_kedro.core.models.training import (
    IGNORE_INDEX,
    TrainingSettings,
    TrainingSettingsError,
    finetune,
    require_task,
    sample_mean_loss,
    tokenize_dataset,
    tokenize_pairs,
    train_causal_lm,
    trained_tasks,
    training_arguments,
)
from c2s_kedro.core.prompts.formatting import C2SPromptFormatter, template_words
from c2s_kedro.core.prompts.training_sets import (
    balanced_rows,
    format_split_prompts,
    pretraining_corpus,
    prompt_formatters,
)

from tests.helpers import tiny_cell_sentences

GENES = [f"GENE{i}" for i in range(300)]
ARCHITECTURE = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 128,
                "max_position_embeddings": 96}
CUSTOM = "c2s_kedro.core.prompts.example_formatters.TissueAwareCellTypeFormatter"


@pytest.fixture(scope="module")
def tokenizer():
    return build_gene_tokenizer(GENES, template_words() + ["T cell", "B cell", "Homo sapiens", "blood", "CD14+ Monocyte"],
                                model_max_length=96)


@pytest.fixture()
def cells():
    return tiny_cell_sentences(GENES)


def _settings(tmp_path, **changes) -> TrainingSettings:
    values = {
        "training_arguments": {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-3,
                               "logging_steps": 1, "save_strategy": "no", "use_cpu": True},
        "checkpoint_dir": str(tmp_path / "checkpoints"), "loss_on_response_only": True, "loss_average": "sample",
        "mlflow_prefix": "test",
    }
    return TrainingSettings(**{**values, **changes})


def test_labels_mask_the_prompt_and_end_with_eos(tokenizer):
    batch = {"model_input": ["Cell sentence: GENE1 GENE2.\nThe cell type is:"], "response": ["CD14+ Monocyte."]}
    out = tokenize_pairs(batch, tokenizer, loss_on_response_only=True)
    ids, labels = out["input_ids"][0], out["labels"][0]
    n_prompt = len(tokenizer(batch["model_input"][0], add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[n_prompt:-1]) == " CD14+ Monocyte."
    everything = tokenize_pairs(batch, tokenizer, loss_on_response_only=False)
    assert everything["labels"][0] == everything["input_ids"][0]


def test_sample_mean_loss_weighs_a_short_answer_like_a_long_one():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 3],   # one answer token
                           [IGNORE_INDEX, 1, 2, 4, 6]])                                    # four answer tokens
    per_token = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1),
                                                  ignore_index=IGNORE_INDEX, reduction="none").view(2, 4)
    expected = (per_token[0, 3] + per_token[1].mean()) / 2
    assert torch.allclose(sample_mean_loss(logits, labels), expected)
    token_mean = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    assert not torch.allclose(sample_mean_loss(logits, labels), token_mean)  # the Trainer's default differs
    assert sample_mean_loss(logits, torch.full_like(labels, IGNORE_INDEX)).item() == 0.0


def test_sample_mean_loss_upcasts_only_the_labelled_positions():
    # conf/gpu at Pythia-410m's shape: float32 copies of all logits took GBs beyond the 10 GB the run had
    torch.manual_seed(0)
    logits = torch.randn(3, 40, 50, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.full((3, 40), IGNORE_INDEX)
    labels[0, 37:] = torch.tensor([1, 2, 3])
    labels[2, 30:] = torch.arange(10)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = sample_mean_loss(logits, labels)
    assert max(t.numel() for t in saved if t.dtype == torch.float32) <= 13 * 50  # the 13 labelled positions
    loss.backward()
    reference = logits.detach().float().requires_grad_()
    per_token = torch.nn.functional.cross_entropy(reference[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1),
                                                  ignore_index=IGNORE_INDEX, reduction="none").view(3, 39)
    expected = (per_token[0].sum() / 3 + per_token[2].sum() / 10) / 2
    expected.backward()
    assert torch.allclose(loss, expected) and torch.allclose(logits.grad.float(), reference.grad, atol=1e-3)


def test_samples_that_do_not_fit_are_dropped_not_cut(tokenizer, cells, caplog):
    unfitted = C2SPromptFormatter(task="cell_type_prediction").format_dataset(cells)
    tokenized = tokenize_dataset(unfitted, tokenizer, max_length=96)
    assert 0 < tokenized.num_rows < cells.num_rows
    assert "exceed the model's context of 96" in caplog.text
    with pytest.raises(ValueError, match="no sample fits"):
        tokenize_dataset(unfitted.select([11]), tokenizer, max_length=96)


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


def _accumulation_run(tokenizer, prompts, tmp_path, batch_size: int, accumulation: int):
    # Plain SGD at a constant rate without clipping: the weights move by exactly lr x the step's gradient.
    arguments = {"num_train_epochs": 1, "per_device_train_batch_size": batch_size,
                 "gradient_accumulation_steps": accumulation, "train_sampling_strategy": "sequential",
                 "optim": "sgd", "learning_rate": 0.5, "lr_scheduler_type": "constant", "warmup_steps": 0,
                 "weight_decay": 0.0, "max_grad_norm": 0.0, "logging_steps": 1, "save_strategy": "no", "use_cpu": True}
    settings = _settings(tmp_path / f"b{batch_size}a{accumulation}", training_arguments=arguments)
    model, history = finetune(build_gpt_neox(tokenizer, ARCHITECTURE, seed=0), prompts, settings)
    return {k: v.detach().clone() for k, v in model.model.state_dict().items()}, [e["loss"] for e in history if "loss" in e]


def test_sample_average_with_gradient_accumulation_equals_one_batch_of_all_micro_batches(tokenizer, tmp_path):
    """Six samples, answers of 1 to 40 genes. Batch 2 x accumulation 2 makes steps of (2 + 2) and
    then one micro-batch of 2; batch 4 makes steps of 4 and 2, the same samples. With every sample
    weighing the same, both runs take the same two steps: the first must average its two
    micro-batches, the last (one micro-batch) must not be divided by 2."""
    rng = np.random.default_rng(1)
    sizes = [1, 40, 3, 25, 2, 30]
    prompts = DatasetDict({"train": Dataset.from_dict({
        "sample_type": ["test"] * 6,
        "model_input": [f"Cell sentence: {' '.join(rng.permutation(GENES)[:8])}." for _ in sizes],
        "response": [" ".join(rng.permutation(GENES)[:n]) for n in sizes],
    })})
    initial = {k: v.clone() for k, v in build_gpt_neox(tokenizer, ARCHITECTURE, seed=0).model.state_dict().items()}
    accumulated, accumulated_losses = _accumulation_run(tokenizer, prompts, tmp_path, batch_size=2, accumulation=2)
    whole, whole_losses = _accumulation_run(tokenizer, prompts, tmp_path, batch_size=4, accumulation=1)

    assert len(accumulated_losses) == len(whole_losses) == 2
    np.testing.assert_allclose(accumulated_losses, whole_losses, rtol=1e-4)
    moved = {k: whole[k] - initial[k] for k in initial}
    assert max(float(d.abs().max()) for d in moved.values()) > 1e-3  # the steps moved the weights
    for key in initial:
        torch.testing.assert_close(accumulated[key] - initial[key], moved[key], rtol=1e-3, atol=1e-6)


def test_finetune_refuses_settings_that_the_trainer_or_lora_refuse(tokenizer, cells, tmp_path):
    prompts = DatasetDict({"train": C2SPromptFormatter(tokenizer=tokenizer, max_tokens=96).format_dataset(cells)})
    model = build_gpt_neox(tokenizer, ARCHITECTURE)
    with pytest.raises(TrainingSettingsError, match="TrainingArguments refused.*no_such_argument"):
        finetune(model, prompts, _settings(tmp_path, training_arguments={"no_such_argument": 1}))
    with pytest.raises(TrainingSettingsError, match="unknown loss average 'per_gene'"):
        finetune(model, prompts, _settings(tmp_path, loss_average="per_gene"))
    with pytest.raises(TrainingSettingsError, match="LoraConfig refused"):
        finetune(model, prompts, _settings(tmp_path, lora={"rank": 2}))


def test_finetune_trains_on_train_evaluates_on_val_and_never_reads_test(tokenizer, cells, tmp_path):
    formatted = C2SPromptFormatter(tokenizer=tokenizer, max_tokens=96).format_dataset(cells)
    broken = Dataset.from_dict({"unrelated": [1, 2]})  # a test part without prompts: reading it would fail
    prompts = DatasetDict({"train": formatted, "val": formatted.select(range(3)), "test": broken})
    arguments = {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1,
                 "eval_strategy": "steps", "eval_steps": 1, "save_strategy": "no", "use_cpu": True}
    base = build_gpt_neox(tokenizer, ARCHITECTURE)
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    trained, history = finetune(base, prompts, _settings(tmp_path, training_arguments=arguments))
    assert [e["step"] for e in history if "eval_loss" in e] == [1, 2]
    assert any(not torch.equal(before[k], v) for k, v in trained.model.state_dict().items())
    # the model remembers what it learnt, so generating cells with a prediction-only model is refused
    assert trained_tasks(trained) == ["cell_type_prediction"]
    require_task(trained, "cell_type_prediction")
    with pytest.raises(ValueError, match="fine-tuned for cell_type_prediction only, not for cell_type_generation"):
        require_task(trained, "cell_type_generation")
    require_task(build_gpt_neox(tokenizer, ARCHITECTURE), "cell_type_generation")  # a model from elsewhere: not refused


def test_custom_formatter_formats_each_cell_once_whatever_the_tasks(cells):
    split = {"train": [f"c{i}" for i in range(8)], "val": ["c8", "c9"], "test": ["c10", "c11"]}
    tasks = ["cell_type_prediction", "cell_type_generation"]
    custom = prompt_formatters(tasks, CUSTOM, {"top_k_genes": 5}, seed=0, top_k_genes=None, label_column="cell_type")
    assert len(custom) == 1
    prompts = format_split_prompts(cells, split, custom, seed=0)
    assert [prompts[part].num_rows for part in ("train", "val", "test")] == [8, 2, 2]
    first_genes = [" ".join(s.split()[:5]) for s in cells.select(range(8))["cell_sentence"]]
    assert sorted(first_genes) == sorted(p.split("Cell sentence: ")[1].split(".")[0] for p in prompts["train"]["model_input"])

    built_in = prompt_formatters(tasks, seed=0, label_column="cell_type")
    assert [f.task for f in built_in] == tasks  # one built-in formatter per task
    both = format_split_prompts(cells, split, built_in, seed=0, max_eval_samples=3)
    assert [both[part].num_rows for part in ("train", "val", "test")] == [16, 3, 4]
    assert set(both["train"]["sample_type"]) == set(tasks)
    with pytest.raises(ValueError, match="no prompt task"):
        prompt_formatters([])


def test_class_balanced_sampling_repeats_rare_labels_train_cells_only(cells):
    assert balanced_rows(["a", "a", "a", "b", None], 3) == [0, 1, 2, 3, 3, 3, 4]
    assert balanced_rows(["a", "b", "b"], 1) == [0, 1, 2]  # every label already has one
    assert balanced_rows(["a", "b", "b", "b", "b"], 3) == [0, 0, 0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="at least 1"):
        balanced_rows(["a"], 0)
    # train: 7 T cells (c0, c2, ..., c12) and 1 B cell (c1); each B copy draws its own template
    big = tiny_cell_sentences(GENES, n_cells=16)
    split = {"train": [f"c{i}" for i in range(0, 14, 2)] + ["c1"], "val": ["c3", "c5"], "test": ["c7", "c9"]}
    formatter = prompt_formatters(["cell_type_prediction"], seed=0, label_column="cell_type")
    plain = format_split_prompts(big, split, formatter, seed=0)
    balanced = format_split_prompts(big, split, formatter, seed=0, min_train_cells_per_label=4, label_column="cell_type")
    assert plain["train"].num_rows == 8 and balanced["train"].num_rows == 11
    assert sorted(balanced["train"]["response"]).count("B cell.") == 4
    b_prompts = [p for p, r in zip(balanced["train"]["model_input"], balanced["train"]["response"]) if r == "B cell."]
    assert len(set(b_prompts)) > 1
    for part in ("val", "test"):
        assert balanced[part]["model_input"] == plain[part]["model_input"]
    with pytest.raises(KeyError, match="label column 'tissue_type'"):
        format_split_prompts(big, split, formatter, seed=0, min_train_cells_per_label=4, label_column="tissue_type")


def test_task_repeats_give_train_cells_more_prompts_of_one_task_only():
    big = tiny_cell_sentences(GENES, n_cells=12)
    split = {"train": [f"c{i}" for i in range(8)], "val": ["c8", "c9"], "test": ["c10", "c11"]}
    formatters = prompt_formatters(["cell_type_prediction", "cell_type_generation"], seed=0, label_column="cell_type")
    plain = format_split_prompts(big, split, formatters, seed=0)
    repeated = format_split_prompts(big, split, formatters, seed=0, task_repeats={"cell_type_generation": 3})
    kinds = lambda part: sorted(part["sample_type"])
    assert kinds(plain["train"]).count("cell_type_generation") == 8
    assert kinds(repeated["train"]).count("cell_type_generation") == 24
    assert kinds(repeated["train"]).count("cell_type_prediction") == 8
    # every train cell's sentence is the answer of 3 generation prompts, not all with the same template
    generation = [(p, r) for p, r, t in zip(repeated["train"]["model_input"], repeated["train"]["response"],
                                            repeated["train"]["sample_type"]) if t == "cell_type_generation"]
    by_answer: dict[str, list[str]] = {}
    for prompt, answer in generation:
        by_answer.setdefault(answer, []).append(prompt)
    assert all(len(prompts) == 3 for prompts in by_answer.values())
    assert any(len(set(prompts)) > 1 for prompts in by_answer.values())
    for part in ("val", "test"):
        assert repeated[part]["model_input"] == plain[part]["model_input"]
    with pytest.raises(ValueError, match="no prompt formatter trains"):
        format_split_prompts(big, split, formatters, seed=0, task_repeats={"tissue_prediction": 2})
    with pytest.raises(ValueError, match="at least 1"):
        format_split_prompts(big, split, formatters, seed=0, task_repeats={"cell_type_generation": 0})


def test_pretraining_corpus_fits_the_context_and_labels_add_generation_prompts(tokenizer, cells):
    corpus = pretraining_corpus(cells, tokenizer, max_tokens=96, max_genes=60, label_column="cell_type",
                                organism_column="organism", seed=0)
    plain = corpus.filter(lambda t: [s == "cell_sentence" for s in t], input_columns="sample_type", batched=True)
    assert plain.num_rows == cells.num_rows and set(plain["model_input"]) == {""}
    # one token per gene and one for the EOS: at most 60 genes, and never more than 95
    assert [len(r.split()) for r in plain["response"]] == [min(20 + 25 * i, 60) for i in range(12)]
    assert corpus.num_rows == 2 * cells.num_rows
    assert set(corpus["sample_type"]) == {"cell_sentence", "cell_type_generation"}
    tokenized = tokenize_dataset(corpus, tokenizer, max_length=96, loss_on_response_only=False)
    assert tokenized.num_rows == corpus.num_rows  # everything fits, nothing dropped

    tight = pretraining_corpus(cells.remove_columns("cell_type"), tokenizer, max_tokens=31, max_genes=60,
                               label_column="cell_type", organism_column="organism", seed=0)
    assert set(tight["sample_type"]) == {"cell_sentence"}  # no label column: plain sentences only
    assert max(len(r.split()) for r in tight["response"]) == 30


def test_label_words_are_the_values_of_the_columns_present(cells):
    words = label_words(cells, ["cell_type", "organism", "no_such_column"])
    assert sorted(words) == ["B cell", "Homo sapiens", "T cell"]
