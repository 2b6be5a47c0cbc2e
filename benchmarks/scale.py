"""The user's sizes and the user's wait: whole `kedro run`s on simulated data at 1/4, 1/2 and full size.

Makes the atlas (``core.simulate.atlas.write_atlas_h5ad``, default 30,000 cells x 36,000 genes, ~2,300
expressed genes per cell) and the screen (``core.simulate.screen.write_perturbseq_h5ad``,
default 2,000 perturbations x 124 cells + 12,000 controls = 260,000 cells x 8,500 genes, 4 gem
groups), each written chunk by chunk. For every size it copies the project (conf/ without
conf/local, pyproject.toml) into ``--workdir``, adds a Kedro environment ``scale`` whose catalog
points ``raw_adata`` / ``perturbseq_raw`` at the files and whose parameters cap training at
``--max-steps`` (finetuning, and pretraining, which builds the default foundation model the
embedding and zero-shot pipelines need), and runs each pipeline with ``kedro run --env scale``,
one after the other in that copy. Wall time and peak RSS are measured on the ``kedro run``
process tree (psutil, polled every 0.2 s). The exponent is the log-log slope of wall time (and of
peak RSS) against cells over the sizes that finished.

    python benchmarks/scale.py                                   # everything, user's sizes
    python benchmarks/scale.py --skip-screen --fractions 0.25    # the atlas pipelines at 1/4 size
    python benchmarks/scale.py --atlas-pipelines data_processing,sentence_conversion --skip-screen

Prints one JSON object. Generated files (several GB at full size) stay under ``--workdir``; pass
``--clean`` to delete each size's files once it is measured.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import yaml

from c2s_kedro.harness import KEDRO, PROJECT_ROOT, copy_project, run_command
ATLAS_PIPELINES = ("data_processing", "sentence_conversion", "benchmarking", "embedding", "finetuning",
                   "zero_shot_annotation", "cell_type_evaluation")
SCREEN_PIPELINES = ("perturbation_data", "perturbation_finetuning", "perturbation_posterior")
logger = logging.getLogger("scale")


def measure(command: list[str], cwd: Path, log: Path, poll_s: float = 0.2) -> dict[str, float]:
    """Run ``command`` (``c2s_kedro.harness.run_command``); wall time, the peak of the summed RSS of
    its process tree, and the seconds until its log first says "Running node" (start-up: imports,
    catalog, MLflow). The tree's RSS is traced once a second next to the log (<log>.rss.tsv: unix
    time, GB), to tell which node the peak belongs to from the log's timestamps."""
    run = run_command(command, cwd, log, poll_s=poll_s, first_node=True, rss_trace=log.with_suffix(".rss.tsv"))
    return {"wall_s": round(run.wall_s, 1), "peak_rss_gb": round(run.peak_tree_rss / 2**30, 2),
            "first_node_s": None if run.first_node_s is None else round(run.first_node_s, 1), "returncode": run.returncode}


def make_project(root: Path, data: dict[str, Path], max_steps: int, posterior: dict | None = None,
                 keep_data: bool = False, pretraining_steps: int | None = None,
                 max_test_cells: int | None = None, max_eval_samples: int | None = None) -> Path:
    """A copy of the project (``c2s_kedro.harness.copy_project``) with the ``scale`` environment; with
    ``keep_data`` an earlier copy's data/ (and MLflow store) stays, so a later pipeline reads what
    an earlier invocation wrote."""
    copy_project(root, keep_data=keep_data)
    env = root / "conf" / "scale"
    env.mkdir()
    catalog = {name: {"type": "c2s_kedro.datasets.H5adDataset", "filepath": str(path), "metadata": {"kedro-viz": {"layer": "raw"}}}
               for name, path in data.items()}
    (env / "catalog.yml").write_text(yaml.safe_dump(catalog))
    steps = {"training_arguments": {"max_steps": max_steps}}
    parameters = {"finetuning": dict(steps), "pretraining": dict(steps), "perturbation": {"finetuning": dict(steps)}}
    if pretraining_steps is not None:  # the foundation model only has to exist for embedding/zero-shot
        parameters["pretraining"] = {"training_arguments": {"max_steps": pretraining_steps}}
    if max_eval_samples is not None:  # an evaluation over a 36,000-gene vocabulary costs many training steps
        for section in (parameters["finetuning"], parameters["pretraining"]):
            section["max_eval_samples"] = max_eval_samples
    if max_test_cells is not None:  # label scoring of every test cell of a large atlas is GPU work
        parameters["evaluation"] = {"max_test_cells": max_test_cells}
    if posterior:  # which held-out perturbations are sampled, and how much (posterior sampling is GPU work)
        parameters["perturbation"]["posterior"] = posterior
    (env / "parameters.yml").write_text(yaml.safe_dump(parameters))
    return root


def finetuning_figures(project: Path) -> dict[str, float]:
    """s/step of the capped run and the epoch it projects (prompts / batch size steps)."""
    log_path = project / "data" / "08_reporting" / "finetuning_log.json"
    prompts = project / "data" / "05_model_input" / "finetuning_prompts"
    if not log_path.exists() or not prompts.exists():
        return {}
    from datasets import load_from_disk

    log = json.loads(log_path.read_text())
    history = log.get("log_history", log) if isinstance(log, dict) else log
    final = next((e for e in reversed(history) if isinstance(e, dict) and "train_runtime" in e), None)
    if not final:
        return {}
    train = load_from_disk(str(prompts))["train"]
    base = yaml.safe_load((PROJECT_ROOT / "conf" / "base" / "parameters_finetuning.yml").read_text())["finetuning"]
    batch = int(base["training_arguments"]["per_device_train_batch_size"])
    s_per_step = float(final["train_runtime"]) / max(1, int(final.get("step", 1)))
    steps_per_epoch = int(np.ceil(train.num_rows / batch))
    return {"s_per_step": round(s_per_step, 3), "train_prompts": train.num_rows, "steps_per_epoch": steps_per_epoch,
            "projected_epoch_s": round(s_per_step * steps_per_epoch, 1)}


def posterior_figures(project: Path) -> dict[str, float]:
    """The posterior's cost per sample and what the scoring compared, from perturbation_posterior_metrics.json."""
    path = project / "data" / "08_reporting" / "perturbation_posterior_metrics.json"
    if not path.exists():
        return {}
    metrics = json.loads(path.read_text())
    keys = ("posterior.seconds_per_sample", "posterior.n_samples", "n_heldout_perturbations",
            "n_heldout_perturbations_not_sampled", "all_heldout.n_perturbations")
    figures = {key: metrics[key] for key in keys if key in metrics}
    if "posterior.seconds_per_sample" in figures:
        figures["seconds_per_sample"] = figures.pop("posterior.seconds_per_sample")
    return figures


def slope(cells: list[int], values: list[float]) -> float | None:
    """Log-log slope: 1 is linear in cells."""
    points = [(c, v) for c, v in zip(cells, values) if v and v > 0]
    if len(points) < 2:
        return None
    x, y = np.log([p[0] for p in points]), np.log([p[1] for p in points])
    return round(float(np.polyfit(x, y, 1)[0]), 2)


def run_dataset(kind: str, fraction: float, args: argparse.Namespace) -> dict:
    from c2s_kedro.core.simulate.atlas import write_atlas_h5ad
    from c2s_kedro.core.simulate.screen import write_perturbseq_h5ad

    workdir = Path(args.workdir) / f"{kind}_{fraction:g}"
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"{kind}.h5ad"
    if kind == "atlas":
        n_cells = int(round(args.atlas_cells * fraction))
        make = lambda: write_atlas_h5ad(path, n_cells, args.atlas_genes, expressed_genes_per_cell=args.genes_per_cell)
        data, pipelines = {"raw_adata": path}, args.atlas_pipelines
    else:
        n_perturbations = int(round(args.perturbations * fraction))
        n_controls = int(round(args.controls * fraction))
        n_cells = n_perturbations * args.cells_per_perturbation + n_controls
        make = lambda: write_perturbseq_h5ad(
            path, n_genes=args.screen_genes, n_perturbations=n_perturbations, cells_per_perturbation=args.cells_per_perturbation,
            n_control_cells=n_controls, n_gem_groups=args.gem_groups)
        data, pipelines = {"perturbseq_raw": path}, args.screen_pipelines
    result: dict = {"fraction": fraction, "n_cells": n_cells, "pipelines": {}}
    if path.exists() and args.reuse_data:
        result["simulation"] = "reused"
    else:
        start = time.perf_counter()
        make()
        result["simulation_s"] = round(time.perf_counter() - start, 1)
    result["file_gb"] = round(path.stat().st_size / 2**30, 2)
    if args.simulate_only:
        return result
    posterior = {"perturbations": args.posterior_perturbations, "n_samples": args.posterior_samples,
                 "prompts_per_perturbation": args.posterior_prompts} if kind == "screen" else None
    project = make_project(workdir / "project", data, args.max_steps, posterior, keep_data=args.reuse_project,
                           pretraining_steps=args.pretraining_steps, max_test_cells=args.max_test_cells,
                           max_eval_samples=args.max_eval_samples)
    for name in pipelines:
        logger.info("%s %g: kedro run --pipelines=%s", kind, fraction, name)
        figures = measure([str(KEDRO), "run", "--env", "scale", f"--pipelines={name}"], project, workdir / f"{name}.log")
        if name == "finetuning":
            figures.update(finetuning_figures(project))
        if name == "perturbation_posterior":
            figures.update(posterior_figures(project))
        result["pipelines"][name] = figures
        logger.info("%s %g %s: %s", kind, fraction, name, figures)
        print(json.dumps({kind: {str(fraction): {name: figures}}}), file=sys.stderr, flush=True)
    if args.clean:
        shutil.rmtree(workdir)
    return result


def summarize(runs: list[dict]) -> dict:
    """Per pipeline: the sizes' figures and the growth exponents."""
    summary: dict = {}
    names = {name for run in runs for name in run["pipelines"]}
    for name in sorted(names):
        done = [r for r in runs if name in r["pipelines"] and r["pipelines"][name]["returncode"] == 0]
        cells = [r["n_cells"] for r in done]
        summary[name] = {
            "time_exponent": slope(cells, [r["pipelines"][name]["wall_s"] for r in done]),
            "memory_exponent": slope(cells, [r["pipelines"][name]["peak_rss_gb"] for r in done]),
        }
    return summary


def combine(reports: list[dict]) -> dict:
    """One report from several invocations' JSON objects (e.g. the CPU pipelines and the model
    pipelines run separately): each dataset's runs merged by size (a pipeline measured twice at
    one size keeps the later report's figures), then the growth exponents and the largest size's
    total computed again over every size."""
    combined: dict = {"machine": reports[0].get("machine"), "max_steps": reports[0].get("max_steps"),
                      "combined_from": len(reports)}
    for kind in ("atlas", "screen"):
        by_cells: dict[int, dict] = {}
        for report in reports:
            for run in report.get(kind, {}).get("runs", []):
                merged = by_cells.setdefault(run["n_cells"], {**run, "pipelines": {}})
                merged["pipelines"].update(run["pipelines"])
        if not by_cells:
            continue
        runs = [by_cells[n] for n in sorted(by_cells)]
        combined[kind] = {"runs": runs, "growth": summarize(runs),
                          "total_wall_s_largest": round(sum(p["wall_s"] for p in runs[-1]["pipelines"].values()), 1)}
    return combined


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--combine", nargs="+", type=Path, default=None, metavar="JSON",
                        help="merge the JSON objects of earlier invocations into one (runs nothing)")
    parser.add_argument("--workdir", default="/tmp/scale")
    parser.add_argument("--fractions", default="0.25,0.5,1", help="sizes as fractions of the full size")
    parser.add_argument("--atlas-cells", type=int, default=30_000)
    parser.add_argument("--atlas-genes", type=int, default=36_000)
    parser.add_argument("--genes-per-cell", type=int, default=2_300)
    parser.add_argument("--perturbations", type=int, default=2_000)
    parser.add_argument("--cells-per-perturbation", type=int, default=124)
    parser.add_argument("--controls", type=int, default=12_000)
    parser.add_argument("--screen-genes", type=int, default=8_500)
    parser.add_argument("--gem-groups", type=int, default=4)
    parser.add_argument("--max-steps", type=int, default=20, help="finetuning (and pretraining) steps")
    parser.add_argument("--pretraining-steps", type=int, default=None,
                        help="steps of the foundation model's pretraining (default: --max-steps)")
    parser.add_argument("--max-test-cells", type=int, default=None,
                        help="evaluation.max_test_cells for the atlas's label scoring (default: all test cells)")
    parser.add_argument("--posterior-perturbations", type=int, default=8,
                        help="held-out perturbations sampled by perturbation_posterior (perturbation.posterior.perturbations)")
    parser.add_argument("--posterior-samples", type=int, default=10, help="samples per prompt and temperature")
    parser.add_argument("--posterior-prompts", type=int, default=1, help="prompts per sampled perturbation")
    parser.add_argument("--max-eval-samples", type=int, default=None,
                        help="val samples evaluated by finetuning and pretraining (default: the pipelines' own, 500)")
    parser.add_argument("--atlas-pipelines", default=",".join(ATLAS_PIPELINES))
    parser.add_argument("--screen-pipelines", default=",".join(SCREEN_PIPELINES))
    parser.add_argument("--skip-atlas", action="store_true")
    parser.add_argument("--skip-screen", action="store_true")
    parser.add_argument("--reuse-data", action="store_true", help="keep a simulated file already in the workdir")
    parser.add_argument("--reuse-project", action="store_true",
                        help="keep the project copy's data/ from an earlier invocation (e.g. run perturbation_posterior "
                             "after perturbation_data without redoing it)")
    parser.add_argument("--clean", action="store_true", help="delete each size's files once measured")
    parser.add_argument("--simulate-only", action="store_true",
                        help="write the datasets and stop (then measure with --reuse-data)")
    args = parser.parse_args()
    if args.combine:
        print(json.dumps(combine([json.loads(path.read_text()) for path in args.combine]), indent=2))
        return
    args.atlas_pipelines = [p for p in args.atlas_pipelines.split(",") if p]
    args.screen_pipelines = [p for p in args.screen_pipelines.split(",") if p]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    fractions = [float(f) for f in args.fractions.split(",")]
    report: dict = {"machine": {"cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1)},
                    "max_steps": args.max_steps}
    for kind, skip in (("atlas", args.skip_atlas), ("screen", args.skip_screen)):
        if skip:
            continue
        runs = [run_dataset(kind, f, args) for f in fractions]
        report[kind] = {"runs": runs, "growth": summarize(runs)}
        if args.simulate_only:
            continue
        full = max(runs, key=lambda r: r["n_cells"])
        report[kind]["total_wall_s_largest"] = round(sum(p["wall_s"] for p in full["pipelines"].values()), 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
