"""A pipeline run alone on a fresh clone: of the nodes upstream of it, the ones that produce what
it needs and nobody saved yet run first, in the same run.

Each registered pipeline holds its own nodes and everything upstream of them
(``pipeline_registry``). ``plan`` keeps the pipeline's own nodes and, of the upstream ones, only
those whose outputs a running node needs and that are not saved: a second run goes straight to the
pipeline's own nodes. The project's ``kedro run`` (``c2s_kedro.cli``) passes the plan to Kedro as
its node list, so every runner runs it, with every node's hooks, in one MLflow run; from Python,
``run_pipelines`` does the same with a session.

What the run's environment defines (``conf/local`` pointing ``foundation_model`` at a hub id or a
model directory of the user's, their annotation input) is never produced or overwritten:
``check_user_entries`` (a ``before_pipeline_run`` hook, c2s_kedro.hooks) stops such a run before
any node runs, naming the entry.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from kedro.io import DatasetError
from kedro.pipeline import Pipeline

from c2s_kedro.core.errors import C2SError
from c2s_kedro.datasets.errors import C2SDatasetError

logger = logging.getLogger(__name__)

# Models a user points the catalog at to *use* them: the project pretrains its own default into this
# entry (the pretraining pipeline) only where conf/base puts it.
BASE_MODELS = ("foundation_model",)
# Inputs a node of the project writes a default for (the test split's cells to annotate, the screen's
# untrained base model). Where the environment defines the entry, ``plan`` leaves that node out, so
# the user's file or model is read and kept.
DEFAULT_INPUTS = ("annotation_raw_adata", "perturbation_base_model")


class UserModelOverwriteError(C2SError, PermissionError):
    """A node of the run would write a base model or default input whose catalog entry is the user's."""


class UserEntryMissingError(C2SError, FileNotFoundError):
    """A dataset the run needs is missing (or would be produced again) and its catalog entry is the
    user's, so the project must not create it."""


class EntryMatcher:
    """Dataset names matched against catalog keys, literal or dataset-factory patterns."""

    def __init__(self, entries: Iterable[str] = ()) -> None:
        entries = list(entries)
        self._literal = {e for e in entries if "{" not in e}
        self._patterns = [re.compile("^" + re.sub(r"\\\{[^}]*\\\}", ".+?", re.escape(e)) + "$") for e in entries if "{" in e]

    def matches(self, name: str) -> bool:
        return name in self._literal or any(p.match(name) for p in self._patterns)


def environment_entries(merged: Mapping[str, Any], base: Mapping[str, Any]) -> list[str]:
    """Catalog keys the environment adds or changes relative to ``conf/base``."""
    return sorted(key for key, value in merged.items() if not key.startswith("_") and base.get(key) != value)


def user_entries(config_loader) -> list[str]:
    """``environment_entries`` of a Kedro config loader's run environment against its base one."""
    from kedro.framework.project import settings

    arguments = {**settings.CONFIG_LOADER_ARGS, "base_env": config_loader.base_env,
                 "default_run_env": config_loader.default_run_env}
    base = type(config_loader)(conf_source=config_loader.conf_source, env=config_loader.base_env,
                               runtime_params=config_loader.runtime_params, **arguments)
    return environment_entries(config_loader["catalog"], base["catalog"])


def _is_parameter(name: str) -> bool:
    return name == "parameters" or name.startswith("params:")


def _exists(catalog, name: str) -> bool:
    try:
        return catalog.exists(name)
    except DatasetError as error:  # Kedro's message names the dataset class, not the entry
        raise C2SDatasetError(f"{name}: {error}") from error


def missing_inputs(pipeline: Pipeline, catalog) -> set[str]:
    """Inputs of ``pipeline`` that are neither parameters nor saved."""
    return {name for name in pipeline.inputs() if not _is_parameter(name) and not _exists(catalog, name)}


def plan(own: Pipeline, project: Pipeline, catalog, user: EntryMatcher, environment: str) -> Pipeline:
    """``own``'s nodes and the nodes of ``project`` upstream of them that must run first: those
    producing an input of a running node that is not saved. A node of ``own`` writing a default
    input the environment defines is left out (the user's file is read)."""
    writers = [n for n in own.nodes if any(user.matches(o) for o in set(n.outputs) & set(DEFAULT_INPUTS))]
    if writers:
        logger.info("%s comes from your environment '%s': node(s) %s that write the project's default are skipped",
                    ", ".join(sorted({o for n in writers for o in n.outputs if o in DEFAULT_INPUTS})), environment,
                    ", ".join(n.name for n in writers))
        own = own - Pipeline(writers)
    if not own.nodes:
        return own
    upstream = project.to_nodes(*(n.name for n in own.nodes)) - own
    missing = missing_inputs(own, catalog)
    needed = set(missing)
    running = []
    for node in reversed(upstream.nodes):  # a node's consumers come before it
        if needed & set(node.outputs):
            running.append(node)
            needed |= missing_inputs(Pipeline([node]), catalog)
    if running:
        produced = sorted(missing & {o for n in running for o in n.outputs})
        logger.info("%s not saved yet: running %d upstream node(s) first in this run (%s)", ", ".join(produced),
                    len(running), ", ".join(n.name for n in reversed(running)))
    return Pipeline(running) + own


def check_user_entries(pipeline: Pipeline, own: Sequence[str], catalog, user: EntryMatcher, environment: str) -> None:
    """Stop a run that would write a dataset whose catalog entry the environment defines, before any
    node runs: upstream nodes (not in ``own``) never write one; the pipeline's own nodes may write
    their outputs where the user points them, but never a base model or a default input."""
    own = set(own)
    for node in pipeline.nodes:
        for name in sorted(o for o in node.outputs if user.matches(o)):
            protected = name in BASE_MODELS or name in DEFAULT_INPUTS
            if node.name in own and not protected:
                continue
            if node.name in own:
                raise UserModelOverwriteError(
                    f"node '{node.name}' would write '{name}', whose catalog entry comes from your environment "
                    f"'{environment}': that is what you chose to use, and the project only builds its own default "
                    f"where conf/base puts it. Run the pipelines that use {name} (e.g. --pipelines=embedding,"
                    "finetuning,evaluation), not the one that builds it, or remove the override."
                )
            saved = _exists(catalog, name)
            raise UserEntryMissingError(
                f"'{name}' {'would be produced again' if saved else 'is not saved'}: the run needs it and its catalog "
                f"entry comes from your environment '{environment}' ({catalog.get(name)}), not from the project, so "
                f"it is not produced here (node '{node.name}' would write it). "
                + ("Run the pipeline with `kedro run --pipelines=...`, or from Python with "
                   "c2s_kedro.upstream.run_pipelines: both run only the upstream nodes whose outputs are missing."
                   if saved else "Check the entry's path or hub id; to train or build it on purpose, run the pipeline "
                   "that produces it, or remove the override to use the project's default.")
            )


def own_nodes(pipeline_names: Sequence[str] | None) -> tuple[Pipeline | None, Pipeline]:
    """The own nodes of the registered pipelines ``pipeline_names`` (every node for the default run;
    None for a name that is not registered), and the project's whole pipeline."""
    from c2s_kedro.pipeline_registry import own_pipelines

    pipelines = own_pipelines()
    project = sum(pipelines.values(), Pipeline([]))
    names = list(pipeline_names or [])
    if not names or "__default__" in names:
        return project, project
    if set(names) - set(pipelines):
        return None, project
    return sum((pipelines[n] for n in names), Pipeline([])), project


def planned_node_names(context, pipeline_names: Sequence[str] | None, **filters: Any) -> list[str] | None:
    """The nodes a run of ``pipeline_names`` runs (``plan``), in a Kedro context; ``filters`` are
    ``Pipeline.filter``'s (tags, node_names, from_nodes, to_outputs, ...), applied to the pipelines'
    own nodes. None where a pipeline name is not registered (Kedro's session then names it)."""
    own, project = own_nodes(pipeline_names)
    if own is None:
        return None
    if any(filters.values()):
        own = own.filter(**{k: v or None for k, v in filters.items()})
    planned = plan(own, project, context.catalog, EntryMatcher(user_entries(context.config_loader)), context.env)
    return [n.name for n in planned.nodes]


def run_pipelines(session, pipeline_names: Sequence[str] | None = None, **kwargs: Any) -> dict[str, Any]:
    """``session.run`` of what ``kedro run --pipelines=...`` runs: the pipelines' own nodes and the
    upstream nodes whose outputs are missing."""
    names = planned_node_names(session.load_context(), pipeline_names)
    if names == []:
        logger.info("nothing to run: the pipeline's nodes write only what your environment provides")
        return {}
    return session.run(pipeline_names=list(pipeline_names) if pipeline_names else None, node_names=names or (), **kwargs)
