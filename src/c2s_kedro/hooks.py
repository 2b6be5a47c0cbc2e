"""Project hooks."""

from __future__ import annotations

import logging

from kedro.framework.hooks import hook_impl
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
