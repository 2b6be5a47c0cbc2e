"""What a run imports before its first node.

Every ``kedro run`` imports every pipeline's nodes (the registry composes each pipeline with its
upstream), so a module-level import of torch in any nodes module made a run of
sentence_conversion wait for torch, transformers and cell-eval. Checked in a fresh interpreter:
this test process has long imported them all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

# What a pipeline without a model never needs before its first node.
MODEL_AND_PLOTTING_LIBRARIES = ("torch", "transformers", "cell_eval", "sklearn", "scanpy", "matplotlib.pyplot")

LOADED_AFTER_REGISTRY = """
import importlib.util, json, sys
import c2s_kedro.settings
from c2s_kedro.datasets import H5adDataset, MetricsDataset
from c2s_kedro.pipeline_registry import register_pipelines
pipelines = register_pipelines()
# a module that lazy_loader has only promised (importlib.util._LazyModule) is not imported yet
loaded = [name for name, module in sys.modules.items() if not isinstance(module, importlib.util._LazyModule)]
print(json.dumps({"loaded": loaded, "pipelines": sorted(pipelines)}))
"""


def _loaded_after_registry() -> dict:
    result = subprocess.run([sys.executable, "-c", LOADED_AFTER_REGISTRY], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_registering_the_pipelines_imports_no_model_or_plotting_library():
    state = _loaded_after_registry()
    assert {"sentence_conversion", "data_processing", "perturbation_data", "finetuning"} <= set(state["pipelines"])
    imported = sorted(set(MODEL_AND_PLOTTING_LIBRARIES) & set(state["loaded"]))
    assert not imported, (
        f"registering the pipelines (and the settings and the catalog's h5ad/metrics datasets) imported {imported}: "
        "a nodes module (or what it imports at module level) loads them; load them lazily (lazy_loader.load or an "
        "import in the node), so that runs which do not use them do not wait for them"
    )
    assert "c2s_kedro.core.models.loading" not in state["loaded"]


def test_what_loads_late_still_loads_after_the_registry():
    """The model libraries load when first used, whatever else was loaded before: torch's import
    inspects every module in sys.modules (inspect.getmodule), so a module that sys.modules only
    promised (lazy_loader.load) was loaded in the middle of it and broke on its own import cycle."""
    code = (
        "from c2s_kedro.pipeline_registry import register_pipelines\n"
        "register_pipelines()\n"
        "from c2s_kedro.datasets import HFModelDataset\n"
        "from c2s_kedro import core\n"
        "print(HFModelDataset.__name__, core.tasks.annotation.AnnotatorRecord.__name__, core.models.loading.LanguageModel.__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-3:] == ["HFModelDataset", "AnnotatorRecord", "LanguageModel"]


def test_kedro_parameter_validator_does_not_warn_about_type_checking_only_hints(caplog):
    """Kedro reads every node's type hints each run; the data types they name are imported for
    type checkers only (so that a run does not import torch for them), and the validator's one
    warning per node that it cannot resolve them is left out (c2s_kedro.library_warnings)."""
    from kedro.pipeline import node, pipeline
    from kedro.validation.type_extractor import TypeExtractor

    from c2s_kedro.library_warnings import ignore_library_noise
    from c2s_kedro.pipeline_registry import register_pipelines
    from c2s_kedro.pipelines.sentence_conversion import nodes

    ignore_library_noise()
    with caplog.at_level("WARNING"):
        assert TypeExtractor(register_pipelines()).extract_types_from_pipelines() == {}
    assert not [record for record in caplog.records if "type hints" in record.getMessage()]
    with caplog.at_level("WARNING"):  # a hint that fails for another reason still warns
        TypeExtractor({"x": pipeline([node(_bad_hint, "params:x", "y")])}).extract_types_from_pipelines()
    assert any("_bad_hint" in record.getMessage() for record in caplog.records)
    assert nodes.convert_to_cell_sentences.__annotations__["processed_adata"].startswith("ad.AnnData")


def _bad_hint(x: "list[int"):  # noqa: F722 - a syntax error in a hint: not a type-checking-only name
    return x


SESSION_CATALOG = """
import json, sys
from pathlib import Path
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
bootstrap_project(Path.cwd())
with KedroSession.create(env="test") as session:
    catalog = session.load_context().catalog
    catalog.exists("cell_sentences")  # what a run of sentence_conversion checks first
    print(json.dumps({"key": catalog["lazy_check_metric"].key, "catalog_untouched": "items" not in vars(catalog),
                      "built": sorted(m for m in ("torch", "transformers", "matplotlib.pyplot", "c2s_kedro.datasets.model_dataset")
                                      if m in sys.modules)}))
"""


def test_the_catalog_stays_lazy_and_kedro_mlflow_still_names_its_metric_datasets(tmp_path):
    """kedro-mlflow's after_catalog_created built every catalog entry (importing torch for the
    model datasets, pyplot for the plots); ProjectMlflowHook shows it only its metric datasets,
    which it still names after their entry. The cell sentences' dataset class imports no
    transformers (kedro-datasets' huggingface package does)."""
    from tests.helpers import copy_project

    project = copy_project(tmp_path / "project")
    (project / "conf" / "test" / "catalog_lazy_check.yml").write_text("lazy_check_metric:\n  type: kedro_mlflow.io.metrics.MlflowMetricDataset\n")
    result = subprocess.run([sys.executable, "-c", SESSION_CATALOG], cwd=project, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads(result.stdout.strip().splitlines()[-1])
    assert state == {"key": "lazy_check_metric", "catalog_untouched": True, "built": []}
