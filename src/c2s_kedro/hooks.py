"""Project hooks."""

from __future__ import annotations

import logging
import os

from kedro.framework.hooks import hook_impl
from kedro.io import AbstractDataset, MemoryDataset

from c2s_kedro.parameters import PARAMETER_NAMESPACE

logger = logging.getLogger(__name__)


class ParameterNamespaceHook:
    """Tells ``c2s_kedro.parameters`` the namespace of the node about to run when its parameters
    are namespaced too, so that an error of the screen's ``perturbation.data_processing`` nodes
    names ``perturbation.data_processing.qc`` and not the atlas's ``data_processing.qc``."""

    @hook_impl
    def before_node_run(self, node) -> None:
        namespace = node.namespace
        namespaced = bool(namespace) and any(name.startswith(f"params:{namespace}.") for name in node.inputs)
        PARAMETER_NAMESPACE.set(namespace if namespaced else None)


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
