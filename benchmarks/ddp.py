"""Fine-tuning with 1 and with 2 processes (DDP over gloo) on the atlas's prompts, on this CPU.

In a copy of the project (``scale.make_project``: an environment ``scale`` whose ``raw_adata`` is
``--atlas`` and whose training stops after ``--max-steps``), the prompts and the default foundation
model are produced once (``kedro run --pipelines=finetuning --to-outputs=finetuning_prompts``, the
expression embedding off: nothing here reads it; the model pretrained ``--pretraining-steps`` only,
since only its shape is timed); then only the ``finetune_model`` node runs, once per configuration,
as a user would start it:

    python -m kedro run --env scale --pipelines=finetuning --nodes=finetune_model                 # 1 process
    python -m kedro run --env scale --pipelines=finetuning --nodes=... --params=finetuning.processes=2

(the node starts the 2 training processes itself, core.models.launch) with ``OMP_NUM_THREADS`` (torch's
intra-op threads per process) set per configuration: 1 process x 2 threads, 1 x 1, 2 x 1, 2 x 2
(four threads on two cores). Configurations
alternate over ``--rounds``, so a change in the machine's load hits all of them. Seconds per step
are the Trainer's ``train_runtime`` over its steps (``finetuning_log.json``, written by rank 0); each
step takes ``--batch`` prompts in all (4 by default: a process peaked at 2.8 GB with 4 prompts of
~512 tokens, whose logits over 36,000 genes dominate), split between the processes: 4 for one
process, 2 per rank for two, the same optimizer steps, so seconds per step compare directly.
Peak memory is the summed RSS of the run's process tree (psutil; it counts pages the ranks share
twice).

    python benchmarks/ddp.py                                  # the 1/4 atlas of scale.py, 20 steps, 1 round
    python benchmarks/ddp.py --atlas my.h5ad --max-steps 10 --rounds 2
    python benchmarks/ddp.py --reuse                          # keep the prompts and model of an earlier run

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import yaml

# the same project copy and measurement as scale.py (`python benchmarks/ddp.py` has this folder on sys.path)
from scale import make_project, measure

from c2s_kedro.harness import KEDRO

# (processes, intra-op threads per process)
CONFIGURATIONS = ((1, 2), (1, 1), (2, 1), (2, 2))
logger = logging.getLogger("ddp")


def prepare(project: Path, atlas: Path, max_steps: int, batch: int, pretraining_steps: int, reuse: bool) -> dict:
    """The project copy with the atlas's prompts and a foundation model saved."""
    saved = [project / "data" / "05_model_input" / "finetuning_prompts", project / "data" / "06_models" / "foundation_model"]
    reused = reuse and all(path.exists() for path in saved)
    make_project(project, {"raw_adata": atlas}, max_steps, keep_data=reused)
    parameters = project / "conf" / "scale" / "parameters.yml"
    settings = yaml.safe_load(parameters.read_text())
    settings["data_processing"] = {"embed": False}  # PCA/kNN/UMAP of the cells: no fine-tuning input reads it
    # The foundation model is only the network to time: its shape matters, not how long it trained.
    # A one-token-per-gene model's logits are batch x tokens x 36,000 genes (1.2 GB at 16 x 512 in
    # fp32, as much again for their gradient): the batch keeps each process within the memory budget.
    # Nor are evaluations and checkpoints timed (the Trainer evaluates once more when max_steps ends,
    # inside train_runtime; a 500-prompt eval set at the eval batch of 32 is minutes and GBs here).
    untimed = {"eval_strategy": "no", "save_strategy": "no", "load_best_model_at_end": False}
    settings["pretraining"] = {"training_arguments": {"max_steps": pretraining_steps, "per_device_train_batch_size": batch,
                                                      **untimed}}
    settings["finetuning"] = {"training_arguments": {"max_steps": max_steps, **untimed}}  # batch: per run
    parameters.write_text(yaml.safe_dump(settings))
    if reused:
        return {"prepared": "reused"}
    return measure([str(KEDRO), "run", "--env", "scale", "--pipelines=finetuning", "--to-outputs=finetuning_prompts"],
                   project, project.parent / "prepare.log")


def run_configuration(project: Path, processes: int, threads: int, batch: int, label: str) -> dict:
    """One fine-tuning run; every configuration takes ``batch`` prompts per step in all, split
    between its processes (the same optimizer steps, so seconds per step compare directly)."""
    command = [sys.executable, "-m", "kedro", "run", "--env", "scale", "--pipelines=finetuning", "--nodes=finetune_model",
               f"--params=finetuning.processes={processes},"
               f"finetuning.training_arguments.per_device_train_batch_size={batch // processes}"]
    os.environ["OMP_NUM_THREADS"] = str(threads)  # measure() passes os.environ on, to the training processes too
    log_path = project / "data" / "08_reporting" / "finetuning_log.json"
    log_path.unlink(missing_ok=True)
    figures = measure(command, project, project.parent / f"finetune_{label}.log")
    if figures["returncode"] != 0 or not log_path.exists():
        return figures
    final = next(e for e in reversed(json.loads(log_path.read_text())) if "train_runtime" in e)
    figures["steps"] = int(final["step"])
    figures["train_runtime_s"] = round(float(final["train_runtime"]), 1)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--atlas", default="/tmp/scale/atlas_0.25/atlas.h5ad",
                        help="raw-count atlas (scale.py's 1/4 atlas: 7,500 x 36,000); made with --cells when missing")
    parser.add_argument("--cells", type=int, default=7_500, help="cells of the atlas made when --atlas is missing")
    parser.add_argument("--genes", type=int, default=36_000)
    parser.add_argument("--workdir", default="/tmp/c2s_ddp_benchmark")
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4,
                        help="prompts per step in all, split between the processes (conf/base: 16 per process)")
    parser.add_argument("--configurations", default=",".join(f"{p}x{t}" for p, t in CONFIGURATIONS),
                        help="processes x threads per process, comma-separated")
    parser.add_argument("--pretraining-steps", type=int, default=2, help="steps of the foundation model that is timed")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--reuse", action="store_true", help="keep the prompts and foundation model of an earlier run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    atlas = Path(args.atlas)
    if not atlas.exists():
        from c2s_kedro.core.simulate.atlas import write_atlas_h5ad

        atlas = workdir / "atlas.h5ad"
        if not (args.reuse and atlas.exists()):
            write_atlas_h5ad(atlas, args.cells, args.genes)
    project = workdir / "project"
    logger.info("preparing the prompts and the foundation model in %s", project)
    prepared = prepare(project, atlas, args.max_steps, args.batch, args.pretraining_steps, args.reuse)

    from datasets import load_from_disk

    train_prompts = load_from_disk(str(project / "data" / "05_model_input" / "finetuning_prompts"))["train"].num_rows
    base = yaml.safe_load((project / "conf" / "base" / "parameters_finetuning.yml").read_text())["finetuning"]["training_arguments"]
    batch = args.batch * int(base.get("gradient_accumulation_steps", 1))  # prompts per optimizer step, in all

    configurations = [tuple(int(n) for n in c.split("x")) for c in args.configurations.split(",")]
    measured: dict[str, list[dict]] = {f"{p}x{t}": [] for p, t in configurations}
    for round_ in range(args.rounds):
        for processes, threads in configurations:
            label = f"{processes}x{threads}"
            logger.info("round %d: %d process(es) x %d thread(s)", round_ + 1, processes, threads)
            figures = run_configuration(project, processes, threads, args.batch, label)
            logger.info("%s: %s", label, figures)
            measured[label].append(figures)

    results = {}
    for processes, threads in configurations:
        label = f"{processes}x{threads}"
        runs = [r for r in measured[label] if "train_runtime_s" in r]
        entry: dict = {"processes": processes, "threads_per_process": threads, "runs": measured[label]}
        if runs:
            s_per_step = statistics.median(r["train_runtime_s"] / r["steps"] for r in runs)
            samples_per_step = batch
            steps_per_epoch = int(np.ceil(train_prompts / samples_per_step))
            entry.update({
                "s_per_step": round(s_per_step, 3),
                "samples_per_step": samples_per_step,
                "samples_per_s": round(samples_per_step / s_per_step, 3),
                "steps_per_epoch": steps_per_epoch,
                "projected_epoch_s": round(steps_per_epoch * s_per_step, 1),
                "peak_rss_gb": max(r["peak_rss_gb"] for r in runs),
            })
        results[label] = entry
    reference = results.get("1x2", {}).get("samples_per_s")
    for entry in results.values():
        if reference and entry.get("samples_per_s"):
            entry["samples_per_s_vs_1x2"] = round(entry["samples_per_s"] / reference, 2)
    print(json.dumps({
        "machine": {"cpus": os.cpu_count(), "load_1min_at_end": round(os.getloadavg()[0], 1)},
        "atlas": str(atlas), "train_prompts": train_prompts, "prompts_per_step": batch, "max_steps": args.max_steps,
        "rounds": args.rounds, "prepare": prepared, "configurations": results,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }, indent=2))


if __name__ == "__main__":
    main()
