"""Training levers for the atlas's fine-tuned model, measured side by side.

Each lever is a set of ``--params`` overrides of the project's own ``kedro run
--pipelines=finetuning,evaluation`` (fine-tuning of the foundation model on both tasks, then label
scoring, generation-based annotation, cell generation and its real-cell classifier), run in a fresh
project copy per lever and seed. Every copy starts from the same inputs, copied from a finished
default run (``--source``): cell sentences, data split, foundation model, processed AnnData, rank fit
and vocabulary, so the levers differ only in what they override. Prints one JSON object per lever
and seed, then a summary (mean and spread over seeds), and writes them to ``--out``.

Generated cells are fewer than the default's 20 per type when ``--cells-per-type`` says so: then
``real_classifier_accuracy_on_generated_types`` is a proxy on that many cells per type (the same
classifier and ceiling; a noisier estimate), named so in the output.

Example (the figures in benchmarks/README.md, section "Levers"):
    .venv/bin/python benchmarks/levers.py --source /tmp/lead/full --work /tmp/h5/levers \\
        --levers default,epochs6 --seeds 0 --cells-per-type 5
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

from c2s_kedro.harness import KEDRO, add_lever_arguments, chosen_levers, copy_inputs, copy_project, run_command, summarize_seeds

logger = logging.getLogger("levers")

# What the finetuning and evaluation pipelines read that neither makes (paths as in conf/base/catalog.yml).
INPUTS = [
    "data/04_feature/cell_sentences",
    "data/04_feature/vocabulary.json",
    "data/05_model_input/data_split.json",
    # read by cell_generation's generation-only training (a lever that fine-tunes formats its own again)
    "data/05_model_input/finetuning_prompts",
    "data/03_primary/processed_adata.h5ad",
    "data/06_models/rank_fit.json",
    "data/06_models/foundation_model",
]

# Lever name -> what it runs. params: kedro --params overrides (dotted keys, OmegaConf dotlist values;
# conf/base is never edited). base: the model the run starts from, from the source run:
# foundation_model (fine-tune the pretrained model, as the default run does) or finetuned_model (the
# source run's fine-tuned model: with pipelines=evaluation it is the default lever without re-training,
# with finetuning it continues training it, i.e. more epochs with the cosine schedule restarted).
LEVERS: dict[str, dict[str, object]] = {
    "default": {"params": {}},
    # the default, scored without re-training: the source run's finetuned_model (same data, seed, settings)
    "default_source_model": {"params": {}, "base": "finetuned_model", "pipelines": "evaluation"},
    # the evidence: more generation epochs made NK / monocyte prompts lead with their markers
    # while eval loss crept up, so the last model is kept rather than the best-eval-loss checkpoint
    "epochs6": {"params": {
        "finetuning.training_arguments.num_train_epochs": 6,
        "finetuning.training_arguments.load_best_model_at_end": "false",
    }},
    # the source's fine-tuned model (3 epochs) trained N more epochs: more epochs without paying the first 3 again
    **{f"continue_plus{n}": {"base": "finetuned_model", "params": {
        "finetuning.training_arguments.num_train_epochs": n,
        "finetuning.training_arguments.load_best_model_at_end": "false",
    }} for n in (1, 2, 3)},
    # shorter sentences (the top genes, where the signal is): cheaper steps; evaluation prompts cut the same way
    "top100": {"params": {"finetuning.top_k_genes": 100, "evaluation.top_k_genes": 100}},
    "top100_epochs6": {"params": {
        "finetuning.top_k_genes": 100,
        "evaluation.top_k_genes": 100,
        "finetuning.training_arguments.num_train_epochs": 6,
        "finetuning.training_arguments.load_best_model_at_end": "false",
    }},
    # generation-only epochs on top of the source's fine-tuned model (the evidence for generation),
    # scored by cell generation only: the model then knows one task, so annotation is not asked of it
    **{f"generation_only_plus{n}": {"base": "finetuned_model", "pipelines": "finetuning,cell_generation", "params": {
        "finetuning.tasks": "[cell_type_generation]",
        "cell_generation.training.epochs": 0,
        "finetuning.training_arguments.num_train_epochs": n,
        "finetuning.training_arguments.load_best_model_at_end": "false",
    }} for n in (1, 2)},
    # what reached the generation target in the chain (8 generation-only epochs after the default's
    # 3 joint ones, then guidance 5), as one run with one cosine schedule, for the spread over seeds
    "generation_only_plus8_guidance5": {"base": "finetuned_model", "pipelines": "finetuning,cell_generation", "params": {
        "finetuning.tasks": "[cell_type_generation]",
        "cell_generation.training.epochs": 0,
        "finetuning.training_arguments.num_train_epochs": 8,
        "finetuning.training_arguments.load_best_model_at_end": "false",
        "cell_generation.guidance_scale": 5.0,
    }},
    # generation passes inside the joint run (finetuning.task_repeats) on the top 100 genes (2.6x cheaper
    # steps), the last model kept, generation guided at 5: what the default could afford of the chain above
    **{f"top100_epochs{e}_gen{r}_guidance5": {"params": {
        "finetuning.top_k_genes": 100,
        "evaluation.top_k_genes": 100,
        "finetuning.training_arguments.num_train_epochs": e,
        "finetuning.training_arguments.load_best_model_at_end": "false",
        "finetuning.task_repeats": f"{{cell_type_generation: {r}}}",
        "cell_generation.guidance_scale": 5.0,
    }} for e, r in ((6, 2), (4, 3), (5, 2))},
    # the same on the top 100 genes (2.6x cheaper steps; generation then asks for at most 100 genes),
    # e.g. from top100_epochs6's model (--model): the candidate default's separate generation training
    "top100_generation_only_plus8_guidance5": {"base": "finetuned_model", "pipelines": "finetuning,cell_generation", "params": {
        "finetuning.top_k_genes": 100,
        "finetuning.tasks": "[cell_type_generation]",
        "cell_generation.training.epochs": 0,
        "finetuning.training_arguments.num_train_epochs": 8,
        "finetuning.training_arguments.load_best_model_at_end": "false",
        "cell_generation.guidance_scale": 5.0,
    }},
    # the default's generation-only training (cell_generation.training) made longer, on a default fine-tuned model (--model)
    **{f"generation_epochs{n}": {"base": "finetuned_model", "pipelines": "cell_generation",
                                 "params": {"cell_generation.training.epochs": n}} for n in (8, 12)},
    # sampling, not training: the source's (or --model's) fine-tuned model generating at a lower temperature
    **{f"generate_T{t}": {"base": "finetuned_model", "pipelines": "cell_generation",
                           "params": {"cell_generation.temperature": t, "cell_generation.training.epochs": 0}} for t in (0.5, 0.7)},
    # classifier-free guidance towards the asked type (cell_generation.guidance_scale), same model
    **{f"generate_cfg{g:g}": {"base": "finetuned_model", "pipelines": "cell_generation",
                              "params": {"cell_generation.guidance_scale": g, "cell_generation.training.epochs": 0}}
       for g in (1.5, 2.0, 3.0, 5.0)},
    # the same on a model fine-tuned on the top 100 genes (generation asks for at most 100)
    **{f"top100_generate_cfg{g:g}": {"base": "finetuned_model", "pipelines": "cell_generation", "params": {
        "finetuning.top_k_genes": 100, "cell_generation.guidance_scale": g, "cell_generation.training.epochs": 0}}
       for g in (5.0, 7.0, 10.0)},
    # class-balanced sampling: every cell type at least 50 train cells (the rare T subtypes have 6-34)
    "balanced50": {"params": {"finetuning.min_train_cells_per_label": 50}},
    "balanced50_epochs6": {"params": {
        "finetuning.min_train_cells_per_label": 50,
        "finetuning.training_arguments.num_train_epochs": 6,
        "finetuning.training_arguments.load_best_model_at_end": "false",
    }},
    "lr1e-3": {"params": {"finetuning.training_arguments.learning_rate": 0.001}},
    # the learning curve's answer (benchmarks/learning_curve.py): the targets at 8-12 epochs; with
    # --model a foundation model pretrained on the top 100 genes (pretraining.max_genes: 100, the
    # fine-tuned length; cheaper) so that 10 epochs fit the finetuning pipeline's 7 minutes
    "epochs10": {"params": {"finetuning.training_arguments.num_train_epochs": 10}},
    "token_loss": {"params": {"finetuning.loss_average": "token"}},
}


def make_project(root: Path, source: Path, base: str) -> None:
    """A project copy (``c2s_kedro.harness.copy_project``) with the source run's inputs; the
    source's ``base`` model directory becomes its foundation_model (finetuned_model too)."""
    copy_project(root)
    copies = {relative: relative for relative in INPUTS}
    copies["data/06_models/foundation_model"] = f"data/06_models/{base}"
    copies["data/06_models/finetuned_model"] = f"data/06_models/{base}"
    copy_inputs(root, source, copies, "a project copy after a default `kedro run`")


def run_lever(name: str, seed: int, args: argparse.Namespace, model: Path | None = None,
              link: int | None = None) -> dict[str, object]:
    """One lever and seed in its own project copy; ``model`` replaces the lever's base model
    (another lever's model, or the previous link of a ``--chain``)."""
    root = args.work / (f"{name}_seed{seed}" + (f"_link{link}" if link is not None else ""))
    lever = LEVERS[name]
    make_project(root, args.source, str(lever.get("base", "foundation_model")))
    if model is not None:  # e.g. another lever's fine-tuned model, scored again without generation
        for entry in ("foundation_model", "finetuned_model"):
            shutil.rmtree(root / "data/06_models" / entry)
            shutil.copytree(model, root / "data/06_models" / entry)
    pipelines = str(lever.get("pipelines", "finetuning,evaluation"))
    nodes = None
    if args.annotation_only:
        # annotation only (no cell generation, the slow part on a loaded CPU); the logistic regressions
        # do not depend on the model, so their predictions are taken from --source when it has them
        pipelines = pipelines.replace("evaluation", "cell_type_evaluation")
        nodes = ["build_evaluation_prompts", "predict_by_generation", "predict_by_label_scoring", "score_predictions"]
        if "finetuning" in pipelines:
            nodes += ["format_finetuning_prompts", "finetune_model", "record_annotator_metadata", "summarize_finetuning"]
        for baseline in ("baseline", "sentence_baseline"):
            made = args.source / f"data/07_model_output/{baseline}_predictions.csv"
            if made.exists():
                (root / "data/07_model_output").mkdir(parents=True, exist_ok=True)
                shutil.copy(made, root / "data/07_model_output" / made.name)
            else:
                nodes.append(f"predict_by_{baseline}")
    overrides = dict(lever["params"])
    overrides.update({
        "finetuning.seed": seed,
        "finetuning.training_arguments.seed": seed,
        "cell_generation.n_cells_per_type": args.cells_per_type,
    })
    if args.max_test_cells is not None:
        overrides["evaluation.max_test_cells"] = args.max_test_cells
    params = ",".join(f"{key}={value}" for key, value in overrides.items())
    command = [str(KEDRO), "run", f"--pipelines={pipelines}", "--params", params]
    if nodes:
        command.append("--nodes=" + ",".join(nodes))
    logger.info("%s seed %d: %s", name, seed, " ".join(command))
    completed = run_command(command, root, root / "run.log")
    if completed.returncode != 0:
        raise RuntimeError(f"{name} seed {seed} failed (rc {completed.returncode}); see {root / 'run.log'}")
    reporting = root / "data/08_reporting"
    evaluation_file = reporting / "evaluation_metrics.json"  # absent when only cell_generation scored the model
    evaluation = json.loads(evaluation_file.read_text()) if evaluation_file.exists() else {}
    generation_file = reporting / "cell_generation_metrics.json"  # absent with --annotation-only
    generation = json.loads(generation_file.read_text()) if generation_file.exists() else {}
    finetuning_file = reporting / "finetuning_metrics.json"  # absent when only evaluation ran
    finetuning = json.loads(finetuning_file.read_text()) if finetuning_file.exists() else {}
    generated_key = "real_classifier_accuracy_on_generated_types"
    if args.cells_per_type != 20:
        generated_key += f"_proxy_{args.cells_per_type}_per_type"
    return {
        "lever": name,
        "seed": seed,
        "lever_settings": lever,
        "model": str(model) if model else None,
        "link": link,
        "annotation_only": args.annotation_only,
        "label_scoring_accuracy": evaluation.get("label_scoring_accuracy"),
        "label_scoring_macro_f1": evaluation.get("label_scoring_macro_f1"),
        "generation_accuracy": evaluation.get("generation_accuracy"),
        "generation_macro_f1": evaluation.get("generation_macro_f1"),
        "baseline_accuracy": evaluation.get("baseline_accuracy"),
        "n_test_cells": evaluation.get("n_test_cells"),
        generated_key: generation.get("real_classifier_accuracy_on_generated_types"),
        "real_classifier_accuracy_on_reconstructed_real": generation.get(
            "real_classifier_accuracy_on_reconstructed_real"),
        "real_vs_generated_classifier_accuracy": generation.get("real_vs_generated_classifier_accuracy"),
        "n_generated_cells": generation.get("n_generated_cells"),
        "training_seconds": finetuning.get("train_runtime_s"),
        "eval_loss_best": finetuning.get("eval_loss_best"),
        "eval_loss_last": finetuning.get("eval_loss_last"),
        "global_step": finetuning.get("global_step"),
        "run_wall_seconds": round(completed.wall_s, 1),
        "peak_rss_mb": completed.peak_rss_mb,
        "project": str(root),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_lever_arguments(parser, LEVERS, "default,epochs6", "/tmp/levers")
    parser.add_argument("--cells-per-type", type=int, default=20, help="generated cells per type (default run: 20)")
    parser.add_argument("--max-test-cells", type=int, default=None, help="evaluation.max_test_cells (null: all)")
    parser.add_argument("--model", type=Path, default=None, help="a model directory to start from instead of the lever's base")
    parser.add_argument("--chain", type=int, default=1,
                        help="run each lever this many times, each link starting from the previous link's fine-tuned "
                             "model (a learning curve: scores against cumulative training time)")
    parser.add_argument("--annotation-only", action="store_true", help="no cell generation: label scoring and generation-based annotation only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    names = chosen_levers(parser, args, LEVERS)
    results = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for name in names:
            model, seconds, steps = args.model, 0.0, 0
            for link in range(1, args.chain + 1):
                result = run_lever(name, seed, args, model=model, link=link if args.chain > 1 else None)
                seconds += float(result["training_seconds"] or 0)
                steps += int(result["global_step"] or 0)
                result.update(cumulative_training_seconds=round(seconds, 1), cumulative_steps=steps)
                model = Path(str(result["project"])) / "data/06_models/finetuned_model"
                print(json.dumps(result), flush=True)
                results.append(result)
                if args.out:  # after every run: a late lever must not lose the earlier ones
                    args.out.write_text(json.dumps({"results": results, "summary": summarize_seeds(results)}, indent=2))
    print(json.dumps({"summary": summarize_seeds(results)}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
