"""The project's ``kedro`` commands (Kedro loads ``<package>.cli`` and its commands override the
built-in ones of the same name).

``kedro run`` is Kedro's own command, with three differences:

- a pipeline runs alone on a fresh clone: of its upstream, what is missing runs first, in the same
  run (c2s_kedro.upstream; the plan goes to Kedro as the run's node list, ``--nodes``, ``--tags``
  and the other filters select among the pipelines' own nodes). ``--only-missing-outputs`` is
  Kedro's rule as it is, over the pipelines and their whole upstream;
- a run stopped by Ctrl-C or SIGTERM ends its MLflow run as KILLED (c2s_kedro.stopping);
- an error the project raises on purpose (a ``C2SError``: a setting to change, a missing input
  with the fix, a refused overwrite) reaches the user as its message, one line, instead of pages of
  traceback through Kedro's internals; Kedro has already logged which node failed. Any other error
  (a bug, a library's failure) keeps its full traceback, as does every error with
  ``C2S_TRACEBACK=1`` in the environment.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import re
import sys

import click
from kedro.framework.cli.project import run as kedro_run

from c2s_kedro.core.errors import C2SError
from c2s_kedro.stopping import killed_runs_end_as_killed
from c2s_kedro.upstream import planned_node_names

logger = logging.getLogger(__name__)


def raised_on_purpose(error: BaseException) -> bool:
    """Whether ``error`` is one the project raises for the user to act on (``C2SError``: its message
    says what to change) rather than a bug or a library's failure."""
    return isinstance(error, C2SError)


def user_error(error: BaseException) -> BaseException | None:
    """The outermost error of ``error``'s cause chain that the project raised on purpose (Kedro
    wraps a dataset's error in its own), or None."""
    seen = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if raised_on_purpose(current):
            return current
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return None


KEDRO_YAML_ERROR = re.compile(r"Invalid YAML or JSON file (?P<path>.+?), unable to read line")


def configuration_error(error: BaseException) -> str | None:
    """A malformed file in conf/ (Kedro's config loader refuses it) as one line: the file, the line and
    column as an editor counts them (from 1), and what YAML expected there; None for any other error."""
    import yaml

    current: BaseException | None = error
    while current is not None:
        match = KEDRO_YAML_ERROR.match(str(current)) if isinstance(current, yaml.YAMLError) else None
        if match:
            problem = current.__cause__
            mark = getattr(problem, "problem_mark", None)
            if mark is None:
                return one_line(current)
            what = " ".join(part for part in (getattr(problem, "context", None), getattr(problem, "problem", None)) if part)
            return (f"{match['path']}, line {mark.line + 1}, column {mark.column + 1}: malformed YAML ({what}); "
                    "fix the file and run again.")
        current = current.__cause__ or current.__context__
    return None


def one_line(error: BaseException) -> str:
    """The error's message on one line (a KeyError's message without the quotes repr adds)."""
    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(str(message).split()) or type(error).__name__


# Kedro's run options that select nodes, as Pipeline.filter names them
FILTERS = {"tags": "tags", "node_names": "node_names", "from_nodes": "from_nodes", "to_nodes": "to_nodes",
           "from_inputs": "from_inputs", "to_outputs": "to_outputs", "namespaces": "node_namespaces"}


def with_upstream(options: dict) -> dict | None:
    """Kedro's run options with the run's plan (c2s_kedro.upstream) as its node list; None when the
    plan is empty (the pipeline's nodes write only what the environment provides)."""
    if options.get("only_missing_outputs"):
        return options
    from kedro.framework.session import KedroSession

    names = options.get("pipelines") or ([options["pipeline"]] if options.get("pipeline") else [])
    filters = {FILTERS[key]: options.get(key) for key in FILTERS}
    with KedroSession.create(env=options.get("env"), conf_source=options.get("conf_source"),
                             runtime_params=options.get("params")) as session:
        planned = planned_node_names(session.load_context(), names, **filters)
    if planned is None or (not planned and any(filters.values())):
        return options  # Kedro names the unknown pipeline, or says that the filters leave no node
    if not planned:
        logger.info("nothing to run: the nodes of %s write only what your environment provides", ", ".join(names))
        return None
    return {**options, **{key: [] for key in FILTERS}, "node_names": planned}


def refuse_launchers() -> None:
    """``kedro run`` runs once: under ``torchrun`` or ``accelerate launch`` every process would run
    every node and write every output."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes > 1:
        raise C2SError(
            f"kedro run was started in {processes} processes (torchrun or accelerate launch): every one would run "
            "every node and write every output. Start kedro run once, as usual; the training nodes start their own "
            "training processes, one per GPU: --params finetuning.processes=N (pretraining.processes, "
            "perturbation.finetuning.processes), see docs/scale.md."
        )


def planned_run(command: click.Command) -> click.Command:
    """A copy of Kedro's ``run`` that runs what the pipelines lack upstream first (``with_upstream``)
    and ends a stopped run as KILLED."""
    planned = copy.copy(command)
    callback = command.callback

    @functools.wraps(callback)
    def run_planned(**options):
        refuse_launchers()
        with killed_runs_end_as_killed():
            options = with_upstream(options)
            return None if options is None else callback(**options)

    planned.callback = run_planned
    return planned


def quiet_errors(command: click.Command) -> click.Command:
    """A copy of ``command`` that prints an error raised on purpose as one line and exits with 1."""
    quiet = copy.copy(command)
    callback = command.callback

    @functools.wraps(callback)
    def run_quietly(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except Exception as error:
            if os.environ.get("C2S_TRACEBACK"):
                raise
            cause = user_error(error)
            message = one_line(cause) if cause is not None else configuration_error(error)
            if message is None:
                raise
            click.secho(f"Error: {message}", fg="red", err=True)
            sys.exit(1)

    quiet.callback = run_quietly
    return quiet


@click.group(name="c2s_kedro")
def cli() -> None:
    """The project's commands."""


run = quiet_errors(planned_run(kedro_run))  # also what `python -m c2s_kedro` runs (kedro's find_run_command)
cli.add_command(run, "run")
