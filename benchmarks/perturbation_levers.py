"""Perturbation-response levers, measured side by side.

Each lever is a ``kedro run --pipelines=perturbation_finetuning,perturbation_posterior`` (the
project's own nodes: pair fine-tuning of the perturbation base model, posterior sampling on the
held-out perturbations, scoring against the baselines and the simulator's truth) in its own
project copy, with the lever's settings in the copy's ``conf/local/parameters.yml`` (conf/base is
not changed). Every copy starts from the same inputs, copied from a finished default run
(``--source``): the screen's processed AnnData, cell sentences, vocabulary, split, rank fit,
truth, prompts and untrained base model, so the levers differ only in what they change.

One lever is not a setting: ``pretrain_screen*`` first trains the base model on the screen's
plain cell sentences (next-token prediction on every gene, as the atlas's foundation model is
pretrained: the pretraining pipeline's corpus and training functions, its conf/base training
arguments with the lever's epochs), on the train and control-train cells only, val and
control-val for the eval loss; the held-out perturbations' cells are never read. Then the pair
fine-tuning starts from that model.

Nor is ``neighbour_context*``: the copy's prompts are rebuilt with each perturbed pair's control
sentence replaced by a training cell of one of the perturbation's 3 co-expression neighbours
(``coexpression_neighbours``). Every run also reports ``perturbation_signal``: what of the
posterior is specific to a perturbation, the gap between the posterior and the real cells, and the
same centered scores for the neighbours' mean training cells.

Prints one JSON object per lever and seed (the best temperature's scores, the baselines, training
and sampling seconds, peak RSS), then a summary (mean and min-max over seeds), and writes them to
``--out`` after every run.

Example (figures in benchmarks/README.md, "Perturbation levers"):
    .venv/bin/python benchmarks/perturbation_levers.py --source <a default run's project copy> \\
        --work /tmp/pl --levers default,epochs1,pretrain_screen --seeds 0
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import yaml

from c2s_kedro.harness import (KEDRO, PROJECT_ROOT, add_lever_arguments, chosen_levers, copy_inputs, copy_project, run_command,
                               summarize_seeds)

logger = logging.getLogger("perturbation_levers")

# What perturbation_finetuning and perturbation_posterior read (paths as in conf/base/catalog.yml).
INPUTS = [
    "data/03_primary/perturbation_processed_adata.h5ad",
    "data/04_feature/perturbation_cell_sentences",
    "data/04_feature/perturbation_vocabulary.json",
    "data/05_model_input/perturbation_split.json",
    "data/05_model_input/perturbation_prompts",
    "data/06_models/perturbation_base_model",
    "data/06_models/perturbation_rank_fit.json",
    "data/02_intermediate/perturbation_truth.csv",
]

# Lever name -> settings. params: the ``perturbation`` block's overrides (nested, merged into
# conf/base by Kedro); pretrain_epochs: epochs of screen-sentence pretraining before pair fine-tuning.
_ONE_EPOCH = {"finetuning": {"training_arguments": {"num_train_epochs": 1}}}
_CHEAP_POSTERIOR = {"posterior": {"n_samples": 50, "temperatures": [0.7, 1.0]}}
LEVERS: dict[str, dict[str, object]] = {
    "default": {"params": {}},  # conf/base as it is (since bc73937: what epochs1_samples50 sets)
    # the defaults before bc73937: 2 epochs; 100 samples at T 0.7 / 1.0 / 1.3
    "old_default": {"params": {"finetuning": {"training_arguments": {"num_train_epochs": 2}},
                               "posterior": {"n_samples": 100, "temperatures": [0.7, 1.0, 1.3]}}},
    # eval loss levels off after ~1 epoch of the default's 2 (5.455 at epoch 1.1, 5.443 at 2)
    "epochs1": {"params": _ONE_EPOCH},
    # the budget's posterior: half the samples, the two temperatures that scored best
    "epochs1_samples50": {"params": {**_ONE_EPOCH, **_CHEAP_POSTERIOR}},
    # more control cells per held-out perturbation, fewer samples each (same number of draws)
    "prompts10": {"params": {"posterior": {"prompts_per_perturbation": 10, "n_samples": 20}}},
    "pretrain_screen": {"params": {}, "pretrain_epochs": 2},
    "pretrain_screen_epochs1_samples50": {"params": {**_ONE_EPOCH, **_CHEAP_POSTERIOR}, "pretrain_epochs": 2},
    # the control sentence of every perturbed pair replaced by a training cell of one of the 3 seen
    # perturbations whose target is most co-expressed with this one's (control-train cells)
    # every posterior sample as long as the training responses (200 genes) before it may end
    "min_genes200": {"params": {"posterior": {"min_genes": 200}}},
    "neighbour_context": {"params": {}, "context_neighbours": 3},
    "neighbour_context_epochs4": {"params": {"finetuning": {"training_arguments": {"num_train_epochs": 4}}},
                                  "context_neighbours": 3},
}


def screen_settings() -> dict:
    """The ``perturbation`` block of conf/base (what every lever copy starts from)."""
    return yaml.safe_load((PROJECT_ROOT / "conf/base/parameters_perturbation.yml").read_text())["perturbation"]


def screen_parameters():
    """conf/base's ``perturbation`` block read as the perturbation pipelines' nodes read it."""
    from c2s_kedro.parameters import read_parameters
    from c2s_kedro.parameters.perturbation import PerturbationParameters

    return read_parameters(PerturbationParameters, screen_settings(), "perturbation")


def part_cells(sentences, split: dict, part: str, genes: list[str], rank_fit: dict, settings):
    """The perturbed and control cells of the split's ``part`` (``train`` or ``test``) in the model's
    space (top-k sentences), as the perturbation_posterior pipeline's evaluation reads them."""
    from c2s_kedro import core

    return core.tasks.perturbation.evaluation.sentence_space_cells(
        sentences, list(split[part]) + list(split[f"control_{part}"]), settings.columns().perturbation, genes,
        core.sentences.rank_fit.RankFit.from_dict(rank_fit), settings.top_k_genes, f"real-{part}",
    )


def dense(matrix):
    """A (small) matrix of cells as a float64 array, sparse or not."""
    import numpy as np

    return np.asarray(matrix.toarray() if hasattr(matrix, "toarray") else matrix, dtype=np.float64)


def make_project(root: Path, source: Path) -> None:
    """A project copy (``c2s_kedro.harness.copy_project``) with the source run's screen inputs."""
    copy_project(root)
    copy_inputs(root, source, INPUTS, "a project copy after a default `kedro run`")


def pretrain_on_screen(root: Path, epochs: int, seed: int) -> dict[str, float]:
    """The copy's base model trained on the screen's plain sentences (train + control-train cells;
    val + control-val for the eval loss), saved over it. Returns seconds and losses."""
    from datasets import DatasetDict

    from c2s_kedro import core
    from c2s_kedro.datasets import ArrowDataset, HFModelDataset
    from c2s_kedro.parameters import read_parameters
    from c2s_kedro.parameters.training import PretrainingParameters

    base_entry = HFModelDataset(path=str(root / "data/06_models/perturbation_base_model"))
    base = base_entry.load()
    sentences = ArrowDataset(path=str(root / "data/04_feature/perturbation_cell_sentences")).load()
    split = json.loads((root / "data/05_model_input/perturbation_split.json").read_text())
    conf = yaml.safe_load((PROJECT_ROOT / "conf/base/parameters_pretraining.yml").read_text())["pretraining"]
    screen = screen_settings()
    conf["training_arguments"].update(num_train_epochs=epochs, seed=seed)
    conf.update(seed=seed, checkpoint_dir=str(root / "data/06_models/screen_pretraining_checkpoints"), resume=False)
    settings = read_parameters(PretrainingParameters, conf, "pretraining")
    max_genes = screen["top_k_genes"] or settings.max_genes  # the prompts' sentence length
    corpus = {
        part: core.prompts.training_sets.pretraining_corpus(
            core.sentences.conversion.select_cells(sentences, split[part] + split[f"control_{part}"]), base.tokenizer,
            base.context_length, max_genes=max_genes, label_column="__no_label__", organism_column="organism", seed=seed,
        )
        for part in ("train", "val")
    }
    start = time.perf_counter()
    trained, history = core.models.training.finetune(base, DatasetDict(corpus), settings.training_settings())
    seconds = time.perf_counter() - start
    base_entry.save(trained)
    summary = core.models.training.summarize_history(history)
    return {"pretrain_seconds": round(seconds, 1), "pretrain_texts": corpus["train"].num_rows,
            **{f"pretrain_{k}": v for k, v in summary.items() if k.startswith("eval_loss")}}


def coexpression_neighbours(processed, split: dict, column: str, k: int) -> dict[str, list[str]]:
    """Each perturbation's ``k`` training perturbations (itself excluded) whose target gene
    correlates most with its own across the control-train cells (log expression)."""
    import numpy as np

    seen = [name for name in split["train_perturbations"] if name in processed.var_names]
    names = sorted(set(processed.obs[column].astype(str)) & set(processed.var_names))
    controls = processed[split["control_train"]]
    genes = list(dict.fromkeys(names + seen))
    x = dense(controls[:, genes].X)
    corr = np.nan_to_num(np.corrcoef(x.T))
    at = {gene: i for i, gene in enumerate(genes)}
    neighbours = {}
    for name in names:
        candidates = [other for other in seen if other != name]
        order = np.argsort([-corr[at[name], at[other]] for other in candidates], kind="stable")
        neighbours[name] = [candidates[i] for i in order[:k]]
    return neighbours


def neighbour_prompts(root: Path, k: int, seed: int) -> dict[str, object]:
    """The copy's prompts rebuilt with the project's prompt function, each perturbed cell paired
    with a training cell (same batch when there is one) of one of its ``k`` co-expression
    neighbours (``coexpression_neighbours``) instead of a control cell; control pairs unchanged."""
    import anndata as ad
    import numpy as np
    import pandas as pd

    from c2s_kedro import core
    from c2s_kedro.datasets import ArrowDataset, HFModelDataset
    from c2s_kedro.pipelines.perturbation_finetuning import nodes

    screen = screen_settings()
    column, batch, control = screen["perturbation_column"], screen["batch_column"], screen["control_label"]
    processed = ad.read_h5ad(root / "data/03_primary/perturbation_processed_adata.h5ad")
    split = json.loads((root / "data/05_model_input/perturbation_split.json").read_text())
    neighbours = coexpression_neighbours(processed, split, column, k)
    obs = processed.obs.loc[split["train"], [column, batch]].astype(str)
    pools = {key: np.asarray(group.index) for key, group in obs.groupby([column, batch])}
    anywhere = {name: np.asarray(group.index) for name, group in obs.groupby(column)}
    rng = np.random.default_rng([seed, 7])
    original = core.tasks.perturbation.pairs.control_pairs

    def with_neighbours(*args, **kwargs) -> pd.DataFrame:
        pairs = original(*args, **kwargs)
        cells = []
        for name, group, own in zip(pairs["perturbation"], pairs["batch"], pairs["control_cell"]):
            if name == control or name not in neighbours:
                cells.append(own)
                continue
            other = neighbours[name][rng.integers(len(neighbours[name]))]
            pool = pools.get((other, str(group)), anywhere[other])
            cells.append(str(rng.choice(pool)))
        return pairs.assign(control_cell=cells)

    sentences = ArrowDataset(path=str(root / "data/04_feature/perturbation_cell_sentences")).load()
    base = HFModelDataset(path=str(root / "data/06_models/perturbation_base_model")).load()
    core.tasks.perturbation.pairs.control_pairs = with_neighbours
    try:
        prompts = nodes.format_perturbation_prompts(sentences, split, base, screen)
    finally:
        core.tasks.perturbation.pairs.control_pairs = original
    ArrowDataset(path=str(root / "data/05_model_input/perturbation_prompts")).save(prompts)
    test = split["test_perturbations"]
    return {"context_neighbours": {name: neighbours[name] for name in test if name in neighbours}}


def perturbation_signal(root: Path) -> dict[str, float]:
    """What of the posterior is specific to a perturbation, per temperature (means over the
    sampled held-out perturbations, in the evaluation's sentence space): the correlation of each
    perturbation's posterior mean minus the mean over all sampled perturbations with the same for
    its real test cells (``centered_pearson``) and with the simulator's truth (``centered_truth``);
    the norm of the gap between the posteriors' mean and the real perturbed cells' mean (``bias``)
    beside the mean norm of a real change from control (``real_change``), and genes per sample;
    the centered measures of the co-expression neighbours' training mean (``neighbour_mean``)."""
    import anndata as ad
    import numpy as np
    import pandas as pd

    from c2s_kedro.datasets import ArrowDataset

    settings = screen_parameters()
    column, control = settings.columns().perturbation, settings.columns().control_label
    samples = ad.read_h5ad(root / "data/07_model_output/posterior_samples_expression.h5ad")
    genes = list(samples.var_names)
    sentences = ArrowDataset(path=str(root / "data/04_feature/perturbation_cell_sentences")).load()
    split = json.loads((root / "data/05_model_input/perturbation_split.json").read_text())
    rank_fit = json.loads((root / "data/06_models/perturbation_rank_fit.json").read_text())
    real = part_cells(sentences, split, "test", genes, rank_fit, settings)
    truth = pd.read_csv(root / "data/02_intermediate/perturbation_truth.csv", index_col=0).reindex(genes).fillna(0.0)
    labels, x = real.obs[column].astype(str).to_numpy(), dense(real.X)
    control_mean = x[labels == control].mean(axis=0)
    signal: dict[str, float] = {}
    for temperature in sorted(samples.obs["temperature"].unique()):
        part = samples[(samples.obs["temperature"] == temperature).to_numpy()]
        names, y = part.obs["perturbation"].astype(str).to_numpy(), dense(part.X)
        sampled = sorted(set(names))
        predicted = {name: y[names == name].mean(axis=0) for name in sampled}
        observed = {name: x[labels == name].mean(axis=0) for name in sampled}
        predicted_mean = np.mean(list(predicted.values()), axis=0)
        observed_mean = np.mean(list(observed.values()), axis=0)
        key = f"signal_T{temperature:g}"
        signal[f"{key}.centered_pearson"] = float(np.mean(
            [np.corrcoef(predicted[n] - predicted_mean, observed[n] - observed_mean)[0, 1] for n in sampled]))
        signal[f"{key}.centered_truth"] = float(np.mean(
            [np.corrcoef(predicted[n] - predicted_mean, truth[n].to_numpy())[0, 1] for n in sampled]))
        signal[f"{key}.bias"] = float(np.linalg.norm(predicted_mean - observed_mean))
        signal[f"{key}.real_change"] = float(np.mean([np.linalg.norm(observed[n] - control_mean) for n in sampled]))
        signal[f"{key}.genes_per_sample"] = float((y > 0).sum(axis=1).mean())
    signal["real_genes_per_cell"] = float((x[labels != control] > 0).sum(axis=1).mean())
    # the same measures for a predictor with no language model: the mean of the training cells of
    # each perturbation's 3 co-expression neighbours (what neighbour_context puts in the prompts)
    train = part_cells(sentences, split, "train", genes, rank_fit, settings)
    neighbours = coexpression_neighbours(ad.read_h5ad(root / "data/03_primary/perturbation_processed_adata.h5ad"),
                                         split, column, 3)
    train_labels, train_x = train.obs[column].astype(str).to_numpy(), dense(train.X)
    reference = {n: np.mean([train_x[train_labels == m].mean(axis=0) for m in neighbours[n]], axis=0) for n in sampled}
    reference_mean = np.mean(list(reference.values()), axis=0)
    signal["neighbour_mean.centered_pearson"] = float(np.mean(
        [np.corrcoef(reference[n] - reference_mean, observed[n] - observed_mean)[0, 1] for n in sampled]))
    signal["neighbour_mean.centered_truth"] = float(np.mean(
        [np.corrcoef(reference[n] - reference_mean, truth[n].to_numpy())[0, 1] for n in sampled]))
    return signal


def best_temperature(metrics: dict[str, float]) -> str:
    """The sampling temperature whose posterior scores the highest ``pearson_delta``."""
    methods = {key.removesuffix(".pearson_delta") for key in metrics if key.startswith("model_T") and key.endswith(".pearson_delta")}
    return max(sorted(methods), key=lambda method: metrics[f"{method}.pearson_delta"])


def headline_scores(metrics: dict[str, float]) -> dict[str, object]:
    """The best temperature and its scores, the two baselines' and the ceilings, from perturbation_posterior_metrics.json."""
    best = best_temperature(metrics)
    return {
        "best_temperature": best,
        **{f"best.{metric}": metrics[f"{best}.{metric}"] for metric in
           ("pearson_delta", "pearson_delta_simulated_truth", "mse", "pearson_delta_top_de", "discrimination_score_l1")},
        **{f"{method}.{metric}": metrics.get(f"{method}.{metric}") for method in ("train_perturbed_mean", "linear_additive")
           for metric in ("pearson_delta", "pearson_delta_simulated_truth", "mse")},
        "observed_cells.pearson_delta_simulated_truth": metrics.get("observed_cells.pearson_delta_simulated_truth"),
        "cell_eval_ceiling.pearson_delta": metrics.get("cell_eval_ceiling.pearson_delta"),
    }


def run_lever(name: str, seed: int, args: argparse.Namespace) -> dict[str, object]:
    root = args.work / f"{name}_seed{seed}"
    lever = LEVERS[name]
    make_project(root, args.source)
    params = json.loads(json.dumps(lever["params"]))  # a copy: the seeds go in below
    params.setdefault("finetuning", {}).setdefault("training_arguments", {})["seed"] = seed
    params.setdefault("posterior", {})["seed"] = seed
    (root / "conf/local/parameters.yml").write_text(yaml.safe_dump({"perturbation": params}))
    result: dict[str, object] = {"lever": name, "seed": seed, "lever_settings": lever}
    start = time.perf_counter()
    if lever.get("pretrain_epochs"):
        result.update(pretrain_on_screen(root, int(lever["pretrain_epochs"]), seed))
    if lever.get("context_neighbours"):
        result.update(neighbour_prompts(root, int(lever["context_neighbours"]), seed))
    command = [str(KEDRO), "run", "--pipelines=perturbation_finetuning,perturbation_posterior"]
    logger.info("%s seed %d: %s", name, seed, " ".join(command))
    completed = run_command(command, root, root / "run.log")
    wall = time.perf_counter() - start
    if completed.returncode != 0:
        raise RuntimeError(f"{name} seed {seed} failed (rc {completed.returncode}); see {root / 'run.log'}")
    reporting = root / "data/08_reporting"
    metrics = json.loads((reporting / "perturbation_posterior_metrics.json").read_text())
    history = json.loads((reporting / "perturbation_finetuning_log.json").read_text())
    train_rows = [row for row in history if "train_runtime" in row]
    evals = [row["eval_loss"] for row in history if "eval_loss" in row]
    result.update({
        **headline_scores(metrics),
        "finetune_seconds": train_rows[-1]["train_runtime"] if train_rows else None,
        "eval_loss_best": min(evals) if evals else None,
        "eval_loss_last": evals[-1] if evals else None,
        "posterior_seconds_per_sample": metrics.get("posterior.seconds_per_sample"),
        "posterior_n_samples": metrics.get("posterior.n_samples"),
        "run_wall_seconds": round(wall, 1),
        "peak_rss_mb": completed.peak_rss_mb,
        **perturbation_signal(root),
        "project": str(root),
    })
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_lever_arguments(parser, LEVERS, "default,pretrain_screen", "/tmp/perturbation_levers")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    names = chosen_levers(parser, args, LEVERS)
    results = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for name in names:
            result = run_lever(name, seed, args)
            print(json.dumps(result), flush=True)
            results.append(result)
            if args.out:  # after every run: a late lever must not lose the earlier ones
                args.out.write_text(json.dumps({"results": results, "summary": summarize_seeds(results)}, indent=2))
    print(json.dumps({"summary": summarize_seeds(results)}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
