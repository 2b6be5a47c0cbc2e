"""read_parameters: values outside a setting's range are refused like a wrong type, naming the key
and the file; every environment's settings are inside their ranges."""

from dataclasses import dataclass
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from c2s_kedro.parameters import ParameterError, at_least, between, greater_than, read_parameters
from c2s_kedro.parameters.annotation import AnnotationParameters
from c2s_kedro.parameters.atlas import (
    BenchmarkingParameters,
    DataProcessingParameters,
    DataSplitParameters,
    SentenceConversionParameters,
)
from c2s_kedro.parameters.inference import CellGenerationParameters, EmbeddingPipelineParameters, EvaluationParameters
from c2s_kedro.parameters.perturbation import PerturbationParameters
from c2s_kedro.parameters.training import FinetuningParameters, PretrainingParameters
from tests.helpers import PROJECT_ROOT

SECTIONS = {
    "data_processing": DataProcessingParameters, "sentence_conversion": SentenceConversionParameters,
    "data_split": DataSplitParameters, "benchmarking": BenchmarkingParameters, "pretraining": PretrainingParameters,
    "finetuning": FinetuningParameters, "embedding": EmbeddingPipelineParameters, "evaluation": EvaluationParameters,
    "cell_generation": CellGenerationParameters, "annotation": AnnotationParameters, "perturbation": PerturbationParameters,
}


@dataclass(frozen=True)
class Ranged:
    count: int = at_least(1)
    temperature: float | None = greater_than(0)
    fractions: dict[str, float] = between(0, 1)
    temperatures: list[float] = greater_than(0)


VALID = {"count": 1, "temperature": 0.5, "fractions": {"train": 0.8, "test": 0.2}, "temperatures": [0.7, 1.0]}


@pytest.mark.parametrize("key, value, message", [
    ("count", 0, "example.count must be at least 1, got 0"),
    ("temperature", 0.0, "example.temperature must be greater than 0, got 0.0"),
    ("fractions", {"train": 1.5}, "example.fractions['train'] must be between 0 and 1, got 1.5"),
    ("temperatures", [0.7, -1], "example.temperatures[1] must be greater than 0, got -1"),
    ("temperatures", [0.7, "hot"], "example.temperatures[1] must be a number greater than 0, got 'hot'"),
])
def test_a_value_outside_its_range_is_refused_naming_the_key_and_the_file(key, value, message):
    with pytest.raises(ParameterError) as error:
        read_parameters(Ranged, {**VALID, key: value}, "example")
    assert str(error.value).startswith(message)
    assert "in your environment (e.g. conf/local/parameters.yml)" in str(error.value)
    assert "conf/base/parameters_example.yml" in str(error.value)


def test_values_in_range_and_null_are_read():
    assert read_parameters(Ranged, {**VALID, "temperature": None}, "example") == Ranged(**{**VALID, "temperature": None})


def test_the_type_check_comes_first():
    with pytest.raises(ParameterError, match="example.count must be int, got True"):
        read_parameters(Ranged, {**VALID, "count": True}, "example")


@pytest.mark.parametrize("section, key, value, message", [
    ("data_processing", "embedding", {"n_top_genes": None, "n_comps": 0, "n_neighbors": 15, "seed": 0},
     "data_processing.embedding.n_comps must be at least 1, got 0"),
    ("data_processing", "qc", {"min_genes_per_cell": 50, "max_genes_per_cell": None, "min_cells_per_gene": 3,
                               "min_counts_per_cell": -5, "max_counts_per_cell": None, "max_pct_mito": 20, "mito_prefix": "MT-"},
     "data_processing.qc.min_counts_per_cell must be at least 0, got -5"),
    ("annotation", "min_probability", 1.5, "annotation.min_probability must be between 0 and 1, got 1.5"),
    ("cell_generation", "temperature", 0, "cell_generation.temperature must be greater than 0, got 0"),
    ("finetuning", "top_k_genes", 0, "finetuning.top_k_genes must be at least 1, got 0"),
    ("data_split", "fractions", {"train": 0.8, "val": -0.1, "test": 0.3},
     "data_split.fractions['val'] must be between 0 and 1, got -0.1"),
])
def test_the_pipelines_settings_have_ranges(section, key, value, message):
    values = _sections(PROJECT_ROOT / "conf" / "base")[section]
    with pytest.raises(ParameterError, match=message.replace(".", r"\.").replace("[", r"\[")):
        read_parameters(SECTIONS[section], {**values, key: value}, section)


def _sections(*folders: Path) -> dict:
    files = [path for folder in folders for path in sorted(folder.glob("parameters*.yml"))]
    return OmegaConf.to_container(OmegaConf.merge(*(OmegaConf.load(path) for path in files)), resolve=True)


@pytest.mark.parametrize("environment", [None, "test", "gpu"])
def test_every_environments_settings_are_in_range(environment):
    folders = [PROJECT_ROOT / "conf" / "base"] + ([PROJECT_ROOT / "conf" / environment] if environment else [])
    values = _sections(*folders)
    for section, cls in SECTIONS.items():
        read_parameters(cls, values[section], section)
