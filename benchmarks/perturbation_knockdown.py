"""Does the perturbation model read its inputs? Levers of the perturbation model measured side by
side on the diagnostics of the perturbation_posterior pipeline.

Each lever is one ``kedro run --pipelines=perturbation_posterior`` in its own project copy
(``c2s_kedro.harness.copy_project``) with the lever's settings in ``conf/local``: the
project's runner makes what the copy lacks (the split, the base model, the prompts, the
fine-tuned model), then samples, probes and scores. Every copy starts from the same screen,
copied from ``--source`` (a project where ``kedro run --pipelines=perturbation_data`` has run):
the raw screen, its truth, processed cells, sentences and vocabulary.

Printed per lever and seed (one JSON object each, also written to ``--out``): for both
evaluations (held-out perturbations; seen perturbations' held-out cells) the knockdown reproduced
share and the target's presence (control cells, real perturbed cells, the model naming the
perturbation, the model naming the control label), the input-sensitivity probe, the model's best
temperature's scores beside the baselines' and the ceilings, the fine-tuning's eval loss and
seconds, the run's wall time and peak RSS.

    .venv/bin/python benchmarks/perturbation_knockdown.py --source <project> --work /tmp/kd \\
        --levers before,synthetic,synthetic_tied --seeds 0 --out results.json

``--quick`` samples 20 per prompt at T 1.0 only (the levers' comparison); without it the
posterior settings are conf/base's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import yaml

from c2s_kedro.harness import copy_inputs, copy_project, run_kedro
SCREEN = [  # what every copy starts from (paths of conf/base/catalog.yml)
    "data/01_raw/perturbseq_simulated.h5ad",
    "data/02_intermediate/perturbation_truth.csv",
    "data/03_primary/perturbation_processed_adata.h5ad",
    "data/04_feature/perturbation_cell_sentences",
    "data/04_feature/perturbation_vocabulary.json",
]
_BEFORE = {"pairing": {"synthetic_pairs_per_control": 0}, "control_top_k_genes": None}
_SYNTHETIC = {"synthetic_pairs_per_control": 2}
_TIED = {"model": {"architecture": {"tie_word_embeddings": True}}}
# lever -> overrides of the perturbation section (merged into conf/base by Kedro)
LEVERS: dict[str, dict] = {
    "default": {},
    "before": _BEFORE,  # no synthetic pairs, the whole top-200 control sentence, untied embeddings
    "before_tied": {**_BEFORE, **_TIED},
    "short_control": {},  # conf/base: a 50-gene control sentence, no synthetic pairs
    "synthetic": {"pairing": _SYNTHETIC},
    "synthetic_tied": {**_TIED, "pairing": _SYNTHETIC},
    "synthetic_tied_name_first": {**_TIED, "pairing": _SYNTHETIC, "prompt_template": 6},  # the name is the first token
    "same_cell_tied_name_first": {**_TIED, "prompt_template": 6, "pairing": {**_SYNTHETIC, "synthetic_same_cell": True}},
    "same_cell_tied_name_first_epochs3": {**_TIED, "prompt_template": 6,
                                          "pairing": {**_SYNTHETIC, "synthetic_same_cell": True},
                                          "finetuning": {"training_arguments": {"num_train_epochs": 3}}},
}
QUICK = {"posterior": {"n_samples": 20, "temperatures": [1.0]}}


def merged(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merged(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def make_copy(root: Path, source: Path, settings: dict) -> None:
    copy_project(root)
    copy_inputs(root, source, SCREEN,
                "a project where `kedro run --pipelines=perturbation_data` has run")
    (root / "conf/local/parameters.yml").write_text(yaml.safe_dump({"perturbation": settings}))


def headline(metrics: dict, prefix: str) -> dict:
    """One evaluation's diagnostics (``prefix`` "" or "seen.")."""

    def get(name):
        value = metrics.get(prefix + name)
        return None if value is None else round(float(value), 4)

    temperatures = sorted({k[len(prefix):].split(".")[0] for k in metrics
                           if k.startswith(prefix + "model_T") and k.endswith(".pearson_delta")})
    best = max(temperatures, key=lambda m: metrics.get(f"{prefix}{m}.pearson_delta") or -1) if temperatures else None
    row = {"best_temperature": best}
    for name in ("reproduced_share", "target_presence", "own_control_target_presence"):
        row[f"knockdown.{name}"] = get(f"knockdown.{best}.{name}")
    row["knockdown.real.target_presence"] = get("knockdown.real.target_presence")
    row["knockdown.control.target_presence"] = get("knockdown.control.target_presence")
    for name in ("name_swap_nats", "name_to_control_nats", "control_swap_nats", "target_logprob_shift"):
        row[f"sensitivity.{name}"] = get(f"sensitivity.{name}")
    for method in (best, "knockdown_only", "coexpression_neighbours", "train_perturbed_mean", "linear_additive"):
        for metric in ("pearson_delta", "pearson_delta_simulated_truth", "centered_pearson_delta", "energy_distance"):
            row[f"{method}.{metric}"] = get(f"{method}.{metric}")
    row[f"{best}.pearson_delta_vs_own_control"] = get(f"{best}.pearson_delta_vs_own_control")
    row[f"{best}.pearson_delta_vs_own_control_simulated_truth"] = get(f"{best}.pearson_delta_vs_own_control_simulated_truth")
    row["ceiling.pearson_delta"] = get("cell_eval_ceiling.pearson_delta")
    row["observed_cells.pearson_delta_simulated_truth"] = get("observed_cells.pearson_delta_simulated_truth")
    row["n_perturbations"] = get("n_heldout_perturbations")
    return row


def run_lever(name: str, seed: int, args: argparse.Namespace) -> dict:
    settings = merged(LEVERS[name], {"seed": seed, "pairing": {"seed": seed}, "split": {"seed": 0},
                                     "finetuning": {"training_arguments": {"seed": seed}}})
    if args.quick:
        settings = merged(settings, QUICK)
    root = args.work / f"{name}-{seed}"
    make_copy(root, args.source, settings)
    started = time.perf_counter()
    # --probe-only: the fine-tuning (and what it needs), then the input-sensitivity probe alone
    runs = [["--pipelines=perturbation_finetuning"], ["--nodes=probe_input_sensitivity"]] if args.probe_only else \
        [["--pipelines=perturbation_posterior"]]
    peaks = []
    for arguments in runs:
        done = run_kedro(root, ["run", *arguments], root / "run.log", append=True)
        if done.returncode:
            raise RuntimeError(f"lever {name} failed: see {root / 'run.log'}")
        peaks.append(done.peak_rss_mb)
    report = "perturbation_sensitivity_metrics.json" if args.probe_only else "perturbation_posterior_metrics.json"
    metrics = json.loads((root / "data/08_reporting" / report).read_text())
    training = json.loads((root / "data/08_reporting/perturbation_finetuning_log.json").read_text())
    result = {"lever": name, "seed": seed, "settings": settings, "wall_seconds": round(time.perf_counter() - started, 1),
              "peak_rss_mb": max(peaks),
              "train_seconds": next((h.get("train_runtime") for h in training if "train_runtime" in h), None),
              "eval_loss": min((h["eval_loss"] for h in training if "eval_loss" in h), default=None),
              "heldout": headline(metrics, ""), "seen": headline(metrics, "seen.")}
    if not args.keep:
        shutil.rmtree(root / "data/06_models", ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/perturbation_knockdown"))
    parser.add_argument("--levers", default="before,synthetic_tied")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--quick", action="store_true", help="20 samples per prompt at T 1.0")
    parser.add_argument("--keep", action="store_true", help="keep the copies' models")
    parser.add_argument("--probe-only", action="store_true", help="fine-tune and probe the input sensitivity; no posterior")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    unknown = [n for n in args.levers.split(",") if n not in LEVERS]
    if unknown:
        parser.error(f"unknown --levers {unknown}; choose from {sorted(LEVERS)}")
    args.work.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.levers.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            result = run_lever(name, seed, args)
            print(json.dumps(result), flush=True)
            results.append(result)
            if args.out:
                args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
