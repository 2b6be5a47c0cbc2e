"""The baselines scored on every held-out perturbation of a screen, as perturbation_posterior's
evaluation scores them (``baseline_mean_scores``), from a project copy's perturbation_data outputs:
wall and CPU seconds and peak RSS per step. Prints the summary and one JSON line.

    python benchmarks/score_heldout.py /tmp/h2/scale/screen_1/project
"""

import json
import sys
import threading
import time

import anndata as ad
import pandas as pd
import psutil
from datasets import load_from_disk

from c2s_kedro.core.sentences.rank_fit import RankFit
from c2s_kedro.core.tasks.perturbation.evaluation import (
    _truth_by_gene,
    baseline_mean_scores,
    sentence_space_cells,
    summarize_scores,
)

COLUMN, CONTROL, TOP_K = "gene", "non-targeting", 200  # the default screen's settings


def main(root: str) -> None:
    process, peak, figures = psutil.Process(), [0], {}

    def watch() -> None:
        while True:
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.1)

    threading.Thread(target=watch, daemon=True).start()

    def step(name, run):
        start, cpu = time.perf_counter(), process.cpu_times()
        out = run()
        after = process.cpu_times()
        figures[name] = {"wall_s": round(time.perf_counter() - start, 1),
                         "cpu_s": round(after.user + after.system - cpu.user - cpu.system, 1),
                         "peak_rss_gb": round(peak[0] / 2**30, 2)}
        return out

    data = f"{root}/data"
    sentences = load_from_disk(f"{data}/04_feature/perturbation_cell_sentences")
    split = json.load(open(f"{data}/05_model_input/perturbation_split.json"))
    fit = RankFit.from_dict(json.load(open(f"{data}/06_models/perturbation_rank_fit.json")))
    genes = list(ad.read_h5ad(f"{data}/03_primary/perturbation_processed_adata.h5ad", backed="r").var_names)
    truth = _truth_by_gene(pd.read_csv(f"{data}/02_intermediate/perturbation_truth.csv"))
    real = step("test_cells", lambda: sentence_space_cells(sentences, split["test"] + split["control_test"], COLUMN, genes, fit,
                                                           TOP_K, "real-test"))
    train = step("train_cells", lambda: sentence_space_cells(sentences, split["train"] + split["control_train"], COLUMN, genes,
                                                             fit, TOP_K, "real-train"))
    scores = step("baseline_mean_scores", lambda: baseline_mean_scores(real, train, COLUMN, CONTROL, truth=truth))
    print(summarize_scores(scores).to_string())
    print(json.dumps({"n_test_cells": real.n_obs, "n_train_cells": train.n_obs,
                      "n_perturbations": int(scores["perturbation"].nunique()), **figures}))


if __name__ == "__main__":
    main(sys.argv[1])
