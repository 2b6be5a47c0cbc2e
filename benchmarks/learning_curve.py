"""Learning curves of the targets that stay out of reach: score against training.

For annotation (``--task annotation``): the project's own ``kedro run --pipelines=finetuning`` in a
project copy seeded from a finished default run (``--source``, as ``levers.py`` makes it), trained
``--epochs`` epochs with a checkpoint and an eval loss after every epoch, every checkpoint kept; then
every checkpoint is scored as the evaluation pipeline scores the fine-tuned model (its nodes
``build_evaluation_prompts``, ``predict_by_label_scoring``, ``predict_by_generation`` and
``score_predictions``, with the source run's two logistic-regression predictions, which do not depend
on the model), so each point is label-scoring and generation accuracy / macro-F1 on the same 69
test cells.

For perturbation (``--task perturbation``): ``kedro run --pipelines=perturbation_finetuning`` in a
copy made as ``perturbation_levers.py`` makes it, trained ``--epochs`` epochs with a checkpoint every
epoch; then every checkpoint is the copy's ``perturbation_model`` for one ``kedro run
--pipelines=perturbation_posterior`` (posterior sampling and scoring against the baselines and the
simulated truth, the default's settings unless ``--temperatures`` / ``--n-samples`` say otherwise).

A checkpoint of an N-epoch run is not an N'-epoch run (the cosine schedule has not decayed at it);
the last point is exactly a full N-epoch training. Training seconds of a point are the run's
``train_runtime`` times its share of the steps (evaluation passes included); they are this machine's,
under whatever else runs on it (the JSON keeps the whole run's wall time and the load).

``--plot`` draws the curves of one or more result files (JSON written by ``--out``) into a PNG:
mean and min-max over seeds against epochs, with the targets and baselines as lines.

Examples (the figures in benchmarks/README.md and the README's results section):
    .venv/bin/python benchmarks/learning_curve.py --task annotation --source S --work W/lc --epochs 12 \\
        --seeds 0,1,2 --out benchmarks/results/learning_curve_annotation.json
    .venv/bin/python benchmarks/learning_curve.py --task perturbation --source S --work W/lcp --epochs 4 \\
        --seeds 0 --out benchmarks/results/learning_curve_perturbation.json
    .venv/bin/python benchmarks/learning_curve.py --plot benchmarks/results/learning_curve_annotation.json \\
        benchmarks/results/learning_curve_perturbation.json --png docs/learning_curves.png
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
from pathlib import Path

import yaml

# the lever scripts' project copies and scores: `python benchmarks/learning_curve.py` has this folder on sys.path
import levers
import perturbation_levers
from c2s_kedro.harness import run_kedro

logger = logging.getLogger("learning_curve")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")


def kedro_run(root: Path, pipelines: str, log_name: str) -> float:
    """One ``kedro run`` in the copy ``root``, its output in ``log_name``; returns its wall seconds."""
    arguments = ["run", f"--pipelines={pipelines}"]
    logger.info("%s: kedro %s", root, " ".join(arguments))
    completed = run_kedro(root, arguments, root / log_name)
    if completed.returncode != 0:
        raise RuntimeError(f"`kedro {' '.join(arguments)}` failed in {root} (rc {completed.returncode}); see {root / log_name}")
    return completed.wall_s


def checkpoints(directory: Path) -> list[Path]:
    """The Trainer's checkpoint-<step> folders of ``directory``, by step."""
    found = sorted(directory.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    if not found:
        raise FileNotFoundError(f"no checkpoint-* folder in {directory}: the training kept none (keep_checkpoints?)")
    return found


def as_model_dir(checkpoint: Path, tokenizer_from: Path) -> Path:
    """The checkpoint made a loadable model directory: the Trainer's checkpoints hold the weights
    and config but not the tokenizer, which fine-tuning does not change (copied from the saved model)."""
    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).exists() and not (checkpoint / name).exists():
            shutil.copy(tokenizer_from / name, checkpoint / name)
    return checkpoint


def epoch_settings(epochs: int, seed: int) -> dict[str, object]:
    """TrainingArguments overrides: ``epochs`` epochs, an eval and a checkpoint after each, all kept."""
    return {"num_train_epochs": epochs, "eval_strategy": "epoch", "save_strategy": "epoch",
            "save_total_limit": None, "load_best_model_at_end": False, "seed": seed}


def points_from_history(history: list[dict], steps: list[int]) -> dict[int, dict[str, float]]:
    """Per checkpoint step: epoch, eval loss at it, and training seconds (runtime x share of the steps)."""
    runtime = next((row["train_runtime"] for row in history if "train_runtime" in row), None)
    last = max(steps)
    evals = {row["step"]: row["eval_loss"] for row in history if "eval_loss" in row and "step" in row}
    epochs = {row["step"]: row["epoch"] for row in history if "epoch" in row and "step" in row}
    return {step: {"step": step, "epoch": round(epochs.get(step, float("nan")), 3), "eval_loss": evals.get(step),
                   "training_seconds": round(runtime * step / last, 1) if runtime else None} for step in steps}


def annotation_curve(seed: int, args: argparse.Namespace) -> list[dict[str, object]]:
    from kedro.config import OmegaConfigLoader

    import pandas as pd
    from c2s_kedro.datasets import ArrowDataset, HFModelDataset
    from c2s_kedro.pipelines.evaluation import nodes

    root = args.work / f"annotation_seed{seed}"
    wall = None
    if not args.score_only:
        levers.make_project(root, args.source, "foundation_model")
        shutil.rmtree(root / "data/06_models/finetuned_model")  # made by the run
        conf = {"finetuning": {"seed": seed, "keep_checkpoints": True, "resume": False,
                               "training_arguments": epoch_settings(args.epochs, seed)}}
        (root / "conf/local/parameters.yml").write_text(yaml.safe_dump(conf))
        wall = round(kedro_run(root, "finetuning", "finetuning.log"), 1)
    history = json.loads((root / "data/08_reporting/finetuning_log.json").read_text())
    found = checkpoints(root / "data/06_models/finetuning_checkpoints")
    points = points_from_history(history, [int(path.name.split("-")[1]) for path in found])
    params = OmegaConfigLoader(conf_source=str(root / "conf"), base_env="base", default_run_env="local")["parameters"]["evaluation"]
    sentences = ArrowDataset(path=str(root / "data/04_feature/cell_sentences")).load()
    split = json.loads((root / "data/05_model_input/data_split.json").read_text())
    baselines = {name: pd.read_csv(args.source / f"data/07_model_output/{name}_predictions.csv")
                 for name in ("baseline", "sentence_baseline")}
    rows = []
    for checkpoint in found:
        model = HFModelDataset(path=str(as_model_dir(checkpoint, root / "data/06_models/finetuned_model"))).load()
        prompts = nodes.build_evaluation_prompts(sentences, split, model, params)
        label_scoring = nodes.predict_by_label_scoring(prompts, model, params)
        generation = nodes.predict_by_generation(prompts, model, params)
        metrics, *_ = nodes.score_predictions(generation, label_scoring, baselines["baseline"], baselines["sentence_baseline"], prompts)
        point = points[int(checkpoint.name.split("-")[1])]
        rows.append({"task": "annotation", "seed": seed, **point,
                     **{key: metrics[key] for key in metrics if key.endswith(("_accuracy", "_macro_f1"))},
                     "n_test_cells": len(prompts["prompt"]), "run_wall_seconds": wall})
        logger.info("annotation seed %d %s", seed, json.dumps(rows[-1]))
    return rows


def perturbation_curve(seed: int, args: argparse.Namespace) -> list[dict[str, object]]:
    root = args.work / f"perturbation_seed{seed}"
    posterior: dict[str, object] = {"seed": seed}
    if args.temperatures:
        posterior["temperatures"] = [float(t) for t in args.temperatures.split(",")]
    if args.n_samples:
        posterior["n_samples"] = args.n_samples
    conf = {"perturbation": {"finetuning": {"keep_checkpoints": True, "resume": False,
                                            "training_arguments": epoch_settings(args.epochs, seed)},
                             "posterior": posterior}}
    wall = None
    if not args.score_only:
        perturbation_levers.make_project(root, args.source)
        (root / "conf/local/parameters.yml").write_text(yaml.safe_dump(conf))
        wall = round(kedro_run(root, "perturbation_finetuning", "finetuning.log"), 1)
    else:  # the posterior settings may differ from the training run's
        (root / "conf/local/parameters.yml").write_text(yaml.safe_dump(conf))
    history = json.loads((root / "data/08_reporting/perturbation_finetuning_log.json").read_text())
    found = checkpoints(root / "data/06_models/perturbation_checkpoints")
    points = points_from_history(history, [int(path.name.split("-")[1]) for path in found])
    final = root / "data/06_models/perturbation_model"
    kept = root / "data/06_models/perturbation_model_final"
    if not kept.exists():
        shutil.move(final, kept)
    elif final.exists():  # an earlier scoring pass stopped with a checkpoint in place
        shutil.rmtree(final)
    rows = []
    try:
        for checkpoint in found:
            shutil.copytree(as_model_dir(checkpoint, kept), final)
            posterior_wall = kedro_run(root, "perturbation_posterior", f"posterior_{checkpoint.name}.log")
            metrics = json.loads((root / "data/08_reporting/perturbation_posterior_metrics.json").read_text())
            point = points[int(checkpoint.name.split("-")[1])]
            rows.append({
                "task": "perturbation", "seed": seed, **point, **perturbation_levers.headline_scores(metrics),
                "posterior_wall_seconds": round(posterior_wall, 1), "run_wall_seconds": wall,
            })
            logger.info("perturbation seed %d %s", seed, json.dumps(rows[-1]))
            shutil.rmtree(final)
    finally:
        if not final.exists():
            shutil.move(kept, final)
    return rows


def by_epoch(rows: list[dict], key: str) -> tuple[list[float], list[float], list[float], list[float]]:
    """Epochs, and the mean, min and max over seeds of ``key`` at each."""
    epochs = sorted({round(row["epoch"]) for row in rows})
    values = [[row[key] for row in rows if round(row["epoch"]) == epoch and row.get(key) is not None] for epoch in epochs]
    return epochs, [statistics.fmean(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def plot(files: list[Path], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for file in files for row in json.loads(file.read_text())["rows"]]
    panels = [task for task in ("annotation", "perturbation") if any(row["task"] == task for row in rows)]
    figure, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.6), squeeze=False)
    for axis, task in zip(axes[0], panels):
        chosen = [row for row in rows if row["task"] == task]
        seeds = sorted({row["seed"] for row in chosen})
        seconds = statistics.fmean(row["training_seconds"] / row["epoch"] for row in chosen if row["epoch"])
        if task == "annotation":
            curves = [("label_scoring_accuracy", "label scoring accuracy", "tab:blue"),
                      ("label_scoring_macro_f1", "label scoring macro-F1", "tab:orange"),
                      ("generation_accuracy", "generation answers accuracy", "tab:green")]
            baseline = statistics.fmean(row["baseline_accuracy"] for row in chosen)
            lines = [(baseline - 0.05, "target accuracy (baseline - 0.05)", "tab:blue"),
                     (0.6, "target macro-F1 0.6", "tab:orange")]
            refs = [(baseline, "logistic regression accuracy", "tab:gray")]
            title = "annotation: 69 test cells"
        else:
            curves = [("best.pearson_delta", "model pearson_delta (best T)", "tab:blue"),
                      ("best.pearson_delta_simulated_truth", "model vs simulated truth", "tab:orange")]
            lines = [(statistics.fmean(row["train_perturbed_mean.pearson_delta"] for row in chosen),
                      "target: train_perturbed_mean pearson_delta", "tab:blue"),
                     (0.1, "target vs truth 0.1", "tab:orange")]
            refs = [(statistics.fmean(row["linear_additive.pearson_delta_simulated_truth"] for row in chosen),
                     "linear baseline vs truth", "tab:gray"),
                    (statistics.fmean(row["cell_eval_ceiling.pearson_delta"] for row in chosen),
                     "cell-eval ceiling pearson_delta", "black")]
            title = "perturbation: 6 held-out perturbations"
        for key, label, colour in curves:
            epochs, mean, low, high = by_epoch(chosen, key)
            axis.plot(epochs, mean, marker="o", color=colour, label=label)
            if len(seeds) > 1:
                axis.fill_between(epochs, low, high, color=colour, alpha=0.2)
        for value, label, colour in lines:
            axis.axhline(value, color=colour, linestyle="--", linewidth=1, label=label)
        for value, label, colour in refs:
            axis.axhline(value, color=colour, linestyle=":", linewidth=1, label=label)
        axis.set_xlabel(f"epochs of fine-tuning (~{seconds:.0f} s each on this 2-core CPU, as measured)")
        axis.set_ylabel("score")
        spread = f"mean and min-max of seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else f"seed {seeds[0]}"
        axis.set_title(f"{title}; {spread}", fontsize=10)
        axis.legend(fontsize=7, loc="best")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png, dpi=110)
    logger.info("wrote %s", png)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("annotation", "perturbation"))
    parser.add_argument("--source", type=Path, help="a project copy after a default `kedro run`")
    parser.add_argument("--work", type=Path, default=Path("/tmp/learning_curve"))
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--temperatures", default=None, help="perturbation: posterior temperatures (default: conf/base's)")
    parser.add_argument("--n-samples", type=int, default=None, help="perturbation: posterior samples (default: conf/base's)")
    parser.add_argument("--score-only", action="store_true",
                        help="score the checkpoints an earlier run left in --work again, without training")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here (after every seed)")
    parser.add_argument("--plot", type=Path, nargs="+", default=None, help="JSON files of earlier runs to draw")
    parser.add_argument("--png", type=Path, default=Path("docs/learning_curves.png"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.plot:
        plot(args.plot, args.png)
        return
    if not args.task or not args.source:
        parser.error("--task and --source are needed (or --plot)")
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    args.work.mkdir(parents=True, exist_ok=True)
    curve = annotation_curve if args.task == "annotation" else perturbation_curve
    rows: list[dict[str, object]] = []
    for seed in (int(s) for s in args.seeds.split(",")):
        rows.extend(curve(seed, args))
        result = {"task": args.task, "epochs": args.epochs, "source": str(args.source), "rows": rows,
                  "load_average": os.getloadavg()}
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
