"""Project tooling shared by the test suite and the benchmark scripts, never used by pipelines.

Written once here so that every test and every ``benchmarks/*.py`` script makes its project copies,
runs ``kedro`` and measures the same way:

- ``copy_project``: an empty project copy (conf/ without conf/local, which is made empty,
  pyproject.toml, .telemetry, an empty src/; the package itself is the installed one), and
  ``copy_inputs``: a finished run's files copied into such a copy;
- ``run_kedro`` / ``run_command``: a command in a subprocess in a project folder, telemetry off,
  its output in a log file; returns the return code, wall seconds and peak memory (``CommandRun``);
- ``TreeMemory``: the peak summed RSS (and PSS) of a process and its children, polled in a thread,
  for in-process work as for a child;
- the command line and summary shared by the lever scripts (``add_lever_arguments``,
  ``chosen_levers``, ``summarize_seeds``).

The package is installed editable, so ``from c2s_kedro.harness import ...`` works from the tests and
from ``python benchmarks/<script>.py`` alike.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

PROJECT_ROOT = Path(__file__).resolve().parents[2]
KEDRO = Path(sys.executable).with_name("kedro")
# What every child run gets: no telemetry prompt or upload, no plotting window.
RUN_ENVIRONMENT = {"KEDRO_DISABLE_TELEMETRY": "1", "MPLBACKEND": "Agg"}


def copy_project(root: Path, *, keep_data: bool = False) -> Path:
    """A new project at ``root``: the project's conf/ (without conf/local, which is made empty),
    pyproject.toml and .telemetry, an empty src/; the package itself is the installed one.

    Whatever was at ``root`` is removed first; with ``keep_data`` only conf/ and src/ are made anew,
    so a later run reads the data/ (and MLflow store) an earlier run wrote there."""
    if keep_data:
        for name in ("conf", "src"):
            shutil.rmtree(root / name, ignore_errors=True)
    elif root.exists():
        shutil.rmtree(root)
    shutil.copytree(PROJECT_ROOT / "conf", root / "conf", ignore=shutil.ignore_patterns("local"))
    (root / "conf" / "local").mkdir()
    shutil.copy(PROJECT_ROOT / "pyproject.toml", root / "pyproject.toml")
    shutil.copy(PROJECT_ROOT / ".telemetry", root / ".telemetry")
    (root / "src").mkdir()
    return root


def copy_inputs(root: Path, source: Path, copies: Mapping[str, str] | Sequence[str], source_hint: str) -> None:
    """Files and folders of ``source`` copied into the project copy ``root`` (target path -> source
    path, both relative; a list copies each path to the same path). A missing one stops with its
    path and what ``source`` must be (``source_hint``), before anything is half-copied."""
    pairs = dict(copies) if isinstance(copies, Mapping) else {relative: relative for relative in copies}
    missing = [str(source / origin) for origin in pairs.values() if not (source / origin).exists()]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing: "
                                f"--source must be {source_hint}")
    for relative, from_relative in pairs.items():
        origin, target = source / from_relative, root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if origin.is_dir() else shutil.copy)(origin, target)


class TreeMemory:
    """Peak memory of a process and its children (this process when ``pid`` is None), polled every
    ``interval`` seconds in a thread: RSS summed, and with ``pss`` PSS summed too (shared pages,
    e.g. of forked dataloader workers, counted once; reading it costs more)."""

    def __init__(self, pid: int | None = None, interval: float = 0.5, pss: bool = False):
        import psutil

        self.root = psutil.Process(pid)
        self.interval, self.pss = interval, pss
        self.peak_rss = self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def sample(self) -> tuple[int, int]:
        """The tree's summed RSS and PSS now (PSS is RSS without ``pss``); raises psutil.NoSuchProcess once the root ended."""
        import psutil

        rss = pss = 0
        for process in [self.root, *self.root.children(recursive=True)]:
            try:
                info = process.memory_full_info() if self.pss else process.memory_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):  # a child that ended between listing and reading
                continue
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
        return rss, pss

    def current(self) -> int:
        """The tree's summed RSS now, counted into the peak."""
        rss, pss = self.sample()
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
        return rss

    def reset(self) -> None:
        """Start a new peak from now (one stage of in-process work after another)."""
        self.peak_rss, self.peak_pss = self.sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                self.current()
            except psutil.NoSuchProcess:
                return
            time.sleep(self.interval)


@dataclass
class CommandRun:
    """What ``run_command`` measured of one child process."""

    returncode: int
    wall_s: float
    # the child's maximum resident set size (wait4's ru_maxrss: the figure `/usr/bin/time -v` prints as
    # "Maximum resident set size"): the largest single process of the run, shared pages counted once
    peak_rss_mb: float
    peak_tree_rss: int  # bytes: the peak of the summed RSS of the process tree (polled)
    peak_tree_pss: int  # bytes: the same in PSS (with ``pss``; else equal to peak_tree_rss)
    first_node_s: float | None  # seconds until the log first said "Running node" (with ``first_node``)
    log: Path


def run_command(command: Sequence[str], cwd: Path, log: Path, *, env: Mapping[str, str] | None = None,
                append: bool = False, poll_s: float = 0.2, pss: bool = False, first_node: bool = False,
                rss_trace: Path | None = None) -> CommandRun:
    """Run ``command`` in ``cwd`` with telemetry off (``RUN_ENVIRONMENT`` over os.environ, then
    ``env``), stdout and stderr into ``log`` (appended to with ``append``), until it ends. Every
    ``poll_s`` seconds the process tree's memory is read; with ``first_node`` the log is watched for
    Kedro's first "Running node"; with ``rss_trace`` the tree's RSS is written there about once a
    second (unix time, GB: which node a peak belongs to, from the log's timestamps). The log ends
    with the child's peak RSS in `/usr/bin/time -v`'s words, so a log reads as it did under it."""
    import psutil

    environment = {**os.environ, **RUN_ENVIRONMENT, **(env or {})}
    started = time.perf_counter()
    seconds_to_first_node = None
    with open(log, "a" if append else "w") as out:
        process = subprocess.Popen([str(part) for part in command], cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                   env=environment)
        memory = TreeMemory(process.pid, interval=poll_s, pss=pss)
        trace, traced = (open(rss_trace, "w") if rss_trace else None), 0.0
        watched = 0.0
        try:
            while True:  # the end is noticed within 20 ms (wall time); the log is read every poll_s
                pid, status, usage = os.wait4(process.pid, os.WNOHANG)
                if pid:
                    break
                if first_node and seconds_to_first_node is None and time.perf_counter() - watched >= poll_s:
                    watched = time.perf_counter()
                    if "Running node" in log.read_text(errors="replace"):
                        seconds_to_first_node = watched - started
                if trace and time.time() - traced >= 1.0:
                    traced = time.time()
                    try:
                        trace.write(f"{traced:.0f}\t{memory.sample()[0] / 2**30:.2f}\n")
                    except psutil.Error:  # it ended since wait4 asked
                        pass
                    trace.flush()
                time.sleep(0.02)
        finally:
            if trace:
                trace.close()
        process.returncode = os.waitstatus_to_exitcode(status)
        memory.stop()
        wall = time.perf_counter() - started
        out.write(f"\tMaximum resident set size (kbytes): {usage.ru_maxrss}\n")  # KiB on Linux
    return CommandRun(returncode=process.returncode, wall_s=wall, peak_rss_mb=usage.ru_maxrss / 1024,
                      peak_tree_rss=memory.peak_rss, peak_tree_pss=memory.peak_pss,
                      first_node_s=seconds_to_first_node, log=log)


def run_kedro(project: Path, arguments: Sequence[str], log: Path, **options) -> CommandRun:
    """``kedro <arguments>`` (this environment's kedro) in the project folder ``project``, as ``run_command`` runs it."""
    return run_command([str(KEDRO), *arguments], project, log, **options)


def logged_peak_rss_mb(log: Path) -> float | None:
    """The peak RSS (MB) a finished run's log ends with (``run_command``'s or `/usr/bin/time -v`'s line), if any."""
    import re

    found = re.findall(r"Maximum resident set size \(kbytes\): (\d+)", log.read_text(errors="replace")) if log.exists() else []
    return int(found[-1]) / 1024 if found else None


def add_lever_arguments(parser: argparse.ArgumentParser, levers: Mapping, default_levers: str, work: str) -> None:
    """--source, --work, --levers, --seeds and --out, as the lever scripts take them."""
    parser.add_argument("--source", type=Path, required=True, help="a project copy after a default `kedro run`")
    parser.add_argument("--work", type=Path, default=Path(work), help="where the project copies go")
    parser.add_argument("--levers", default=default_levers, help=f"comma-separated, of {sorted(levers)}")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")


def chosen_levers(parser: argparse.ArgumentParser, args: argparse.Namespace, levers: Mapping) -> list[str]:
    """The --levers names, each checked against ``levers``; --work made."""
    names = args.levers.split(",")
    unknown = [n for n in names if n not in levers]
    if unknown:
        parser.error(f"unknown --levers {unknown}; choose from {sorted(levers)}")
    args.work.mkdir(parents=True, exist_ok=True)
    return names


def summarize_seeds(results: list[dict[str, object]]) -> dict[str, dict[str, object]]:
    """Mean, and min-max spread over seeds, of every numeric score per lever (and link of a chain)."""
    summary: dict[str, dict[str, object]] = {}
    group = lambda r: str(r["lever"]) + (f" link {r['link']}" if r.get("link") is not None else "")
    for name in dict.fromkeys(group(r) for r in results):
        rows = [r for r in results if group(r) == name]
        entry: dict[str, object] = {"n_seeds": len(rows)}
        for key, value in rows[0].items():
            if isinstance(value, (int, float)) and key != "seed" and all(r.get(key) is not None for r in rows):
                values = [float(r[key]) for r in rows]
                entry[key] = {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}
        summary[name] = entry
    return summary
