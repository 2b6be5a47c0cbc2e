"""The whole `kedro run` as the user waits for it, beside the reference package.

Run by hand (not part of the tests); prints one JSON object on stdout:

    python benchmarks/startup.py                                      # 20,000 x 36,000, ~2,000 genes/cell
    python benchmarks/startup.py --reference-python /path/to/venv/bin/python   # with cell2sentence there
    python benchmarks/startup.py --cells 3000 --genes 5000 --genes-per-cell 500 --repeats 1   # quick

1. Writes the atlas (``core.simulate.atlas.write_atlas_h5ad``) and, in a copy of the project under
   ``--workdir`` (conf/ without conf/local; a ``startup`` environment pointing ``raw_adata`` at the
   file, ``data_processing.embed: false``), runs ``data_processing`` once.
2. Side by side, ``--repeats`` times in turn: ``kedro run --env startup --pipelines=sentence_conversion``
   as a whole process, and the reference in a fresh Python process on the same processed h5ad:
   ``cell2sentence``'s ``CSData.adata_to_arrow`` + ``save_to_disk`` when ``--reference-python``
   imports it, else the reference-style per-cell loop of conversion_throughput.py (+ Arrow dataset,
   ``save_to_disk``). The JSON says which. Wall seconds, peak RSS of the process tree (psutil).
3. Seconds until each listed pipeline's first node starts (before its inputs load), and the
   seconds of every node of the sentence_conversion run (convert_to_cell_sentences -> cells/s).
   Kedro runs under a small prelude (``python -c``: Kedro's own CLI ``main`` with
   ``Task.execute`` wrapped to note the time); a first-node-only run ends there.
4. The kernel rate: ``cell_sentences_from_adata`` on the same processed h5ad in memory, in a
   fresh process, after a warm-up (as conversion_throughput.py measures it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from c2s_kedro.harness import copy_project, run_command

PROJECT = Path(__file__).resolve().parents[1]
KEDRO = Path(sys.executable).with_name("kedro")
ENV = "startup"
LABEL_COLUMNS = ["cell_type", "tissue", "organism"]  # conf/base/parameters_sentence_conversion.yml
SEED = 1234
FIRST_NODE_PIPELINES = ("data_processing", "sentence_conversion", "benchmarking", "perturbation_data", "embedding")
logger = logging.getLogger("startup")

# Kedro's CLI with the start of every task (node) and its node's seconds noted in $C2S_MARKS.
PRELUDE = r"""
import json, os, sys, time
marks = {"nodes": {}}
from kedro.runner import task
execute = task.Task.execute
def timed(self):
    started = time.time()
    marks.setdefault("first_node", started)
    if os.environ.get("C2S_FIRST_NODE_ONLY"):
        json.dump(marks, open(os.environ["C2S_MARKS"], "w")); os._exit(0)
    result = execute(self)
    marks["nodes"][self.node.name] = time.time() - started
    marks["last_node_done"] = time.time()
    json.dump(marks, open(os.environ["C2S_MARKS"], "w"))
    return result
task.Task.execute = timed
from kedro.framework.cli import main
sys.argv = ["kedro", *sys.argv[1:]]
main()
"""

REFERENCE_PACKAGE = r"""
import sys, anndata
from cell2sentence import CSData
adata = anndata.read_h5ad(sys.argv[1])
arrow, vocabulary = CSData.adata_to_arrow(adata, random_state=int(sys.argv[3]), label_col_names=sys.argv[4].split(","))
arrow.save_to_disk(sys.argv[2])
"""

REFERENCE_LOOP = r"""
import runpy, sys
import anndata
from datasets import Dataset
reference_loop = runpy.run_path(sys.argv[5] + "/conversion_throughput.py")["reference_loop"]
adata = anndata.read_h5ad(sys.argv[1])
labels = sys.argv[4].split(",")
names = [str(name).upper() for name in adata.var_names]
sentences = reference_loop(adata.X.tocsr(), names, adata.n_obs, int(sys.argv[3]))
columns = {"cell_name": adata.obs_names.tolist(), "cell_sentence": sentences}
columns.update({label: adata.obs[label].astype(str).tolist() for label in labels})
Dataset.from_dict(columns).save_to_disk(sys.argv[2])
"""

KERNEL = r"""
import json, shutil, sys, tempfile, time
import anndata
from c2s_kedro.core.sentences.conversion import cell_sentences_from_adata
adata = anndata.read_h5ad(sys.argv[1])
labels = sys.argv[3].split(",")
def convert(cells):
    directory = tempfile.mkdtemp(dir=sys.argv[2])
    started = time.perf_counter()
    cell_sentences_from_adata(cells, label_columns=labels, seed=int(sys.argv[4]), cache_dir=directory)
    seconds = time.perf_counter() - started
    shutil.rmtree(directory)
    return seconds
convert(adata[: min(1024, adata.n_obs)].copy())  # warm-up: compiled kernels, Arrow
runs = [convert(adata) for _ in range(int(sys.argv[5]))]
print(json.dumps({"seconds": runs, "cells": adata.n_obs}))
"""


def measure(command: list[str], cwd: Path, log: Path, env: dict | None = None, poll_s: float = 0.05) -> dict:
    """Wall seconds and the peak summed RSS of the process tree (``c2s_kedro.harness.run_command``)."""
    # COLUMNS: rich does not wrap the log lines read back here
    run = run_command(command, cwd, log, env={"TQDM_DISABLE": "1", "COLUMNS": "400", **(env or {})}, poll_s=poll_s)
    if run.returncode:
        raise RuntimeError(f"{' '.join(map(str, command[:3]))}... failed (exit {run.returncode}); see {log}")
    return {"wall_s": round(run.wall_s, 2), "peak_rss_gb": round(run.peak_tree_rss / 2**30, 2)}


def make_project(root: Path, raw: Path) -> Path:
    """A copy of the project (``c2s_kedro.harness.copy_project``) with the ``startup`` environment;
    an earlier copy's data/ stays (``--reuse-data``)."""
    copy_project(root, keep_data=True)
    env = root / "conf" / ENV
    env.mkdir()
    (env / "catalog.yml").write_text(yaml.safe_dump({"raw_adata": {"type": "c2s_kedro.datasets.H5adDataset", "filepath": str(raw)}}))
    # the sentences do not depend on the PCA/UMAP of the processed cells
    (env / "parameters.yml").write_text(yaml.safe_dump({"data_processing": {"embed": False}}))
    return root


def kedro_run(project: Path, pipeline: str, log: Path) -> dict:
    """The whole run: wall seconds, peak RSS, seconds to the first node, seconds of each node."""
    marks_file = log.with_suffix(".marks.json")
    marks_file.unlink(missing_ok=True)
    started_wall = time.time()
    result = measure([sys.executable, "-c", PRELUDE, "run", "--env", ENV, f"--pipelines={pipeline}"], project, log,
                     {"C2S_MARKS": str(marks_file)})
    marks = json.loads(marks_file.read_text())
    result["first_node_s"] = round(marks["first_node"] - started_wall, 2)
    result["after_last_node_s"] = round(started_wall + result["wall_s"] - marks["last_node_done"], 2)
    # each task: its inputs loaded, the node, its outputs saved (lazy imports of the node's modules too)
    result["tasks_s"] = {name: round(seconds, 2) for name, seconds in marks["nodes"].items()}
    rates = re.findall(r"cell sentences of (\d+) cells in ([\d.]+) s", re.sub(r"\s+", " ", log.read_text(errors="replace")))
    result["conversion_s"] = float(rates[-1][1]) if rates else None  # core.sentences.conversion logs it
    return result


def kedro_run_first_node(project: Path, pipeline: str, log: Path) -> float:
    """Seconds from the command to its first node (the process ends there)."""
    marks_file = log.with_suffix(".marks.json")
    marks_file.unlink(missing_ok=True)
    env = {"C2S_MARKS": str(marks_file), "C2S_FIRST_NODE_ONLY": "1"}
    started_wall = time.time()
    measure([sys.executable, "-c", PRELUDE, "run", "--env", ENV, f"--pipelines={pipeline}"], project, log, env)
    return round(json.loads(marks_file.read_text())["first_node"] - started_wall, 2)


FLOOR_PIPELINE = """from kedro.pipeline import Pipeline, node, pipeline


def nothing():
    return None


def register_pipelines() -> dict[str, Pipeline]:
    return {"__default__": pipeline([node(nothing, None, "nothing_done", name="nothing")])}
"""


def make_floor_project(root: Path) -> Path:
    """The smallest Kedro project this environment can run: one node that does nothing, none of
    our code, the installed plugins (kedro-mlflow with our mlflow.yml, kedro-viz, ...): what
    Kedro and its plugins cost before any project's first node."""
    shutil.rmtree(root, ignore_errors=True)
    package = root / "src" / "startup_floor"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "settings.py").write_text("")
    (package / "pipeline_registry.py").write_text(FLOOR_PIPELINE)
    (root / "pyproject.toml").write_text(
        '[tool.kedro]\npackage_name = "startup_floor"\nproject_name = "startup_floor"\n'
        f'kedro_init_version = "{_kedro_version()}"\nsource_dir = "src"\n')
    (root / ".telemetry").write_text("consent: false\n")
    for env in ("base", "local"):
        (root / "conf" / env).mkdir(parents=True)
    shutil.copy(PROJECT / "conf" / "base" / "mlflow.yml", root / "conf" / "base" / "mlflow.yml")
    for config in ("catalog.yml", "parameters.yml"):
        (root / "conf" / "base" / config).write_text("{}\n")
    return root


def _kedro_version() -> str:
    from importlib.metadata import version

    return version("kedro")


def floor_first_node(root: Path, log: Path) -> float:
    """Seconds from ``kedro run`` to the floor project's one node."""
    marks_file = log.with_suffix(".marks.json")
    marks_file.unlink(missing_ok=True)
    started_wall = time.time()
    measure([sys.executable, "-c", PRELUDE, "run"], root, log, {"C2S_MARKS": str(marks_file), "C2S_FIRST_NODE_ONLY": "1"})
    return round(json.loads(marks_file.read_text())["first_node"] - started_wall, 2)


def import_seconds(module: str) -> float:
    """Seconds a fresh interpreter takes to import ``module`` (interpreter start-up excluded)."""
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return round(float(out.strip().splitlines()[-1]), 2)  # kedro logs its logging set-up on stdout first


def framework_floor(work: Path, repeats: int, pipelines: list[str], project: Path | None) -> dict:
    """The floor project's first node beside ours (side by side, ``repeats`` times in turn), and
    the imports that make most of it."""
    floor_root = make_floor_project(work / "floor_project")
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    floor, ours = [], {name: [] for name in pipelines}
    floor_first_node(floor_root, logs / "floor_warmup.log")  # creates its MLflow database (ours exists already)
    for repeat in range(repeats):
        floor.append(floor_first_node(floor_root, logs / f"floor_{repeat}.log"))
        if project is not None:
            for name in pipelines:
                ours[name].append(kedro_run_first_node(project, name, logs / f"first_node_{name}_{repeat}.log"))
    report = {"floor_first_node_s": floor, "floor_first_node_median_s": statistics.median(floor),
              "imports_s": {m: import_seconds(m) for m in ("kedro.framework.cli", "mlflow", "kedro_mlflow.framework.hooks")}}
    if project is not None:
        report["ours_first_node_median_s"] = {name: statistics.median(v) for name, v in ours.items()}
        report["ours_first_node_s"] = ours
    return report


def reference_command(python: str) -> tuple[list[str], str]:
    """The reference package's conversion when ``python`` imports cell2sentence, else the loop."""
    has_package = subprocess.run([python, "-c", "import cell2sentence"], capture_output=True).returncode == 0
    if has_package:
        return [python, "-c", REFERENCE_PACKAGE], "cell2sentence CSData.adata_to_arrow + Dataset.save_to_disk"
    return [sys.executable, "-c", REFERENCE_LOOP], "reference-style per-cell loop (conversion_throughput.reference_loop) + Dataset.save_to_disk"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=20_000)
    parser.add_argument("--genes", type=int, default=36_000)
    parser.add_argument("--genes-per-cell", type=int, default=2_000)
    parser.add_argument("--repeats", type=int, default=3, help="side-by-side runs of each (median)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "c2s_startup")
    parser.add_argument("--reference-python", default=sys.executable,
                        help="a Python that imports cell2sentence (default: this one; the loop when it does not)")
    parser.add_argument("--pipelines", nargs="+", default=list(FIRST_NODE_PIPELINES), help="first-node timings")
    parser.add_argument("--reuse-data", action="store_true", help="keep an existing atlas and processed data")
    parser.add_argument("--floor-only", action="store_true",
                        help="only the framework floor (a one-node Kedro project with the installed plugins) beside our "
                             "pipelines' first nodes (needs the project copy in --workdir from an earlier run)")
    args = parser.parse_args()
    if args.floor_only:
        project = args.workdir / "project"
        if (project / "conf").exists():  # today's conf/ over the earlier run's data/
            make_project(project, args.workdir / "atlas.h5ad")
        print(json.dumps(framework_floor(args.workdir, args.repeats, args.pipelines,
                                         project if (project / "conf").exists() else None), indent=2))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    from c2s_kedro.core.simulate.atlas import write_atlas_h5ad

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    raw = work / "atlas.h5ad"
    project = make_project(work / "project", raw)
    processed = project / "data" / "03_primary" / "processed_adata.h5ad"
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    if not (args.reuse_data and raw.exists()):
        logger.info("writing the %d x %d atlas", args.cells, args.genes)
        write_atlas_h5ad(raw, args.cells, args.genes, expressed_genes_per_cell=args.genes_per_cell)
    if not (args.reuse_data and processed.exists()):
        logger.info("data_processing")
        kedro_run(project, "data_processing", logs / "data_processing.log")

    command, reference_kind = reference_command(args.reference_python)
    ours, theirs = [], []
    for repeat in range(args.repeats):
        logger.info("side by side, run %d", repeat + 1)
        ours.append(kedro_run(project, "sentence_conversion", logs / f"sentence_conversion_{repeat}.log"))
        out = work / "reference_sentences"
        shutil.rmtree(out, ignore_errors=True)
        theirs.append(measure([*command, str(processed), str(out), str(SEED), ",".join(LABEL_COLUMNS), str(PROJECT / "benchmarks")],
                              work, logs / f"reference_{repeat}.log"))
    n_cells = int(json.loads(subprocess.run(
        [sys.executable, "-c", "import sys, anndata; print(anndata.read_h5ad(sys.argv[1], backed='r').n_obs)", str(processed)],
        capture_output=True, text=True, check=True).stdout))

    logger.info("first nodes, beside the framework floor")
    floor = framework_floor(work, args.repeats, args.pipelines, project)
    first_node = floor.pop("ours_first_node_median_s")

    logger.info("kernel rate")
    kernel = json.loads(subprocess.run(
        [sys.executable, "-c", KERNEL, str(processed), str(work), ",".join(LABEL_COLUMNS), str(SEED), str(args.repeats)],
        capture_output=True, text=True, check=True, env={**os.environ, "TQDM_DISABLE": "1"}).stdout.strip().splitlines()[-1])

    ours_wall = statistics.median(run["wall_s"] for run in ours)
    theirs_wall = statistics.median(run["wall_s"] for run in theirs)
    node_s = statistics.median(run["conversion_s"] for run in ours)
    task_s = statistics.median(run["tasks_s"]["convert_to_cell_sentences"] for run in ours)
    kernel_s = statistics.median(kernel["seconds"])
    report = {
        "machine": {"cpus": len(os.sched_getaffinity(0)), "load_average_1min_at_end": round(os.getloadavg()[0], 2)},
        "data": {"cells": n_cells, "genes": args.genes, "genes_per_cell": args.genes_per_cell},
        "command": f"kedro run --env {ENV} --pipelines=sentence_conversion",
        "reference": reference_kind,
        "sentence_conversion_whole_process_s": ours_wall,
        "reference_whole_process_s": theirs_wall,
        "ratio_reference_over_ours": round(theirs_wall / ours_wall, 2),
        "runs": {"ours": ours, "reference": theirs},
        "first_node_s": first_node,
        "framework_floor": floor,  # a one-node Kedro project with the same plugins: the first node no project can beat
        "in_pipeline_cells_per_s": round(n_cells / node_s),
        "convert_task_cells_per_s": round(n_cells / task_s),  # with the h5ad load, first imports and the save
        "kernel_cells_per_s": round(n_cells / kernel_s),
        "kernel_over_in_pipeline": round(node_s / kernel_s, 2),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
