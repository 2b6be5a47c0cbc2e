"""Running one pipeline alone on a fresh clone: what it needs and nobody saved yet is produced
first, in the same run.

``kedro run --pipelines=finetuning`` needs processed data, sentences, a split and a foundation
model. ``UpstreamRunner`` adds to the pipeline the nodes of the project's ``__default__``
pipeline that lead to its missing inputs, keeps of those only the ones Kedro's own
missing-outputs rule says must run, and runs everything as one pipeline: node hooks fire for
every node (MLflow logs their parameters), and a failure upstream is a failure of this run. The
pipeline's own nodes always run. A second run finds the inputs saved and adds nothing.

It never produces a dataset whose catalog entry the run's environment defines (``conf/local``
pointing ``foundation_model`` at a hub id, a model directory of the user's, a typo'd path):
missing, such an entry is an error that names it. ``ProjectSession`` (settings.py) makes this
the runner of ``kedro run`` and of ``KedroSession.run`` when no other runner is asked for.

Under ``torchrun`` (or ``accelerate launch``) every process runs the same nodes, so that the HF
Trainer's collective steps line up, and only rank 0 writes: rank 0 decides which nodes run from
the files as they are and sends that list to the other ranks before anything is written (so a
file rank 0 is still writing is never mistaken for a saved input), and the other ranks keep
every save in memory (``KeptInMemory``). Their Kedro plugins' hooks are off
(``plugins_off_this_rank``, settings.py): one process creates the MLflow store and records the run.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from kedro.framework.session import KedroSession
from kedro.io import AbstractDataset, DatasetError, MemoryDataset
from kedro.pipeline import Pipeline
from kedro.runner import SequentialRunner

from c2s_kedro.core.errors import C2SError
from c2s_kedro.datasets.errors import C2SDatasetError

logger = logging.getLogger(__name__)


# Models a user points the catalog at to *use* them: the project trains its own defaults into these
# entries (pretraining, the screen's base model) only where conf/base puts them.
BASE_MODELS = ("foundation_model", "perturbation_base_model")
# Inputs a node of the project writes a default for (the test split's cells to annotate). Where the
# environment defines the entry, that node is left out of the run, the default run included, so the
# user's file is read and never overwritten.
DEFAULT_INPUTS = ("annotation_raw_adata",)


class UserModelOverwriteError(C2SError, PermissionError):
    """A node of the run would write a base model whose catalog entry is the user's."""


class UserEntryMissingError(C2SError, FileNotFoundError):
    """A dataset the run needs is missing and its catalog entry is the user's, so the project
    must not create it."""


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


class UpstreamRunner(SequentialRunner):
    """``SequentialRunner`` that first produces the missing inputs of the pipeline it runs.

    Args:
        project_pipeline: where producers are looked up (default: the registered ``__default__``).
        user_entries: names (or ``{placeholder}`` patterns) of catalog entries defined by the run's
            environment rather than by the project; the runner refuses to produce those.
        environment: the environment's name, for messages.
    """

    def __init__(
        self,
        is_async: bool = False,
        project_pipeline: Pipeline | Callable[[], Pipeline] | None = None,
        user_entries: Iterable[str] = (),
        environment: str | None = None,
    ) -> None:
        super().__init__(is_async=is_async)
        self._project_pipeline = project_pipeline
        self._user_entries = _EntryMatcher(user_entries)
        self._environment = environment

    def __repr__(self) -> str:
        # Recorded as the run's runner; kedro-viz tracks run status only for runs whose runner reads
        # as a SequentialRunner object, which this is.
        return f"<kedro.runner.sequential_runner.SequentialRunner object (c2s_kedro.runner.UpstreamRunner) at {id(self):#x}>"

    def _project(self) -> Pipeline:
        if isinstance(self._project_pipeline, Pipeline):
            return self._project_pipeline
        if callable(self._project_pipeline):
            return self._project_pipeline()
        from kedro.framework.project import pipelines

        pipelines.set_requested(None)  # the registry may have loaded only the requested pipelines
        return pipelines["__default__"]

    def upstream_of(self, pipeline: Pipeline, catalog) -> Pipeline:
        """The nodes that must run before ``pipeline`` to produce its missing inputs."""
        missing = missing_inputs(pipeline, catalog)
        if not missing:
            return Pipeline([])
        project = self._project()
        producible = sorted(missing & project.all_outputs())
        if not producible:
            return Pipeline([])  # Kedro reports inputs nobody produces itself
        candidates = project.to_outputs(*producible) - pipeline
        upstream = self._filter_pipeline_for_missing_outputs(candidates, catalog)
        self._refuse_user_entries(upstream, pipeline, catalog)
        return upstream

    def _refuse_user_entries(self, upstream: Pipeline, pipeline: Pipeline, catalog) -> None:
        for node in upstream.nodes:
            for name in node.outputs:
                if not self._user_entries.matches(name):
                    continue
                state = "is not saved" if not _exists(catalog, name) else "would be overwritten"
                described = catalog.get(name)
                raise UserEntryMissingError(
                    f"'{name}' {state}: the run needs it and its catalog entry comes from your environment "
                    f"'{self._environment or 'local'}' ({described}), not from the project, so it is not "
                    f"produced here (node '{node.name}' would write it). Check the entry's path or hub id; "
                    "to train or build it on purpose, run the pipeline that produces it, or remove the "
                    "override to use the project's default."
                )

    def _refuse_training_into_user_models(self, pipeline: Pipeline) -> None:
        for node in pipeline.nodes:
            for name in sorted(set(node.outputs) & set(BASE_MODELS)):
                if self._user_entries.matches(name):
                    raise UserModelOverwriteError(
                        f"node '{node.name}' would write '{name}', whose catalog entry comes from your environment "
                        f"'{self._environment or 'local'}': that is the model you chose to use, and the project only "
                        f"builds its own default model where conf/base puts it. Run the pipelines that use {name} "
                        "(e.g. --pipelines=embedding,finetuning,evaluation or perturbation_finetuning,"
                        "perturbation_posterior), not the one that builds it, or remove the override."
                    )

    def _without_default_writers(self, pipeline: Pipeline) -> Pipeline:
        writers = [n for n in pipeline.nodes if any(self._user_entries.matches(o) for o in set(n.outputs) & set(DEFAULT_INPUTS))]
        if not writers:
            return pipeline
        logger.info(
            "%s comes from your environment '%s': node(s) %s that write the project's default are skipped",
            ", ".join(sorted({o for n in writers for o in n.outputs if o in DEFAULT_INPUTS})),
            self._environment or "local", ", ".join(n.name for n in writers),
        )
        return pipeline - Pipeline(writers)

    def plan(self, pipeline: Pipeline, catalog, only_missing_outputs: bool = False) -> Pipeline:
        """The nodes this run runs: ``pipeline``'s own and the upstream ones that produce its
        missing inputs (``only_missing_outputs``: Kedro's flag, those whose outputs are missing)."""
        upstream = self.upstream_of(pipeline, catalog)
        self._refuse_training_into_user_models(upstream + pipeline)
        if upstream.nodes:
            produced = sorted(missing_inputs(pipeline, catalog) & upstream.all_outputs())
            logger.info(
                "%s not saved yet: running %d upstream node(s) first in this run (%s)",
                ", ".join(produced), len(upstream.nodes), ", ".join(n.name for n in upstream.nodes),
            )
        planned = upstream + pipeline
        return self._filter_pipeline_for_missing_outputs(planned, catalog) if only_missing_outputs else planned

    def _plan_of_rank_zero(self, pipeline: Pipeline, catalog, only_missing_outputs: bool) -> Pipeline:
        """Under torchrun: rank 0 plans and sends its node list; the other ranks run that list and
        keep their saves in memory."""
        if process_rank() == 0:
            try:
                planned = self.plan(pipeline, catalog, only_missing_outputs)
            except Exception:
                share_plan(None)  # the other ranks stop instead of waiting for a plan
                raise
            share_plan([n.name for n in planned.nodes])
            return planned
        names = share_plan(None)
        if names is None:
            logger.error("rank 0 stopped before running any node (its message says why); rank %d stops too", process_rank())
            raise SystemExit(1)
        own = {n.name for n in pipeline.nodes}
        known = pipeline if set(names) <= own else (self._project() - pipeline) + pipeline
        planned = known.only_nodes(*names)
        keep_saves_in_memory(catalog, planned.datasets())
        logger.info("rank %d of %d runs rank 0's %d node(s) and keeps their outputs in memory; rank 0 writes them",
                    process_rank(), world_size(), len(planned.nodes))
        return planned

    def run(
        self,
        pipeline: Pipeline,
        catalog,
        hook_manager=None,
        run_id: str | None = None,
        only_missing_outputs: bool = False,
    ) -> dict[str, Any]:
        pipeline = self._without_default_writers(pipeline)
        if world_size() > 1:
            planned = self._plan_of_rank_zero(pipeline, catalog, only_missing_outputs)
        else:
            planned = self.plan(pipeline, catalog, only_missing_outputs)
        return super().run(planned, catalog, hook_manager, run_id)


class _EntryMatcher:
    """Dataset names matched against catalog keys, literal or dataset-factory patterns."""

    def __init__(self, entries: Iterable[str]) -> None:
        entries = list(entries)
        self._literal = {e for e in entries if "{" not in e}
        self._patterns = [re.compile("^" + re.sub(r"\\\{[^}]*\\\}", ".+?", re.escape(e)) + "$") for e in entries if "{" in e]

    def matches(self, name: str) -> bool:
        return name in self._literal or any(p.match(name) for p in self._patterns)


# ---- several processes: torchrun, accelerate launch ----------------------------------------------

# As long as the Trainer waits by default (TrainingArguments.ddp_timeout): how long a rank waits for
# rank 0's plan, a file rank 0 makes on first load, or a collective step.
DDP_TIMEOUT_S = 1800
# Kedro plugins whose hooks only rank 0 runs: kedro-mlflow (one process creates the SQLite store and
# records the one MLflow run), kedro-viz (rank 0 writes its run-status and dataset-statistics files),
# telemetry. Both spellings of kedro-mlflow's distribution name.
RANK_ZERO_PLUGINS = ("kedro_mlflow", "kedro-mlflow", "kedro-viz", "kedro-telemetry")


def process_rank() -> int:
    """This process's rank under ``torchrun`` or ``accelerate launch`` (0 when not distributed)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """How many processes run the pipeline together (1 when not distributed)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def plugins_off_this_rank() -> tuple[str, ...]:
    """``settings.DISABLE_HOOKS_FOR_PLUGINS``: ``RANK_ZERO_PLUGINS`` on a non-zero rank, none otherwise."""
    return RANK_ZERO_PLUGINS if process_rank() > 0 else ()


def _process_group():
    """``torch.distributed``, with the default process group open. The Trainer (accelerate) uses a
    group that is already open: gloo on a CPU; on GPUs NCCL for CUDA tensors and gloo for CPU ones
    (what accelerate opens for FSDP with CPU offload), each rank on its own GPU (``LOCAL_RANK``)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            backend = "cuda:nccl,cpu:gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=DDP_TIMEOUT_S))
        # a group left open at interpreter exit can abort the process after a finished run
        # ("terminate called without an active exception", exit -6): close what was opened here
        atexit.register(_close_process_group)
    return dist


def _close_process_group() -> None:
    """Close the default process group if it is still open (the Trainer may have closed it)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:  # no rank tears its connections down while another still uses them
            dist.barrier()
        finally:
            dist.destroy_process_group()


def share_plan(node_names: list[str] | None) -> list[str] | None:
    """Rank 0's ``node_names`` on every rank (None: rank 0 could not plan the run)."""
    import torch

    box = [node_names if process_rank() == 0 else None]
    _process_group().broadcast_object_list(box, src=0, device=torch.device("cpu"))
    return box[0]


class KeptInMemory(AbstractDataset):
    """A dataset on a non-zero rank: saves stay in this process and loads read them back; what this
    process did not save is read from the wrapped dataset, once it exists (a file that rank 0 makes
    on its first load, the default raw counts, is waited for rather than made twice)."""

    def __init__(self, wrapped: AbstractDataset, timeout_s: float = DDP_TIMEOUT_S, poll_s: float = 1.0):
        self._wrapped = wrapped
        self._timeout_s, self._poll_s = timeout_s, poll_s
        self._data = None
        self._saved = False

    def _describe(self) -> dict:
        return {"kept_in_memory_on_this_rank": repr(self._wrapped)}

    def load(self):
        if self._saved:
            return self._data
        deadline = time.monotonic() + self._timeout_s
        while not self._wrapped.exists():
            if time.monotonic() > deadline:
                raise C2SDatasetError(
                    f"rank {process_rank()} waited {self._timeout_s:.0f} s for rank 0 to write {self._wrapped}; "
                    "rank 0 makes it on its first load. See rank 0's log for why it did not."
                )
            time.sleep(self._poll_s)
        return self._wrapped.load()

    def save(self, data) -> None:
        self._data, self._saved = data, True

    def _exists(self) -> bool:
        return self._saved or self._wrapped.exists()


def keep_saves_in_memory(catalog, names: Iterable[str]) -> None:
    """Wraps the catalog's datasets ``names`` (dataset-factory patterns resolved) in ``KeptInMemory``."""
    catalog_logger = logging.getLogger("kedro.io.data_catalog")
    level = catalog_logger.level
    catalog_logger.setLevel(logging.ERROR)  # its "Replacing dataset" warning, once per dataset: replacing is the point
    try:
        for name in names:
            dataset = catalog.get(name)
            if dataset is not None and not isinstance(dataset, MemoryDataset | KeptInMemory):
                catalog[name] = KeptInMemory(dataset)
    finally:
        catalog_logger.setLevel(level)


def environment_entries(merged: Mapping[str, Any], base: Mapping[str, Any]) -> list[str]:
    """Catalog keys the environment adds or changes relative to ``conf/base``."""
    return sorted(key for key, value in merged.items() if not key.startswith("_") and base.get(key) != value)


class ProjectSession(KedroSession):
    """``KedroSession`` whose default runner is ``UpstreamRunner``: any pipeline runs alone.

    A runner asked for explicitly (``--runner=ParallelRunner``) is used as it is.
    """

    def run(self, *args: Any, runner=None, **kwargs: Any) -> dict[str, Any]:
        if runner is None or type(runner) is SequentialRunner:
            is_async = bool(getattr(runner, "_is_async", False))
            runner = UpstreamRunner(is_async=is_async, **self._environment_settings())
        with killed_runs_end_as_killed():
            return super().run(*args, runner=runner, **kwargs)

    def _environment_settings(self) -> dict[str, Any]:
        from kedro.framework.project import settings

        arguments = dict(settings.CONFIG_LOADER_ARGS)
        base_env = arguments.get("base_env", "base")
        env = self.store.get("env") or arguments.get("default_run_env", "local")
        loader = settings.CONFIG_LOADER_CLASS
        merged = loader(conf_source=self._conf_source, env=env, runtime_params=self.store.get("runtime_params"), **arguments)
        base = loader(conf_source=self._conf_source, env=base_env, **arguments)
        return {"user_entries": environment_entries(merged["catalog"], base["catalog"]), "environment": env}


class Terminated(SystemExit):
    """SIGTERM, raised where the run is so that it unwinds like Ctrl-C; exits with 128 + 15, as
    the shell reports a process ended by the signal."""


def _terminate(signum, frame) -> None:
    raise Terminated(128 + signum)


# Set by Ctrl-C during a run: a library that turns the KeyboardInterrupt into an error of its own
# (numba compiling, a ctypes callback) or swallows it ("Exception ignored in ...") does not make a
# stopped run pass for a failed or a finished one.
_STOP_REQUESTED = threading.Event()


def _interrupt(signum, frame) -> None:
    _STOP_REQUESTED.set()
    raise KeyboardInterrupt


def stop_if_requested(where: str) -> None:
    """Raise ``KeyboardInterrupt`` when Ctrl-C was pressed during the run and something swallowed it;
    called between nodes (``c2s_kedro.hooks.StopBetweenNodesHook``)."""
    if _STOP_REQUESTED.is_set():
        raise KeyboardInterrupt(f"Ctrl-C was pressed before {where}")


@contextmanager
def killed_runs_end_as_killed() -> Iterator[None]:
    """A run stopped by Ctrl-C or SIGTERM ends its MLflow run as KILLED instead of leaving it
    RUNNING (kedro-mlflow ends runs only on errors, and MLflow's exit handler would call it
    FINISHED). SIGTERM unwinds like Ctrl-C, so files being written are cleaned up. An error raised
    after Ctrl-C (a library that turned the interrupt into its own error) counts as the stop it
    is. A run that was already active before (an orchestrator's) is left to whoever opened it.
    SIGKILL cannot be caught: c2s_kedro.hooks.MlflowRunLivenessHook ends such runs when the next
    run starts."""
    import mlflow

    opened_before = mlflow.active_run()
    in_main_thread = threading.current_thread() is threading.main_thread()
    _STOP_REQUESTED.clear()
    previous = {}
    if in_main_thread:
        previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _terminate)}
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where Ctrl-C is ignored
            previous[signal.SIGINT] = signal.signal(signal.SIGINT, _interrupt)

    def end_ours_as_killed() -> None:
        def ours(run) -> bool:
            return run is not None and (opened_before is None or run.info.run_id != opened_before.info.run_id)

        ended = {}
        while ours(run := mlflow.active_run()):  # the run may be on MLflow's stack more than once
            mlflow.end_run("KILLED")
            ended.setdefault(run.info.run_id, run.info.run_name)
        for run_id, name in ended.items():
            logger.warning("the run was stopped: MLflow run %s (%s) ended as KILLED", run_id, name)

    try:
        yield
    except (KeyboardInterrupt, Terminated):
        end_ours_as_killed()
        raise
    except Exception as error:
        if not _STOP_REQUESTED.is_set():
            raise
        end_ours_as_killed()
        raise KeyboardInterrupt(f"Ctrl-C, which a library turned into {type(error).__name__}: {error}") from error
    finally:
        _STOP_REQUESTED.clear()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
