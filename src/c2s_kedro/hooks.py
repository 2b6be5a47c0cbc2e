"""Project hooks."""

from __future__ import annotations

import logging
import os

from kedro.framework.hooks import hook_impl
from kedro.io import AbstractDataset, MemoryDataset
from kedro.runner import SequentialRunner

logger = logging.getLogger(__name__)


class UpstreamOutputsHook:
    """Produce a pipeline's missing inputs before it runs.

    ``kedro run --pipeline=finetuning`` on a fresh clone needs processed data, sentences, a split
    and a foundation model. Before a pipeline runs, every input that is neither a parameter nor
    already saved is produced by the nodes of the full project pipeline that lead to it, and only
    those whose outputs are missing run. A second run finds them saved and goes straight to its
    own nodes.
    """

    @hook_impl
    def before_pipeline_run(self, run_params, pipeline, catalog) -> None:
        from kedro.framework.project import pipelines

        missing = sorted(
            name for name in pipeline.inputs()
            if not name.startswith("params:") and name != "parameters" and not catalog.exists(name)
        )
        if not missing:
            return
        project = pipelines["__default__"]
        producible = sorted(set(missing) & project.all_outputs())
        if not producible:
            return  # Kedro will report the missing inputs itself
        logger.info("inputs %s are not saved yet: producing them first with their upstream nodes", producible)
        SequentialRunner().run(project.to_outputs(*producible), catalog, only_missing_outputs=True)


def process_rank() -> int:
    """This process's rank under ``torchrun`` (0 when not distributed)."""
    return int(os.environ.get("RANK", "0"))


class _KeptInMemory(AbstractDataset):
    """Wraps a dataset on a non-zero rank: saves stay in this process, loads read them back (or the
    wrapped dataset when this process saved nothing)."""

    def __init__(self, wrapped: AbstractDataset):
        self._wrapped = wrapped
        self._data = None
        self._saved = False

    def _describe(self) -> dict:
        return {"kept_in_memory_on_this_rank": repr(self._wrapped)}

    def load(self):
        return self._data if self._saved else self._wrapped.load()

    def save(self, data) -> None:
        self._data, self._saved = data, True

    def _exists(self) -> bool:
        return self._saved or self._wrapped.exists()


class DistributedRunHook:
    """Under ``torchrun --nproc_per_node=N kedro run ...`` every process runs the pipeline and the
    HF Trainer trains with DDP, but only rank 0 writes outputs and records the MLflow run; the
    other ranks keep what they produce in memory."""

    @hook_impl
    def after_context_created(self, context) -> None:
        config = getattr(context, "mlflow", None)  # set by kedro-mlflow's hook, which runs first
        if process_rank() > 0 and config is not None:
            from kedro.framework.project import pipelines

            config.tracking.disable_tracking.pipelines = list(pipelines)

    @hook_impl
    def after_catalog_created(self, catalog) -> None:
        if process_rank() == 0:
            return
        for name in list(catalog.keys()):
            dataset = catalog.get(name)
            if not isinstance(dataset, MemoryDataset | _KeptInMemory):
                catalog[name] = _KeptInMemory(dataset)
