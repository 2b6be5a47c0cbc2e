"""c2s_kedro.datasets.ArrowDataset: save_to_disk folders, without importing transformers."""

import subprocess
import sys

import pytest
from datasets import Dataset, DatasetDict
from kedro.io import DatasetError

from c2s_kedro.datasets import ArrowDataset


def test_a_dataset_and_a_dataset_dict_round_trip_and_exist_once_saved(tmp_path):
    sentences = ArrowDataset(path=str(tmp_path / "cell_sentences"))
    assert not sentences.exists()
    sentences.save(Dataset.from_dict({"cell_name": ["a", "b"], "cell_sentence": ["CD3E CD4", "MS4A1"]}))
    assert sentences.exists() and sentences.load()["cell_sentence"] == ["CD3E CD4", "MS4A1"]
    prompts = ArrowDataset(path=str(tmp_path / "prompts"))
    prompts.save(DatasetDict({"train": Dataset.from_dict({"x": [1]}), "val": Dataset.from_dict({"x": [2]})}))
    assert prompts.exists() and sorted(prompts.load()) == ["train", "val"]


def test_a_dataset_read_from_its_folder_saves_back_to_it(tmp_path):
    """The save swaps a complete folder in: the dataset being saved may be memory-mapped from the
    folder it replaces (save_to_disk alone refuses that)."""
    dataset = ArrowDataset(path=str(tmp_path / "d"))
    dataset.save(Dataset.from_dict({"x": [1, 2]}))
    dataset.save(dataset.load().map(lambda row: {"x": row["x"] * 10}))
    assert dataset.load()["x"] == [10, 20]
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no staging folder left


def test_anything_else_is_refused_with_what_was_given(tmp_path):
    with pytest.raises(DatasetError, match="Dataset or DatasetDict objects, got list"):
        ArrowDataset(path=str(tmp_path / "d")).save([1, 2])


def test_the_class_imports_without_transformers_or_torch():
    """kedro-datasets' huggingface.ArrowDataset imports transformers (and torch) with its package."""
    code = "import sys; from c2s_kedro.datasets import ArrowDataset; print('transformers' in sys.modules, 'torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]
