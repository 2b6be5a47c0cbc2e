"""The notes' 8,192-token case: 2,048-gene cell sentences on a GPT-NeoX with 8,192
positions and a byte-level BPE tokenizer that spends ~3.4 tokens per gene, as C2S-Scale's models do.

Nothing is downloaded: the script builds a tiny random GPT-NeoX (8,192 positions) and trains a
``tokenizers`` byte-level BPE on gene names, choosing the vocabulary size so that a gene costs about
3.4 tokens (the figure is measured and printed), and saves both as a Hugging Face model directory.
Then, through the project's core functions, at full length:

- fine-tuning with prediction prompts of 2,048 genes (~7,000 tokens) and generation samples;
- evaluation: label scoring and greedy generation of the cell type, per cell;
- embedding, per cell;
- cell generation and posterior sampling of 2,048-gene responses (prompts fitted to what is left);
- the context guards: nothing ever holds more than 8,192 positions; too-long inputs are shortened
  (``fit_to_context``) or refused (inference and sampling guards), and the room left for new
  tokens is logged in genes.

Prints one JSON object: tokens per gene, peak RSS (process, MB) and seconds per step of each stage,
and what the guards did. ``--save-model DIR`` keeps the model directory (for a ``kedro run`` with a
Kedro environment pointing ``foundation_model`` / ``perturbation_base_model`` at it).

    .venv/bin/python benchmarks/long_context.py                 # ~15 min on 2 shared cores
    .venv/bin/python benchmarks/long_context.py --save-model /tmp/me/long_model --skip-stages
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from c2s_kedro.harness import KEDRO, TreeMemory, copy_project, run_kedro

CONTEXT = 8192
TARGET_TOKENS_PER_GENE = 3.4
GENES_PER_CELL = 2048


# ---- gene names and tokenizer -----------------------------------------------------------------
FAMILIES = ["ZNF", "SLC", "KRT", "OR", "TMEM", "CCDC", "FAM", "KIAA", "RPL", "RPS", "HLA-D", "CD", "IL", "ATP",
            "ANKRD", "PCDH", "TRIM", "ADAM", "COL", "MYO", "NDUF", "PPP", "PRR", "SNOR", "MIR", "LRRC", "WDR",
            "ZBTB", "DNAJ", "HSP", "CXCL", "CCL", "TNF", "GPR", "KCN", "CACN", "SEMA", "EIF", "MRPL", "MT-"]
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def gene_names(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct human-looking gene names: family stems with numbers and letter suffixes, lncRNA
    and clone ids (``LINC01234``, ``RP11-34P13.3``, ``AC009.1``), and short symbols; some names are
    prefixes of others (``CD3`` and ``CD3D``), as in real gene vocabularies."""
    rng = np.random.default_rng(seed)
    names: dict[str, None] = {}
    while len(names) < n:
        kind = rng.random()
        if kind < 0.55:
            name = f"{FAMILIES[rng.integers(len(FAMILIES))]}{rng.integers(1, 400)}"
            if rng.random() < 0.4:
                name += LETTERS[rng.integers(26)] + (str(rng.integers(1, 20)) if rng.random() < 0.5 else "")
        elif kind < 0.65:
            name = f"LINC{rng.integers(0, 2700):05d}"
        elif kind < 0.75:
            name = f"RP{rng.integers(1, 14)}-{rng.integers(1, 1200)}{LETTERS[rng.integers(26)]}{rng.integers(1, 25)}.{rng.integers(1, 9)}"
        elif kind < 0.82:
            name = f"A{LETTERS[rng.integers(4)]}{rng.integers(0, 999999):06d}.{rng.integers(1, 4)}"
        else:
            length = rng.integers(3, 6)
            name = "".join(LETTERS[i] for i in rng.integers(0, 26, size=length))
            if rng.random() < 0.6:
                name += str(rng.integers(1, 10))
        names[name] = None
    return list(names)


def train_bpe(corpus: Sequence[str], vocab_size: int):
    """A byte-level BPE as Pythia's (no pad token, ``<|endoftext|>`` as BOS/EOS), trained on ``corpus``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    ))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def tokens_per_gene(tokenizer, genes: Sequence[str]) -> float:
    """Mean tokens of ``" " + gene`` (how a gene follows another in a cell sentence)."""
    from c2s_kedro.core.prompts.formatting import count_tokens

    return float(count_tokens(tokenizer, [" " + g for g in genes]).mean())


def prompt_corpus(genes: Sequence[str], n_sentences: int = 400, seed: int = 0) -> list[str]:
    """Training text for the tokenizer: our prompt templates and random cell sentences of ``genes``."""
    from c2s_kedro.core.prompts.formatting import load_templates

    rng = np.random.default_rng(seed)
    corpus = []
    for task in ("cell_type_prediction", "cell_type_generation"):
        templates = load_templates(task)
        corpus += [text.replace("{", " ").replace("}", " ") for text in (*templates.inputs, *templates.responses)]
    corpus += [" ".join(rng.permutation(genes)[:200]) for _ in range(n_sentences)]
    return corpus


def bpe_with_tokens_per_gene(genes: Sequence[str], target: float = TARGET_TOKENS_PER_GENE, seed: int = 0):
    """The BPE (trained on ``prompt_corpus``) whose vocabulary size puts the mean tokens per gene
    closest to ``target``: a bisection over the vocabulary size (more merges, fewer tokens per gene)."""
    corpus = prompt_corpus(genes, seed=seed)
    low, high = 300, 20000
    best = None
    for _ in range(12):
        middle = (low + high) // 2
        tokenizer = train_bpe(corpus, middle)
        measured = tokens_per_gene(tokenizer, genes)
        if best is None or abs(measured - target) < abs(best[1] - target):
            best = (tokenizer, measured)
        if abs(measured - target) < 0.05 or high - low < 8:
            break
        low, high = (low, middle) if measured < target else (middle, high)
    return best


def build_model_dir(directory: Path, architecture: dict[str, Any], tokenizer, seed: int = 0) -> Path:
    """A random GPT-NeoX of ``architecture`` with ``tokenizer``, saved with ``core.models.loading.save_model``."""
    from c2s_kedro.core.models.loading import build_gpt_neox, save_model

    save_model(build_gpt_neox(tokenizer, architecture, seed=seed), directory)
    return directory


TINY_8K = {
    "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 256,
    "max_position_embeddings": CONTEXT, "rotary_pct": 0.25, "rotary_emb_base": 10000,
}


# ---- measurement --------------------------------------------------------------------------------
@contextmanager
def stage(name: str, results: dict[str, Any], rss: TreeMemory, steps: int, unit: str):
    """Seconds per ``unit`` and the peak RSS of this process and its children during the block."""
    rss.reset()
    start = time.perf_counter()
    record: dict[str, Any] = {}
    yield record
    seconds = time.perf_counter() - start
    rss.current()
    results[name] = {"peak_rss_mb": round(rss.peak_rss / 2**20), f"s_per_{unit}": round(seconds / steps, 3),
                     "steps": steps, **record}
    logging.getLogger("long_context").info("%s: %s", name, results[name])


class LogCapture(logging.Handler):
    """Keeps the messages of the project's loggers, to show what the guards logged."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def matching(self, *words: str) -> list[str]:
        return [m for m in self.messages if all(w in m for w in words)]


def expect_error(call: Callable[[], Any], error: type[BaseException]) -> str:
    try:
        call()
    except error as raised:
        return str(raised)
    raise AssertionError(f"{call} did not raise {error.__name__}")


# ---- the stages ---------------------------------------------------------------------------------
def cell_sentences(genes: Sequence[str], n_cells: int, seed: int = 0):
    """``n_cells`` cells of ``GENES_PER_CELL`` genes each (a random order per cell), two cell types."""
    from datasets import Dataset

    rng = np.random.default_rng(seed)
    return Dataset.from_dict({
        "cell_name": [f"cell{i}" for i in range(n_cells)],
        "cell_sentence": [" ".join(rng.permutation(genes)[:GENES_PER_CELL]) for _ in range(n_cells)],
        "cell_type": ["CD4+ T cell", "CD14+ monocyte"] * (n_cells // 2),
        "organism": ["Homo sapiens"] * n_cells,
    })


def run_stages(model_dir: Path, genes: list[str], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch

    from c2s_kedro.core.models import inference
    from c2s_kedro.core.models.loading import load_model
    from c2s_kedro.core.models.training import TrainingSettings, finetune
    from c2s_kedro.core.prompts.formatting import (
        ContextTooSmallError,
        cell_generation_prompts,
        count_tokens,
        fit_prompt,
        load_templates,
        sentence_table,
    )
    from c2s_kedro.core.prompts.perturbation import PerturbationPromptFormatter, response_token_budget
    from c2s_kedro.core.prompts.training_sets import format_split_prompts, prompt_formatters
    from c2s_kedro.core.tasks.cell_generation import generate_cells
    from c2s_kedro.core.tasks.evaluation import cell_type_test_prompts
    from c2s_kedro.core.tasks.perturbation.posterior import sample_posterior

    torch.set_num_threads(args.threads)
    capture = LogCapture()
    logging.getLogger("c2s_kedro").addHandler(capture)
    rss = TreeMemory(interval=0.01)  # this process (and its children), every 10 ms
    results: dict[str, Any] = {}
    model = load_model(model_dir, device="cpu", dtype="fp32")
    tokenizer, context = model.tokenizer, model.context_length
    assert context == CONTEXT, context
    cells = cell_sentences(genes, args.cells)
    names = cells["cell_name"]
    split = {"train": names[: args.cells // 2], "val": names[args.cells // 2: 3 * args.cells // 4],
             "test": names[3 * args.cells // 4:]}
    full = cells[0]["cell_sentence"]
    results["full_sentence_tokens"] = int(count_tokens(tokenizer, [full])[0])
    longest_positions: dict[str, int] = {}

    # fine-tuning: prediction prompts keep ~all 2,048 genes; generation samples are fitted (prompt + answer)
    formatters = prompt_formatters(["cell_type_prediction", "cell_type_generation"], seed=0, tokenizer=tokenizer,
                                   max_tokens=context)
    prompts = format_split_prompts(cells, split, formatters, seed=0)
    train = prompts["train"]
    lengths = count_tokens(tokenizer, [f"{i} {r}" for i, r in zip(train["model_input"], train["response"])]) + 1
    longest_positions["training sample (with EOS)"] = int(lengths.max())
    prediction = [i for i, t in enumerate(train["sample_type"]) if t == "cell_type_prediction"]
    results["training_prediction_prompt_tokens"] = int(count_tokens(tokenizer, [train["model_input"][prediction[0]]])[0])
    settings = TrainingSettings(
        training_arguments={"max_steps": args.train_steps, "per_device_train_batch_size": 1, "learning_rate": 1e-4,
                            "logging_steps": 1, "save_strategy": "no", "eval_strategy": "no", "seed": 0,
                            "dataloader_num_workers": 0},
        checkpoint_dir=str(work / "checkpoints"), loss_on_response_only=True, loss_average="sample",
        mlflow_prefix="long_context", resume=False,
    )
    with stage("training_step", results, rss, args.train_steps, "step") as record:
        model, history = finetune(model, prompts, settings)
        record["batch"] = "1 sample per step, samples of up to %d tokens" % longest_positions["training sample (with EOS)"]
        record["losses"] = [round(h["loss"], 3) for h in history if "loss" in h]

    # evaluation: label scoring and greedy generation per cell, prompts fitted with room for the answer
    table = sentence_table(cells, ["cell_type"], optional=["organism"])
    evaluation = cell_type_test_prompts(table, split["train"], split["test"], "cell_type", "organism", tokenizer,
                                        context, extra_new_tokens=2)
    eval_tokens = count_tokens(tokenizer, evaluation["prompt"])
    results["evaluation_prompt_tokens"] = int(eval_tokens.max())
    n_eval = len(evaluation["prompt"])
    with stage("label_scoring", results, rss, n_eval, "cell") as record:
        predicted, _ = inference.predict_labels(model, evaluation["prompt"], evaluation["labels"], batch_size=1)
        record["only_known_labels"] = set(predicted) <= set(evaluation["labels"])
    longest_answer = max(len(ids) for ids in tokenizer([f" {label}." for label in evaluation["labels"]],
                                                       add_special_tokens=False)["input_ids"]) + 1
    longest_positions["label scoring (prompt + longest answer)"] = int(eval_tokens.max()) + longest_answer
    with stage("generation", results, rss, n_eval, "cell") as record:
        answers, matched = inference.generate_labels(model, evaluation["prompt"], evaluation["labels"], 2, batch_size=1)
        record["answers"] = answers[:2]
    longest_positions["generated label (prompt + new tokens)"] = int(eval_tokens.max()) + longest_answer + 2

    # embedding, per cell
    template = load_templates("cell_type_prediction").inputs[0]
    embed_prompts = [fit_prompt(template, s.split(), {"organism": "Homo sapiens"}, tokenizer, context)[0]
                     for s in cells["cell_sentence"][: args.embed_cells]]
    embed_tokens = count_tokens(tokenizer, embed_prompts)
    longest_positions["embedding prompt"] = int(embed_tokens.max())
    with stage("embedding", results, rss, len(embed_prompts), "cell") as record:
        vectors = inference.embed_prompts(model, embed_prompts, batch_size=1)
        record["prompt_tokens"] = int(embed_tokens.max())
        record["finite"] = bool(np.isfinite(vectors).all())

    # cell generation: the prompt asks for as many of 2,048 genes as fit with the answer
    generation = cell_generation_prompts(cells["cell_sentence"], cells["cell_type"], tokenizer, context, n_per_type=1)
    generation_tokens = count_tokens(tokenizer, generation["prompt"])
    longest_positions["cell generation (prompt + max_new_tokens)"] = int(generation_tokens.max()) + generation["max_new_tokens"]
    with stage("cell_generation", results, rss, len(generation["prompt"]), "cell") as record:
        generated = generate_cells(model, generation["prompt"], generation["cell_type"], genes,
                                   generation["max_new_tokens"], batch_size=1, seed=0)
        record["genes_requested"] = generation["genes_requested"]
        record["max_new_tokens"] = generation["max_new_tokens"]
        record["genes_generated"] = generated["n_genes"].tolist()
        record["only_vocabulary_genes_none_twice"] = bool(
            (generated["n_non_genes_dropped"] == 0).all() and (generated["n_repeats_merged"] == 0).all())

    # posterior sampling of 2,048-gene responses: the budget is the full response, the control shortened
    pairs = cells.select(range(2)).map(lambda row: {
        "control_sentence": row["cell_sentence"], "perturbed_sentence": cells[1]["cell_sentence"], "perturbation": "STAT1",
    }, remove_columns=list(cells.column_names), keep_in_memory=True)
    response = " ".join(cells[1]["cell_sentence"].split()[:GENES_PER_CELL]) + "."
    budget = response_token_budget(tokenizer, [response])
    formatter = PerturbationPromptFormatter(top_k_genes=GENES_PER_CELL, tokenizer=tokenizer, max_tokens=context,
                                            response_budget=budget)
    posterior_prompts = formatter.format_dataset(pairs)
    posterior_tokens = count_tokens(tokenizer, posterior_prompts["model_input"])
    longest_positions["posterior sample (prompt + max_new_tokens)"] = int(posterior_tokens.max()) + budget
    with stage("posterior_sample", results, rss, args.posterior_samples, "sample") as record:
        samples = sample_posterior(model, posterior_prompts["model_input"][:1], genes, n_samples=args.posterior_samples,
                                   temperatures=[1.0], max_new_tokens=budget, seed=0, batch_size=args.posterior_samples)
        record["max_new_tokens"] = budget
        record["control_genes_kept"] = posterior_prompts["n_control_genes"][0]
        record["genes_per_sample"] = samples["n_genes"].tolist()
        record["only_vocabulary_genes_none_twice"] = bool((samples["n_unknown"] == 0).all() and (samples["n_repeated"] == 0).all())
    rss.stop()

    # the guards: a prompt that would run past the context is refused before anything is computed
    too_long = template.format(num_genes=GENES_PER_CELL * 2, cell_sentence=" ".join(genes[: GENES_PER_CELL * 2]),
                               organism="Homo sapiens")
    refused = {
        "label_scoring": expect_error(lambda: inference.score_labels(model, [too_long], evaluation["labels"]), ValueError),
        "generation": expect_error(lambda: inference.generate_texts(model, [embed_prompts[0]], max_new_tokens=2000),
                                   ValueError),
        "embedding": expect_error(lambda: inference.embed_prompts(model, [too_long]), ValueError),
        "posterior": expect_error(lambda: sample_posterior(model, [embed_prompts[0]], genes, n_samples=1,
                                                           temperatures=[1.0], max_new_tokens=budget), ContextTooSmallError),
        "instruction_alone_too_long": expect_error(
            lambda: fit_prompt("word " * (context + 10) + "{cell_sentence}", genes, {}, tokenizer, context),
            ContextTooSmallError),
    }
    results["guards"] = {
        "longest_positions_used": longest_positions,
        "never_over_context": all(value <= context for value in longest_positions.values()),
        "refused": {name: message[:160] for name, message in refused.items()},
        "shortened_logged": capture.matching("lost", "genes")[:3] + capture.matching("shortened")[:2],
        "room_logged": capture.matching("leaves room")[:4],
    }
    return results


# ---- the same through kedro run ------------------------------------------------------------------
def counts_adata(genes: Sequence[str], n_cells: int, seed: int = 0):
    """Raw counts in which every cell expresses about 2,500 of ``genes`` (so its sentence has more
    than 2,048), two cell types with their own highly expressed genes."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    kinds = np.array(["CD4+ T cell", "CD14+ monocyte"])[np.arange(n_cells) % 2]
    rates = np.where(rng.random((n_cells, len(genes))) < 0.45, rng.gamma(2.0, 2.0, (n_cells, len(genes))), 0.0)
    rates[kinds == kinds[0], :50] *= 8
    rates[kinds == kinds[1], 50:100] *= 8
    counts = rng.poisson(rates).astype(np.float32)
    obs = pd.DataFrame({"cell_type": pd.Categorical(kinds), "organism": "Homo sapiens", "tissue": "blood"},
                       index=[f"cell{i}" for i in range(n_cells)])
    return ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=list(genes)))


def kedro_environment(root: Path, model_dir: Path) -> dict[str, Any]:
    """conf/long_context: conf/test's settings (it replaces the test env), both base models
    replaced by ``model_dir``, the cells' file, one 7,000-token sample per step and per pass."""
    import yaml

    parameters = yaml.safe_load((root / "conf" / "test" / "parameters.yml").read_text())
    parameters["finetuning"]["training_arguments"].update(
        {"per_device_train_batch_size": 1, "per_device_eval_batch_size": 1, "max_steps": 4, "eval_steps": 2,
         "save_steps": 2})
    parameters["evaluation"] = {"batch_size": 1}
    parameters["embedding"]["batch_size"] = 1
    parameters["cell_generation"] = {"n_cells_per_type": 1, "batch_size": 1, "n_comps": 5, "n_neighbors": 3}
    model = {"type": "c2s_kedro.datasets.HFModelDataset", "path": str(model_dir), "load_args": {"device": "cpu"}}
    catalog = {
        "raw_adata": {"type": "c2s_kedro.datasets.H5adDataset", "filepath": "data/01_raw/long_cells.h5ad"},
        "foundation_model": model, "perturbation_base_model": model,
    }
    env = root / "conf" / "long_context"
    env.mkdir(parents=True, exist_ok=True)
    (env / "parameters.yml").write_text(yaml.safe_dump(parameters, sort_keys=False))
    (env / "catalog.yml").write_text(yaml.safe_dump(catalog, sort_keys=False))
    (env / "mlflow.yml").write_text((root / "conf" / "test" / "mlflow.yml").read_text())
    return parameters


def kedro_stage(model_dir: Path, genes: list[str], work: Path, n_cells: int, pipelines: str) -> dict[str, Any]:
    """``kedro run --env long_context --pipelines=...`` in a copy of the project, with peak RSS and wall time."""
    project = copy_project(work / "project")
    (project / "data" / "01_raw").mkdir(parents=True)
    counts_adata(genes, n_cells).write_h5ad(project / "data" / "01_raw" / "long_cells.h5ad")
    kedro_environment(project, model_dir)
    arguments = ["run", "--env", "long_context", f"--pipelines={pipelines}"]
    log = work / "kedro.log"
    run = run_kedro(project, arguments, log, env={"TOKENIZERS_PARALLELISM": "false"})
    text = log.read_text()
    result: dict[str, Any] = {
        "command": " ".join([str(KEDRO), *arguments]), "project": str(project), "log": str(log), "returncode": run.returncode,
        "wall_s": round(run.wall_s, 1), "peak_rss_mb": round(run.peak_rss_mb),
        "room_logged": [line.strip() for line in text.splitlines() if "leaves room" in line][:3],
    }
    for name in ("finetuning_log.json", "evaluation_metrics.json", "embedding_metrics.json", "cell_generation_metrics.json"):
        path = project / "data" / "08_reporting" / name
        result[name] = path.exists()
    prompts = project / "data" / "05_model_input" / "finetuning_prompts"
    if prompts.exists():
        from datasets import load_from_disk

        from c2s_kedro.core.prompts.formatting import count_tokens
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        train = load_from_disk(str(prompts))["train"]
        lengths = count_tokens(tokenizer, [f"{i} {r}" for i, r in zip(train["model_input"], train["response"])]) + 1
        result["finetuning_sample_tokens_max"] = int(lengths.max())
        result["finetuning_sample_tokens_median"] = int(np.median(lengths))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--genes", type=int, default=6000, help="vocabulary genes (each cell expresses 2,048 of them)")
    parser.add_argument("--cells", type=int, default=8, help="cells (half train, a quarter val, a quarter test)")
    parser.add_argument("--train-steps", type=int, default=4)
    parser.add_argument("--embed-cells", type=int, default=4)
    parser.add_argument("--posterior-samples", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save-model", type=Path, default=None, help="keep the model directory here")
    parser.add_argument("--skip-stages", action="store_true", help="only build (and save) the model")
    parser.add_argument("--kedro", default=None, metavar="PIPELINES",
                        help="also run these pipelines (e.g. finetuning,evaluation,embedding) with kedro in a copy")
    parser.add_argument("--kedro-cells", type=int, default=40)
    parser.add_argument("--work", type=Path, default=None, help="folder for the kedro copy (default: temporary)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    genes = gene_names(args.genes)
    tokenizer, measured = bpe_with_tokens_per_gene(genes)
    with tempfile.TemporaryDirectory(prefix="long_context_") as scratch:
        model_dir = args.save_model or Path(scratch) / "model"
        build_model_dir(model_dir, TINY_8K, tokenizer)
        (model_dir / "genes.txt").write_text("\n".join(genes) + "\n")
        results: dict[str, Any] = {
            "model": {"directory": str(model_dir), "context": CONTEXT, **TINY_8K, "tokenizer_vocabulary": len(tokenizer)},
            "tokens_per_gene": round(measured, 3), "genes_per_cell": GENES_PER_CELL,
        }
        if not args.skip_stages:
            results.update(run_stages(model_dir, genes, args, Path(scratch)))
        if args.kedro:
            work = args.work or Path(scratch) / "kedro"
            work.mkdir(parents=True, exist_ok=True)
            results["kedro"] = kedro_stage(model_dir, genes, work, args.kedro_cells, args.kedro)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
