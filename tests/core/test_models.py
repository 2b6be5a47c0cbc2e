"""Tokenizer, model loading and embeddings on tiny models (training: test_training.py; prompts and
context fitting: test_prompts.py; the embedding nodes: tests/pipelines/test_embedding.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from c2s_kedro.core.models.inference import embed_prompts
from c2s_kedro.core.models.loading import LanguageModel, ModelNotFoundError, build_gpt_neox, load_model, save_model
from c2s_kedro.core.models.tokenizer import build_gene_tokenizer
from c2s_kedro.core.prompts.formatting import load_templates, template_words

GENES = ["CD3D", "CD8A", "MT-CO1", "RP11-34P13.3", "HLA-DRB1", "IGKV1-5", "CD3", "LINC00115", "AC009.1"] + [
    f"GENE{i}" for i in range(200)
]
ARCHITECTURE = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 128}


@pytest.fixture(scope="module")
def tokenizer():
    return build_gene_tokenizer(GENES, template_words() + ["CD14+ Monocyte", "Homo sapiens"], model_max_length=128)


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    save_model(build_gpt_neox(tokenizer, ARCHITECTURE, seed=0), directory)
    return directory


def test_every_gene_is_one_token_and_decoding_restores_the_text(tokenizer):
    for template in load_templates("cell_type_prediction").inputs:
        prompt = template.format(num_genes=len(GENES[:9]), organism="Homo sapiens", cell_sentence=" ".join(GENES[:9]))
        text = prompt + " CD14+ Monocyte."
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text
    sentence_ids = tokenizer(" " + " ".join(GENES), add_special_tokens=False)["input_ids"]
    assert len(sentence_ids) == len(GENES)  # 1.0 token per gene
    assert tokenizer.convert_ids_to_tokens(sentence_ids)[3] == "\u2581RP11-34P13.3"


def test_unseen_words_fall_back_to_characters_without_unknown_tokens(tokenizer):
    text = "Zebrafish cell: 12345 genes (unusual-word), ok?\nYes."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_saved_model_opens_with_plain_auto_classes(model_dir):
    assert (model_dir / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=False)
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert model.config.max_position_embeddings == 128 and tok.pad_token == "<pad>"


def test_load_model_from_local_directory(model_dir):
    loaded = load_model(model_dir)
    assert isinstance(loaded, LanguageModel)
    assert loaded.context_length == 128 and loaded.device.type == "cpu"
    assert loaded.tokenizer.pad_token_id is not None and not loaded.model.training
    assert next(loaded.model.parameters()).dtype == torch.float32


def test_missing_model_directory_names_the_path_and_the_fix(tmp_path):
    with pytest.raises(ModelNotFoundError, match="model directory not found.*pretraining"):
        load_model(tmp_path / "no_such_model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="not a Hugging Face model directory"):
        load_model(tmp_path / "empty")


def test_unreachable_hub_id_fails_fast_with_local_directory_advice(monkeypatch):
    """Without a route to the hub the loader probes it once with a short timeout and never starts
    the hub client's download, whose retries would take minutes."""
    from types import SimpleNamespace

    from c2s_kedro.core.models import loading

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the real situation here: no route to the hub
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    probes, opened, open_model = [], [], loading._open

    def no_route(address, timeout=None, *args, **kwargs):
        probes.append((address, timeout))
        raise OSError("no route to host")

    def recording_open(location, dtype, **kwargs):
        opened.append(kwargs)
        return open_model(location, dtype, **kwargs)

    monkeypatch.setattr(loading, "socket", SimpleNamespace(create_connection=no_route))  # the loader's probe only
    monkeypatch.setattr(loading, "_open", recording_open)
    with pytest.raises(ModelNotFoundError, match="local directory"):
        load_model("vandijklab/no-such-model-for-tests")
    assert opened == [{"local_files_only": True}]  # the local cache was read; no download was tried
    assert probes == [(("hub.invalid", 443), 3.0)]


def test_embedding_does_not_depend_on_batch_neighbours(model_dir):
    model = load_model(model_dir)
    short = "Cell sentence: CD3D CD8A."
    others = ["Cell sentence: " + " ".join(GENES[: 20 + 3 * i]) + "." for i in range(31)]
    alone = embed_prompts(model, [short], batch_size=1)[0]
    batched = embed_prompts(model, others[:15] + [short] + others[15:], batch_size=32)[15]
    assert np.abs(alone - batched).max() <= 1e-4
    assert np.abs(alone).sum() > 0


def test_embedding_refuses_prompts_longer_than_the_context(model_dir):
    model = load_model(model_dir)
    with pytest.raises(ValueError, match="exceed the model's context of 128"):
        embed_prompts(model, ["Cell sentence: " + " ".join(GENES) + "."])


def test_precision_on_cpu_is_fp32_unless_bf16_is_asked_for():
    from c2s_kedro.core.models.loading import pick_dtype

    cpu = torch.device("cpu")
    assert pick_dtype("auto", cpu) == pick_dtype(None, cpu) == torch.float32
    assert pick_dtype("bf16", cpu) == pick_dtype("bfloat16", cpu) == torch.bfloat16  # fast on CPUs with AMX
    assert pick_dtype("fp16", cpu) == torch.float32  # half precision matmuls are slow or missing on CPU
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        pick_dtype("int8", cpu)
