"""Project hooks."""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import unquote

from kedro.framework.hooks import hook_impl
from kedro_mlflow.framework.hooks import MlflowHook

from c2s_kedro.parameters import PARAMETER_NAMESPACE
from c2s_kedro.stopping import stop_if_requested
from c2s_kedro.upstream import EntryMatcher, check_user_entries, own_nodes, user_entries

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


class StopBetweenNodesHook:
    """Ctrl-C that a library swallowed while a node ran (native code) still stops the run, before
    the next node, and the MLflow run ends as KILLED (``c2s_kedro.stopping.killed_runs_end_as_killed``)."""

    @hook_impl
    def before_node_run(self, node) -> None:
        stop_if_requested(f"node {node.name}")


def unread_local_settings(conf_source: Path | str, env: str, default_env: str = "local") -> list[str]:
    """The files of ``conf/<default_env>`` that hold settings (non-empty YAML) when the run's
    environment is another one, which Kedro does not read: it layers conf/base and the run's
    environment only, and the default environment is the one used when no ``--env`` is given."""
    import yaml

    folder = Path(conf_source) / default_env
    if env == default_env or not folder.is_dir():
        return []
    unread = []
    for path in sorted(folder.rglob("*")):
        if path.suffix not in (".yml", ".yaml", ".json") or not path.is_file():
            continue
        try:
            content = yaml.safe_load(path.read_text())
        except yaml.YAMLError:
            content = True  # a malformed file holds something too
        if content:
            unread.append(path.relative_to(folder).as_posix())
    return unread


class EnvironmentLayersHook:
    """Says once when ``conf/local`` holds settings that this run does not read (``--env test``):
    Kedro's rule, which otherwise silently runs on the built-in data and defaults."""

    @hook_impl
    def after_context_created(self, context) -> None:
        from kedro.framework.project import settings

        default_env = settings.CONFIG_LOADER_ARGS.get("default_run_env", "local")
        unread = unread_local_settings(context.config_loader.conf_source, context.env or default_env, default_env)
        if unread:
            logger.warning(
                "conf/%s holds settings (%s) that this run does not read: Kedro reads conf/base, then the run's "
                "environment only (--env %s: conf/%s); conf/%s is the environment of a run without --env. Put the "
                "settings this run needs in conf/%s too, or run without --env.",
                default_env, ", ".join(unread), context.env, context.env, default_env, context.env,
            )


# ---- the MLflow run of each `kedro run` ------------------------------------------------------------

PID_TAG, HOST_TAG, ENDED_TAG = "c2s.pid", "c2s.host", "c2s.ended"


def run_name(pipeline_names: Iterable[str] | None) -> str:
    """The MLflow run's name: the pipelines run (``finetuning``, ``finetuning + evaluation``);
    ``all pipelines`` for the default run."""
    names = [name for name in (pipeline_names or []) if name]
    if not names or names == ["__default__"]:
        return "all pipelines"
    return " + ".join("all pipelines" if name == "__default__" else name for name in names)


class MlflowRunNameHook:
    """Names the run kedro-mlflow opens after the pipelines run, not ``__default__`` (a ``name``
    set in mlflow.yml wins). Runs before kedro-mlflow's ``before_pipeline_run``, which starts it."""

    def __init__(self) -> None:
        self._config = None

    @hook_impl
    def after_context_created(self, context) -> None:
        self._config = getattr(context, "mlflow", None)  # set by kedro-mlflow's hook, which runs first

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params) -> None:
        if self._config is not None and self._config.tracking.run.name is None:
            self._config.tracking.run.name = run_name(run_params.get("pipeline_names") or [run_params.get("pipeline_name")])


OBJECT_PRINTOUT = re.compile(r"^<(?:[\w.]+\.)?(?P<name>\w+) object at 0x[0-9a-f]+>$")


def readable_tags(run_params: dict) -> dict[str, str]:
    """The tags kedro-mlflow copies from Kedro's run parameters that do not read well, rewritten:
    ``runner`` is the runner's class name, not its object printout; Kedro's session id is
    ``kedro_session_id`` (a ``run_id`` tag that is not MLflow's run id misleads)."""
    tags = {}
    runner = str(run_params.get("runner") or "")
    if match := OBJECT_PRINTOUT.match(runner):
        tags["runner"] = match["name"]
    if run_params.get("run_id"):
        tags["kedro_session_id"] = str(run_params["run_id"])
    return tags


class MlflowRunTagsHook:
    """Applies ``readable_tags`` to the run kedro-mlflow opened (its ``before_pipeline_run`` runs first)."""

    @hook_impl
    def before_pipeline_run(self, run_params) -> None:
        import mlflow

        run = mlflow.active_run()
        if run is None:
            return
        tags = readable_tags(run_params)
        mlflow.set_tags(tags)
        if "kedro_session_id" in tags and mlflow.MlflowClient().get_run(run.info.run_id).data.tags.get("run_id"):
            mlflow.MlflowClient().delete_tag(run.info.run_id, "run_id")


def _process_exists(pid: int, started_ms: int | None) -> bool:
    """Whether process ``pid`` still runs and is the one that started at ``started_ms`` (a pid
    reused by a process started later is not it)."""
    import psutil

    try:
        created = psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True
    return started_ms is None or created <= started_ms / 1000 + 1


def end_runs_of_dead_processes(client, experiment_id: str, current_run_id: str | None = None) -> list[str]:
    """Ends as KILLED the runs of the experiment left RUNNING by a process of this machine that no
    longer exists (killed with SIGKILL, or the machine went down); returns their ids."""
    host = socket.gethostname()
    ended = []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000):
        tags = run.data.tags
        if run.info.run_id == current_run_id or tags.get(HOST_TAG) != host or not tags.get(PID_TAG, "").isdigit():
            continue
        if _process_exists(int(tags[PID_TAG]), run.info.start_time):
            continue
        client.set_tag(run.info.run_id, ENDED_TAG, f"its process {tags[PID_TAG]} on {host} no longer existed when run "
                                                   f"{current_run_id or '(none)'} started")
        client.set_terminated(run.info.run_id, "KILLED")
        logger.warning("MLflow run %s (%s) was left RUNNING by process %s, which no longer exists: ended it as KILLED",
                       run.info.run_id, run.info.run_name, tags[PID_TAG])
        ended.append(run.info.run_id)
    return ended


class MlflowRunLivenessHook:
    """Records which process owns the run (``c2s.pid``, ``c2s.host`` tags), and ends as KILLED
    the runs whose process was killed without a chance to end them. Runs after kedro-mlflow's
    ``before_pipeline_run``, once the run exists. (SIGTERM and Ctrl-C end the run as KILLED
    themselves: ``c2s_kedro.stopping``.)"""

    @hook_impl
    def before_pipeline_run(self) -> None:
        import mlflow

        run = mlflow.active_run()
        if run is None:
            return
        mlflow.set_tags({PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()})
        try:
            end_runs_of_dead_processes(mlflow.MlflowClient(), run.info.experiment_id, run.info.run_id)
        except Exception as error:  # noqa: BLE001 - tidying other runs must never stop this one
            logger.warning("could not check for runs left RUNNING by killed processes: %s", error)


def sqlite_store_path(tracking_uri: str | None, project_path: Path | str) -> Path | None:
    """The SQLite file of a local ``sqlite:///`` tracking URI (relative to the project, as kedro-mlflow
    reads it); None for any other store."""
    if not tracking_uri or not tracking_uri.startswith("sqlite:///"):
        return None
    path = Path(unquote(tracking_uri[len("sqlite:///"):]))
    return path if path.is_absolute() else Path(project_path) / path


class MlflowStoreHook:
    """Makes the project's SQLite MLflow store ready before kedro-mlflow opens it
    (``core.tracking.prepare_sqlite_store``): a first run stopped while MLflow builds its tables no
    longer leaves a store that every later run refuses."""

    @hook_impl(tryfirst=True)
    def after_context_created(self, context) -> None:
        import mlflow
        from kedro.config import MissingConfigException

        from c2s_kedro.core.tracking import prepare_sqlite_store

        if mlflow.active_run() is not None:  # an orchestrator's run: its store
            return
        loader = context.config_loader
        loader.config_patterns.setdefault("mlflow", ["mlflow*", "mlflow*/**", "**/mlflow*"])  # as kedro-mlflow reads it
        try:
            tracking_uri = (loader["mlflow"].get("server") or {}).get("mlflow_tracking_uri")
        except MissingConfigException:
            return
        database = sqlite_store_path(tracking_uri, context.project_path)
        if database is not None:
            prepare_sqlite_store(database)


class UserEntriesHook:
    """Stops a run that would produce or overwrite a dataset whose catalog entry the run's
    environment defines (``c2s_kedro.upstream.check_user_entries``), before any node runs and before
    an MLflow run is opened."""

    def __init__(self) -> None:
        self._entries, self._environment = EntryMatcher(), "local"

    @hook_impl
    def after_context_created(self, context) -> None:
        self._entries = EntryMatcher(user_entries(context.config_loader))
        self._environment = context.env or context.config_loader.default_run_env

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params, pipeline, catalog) -> None:
        own, _ = own_nodes(run_params.get("pipeline_names"))
        check_user_entries(pipeline, [n.name for n in own.nodes] if own else [], catalog, self._entries, self._environment)


# kedro-mlflow's metric datasets, which its after_catalog_created names after their catalog entries
MLFLOW_METRIC_TYPE = re.compile(r"kedro_mlflow\.io\.metrics\.")


class MetricEntries:
    """The part of a catalog that kedro-mlflow's ``after_catalog_created`` needs: the entries whose
    configured type is one of its metric datasets (``items``), and ``__setitem__`` to rename them."""

    def __init__(self, catalog, names: list[str]) -> None:
        self._catalog, self._names = catalog, names

    def items(self) -> list[tuple[str, object]]:
        return [(name, self._catalog[name]) for name in self._names]

    def __setitem__(self, name: str, dataset) -> None:
        self._catalog[name] = dataset


class ProjectMlflowHook(MlflowHook):
    """kedro-mlflow's hook, registered by the project (settings.py turns its plugin entry point off)
    so that the catalog stays lazy: its ``after_catalog_created`` looks at every entry to find its
    metric datasets, which builds every dataset and imports its library (torch and transformers for
    the models, pyplot for the plots) in a run of sentence_conversion too (~40% of its start-up).
    Here it is shown the entries whose configured type is one of its metric datasets
    (``catalog.get_type`` would import every class to tell); everything else is kedro-mlflow's own."""

    @hook_impl
    def after_catalog_created(self, catalog, conf_catalog, conf_creds, parameters, save_version, load_versions) -> None:
        names = [name for name, entry in conf_catalog.items()
                 if isinstance(entry, dict) and MLFLOW_METRIC_TYPE.match(str(entry.get("type", ""))) and name in catalog]
        super().after_catalog_created(MetricEntries(catalog, names), conf_catalog, conf_creds, parameters,
                                      save_version, load_versions)
