"""Label-scoring levers that need no training: the decision rule, not the model.

On finished default runs (``--runs``, project copies after ``kedro run``), with each run's own
fine-tuned model and test cells:
- **prior correction**: the label-scoring probabilities divided by the train cells' label
  frequencies to the power ``alpha`` (0: the default argmax; 1: p(cell | label), every type equally
  likely a priori), read from the run's ``label_scoring_predictions.csv``;
- **template ensembles**: each test cell's label log-probabilities averaged over the paraphrased
  prompt templates drawn with evaluation seeds 0..K-1 (the default is one draw, seed 0), scored
  with the evaluation pipeline's own nodes.
Prints one JSON line per run and setting (label-scoring accuracy and macro-F1 on the run's test
cells) and writes them to ``--out``.

Example (the figures in benchmarks/README.md, "Levers"):
    .venv/bin/python benchmarks/scoring_levers.py --runs /tmp/s9/fresh,/tmp/s9/seeds/default_seed1 --templates 8
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, f1_score


def scores(truth, predicted) -> dict[str, float]:
    present = sorted(set(truth))
    return {"label_scoring_accuracy": round(float(accuracy_score(truth, predicted)), 4),
            "label_scoring_macro_f1": round(float(f1_score(truth, predicted, labels=present, average="macro", zero_division=0)), 4)}


def prior_correction(run: Path, alphas: list[float]) -> list[dict[str, object]]:
    import anndata as ad

    table = pd.read_csv(run / "data/07_model_output/label_scoring_predictions.csv")
    split = json.loads((run / "data/05_model_input/data_split.json").read_text())
    obs = ad.read_h5ad(run / "data/03_primary/processed_adata.h5ad", backed="r").obs
    labels = [column[2:-1] for column in table.columns if column.startswith("p(")]
    frequency = obs.loc[split["train"], "cell_type"].astype(str).value_counts(normalize=True).reindex(labels).to_numpy()
    log_probability = np.log(np.clip(table[[f"p({label})" for label in labels]].to_numpy(), 1e-300, None))
    return [{"run": str(run), "lever": "prior_correction", "alpha": alpha,
             **scores(table["label"], np.array(labels)[(log_probability - alpha * np.log(frequency)).argmax(axis=1)])}
            for alpha in alphas]


def template_ensembles(run: Path, templates: int) -> list[dict[str, object]]:
    from kedro.config import OmegaConfigLoader

    from c2s_kedro import core
    from c2s_kedro.datasets import ArrowDataset, HFModelDataset
    from c2s_kedro.pipelines.evaluation import nodes

    params = OmegaConfigLoader(conf_source=str(run / "conf"), base_env="base", default_run_env="local")["parameters"]["evaluation"]
    model = HFModelDataset(path=str(run / "data/06_models/finetuned_model")).load()
    sentences = ArrowDataset(path=str(run / "data/04_feature/cell_sentences")).load()
    split = json.loads((run / "data/05_model_input/data_split.json").read_text())
    draws, rows = [], []
    for seed in range(templates):
        prompts = nodes.build_evaluation_prompts(sentences, split, model, {**params, "seed": seed})
        log_probability = core.models.inference.score_labels(model, prompts["prompt"], prompts["labels"], batch_size=params["batch_size"])
        draws.append(log_probability - np.logaddexp.reduce(log_probability, axis=1, keepdims=True))
        labels = np.array(prompts["labels"])
        rows.append({"run": str(run), "lever": "template_draw", "evaluation_seed": seed,
                     **scores(prompts["label"], labels[draws[-1].argmax(axis=1)])})
        rows.append({"run": str(run), "lever": "template_ensemble", "templates": seed + 1,
                     **scores(prompts["label"], labels[np.mean(draws, axis=0).argmax(axis=1)])})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", required=True, help="comma-separated project copies after a default `kedro run`")
    parser.add_argument("--alphas", default="0,0.25,0.5,0.75,1")
    parser.add_argument("--templates", type=int, default=8, help="template draws to ensemble (0: skip)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    for run in (Path(r) for r in args.runs.split(",")):
        rows += prior_correction(run, [float(a) for a in args.alphas.split(",")])
        if args.templates:
            rows += template_ensembles(run, args.templates)
    for row in rows:
        print(json.dumps(row))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
