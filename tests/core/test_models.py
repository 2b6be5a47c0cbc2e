"""Tokenizer, model loading, context fitting and embeddings on tiny models (training: test_training.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from c2s_kedro.core.inference import embed_prompts
from c2s_kedro.core.models import LanguageModel, ModelNotFoundError, build_gpt_neox, load_model, save_model
from c2s_kedro.core.prompts import C2SPromptFormatter, ContextTooSmallError, fit_prompt, load_templates, template_words
from c2s_kedro.core.tokenizer import build_gene_tokenizer

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

    from c2s_kedro.core import models

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the real situation here: no route to the hub
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    probes, opened, open_model = [], [], models._open

    def no_route(address, timeout=None, *args, **kwargs):
        probes.append((address, timeout))
        raise OSError("no route to host")

    def recording_open(location, dtype, **kwargs):
        opened.append(kwargs)
        return open_model(location, dtype, **kwargs)

    monkeypatch.setattr(models, "socket", SimpleNamespace(create_connection=no_route))  # the loader's probe only
    monkeypatch.setattr(models, "_open", recording_open)
    with pytest.raises(ModelNotFoundError, match="local directory"):
        load_model("vandijklab/no-such-model-for-tests")
    assert opened == [{"local_files_only": True}]  # the local cache was read; no download was tried
    assert probes == [(("hub.invalid", 443), 3.0)]


def test_fit_prompt_drops_genes_from_the_end_and_refuses_a_tiny_context(tokenizer):
    template = load_templates("cell_type_prediction").inputs[0]
    fields = {"organism": "Homo sapiens"}
    full, kept = fit_prompt(template, GENES, fields, tokenizer, max_tokens=None)
    assert kept == len(GENES)
    prompt, kept = fit_prompt(template, GENES, fields, tokenizer, max_tokens=100)
    assert 0 < kept < len(GENES)
    assert len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) <= 100
    assert " ".join(GENES[:kept]) + ".\n" in prompt and GENES[kept] not in prompt.split()
    assert f" {kept} most" in prompt  # the instruction states the number of genes kept
    assert prompt.endswith("The cell type corresponding to these genes is:")
    with pytest.raises(ContextTooSmallError, match="instruction alone takes"):
        fit_prompt(template, GENES, fields, tokenizer, max_tokens=10)


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


def test_formatter_picks_templates_with_the_seed_and_needs_its_label_column():
    data = Dataset.from_dict({"cell_name": ["a", "b", "c"], "cell_sentence": ["CD3D CD8A", "MT-CO1", ""], "cell_type": ["T", "B", "T"]})
    formatter = C2SPromptFormatter(task="cell_type_prediction", top_k_genes=1, seed=3)
    first, second = formatter.format_dataset(data), formatter.format_dataset(data)
    assert first.column_names == ["sample_type", "model_input", "response"]
    assert first["model_input"] == second["model_input"]
    assert first["response"] == ["T.", "B.", "T."]
    assert "CD8A" not in first["model_input"][0] and "CD3D" in first["model_input"][0]
    with pytest.raises(KeyError, match="tissue"):
        C2SPromptFormatter(label_column="tissue").format_dataset(data)
    with pytest.raises(ValueError, match="unknown prompt task"):
        C2SPromptFormatter(task="protein_folding")


def test_embedding_pipeline_nodes_work_with_a_bpe_model_of_short_context(tmp_path):
    """A hub-style model (byte-level BPE, several tokens per gene, short context) goes through the
    same embedding nodes; prompts are shortened to its context, never past it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from c2s_kedro.pipelines.embedding.nodes import build_embedding_prompts, embed_cells

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [" ".join(GENES)] + list(load_templates("cell_type_prediction").inputs)
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")  # no pad token, like Pythia
    architecture = {**ARCHITECTURE, "max_position_embeddings": 256}
    model = build_gpt_neox(tokenizer, architecture).model
    model.save_pretrained(tmp_path / "bpe_model")
    tokenizer.save_pretrained(tmp_path / "bpe_model")

    loaded = load_model(tmp_path / "bpe_model")
    assert loaded.tokenizer.pad_token is not None  # set by the loader
    per_gene = len(loaded.tokenizer(" " + " ".join(GENES[:50]), add_special_tokens=False)["input_ids"]) / 50
    assert per_gene > 1.5  # BPE spends several tokens per gene, unlike the gene-level tokenizer
    sentences = Dataset.from_dict({
        "cell_name": ["a", "b"],
        "cell_sentence": [" ".join(GENES[:5]), " ".join(GENES)],
        "organism": ["Homo sapiens", None],
    })
    prompts = build_embedding_prompts(sentences, loaded, {"template_index": 0})
    assert prompts["genes_kept"][0] == 5 and 0 < prompts["genes_kept"][1] < len(GENES)
    lengths = [len(loaded.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts["prompt"]]
    assert max(lengths) <= 256
    embeddings = embed_cells(prompts, loaded, {"batch_size": 2})
    assert embeddings.shape == (2, ARCHITECTURE["hidden_size"]) and np.isfinite(embeddings).all()


def test_precision_on_cpu_is_fp32_unless_bf16_is_asked_for():
    from c2s_kedro.core.models import pick_dtype

    cpu = torch.device("cpu")
    assert pick_dtype("auto", cpu) == pick_dtype(None, cpu) == torch.float32
    assert pick_dtype("bf16", cpu) == pick_dtype("bfloat16", cpu) == torch.bfloat16  # fast on CPUs with AMX
    assert pick_dtype("fp16", cpu) == torch.float32  # half precision matmuls are slow or missing on CPU
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        pick_dtype("int8", cpu)
