"""The pretraining nodes and pipeline on a few cells with a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset

from c2s_kedro.core.models.tokenizer import SPACE_MARKER
from c2s_kedro.core.prompts.formatting import template_words
from c2s_kedro.pipelines.pretraining import create_pipeline
from c2s_kedro.pipelines.pretraining.nodes import (
    build_pretraining_corpus,
    initialize_foundation_model,
    pretrain_foundation_model,
)
from tests.helpers import load_parameters, params_entries, run_pipeline

GENES = [f"GENE{i}" for i in range(120)]
N_CELLS = 16
MARKERS = [f"ONLY{i}" for i in range(N_CELLS)]  # one gene that only cell i expresses, its top gene
CONTEXT = 64
SPLIT = {"train": [f"c{i}" for i in range(10)], "val": ["c10", "c11", "c12"], "test": ["c13", "c14", "c15"]}


@pytest.fixture()
def cell_sentences() -> Dataset:
    rng = np.random.default_rng(0)
    return Dataset.from_dict({
        "cell_name": [f"c{i}" for i in range(N_CELLS)],
        "cell_sentence": [" ".join([MARKERS[i], *rng.permutation(GENES)[: 10 + 7 * i]]) for i in range(N_CELLS)],
        "cell_type": ["T cell", "B cell", "NK cell", None] * (N_CELLS // 4),
        "organism": ["Homo sapiens"] * N_CELLS,
    })


@pytest.fixture()
def vocabulary() -> dict[str, int]:
    return {gene: 1 for gene in GENES + MARKERS}


def _params(tmp_path, **changes) -> dict:
    params = load_parameters("pretraining")["pretraining"]
    params["architecture"] = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2,
                              "intermediate_size": 128, "max_position_embeddings": CONTEXT}
    params["training_arguments"] = {"max_steps": 4, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8,
                                    "learning_rate": 1e-2, "logging_steps": 1, "eval_strategy": "steps",
                                    "eval_steps": 2, "save_strategy": "steps", "save_steps": 2, "use_cpu": True}
    params["checkpoint_dir"] = str(tmp_path / "checkpoints")
    return {**params, **changes}


def test_the_tokenizer_holds_the_genes_the_template_words_and_the_labels(vocabulary, cell_sentences, tmp_path):
    model = initialize_foundation_model(vocabulary, cell_sentences, _params(tmp_path))
    tokenizer = model.tokenizer
    genes = list(vocabulary)
    ids = tokenizer(" " + " ".join(genes), add_special_tokens=False)["input_ids"]
    assert len(ids) == len(genes) and tokenizer.unk_token_id not in ids  # one token per gene
    words = [w.rstrip(".,:;!?()") for w in template_words()] + ["T", "B", "NK", "cell", "Homo", "sapiens"]
    tokens = [SPACE_MARKER + w for w in words if w]
    assert tokenizer.unk_token_id not in tokenizer.convert_tokens_to_ids(tokens)
    labelled = tokenizer(" NK cell. Homo sapiens", add_special_tokens=False)["input_ids"]
    assert len(labelled) == 5  # NK, cell, ".", Homo, sapiens: each label word one token
    assert "Zebrafish" not in tokenizer.get_vocab() and SPACE_MARKER + "Zebrafish" not in tokenizer.get_vocab()
    assert model.context_length == tokenizer.model_max_length == CONTEXT
    assert model.model.config.num_hidden_layers == 2 and model.model.config.vocab_size == len(tokenizer)


def test_the_corpus_never_uses_test_cells_and_fits_the_context(vocabulary, cell_sentences, tmp_path):
    params = _params(tmp_path)
    model = initialize_foundation_model(vocabulary, cell_sentences, params)
    train, val = build_pretraining_corpus(cell_sentences, SPLIT, model, params)

    def markers(corpus: Dataset) -> set[str]:
        texts = [f"{i} {r}" for i, r in zip(corpus["model_input"], corpus["response"])]
        return {m for m in MARKERS if any(m in t.split() or f"{m}." in t.split() for t in texts)}

    assert markers(train) == {MARKERS[int(c[1:])] for c in SPLIT["train"]}
    assert markers(val) == {MARKERS[int(c[1:])] for c in SPLIT["val"]}
    # each cell's plain sentence, and a generation prompt for each labelled one (every 4th has no label)
    assert train.num_rows == 10 + 8 and val.num_rows == 3 + 2
    for corpus in (train, val):
        lengths = [len(model.tokenizer(i + " " + r if i else " " + r, add_special_tokens=False)["input_ids"]) + 1
                   for i, r in zip(corpus["model_input"], corpus["response"])]
        assert max(lengths) <= CONTEXT
    longest = max(len(r.split()) for r in train["response"])
    assert longest == CONTEXT - 1  # long sentences are cut to what fits with the EOS, not dropped


def test_the_eval_texts_are_capped_at_max_eval_samples_train_texts_never(vocabulary, cell_sentences, tmp_path):
    whole = _params(tmp_path, max_eval_samples=None)
    model = initialize_foundation_model(vocabulary, cell_sentences, whole)
    train_all, val_all = build_pretraining_corpus(cell_sentences, SPLIT, model, whole)
    capped = _params(tmp_path, max_eval_samples=3)
    train, val = build_pretraining_corpus(cell_sentences, SPLIT, model, capped)
    assert val_all.num_rows == 5 and val.num_rows == 3 and train.num_rows == train_all.num_rows
    texts = lambda corpus: {(i, r) for i, r in zip(corpus["model_input"], corpus["response"])}
    assert texts(val) < texts(val_all)  # a subset of the val texts, none from elsewhere
    assert build_pretraining_corpus(cell_sentences, SPLIT, model, capped)[1]["response"] == val["response"]  # seeded


def test_pretraining_changes_the_weights_and_returns_its_history(vocabulary, cell_sentences, tmp_path):
    params = _params(tmp_path)
    model = initialize_foundation_model(vocabulary, cell_sentences, params)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    train, val = build_pretraining_corpus(cell_sentences, SPLIT, model, params)
    trained, history = pretrain_foundation_model(model, train, val, params)
    after = trained.model.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight") and "layernorm" not in k)
    assert [e["step"] for e in history if "loss" in e] == [1, 2, 3, 4]
    assert [e["step"] for e in history if "eval_loss" in e] == [2, 4]
    assert not list((tmp_path / "checkpoints").glob("checkpoint-*"))  # removed once complete


def test_the_pretraining_pipeline_reports_the_model_it_built(vocabulary, cell_sentences, tmp_path):
    params = {"pretraining": _params(tmp_path, max_genes=20)}
    inputs = {"vocabulary": vocabulary, "cell_sentences": cell_sentences, "data_split": SPLIT, **params_entries(params)}
    catalog = run_pipeline(create_pipeline(), inputs)
    model = catalog.load("foundation_model")
    metrics = catalog.load("pretraining_metrics")
    assert metrics["vocabulary_size"] == len(model.tokenizer) and metrics["context_length"] == CONTEXT
    assert metrics["n_parameters"] == model.model.num_parameters() and metrics["global_step"] == 4
    assert max(len(r.split()) for r in catalog.load("pretraining_train_corpus")["response"]) == 20  # max_genes


def test_an_unknown_setting_or_a_broken_architecture_names_the_setting(vocabulary, cell_sentences, tmp_path):
    with pytest.raises(ValueError, match="pretraining.max_gene\\b.*parameters_pretraining.yml"):
        initialize_foundation_model(vocabulary, cell_sentences, {**_params(tmp_path), "max_gene": 10})
    broken = _params(tmp_path)
    broken["architecture"] = {k: v for k, v in broken["architecture"].items() if k != "hidden_size"}
    with pytest.raises(ValueError, match="lacks hidden_size.*Change pretraining.architecture"):
        initialize_foundation_model(vocabulary, cell_sentences, broken)
