"""Where a model is read from (local directory, HF cache, hub) and how (device_map, attention,
8-/4-bit), on tiny hub-shaped models; nothing is downloaded."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import constants as hub_constants
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from c2s_kedro.core.models import loading
from c2s_kedro.core.models.loading import (
    LoadOptions,
    ModelNotFoundError,
    UnsupportedLoadSettingError,
    build_gpt_neox,
    hub_model_available,
    load_model,
    model_source,
    save_model,
)
from tests.helpers import byte_level_bpe_tokenizer

ARCHITECTURE = {"num_hidden_layers": 1, "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32,
                "max_position_embeddings": 64}
HUB_MODEL = "tiny-org/tiny-c2s"


def bpe_tokenizer():
    """A byte-level BPE tokenizer without a pad token, like Pythia's."""
    corpus = ["CD3D CD8A MT-CO1 HLA-DRB1 GENE1 GENE12 The cell type corresponding to these genes is: T cell."]
    return byte_level_bpe_tokenizer(corpus, vocab_size=280)


def save_tiny_model(directory: Path, seed: int = 0) -> Path:
    save_model(build_gpt_neox(bpe_tokenizer(), ARCHITECTURE, seed=seed), directory)
    return directory


def put_in_hub_cache(model_dir: Path, cache: Path, repo_id: str, revision: str = "0" * 40) -> None:
    """Lay ``model_dir`` out as huggingface_hub's cache does: blobs, a snapshot, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for number, file in enumerate(sorted(model_dir.iterdir())):
        blob = repo / "blobs" / f"{number:040x}"
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob.name))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)


def use_hub_cache(monkeypatch, cache: Path) -> None:
    """What HF_HUB_CACHE=<cache> HF_HUB_OFFLINE=1 does for a fresh process (the hub client reads
    the environment when it is imported, so the constants are set too)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)


def no_probe(monkeypatch) -> list:
    """Fail the test if the hub is probed over the network."""
    probes = []

    def refuse(address, timeout=None, *args, **kwargs):
        probes.append(address)
        raise AssertionError(f"the hub was probed at {address}")

    monkeypatch.setattr(loading, "socket", SimpleNamespace(create_connection=refuse))
    return probes


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


# ---- where a model is read from ---------------------------------------------------------------

def test_a_hub_id_is_recognised_whatever_made_the_path_absolute(tmp_path, monkeypatch):
    root = tmp_path / "project"
    (root / "models" / "mine").mkdir(parents=True)
    (root / "data" / "06_models").mkdir(parents=True)
    monkeypatch.chdir(root)

    as_kedro_passes_it = model_source(root / "vandijklab" / "C2S-Pythia-410m-cell-type-prediction", root=root)
    assert as_kedro_passes_it.hub_id == "vandijklab/C2S-Pythia-410m-cell-type-prediction"
    assert model_source("vandijklab/C2S-Pythia-410m-cell-type-prediction").hub_id == as_kedro_passes_it.hub_id
    assert as_kedro_passes_it.path == root / "vandijklab" / "C2S-Pythia-410m-cell-type-prediction"
    # an owner/name path whose first folder is the project's is a local path, existing or not
    assert not model_source(root / "models" / "my_c2s_model_typo", root=root).is_hub
    assert not model_source("models/my_c2s_model_typo").is_hub
    assert model_source("models/mine").path == root / "models" / "mine"
    shutil.rmtree(root / "models")  # the README's folder for local copies is local even before it exists
    assert not model_source("models/my_c2s_model_typo").is_hub
    assert model_source("checkpoints/run1").is_hub  # another owner/name without such a folder: tried on the hub
    # the project's default location (three parts), explicit relative paths, paths outside the root
    assert not model_source(root / "data" / "06_models" / "foundation_model", root=root).is_hub
    assert not model_source("./vandijklab/C2S-Pythia-410m").is_hub
    assert not model_source(tmp_path / "elsewhere" / "model", root=root).is_hub
    assert not model_source(tmp_path / "vandijklab" / "model").is_hub  # absolute without a root: local
    # something that exists is local even if it looks like a hub id
    (root / "vandijklab" / "local-copy").mkdir(parents=True)
    assert not model_source(root / "vandijklab" / "local-copy", root=root).is_hub
    assert not model_source(root / "vandijklab" / "other", root=root).is_hub  # vandijklab/ is now a project folder


def test_a_cached_hub_id_loads_offline_from_the_cache(tiny_model_dir, tmp_path, monkeypatch):
    cache = tmp_path / "hf_cache"
    put_in_hub_cache(tiny_model_dir, cache, HUB_MODEL)
    use_hub_cache(monkeypatch, cache)
    probes = no_probe(monkeypatch)
    monkeypatch.chdir(tmp_path)

    assert hub_model_available(model_source(HUB_MODEL))
    loaded = load_model(HUB_MODEL)
    expected = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert loaded.source == HUB_MODEL and loaded.context_length == 64
    assert torch.equal(loaded.model.gpt_neox.embed_in.weight, expected.gpt_neox.embed_in.weight)
    assert loaded.tokenizer.pad_token == "<|endoftext|>"  # the loader set it
    assert probes == []


def test_an_uncached_hub_id_offline_fails_at_once_with_both_possibilities(tmp_path, monkeypatch):
    use_hub_cache(monkeypatch, tmp_path / "empty_cache")
    probes = no_probe(monkeypatch)
    monkeypatch.chdir(tmp_path)
    source = model_source("vandijklab/C2S-Pythia-410m-cell-type-prediction")
    advice = (r"'vandijklab/C2S-Pythia-410m-cell-type-prediction' is neither a local model directory "
              r"\(nothing at .*vandijklab/C2S-Pythia-410m-cell-type-prediction\) nor.*Hugging Face cache "
              r"\(.*empty_cache\).*HF_HUB_OFFLINE is set.*If it is a local directory, check the path.*"
              r"`hf download vandijklab/C2S-Pythia-410m-cell-type-prediction --local-dir "
              r"models/C2S-Pythia-410m-cell-type-prediction`")
    with pytest.raises(ModelNotFoundError, match=advice) as error:
        hub_model_available(source)
    assert error.value.local_dir == "models/C2S-Pythia-410m-cell-type-prediction"
    with pytest.raises(ModelNotFoundError, match=advice):
        load_model(source)
    assert probes == []  # offline: not even a probe


def test_an_unreachable_hub_is_probed_once_briefly_and_then_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    probes = []

    def no_route(address, timeout=None, *args, **kwargs):
        probes.append((address, timeout))
        raise OSError("no route to host")

    monkeypatch.setattr(loading, "socket", SimpleNamespace(create_connection=no_route))
    monkeypatch.setattr(loading, "file_exists", lambda *a, **k: pytest.fail("the hub API was called"))
    with pytest.raises(ModelNotFoundError, match=r"no connection to hub\.invalid.*hf download owner/model"):
        hub_model_available(model_source("owner/model", root=tmp_path))
    assert probes == [(("hub.invalid", 443), 3.0)]


def test_a_reachable_hub_decides_whether_an_uncached_hub_id_exists(tmp_path, monkeypatch):
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=3.0: True)
    asked = []
    monkeypatch.setattr(loading, "file_exists", lambda repo, name: asked.append((repo, name)) or repo == "owner/real")
    assert hub_model_available(model_source("owner/real", root=tmp_path))
    assert not hub_model_available(model_source("owner/typo", root=tmp_path))
    assert asked == [("owner/real", "config.json"), ("owner/typo", "config.json")]


def test_a_missing_local_directory_is_named_and_not_tried_on_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    probes = no_probe(monkeypatch)
    with pytest.raises(ModelNotFoundError, match=r"model directory not found: .*models/my_c2s_model_typo\.") as error:
        load_model("models/my_c2s_model_typo")
    assert error.value.hub_id is None and probes == []


# ---- how a model is loaded ---------------------------------------------------------------------

@pytest.fixture
def captured(monkeypatch, tiny_model_dir):
    """``AutoModelForCausalLM.from_pretrained`` replaced by one that records its keyword
    arguments and returns the tiny model (the tokenizer still loads for real)."""
    calls = []
    real = AutoModelForCausalLM.from_pretrained

    def recording(location, *args, **kwargs):
        calls.append(kwargs)
        return real(tiny_model_dir)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", recording)
    return calls


def fake_cuda(monkeypatch, packages=("bitsandbytes", "flash_attn")):
    """A machine with CUDA and ``packages`` installed, as far as the load checks can tell."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(loading, "_has_package", lambda name: name in packages)


def test_defaults_pass_only_the_safe_loading_flags(tiny_model_dir, captured):
    load_model(tiny_model_dir)
    assert captured == [{"trust_remote_code": False, "use_safetensors": True, "dtype": torch.float32,
                         "local_files_only": True}]


def test_large_model_settings_reach_from_pretrained(tiny_model_dir, captured):
    loaded = load_model(tiny_model_dir, dtype="bf16", device_map="auto", low_cpu_mem_usage=True,
                        attn_implementation="sdpa")
    assert captured[0] == {"trust_remote_code": False, "use_safetensors": True, "dtype": torch.bfloat16,
                           "local_files_only": True, "attn_implementation": "sdpa", "low_cpu_mem_usage": True,
                           "device_map": "auto"}
    assert not loaded.model.training


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_attention_implementation_is_the_one_the_model_runs(tiny_model_dir, implementation):
    loaded = load_model(tiny_model_dir, attn_implementation=implementation)
    assert loaded.model.config._attn_implementation == implementation
    ids = loaded.tokenizer("CD3D CD8A", return_tensors="pt")
    assert torch.isfinite(loaded.model(**ids).logits).all()


def test_4bit_settings_become_a_bitsandbytes_config_on_a_cuda_machine(tiny_model_dir, captured, monkeypatch):
    fake_cuda(monkeypatch)
    load_model(tiny_model_dir, dtype="bf16", quantization={
        "load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "bf16",
        "bnb_4bit_use_double_quant": True,
    })
    kwargs = captured[0]
    config = kwargs["quantization_config"]
    assert isinstance(config, BitsAndBytesConfig)
    assert config.load_in_4bit and not config.load_in_8bit
    assert (config.bnb_4bit_quant_type, config.bnb_4bit_compute_dtype, config.bnb_4bit_use_double_quant) == (
        "nf4", torch.bfloat16, True)
    assert kwargs["device_map"] == {"": "cuda"}  # bitsandbytes places the weights itself: no .to() afterwards
    assert kwargs["dtype"] == torch.bfloat16 and kwargs["trust_remote_code"] is False and kwargs["use_safetensors"]


def test_8bit_with_an_explicit_device_map(tiny_model_dir, captured, monkeypatch):
    fake_cuda(monkeypatch)
    load_model(tiny_model_dir, device_map="auto", quantization={"load_in_8bit": True})
    assert captured[0]["quantization_config"].load_in_8bit and captured[0]["device_map"] == "auto"


@pytest.mark.parametrize(("settings", "machine", "needed"), [
    ({"quantization": {"load_in_4bit": True}}, None, r"4-bit loading \(bitsandbytes\) needs a CUDA GPU and this machine has none"),
    ({"quantization": {"load_in_8bit": True}}, None, r"8-bit loading \(bitsandbytes\) needs a CUDA GPU"),
    ({"quantization": {"load_in_4bit": True}}, ("flash_attn",), r"needs the bitsandbytes package.*`pip install bitsandbytes`"),
    ({"attn_implementation": "flash_attention_2", "dtype": "bf16"}, None, "flash_attention_2 needs a CUDA GPU"),
    ({"attn_implementation": "flash_attention_2", "dtype": "bf16"}, ("bitsandbytes",), r"flash-attn package.*`pip install flash-attn"),
    ({"attn_implementation": "flash_attention_2"}, ("flash_attn",), "half precision only; set dtype bf16 or fp16"),
    ({"device": "cuda"}, None, "device 'cuda' needs a CUDA GPU"),
])
def test_settings_this_machine_cannot_honour_stop_before_any_weight_is_read(tiny_model_dir, captured, monkeypatch,
                                                                            settings, machine, needed):
    if machine is None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    else:
        fake_cuda(monkeypatch, packages=machine)
    with pytest.raises(UnsupportedLoadSettingError, match=needed):
        load_model(tiny_model_dir, **settings)
    with pytest.raises(UnsupportedLoadSettingError, match=needed):
        load_model("owner/not-even-looked-up", **settings)  # refused before the source is opened
    assert captured == []


@pytest.mark.parametrize(("settings", "message"), [
    ({"load_in_4bit": True}, r"unknown load setting\(s\) load_in_4bit; known: device, dtype, device_map"),
    ({"quantization": {"load_in_4bit": True, "bits": 4}}, r"unknown quantization setting\(s\) bits; .*bnb_4bit_compute_dtype"),
    ({"quantization": {"load_in_4bit": True, "load_in_8bit": True}}, "exactly one of load_in_4bit"),
    ({"quantization": {}}, "exactly one of load_in_4bit"),
    ({"quantization": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf5"}}, "use nf4 or fp4"),
    ({"quantization": {"load_in_4bit": True, "bnb_4bit_compute_dtype": "int4"}}, "unknown bnb_4bit_compute_dtype 'int4'"),
    ({"attn_implementation": "flash"}, "unknown attn_implementation 'flash'; use one of eager, sdpa, flash_attention_2"),
    ({"device": "cuda:1", "device_map": "auto"}, "both set"),
    ({"low_cpu_mem_usage": "yes"}, "must be true or false"),
    ({"dtype": "int8"}, "unknown dtype 'int8'"),
    ({"device": "gpu"}, "unknown device 'gpu'; use auto, cpu, cuda"),
])
def test_malformed_settings_name_what_is_wrong(settings, message):
    with pytest.raises(UnsupportedLoadSettingError, match=message):
        LoadOptions.from_dict(settings)
