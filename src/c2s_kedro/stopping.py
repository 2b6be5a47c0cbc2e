"""A run stopped by Ctrl-C or SIGTERM ends as stopped: its MLflow run is KILLED, not left RUNNING
or called FINISHED, and files being written are cleaned up as on Ctrl-C. The project's
``kedro run`` (c2s_kedro.cli) runs inside ``killed_runs_end_as_killed``; a hook
(c2s_kedro.hooks.StopBetweenNodesHook) stops before the next node when a library swallowed Ctrl-C.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)


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
