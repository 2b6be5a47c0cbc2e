"""A hub-style model through every model pipeline, put in place by a Kedro environment only.

C2S models on the hub are GPT-NeoX (Pythia) with a byte-level BPE tokenizer: no pad token, genes and
labels of several tokens, and gene names that are prefixes of others (CD4 / CD40 / CD40LG on the
default data). The test builds such a model, writes a `conf/hub_style` environment (the test
environment's settings plus a catalog that points `foundation_model` and `perturbation_base_model` at
it) and runs the pipelines a user runs with a hub model, as `kedro run` in a copy of the project."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import scanpy as sc
import yaml

from c2s_kedro.core.models.loading import build_gpt_neox, load_model, save_model
from c2s_kedro.core.prompts.formatting import load_templates
from tests.helpers import byte_level_bpe_tokenizer, copy_project

pytestmark = pytest.mark.e2e

PIPELINES = ("finetuning", "evaluation", "zero_shot_annotation", "embedding", "cell_generation",
             "perturbation_finetuning", "perturbation_posterior")
ARCHITECTURE = {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64,
                "max_position_embeddings": 256}  # short: prompts are fitted to it


def _hub_style_model(directory: Path) -> Path:
    """Random GPT-NeoX weights and a byte-level BPE trained on the default data's genes and labels and on
    the prompt templates; the screen's genes are spelt with whatever pieces the BPE learnt."""
    adata = sc.datasets.pbmc68k_reduced()
    genes = list(adata.raw.var_names)
    labels = sorted(adata.obs["bulk_labels"].unique())
    templates = [text for task in ("cell_type_prediction", "cell_type_generation")
                 for text in (*load_templates(task).inputs, *load_templates(task).responses)]
    tokenizer = byte_level_bpe_tokenizer([" ".join(genes), " ".join(labels), *templates], vocab_size=600)
    assert tokenizer.pad_token is None  # as Pythia's; the loader sets one
    save_model(build_gpt_neox(tokenizer, ARCHITECTURE, seed=0), directory)
    return directory


def _kedro(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "MPLBACKEND": "Agg"}
    result = subprocess.run([sys.executable, "-m", "kedro", *args], cwd=project, env=env,
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, f"kedro {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = copy_project(tmp_path_factory.mktemp("hub_style_project"))
    model = _hub_style_model(tmp_path_factory.mktemp("hub_model") / "tiny-c2s-bpe")
    environment = root / "conf" / "hub_style"
    shutil.copytree(root / "conf" / "test", environment)
    entry = {"type": "c2s_kedro.datasets.HFModelDataset", "path": str(model)}
    (environment / "catalog.yml").write_text(
        yaml.safe_dump({"foundation_model": entry, "perturbation_base_model": entry}))
    before = {file.name: file.stat().st_mtime_ns for file in model.iterdir()}
    _kedro(root, "run", "--env", "hub_style", "--pipelines", ",".join(PIPELINES))
    assert {file.name: file.stat().st_mtime_ns for file in model.iterdir()} == before  # the user's model is never written
    return root


def _words_of(sentences: pd.Series) -> list[list[str]]:
    return [str(sentence).split() for sentence in sentences.fillna("")]


def test_the_hub_style_model_is_the_one_fine_tuned_and_left_untouched(project: Path):
    data = project / "data"
    assert not (data / "06_models" / "foundation_model").exists()  # never pretrained: the environment's model is used
    assert not (data / "06_models" / "perturbation_base_model").exists()
    finetuned = load_model(data / "06_models" / "finetuned_model")
    assert finetuned.tokenizer.backend_tokenizer.model.__class__.__name__ == "BPE"
    perturbation = load_model(data / "06_models" / "perturbation_model")
    assert len(perturbation.tokenizer) == len(finetuned.tokenizer)


def test_label_scoring_names_only_known_labels(project: Path):
    data = project / "data"
    import anndata as ad

    known = set(ad.read_h5ad(data / "01_raw" / "pbmc68k_counts.h5ad", backed="r").obs["cell_type"].astype(str))
    for name in ("label_scoring_predictions.csv", "zero_shot_label_scoring_predictions.csv"):
        predictions = pd.read_csv(data / "07_model_output" / name)
        assert len(predictions) > 0 and set(predictions["prediction"].astype(str)) <= known, name
    for name in ("evaluation_metrics.json", "zero_shot_evaluation_metrics.json"):
        metrics = json.loads((data / "08_reporting" / name).read_text())
        assert 0.0 <= metrics["label_scoring_accuracy"] <= 1.0


def test_generated_cells_and_posterior_samples_hold_only_vocabulary_genes_each_once(project: Path):
    data = project / "data"
    atlas_genes = set(json.loads((data / "04_feature" / "vocabulary.json").read_text()))
    generated = pd.read_csv(data / "07_model_output" / "generated_cells.csv", index_col=0)
    sentences = _words_of(generated["cell_sentence"])
    assert len(sentences) > 0 and sum(map(len, sentences)) > 0  # the BPE model did write genes
    for words in sentences:
        assert set(words) <= atlas_genes and len(words) == len(set(words))

    screen_genes = set(json.loads((data / "04_feature" / "perturbation_vocabulary.json").read_text()))
    samples = pd.read_csv(data / "07_model_output" / "posterior_samples.csv")
    sentences = _words_of(samples["sentence"])
    assert len(sentences) > 0 and sum(map(len, sentences)) > 0
    for words in sentences:
        assert set(words) <= screen_genes and len(words) == len(set(words))


def test_embeddings_come_from_the_hub_style_model(project: Path):
    import anndata as ad

    embeddings = ad.read_h5ad(project / "data" / "07_model_output" / "cell_embeddings.h5ad")
    assert embeddings.obsm["X_c2s"].shape[1] == ARCHITECTURE["hidden_size"]
