"""HFModelDataset as Kedro hands it its path (absolute under the project), and through a
KedroSession with a conf/local override, as a user runs it; nothing is downloaded."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from kedro.io import DataCatalog, DatasetError
from transformers import AutoModelForCausalLM

from c2s_kedro.core.models.loading import LanguageModel
from c2s_kedro.datasets import HFModelDataset
from tests.helpers import copy_project
from tests.core.test_model_loading import HUB_MODEL, no_probe, put_in_hub_cache, save_tiny_model, use_hub_cache

C2S_410M = "vandijklab/C2S-Pythia-410m-cell-type-prediction"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def project(tmp_path) -> Path:
    """A folder Kedro recognises as a project root."""
    root = tmp_path / "project"
    root.mkdir()
    (root / "pyproject.toml").write_text('[tool.kedro]\npackage_name = "c2s_kedro"\n')
    return root


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, tiny_model_dir) -> Path:
    """HF_HUB_OFFLINE=1 and a Hugging Face cache holding the tiny model as ``HUB_MODEL``."""
    cache = tmp_path / "hf_cache"
    put_in_hub_cache(tiny_model_dir, cache, HUB_MODEL)
    use_hub_cache(monkeypatch, cache)
    return cache


def _same_weights(loaded: LanguageModel, model_dir: Path) -> bool:
    expected = AutoModelForCausalLM.from_pretrained(model_dir)
    return torch.equal(loaded.model.gpt_neox.embed_in.weight, expected.gpt_neox.embed_in.weight)


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


# ---- the dataset as Kedro builds it --------------------------------------------------------------

def test_a_cached_hub_id_made_absolute_by_kedro_exists_loads_and_refuses_saves(project, hub_cache, tiny_model_dir,
                                                                              monkeypatch):
    probes = no_probe(monkeypatch)
    dataset = HFModelDataset(path=str(project / HUB_MODEL))  # what Kedro passes for `path: tiny-org/tiny-c2s`
    assert dataset.exists()
    assert f"hub_id='{HUB_MODEL}'" in str(dataset)
    loaded = dataset.load()
    assert loaded.source == HUB_MODEL and _same_weights(loaded, tiny_model_dir)
    with pytest.raises(DatasetError, match="hub id, which is read-only"):
        dataset.save(loaded)
    assert _files(project) == {"pyproject.toml"} and probes == []


def test_an_uncached_hub_id_offline_fails_the_exists_check_with_the_copy_over_advice(project, hub_cache, monkeypatch):
    probes = no_probe(monkeypatch)
    dataset = HFModelDataset(path=str(project / C2S_410M))
    advice = (r"nor, as a Hugging Face hub id, in this machine's Hugging Face cache.*HF_HUB_OFFLINE is set.*"
              rf"`hf download {C2S_410M} --local-dir models/C2S-Pythia-410m-cell-type-prediction`.*"
              r"In this catalog entry: `path: models/C2S-Pythia-410m-cell-type-prediction`")
    with pytest.raises(DatasetError, match=advice):
        dataset.exists()
    with pytest.raises(DatasetError, match=advice):
        dataset.load()
    assert probes == []


def test_a_missing_local_path_does_not_exist_and_its_load_names_the_path_and_the_entry(project, monkeypatch):
    probes = no_probe(monkeypatch)
    typo = project / "models" / "my_c2s_model_typo"
    catalog = DataCatalog(datasets={"foundation_model": HFModelDataset(path=str(typo))})
    assert not catalog.exists("foundation_model")
    with pytest.raises(DatasetError, match=rf"^foundation_model: model directory not found: {typo}\..*"
                                           r"Check the `path` of this catalog entry\.") as error:
        catalog.load("foundation_model")
    assert "hub" not in str(error.value).split("Nothing was saved")[0]  # not confused with a hub id
    assert probes == [] and not typo.exists()


def test_without_a_project_folder_of_that_name_a_missing_path_states_both_possibilities(project, hub_cache):
    dataset = HFModelDataset(path=str(project / "checkpoints" / "my_model"))
    with pytest.raises(DatasetError, match=r"'checkpoints/my_model' is neither a local model directory.*"
                                           r"If it is a local directory, check the path"):
        dataset.exists()


def test_saving_to_a_local_path_writes_the_model_there(project, tiny_model_dir, tmp_path):
    from c2s_kedro.core.models.loading import load_model

    target = project / "models" / "mine"
    dataset = HFModelDataset(path=str(target))
    assert not dataset.exists()
    dataset.save(load_model(tiny_model_dir))
    assert dataset.exists() and _same_weights(dataset.load(), tiny_model_dir)


def test_malformed_load_args_fail_when_the_catalog_creates_the_entry():
    catalog = DataCatalog.from_config({"foundation_model": {
        "type": "c2s_kedro.datasets.HFModelDataset", "path": "data/06_models/foundation_model",
        "load_args": {"quantization": {"load_in_4bit": True, "bits": 4}}}})
    with pytest.raises(DatasetError, match=r"(?s)unknown quantization setting\(s\) bits.*dataset 'foundation_model'"):
        catalog.get("foundation_model")


def test_4bit_on_a_machine_without_cuda_stops_at_the_exists_check_and_the_load(project, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    opened = []
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: opened.append(k))
    shutil.copytree(tiny_model_dir, project / "models" / "mine")  # creates models/
    dataset = HFModelDataset(path=str(project / "models" / "mine"), load_args={
        "dtype": "bf16", "quantization": {"load_in_4bit": True, "bnb_4bit_compute_dtype": "bf16"}})
    needed = r"4-bit loading \(bitsandbytes\) needs a CUDA GPU and this machine has none.*this catalog entry's load_args"
    with pytest.raises(DatasetError, match=needed):
        dataset.exists()
    with pytest.raises(DatasetError, match=needed):
        dataset.load()
    assert opened == []


# ---- as a user runs it: conf/local overrides foundation_model --------------------------------------

@pytest.fixture
def user_project(tmp_path):
    """A copy of the project's conf/ and pyproject.toml; yields (root, write_local_catalog, session)
    where session() opens the session `kedro run` opens (env local)."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    root = copy_project(tmp_path / "user_project")

    def local_catalog(path: str) -> None:
        (root / "conf" / "local" / "catalog.yml").write_text(
            f"foundation_model:\n  type: c2s_kedro.datasets.HFModelDataset\n  path: {path}\n  load_args: {{device: cpu}}\n"
        )

    bootstrap_project(root)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        yield root, local_catalog, lambda: KedroSession.create(project_path=root)
    finally:
        os.chdir(cwd)
        sys.modules.pop("c2s_kedro.pipeline_registry", None)


def _written_data(root: Path) -> set[str]:
    # kedro-viz keeps its run-status log in .viz/ (not a dataset)
    return {p for p in _files(root) if not p.startswith(("conf/", "mlflow", ".viz/")) and p not in {"pyproject.toml", ".telemetry"}}


def test_a_typo_in_a_local_model_path_stops_the_run_naming_the_entry_and_the_path(user_project, monkeypatch):
    from c2s_kedro.upstream import UserEntryMissingError, run_pipelines

    root, local_catalog, session = user_project
    probes = no_probe(monkeypatch)
    local_catalog("models/my_c2s_model_typo")  # a fresh project: no models/ folder yet
    with session() as kedro_session:
        with pytest.raises(UserEntryMissingError, match=r"'foundation_model' is not saved.*environment 'local'.*"
                                                        r"models/my_c2s_model_typo"):
            run_pipelines(kedro_session, ["embedding"])  # what `kedro run --pipelines=embedding` runs
    assert _written_data(root) == set()  # nothing processed, nothing pretrained into the typo'd path
    assert not (root / "models" / "my_c2s_model_typo").exists() and probes == []


def test_an_uncached_hub_id_offline_stops_the_run_at_once_with_the_advice(user_project, tmp_path, monkeypatch):
    from c2s_kedro.upstream import run_pipelines

    root, local_catalog, session = user_project
    use_hub_cache(monkeypatch, tmp_path / "empty_cache")
    probes = no_probe(monkeypatch)
    local_catalog(C2S_410M)
    with session() as kedro_session:
        with pytest.raises(DatasetError, match=rf"(?s)hub_id='{C2S_410M}'.*`hf download {C2S_410M} --local-dir "
                                               r"models/C2S-Pythia-410m-cell-type-prediction`.*"
                                               r"`path: models/C2S-Pythia-410m-cell-type-prediction`"):
            run_pipelines(kedro_session, ["embedding"])
    assert _written_data(root) == set() and not (root / "vandijklab").exists() and probes == []


def test_a_cached_hub_id_is_what_the_embedding_pipeline_loads_and_is_never_produced(user_project, hub_cache,
                                                                                   tiny_model_dir, monkeypatch):
    from c2s_kedro.pipeline_registry import own_pipelines
    from c2s_kedro.upstream import EntryMatcher, missing_inputs, own_nodes, plan

    root, local_catalog, session = user_project
    probes = no_probe(monkeypatch)
    local_catalog(HUB_MODEL)
    with session() as kedro_session:
        catalog = kedro_session.load_context().catalog
        embedding, project = own_pipelines()["embedding"], own_nodes(None)[1]
        assert "foundation_model" in embedding.inputs()
        assert "foundation_model" not in missing_inputs(embedding, catalog)
        planned = plan(embedding, project, catalog, EntryMatcher(["foundation_model"]), "local")
        assert "foundation_model" not in planned.all_outputs()  # not pretrained upstream
        loaded = catalog.load("foundation_model")
    assert loaded.source == HUB_MODEL and _same_weights(loaded, tiny_model_dir)
    assert not (root / "tiny-org").exists() and probes == []


def test_a_saved_model_folder_gets_the_umask_permissions_not_a_private_one(tmp_path, tiny_model_dir):
    import stat

    previous = os.umask(0o027)
    try:
        target = tmp_path / "saved" / "model"
        HFModelDataset(path=str(target)).save(HFModelDataset(path=str(tiny_model_dir)).load())
    finally:
        os.umask(previous)
    assert stat.S_IMODE(target.stat().st_mode) == 0o750  # 0o777 & ~0o027, not mkdtemp's 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in target.iterdir() if p.is_file()} == {0o640}
    assert [p.name for p in target.parent.iterdir()] == ["model"]
