"""The annotator as an MLflow model: a table of raw counts in, labels with probabilities out.

``C2SAnnotator`` is a plain ``mlflow.pyfunc.PythonModel`` around a model directory fine-tuned here
(its annotator record holds labels, genes and the training's processing) and the annotation
settings. Its ``predict`` is ``annotation.annotate_counts``, the steps the annotation pipeline's
nodes run, so both give the same numbers for the same cells. It is served and loaded with the
environment it was logged from (``--env-manager local``): this package must be installed there.
"""

import json
import logging
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

from c2s_kedro.core.models.loading import LanguageModel, load_model, save_model
from c2s_kedro.core.tasks.annotation import annotate_counts, annotator_record, counts_adata

logger = logging.getLogger(__name__)

ARTIFACT_PATH = "c2s_annotator"
# what predict imports at run time; pinned to the versions of the environment that logs the model
RUNTIME_PACKAGES = ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "anndata", "scanpy", "datasets",
                    "pandas", "numpy", "scipy", "scikit-learn", "pyarrow")


class C2SAnnotator(PythonModel):
    """Cell-type annotation of raw counts: cells as rows, gene symbols as columns.

    Returns one row per input row: ``cell`` (the input's index), ``label`` (``Unassigned`` below
    the minimum probability, for cells QC removes and for cells expressing no gene the model
    knows), ``confidence`` and one probability column per label.
    """

    def load_context(self, context) -> None:
        self.language_model = load_model(context.artifacts["model"], device="auto", dtype="auto")
        self.options = json.loads(Path(context.artifacts["settings"]).read_text())

    # the pd.DataFrame hint makes MLflow hand over a DataFrame (gene columns differ between datasets,
    # so no column schema is enforced)
    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        table = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        return annotate_counts(self.language_model, counts_adata(table), **self.options)


def _requirements() -> list[str]:
    pins = []
    for package in RUNTIME_PACKAGES:
        try:
            pins.append(f"{package}=={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            continue
    return pins


ANNOTATOR_RUN_TAG = "c2s.annotator_run"  # on the pipeline's run: the child run that holds the annotator


def log_annotator(language_model: LanguageModel, options: dict[str, Any], name: str = ARTIFACT_PATH) -> str | None:
    """Log ``language_model`` (saved as a model directory) and the annotation ``options``
    (``annotate_counts`` keyword arguments) as a pyfunc model in a child run (``c2s_annotator``) of
    the active MLflow run, tagged on it as ``c2s.annotator_run``; returns the ``runs:/`` URI it loads
    from, or None when no run is active (nothing is logged)."""
    annotator_record(language_model)  # refuse a model that cannot annotate before copying it
    run = mlflow.active_run()
    if run is None:
        logger.warning("no MLflow run is active (kedro run starts one): the annotator is not logged")
        return None
    with tempfile.TemporaryDirectory(prefix="c2s_annotator_") as scratch:
        # saved afresh: an in-memory model's ``source`` is where it was loaded from, not what it is now
        directory = Path(scratch) / "model"
        save_model(language_model, directory)
        settings = Path(scratch) / "settings.json"
        settings.write_text(json.dumps(options, indent=2))
        # in a run of its own under the pipeline's run: MLflow lists a logged model's source run's metrics
        # as the model's, and the pipeline's run holds hundreds of every pipeline's
        with mlflow.start_run(nested=True, run_name=name, experiment_id=run.info.experiment_id) as own:
            mlflow.pyfunc.log_model(
                name=name, python_model=C2SAnnotator(), artifacts={"model": str(directory), "settings": str(settings)},
                pip_requirements=_requirements(),
            )
    mlflow.set_tag(ANNOTATOR_RUN_TAG, own.info.run_id)
    uri = f"runs:/{own.info.run_id}/{name}"
    logger.info("annotator logged as the MLflow model %s", uri)
    return uri
