"""conf/gpu proven end to end on this CPU, at C2S-Pythia-410m's exact shape.

Builds locally (nothing downloaded) a random GPT-NeoX of Pythia-410m's shape (24 layers, hidden
1,024, 16 heads, intermediate 4,096, 2,048 positions, rotary on a quarter of each head as Pythia,
parallel residual, untied embeddings) with a byte-level BPE of ~50k tokens trained with
``tokenizers`` on gene names, prompt text and filler words (so that a gene costs about as many
tokens as in Pythia's own tokenizer), saved as safetensors. Then, in a copy of the project:

    kedro run --env gpu --pipelines=finetuning --params finetuning.training_arguments.max_steps=1
    kedro run --env gpu --pipelines=cell_type_evaluation --params evaluation.max_test_cells=4
    kedro run --env gpu --pipelines=evaluation --params evaluation.max_test_cells=4   # must stop: the model only predicts

The only changes to conf/gpu: the model path (in the copy's conf/gpu/catalog.yml), max_steps and
the number of test cells scored (runtime --params); the device stays ``auto``, which is the CPU here. Everything else (bf16, batch
sizes, gradient accumulation with the per-sample loss, top-200 genes, checkpoints, 500 val samples
at most) is what a GPU run uses.

Prints one JSON object: tokens per gene, parameters, and per run the exit status, wall time, peak
memory of the kedro process tree (PSS summed, polled by psutil every 0.5 s; summed RSS is also
printed but counts the forked dataloader workers' shared pages many times) and the max RSS of the
main process (wait4's, the figure /usr/bin/time prints; c2s_kedro.harness.run_kedro), seconds per training step (the Trainer's
``train_runtime`` / steps).

    .venv/bin/python benchmarks/gpu_env_on_cpu.py --work /tmp/me/gpu_env     # ~20-40 min on 2 shared cores
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

# `python benchmarks/gpu_env_on_cpu.py` has this folder on sys.path
from long_context import gene_names, prompt_corpus, tokens_per_gene, train_bpe

from c2s_kedro import harness
VOCABULARY = 50277  # Pythia's tokenizer; the embedding matrix is padded to 50,304 rows as Pythia's
PYTHIA_410M = {
    "num_hidden_layers": 24, "hidden_size": 1024, "num_attention_heads": 16, "intermediate_size": 4096,
    "max_position_embeddings": 2048, "rotary_pct": 0.25, "rotary_emb_base": 10000, "use_parallel_residual": True,
    "hidden_act": "gelu", "layer_norm_eps": 1e-5, "initializer_range": 0.02, "attention_bias": True,
}
SYLLABLES = ["ba", "ke", "ti", "lo", "mu", "ra", "ne", "si", "to", "fa", "de", "gi", "po", "lu", "ve", "za", "cha",
             "sh", "th", "in", "on", "er", "an", "st", "ing", "ed", "ly", "ous"]


def project_genes() -> list[str]:
    """The genes of the project's default data (scanpy's pbmc68k_reduced, inside the wheel)."""
    import scanpy as sc

    return [str(g) for g in sc.datasets.pbmc68k_reduced().raw.var_names]


def filler_text(seed: int = 0) -> list[str]:
    """~65,000 lowercase pseudo-words, each twice: most of a 50k vocabulary goes to them, as most of
    Pythia's goes to English, so gene names keep costing several tokens."""
    rng = np.random.default_rng(seed)
    words = sorted({"".join(rng.choice(SYLLABLES, size=rng.integers(2, 6))) for _ in range(100000)})
    return [" ".join(words[i: i + 50]) for i in range(0, len(words), 50)] * 2


def build_tokenizer(genes: list[str], gene_sentences: int):
    corpus = filler_text() + prompt_corpus(genes + gene_names(20000), n_sentences=gene_sentences)
    return train_bpe(corpus, VOCABULARY)


def build_model(directory: Path, gene_sentences: int) -> dict[str, Any]:
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    genes = project_genes()
    tokenizer = build_tokenizer(genes, gene_sentences)
    config = GPTNeoXConfig(
        vocab_size=50304, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False, **PYTHIA_410M,
    )
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(config)
    tokenizer.model_max_length = config.max_position_embeddings
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)  # fp32 on disk, as the hub model; loaded in bf16
    tokenizer.save_pretrained(directory)
    info = {"parameters": model.num_parameters(), "tokenizer_vocabulary": len(tokenizer),
            "tokens_per_gene": round(tokens_per_gene(tokenizer, genes), 3), **PYTHIA_410M}
    (directory / "build_info.json").write_text(json.dumps(info, indent=2))
    return info


def copy_project(root: Path, model_dir: Path) -> Path:
    """A project copy (``c2s_kedro.harness.copy_project``) whose conf/gpu's foundation_model path points
    at ``model_dir``. A copy made before keeps its data/ (the processed cells; delete the folder to
    start from nothing) and gets a fresh conf/."""
    harness.copy_project(root, keep_data=True)
    catalog = root / "conf" / "gpu" / "catalog.yml"
    text = catalog.read_text()
    changed = re.sub(r"(foundation_model:\n(?:  .*\n)*?  path: ).*", rf"\g<1>{model_dir}", text, count=1)
    if changed == text:
        raise RuntimeError(f"could not find foundation_model's path in {catalog}")
    catalog.write_text(changed)
    return root


def kedro_run(project: Path, arguments: list[str], log: Path) -> dict[str, Any]:
    run = harness.run_kedro(project, ["run", "--env", "gpu", *arguments], log, env={"TOKENIZERS_PARALLELISM": "false"},
                    poll_s=0.5, pss=True)
    code, text = run.returncode, log.read_text()
    result = {
        "command": "kedro run --env gpu " + " ".join(arguments), "returncode": code, "wall_s": round(run.wall_s, 1),
        "peak_tree_rss_mb": round(run.peak_tree_rss / 2**20), "peak_tree_pss_mb": round(run.peak_tree_pss / 2**20),
        "main_process_maxrss_mb": round(run.peak_rss_mb), "log": str(log),
    }
    if code:
        errors = [line for line in text.splitlines() if "Error" in line or "error" in line]
        result["error"] = errors[-3:]
    return result


def training_figures(project: Path) -> dict[str, Any]:
    path = project / "data" / "08_reporting" / "finetuning_log.json"
    if not path.exists():
        return {}
    history = json.loads(path.read_text())
    history = history if isinstance(history, list) else history.get("log_history", history)
    final = [h for h in history if "train_runtime" in h]
    losses = [h["loss"] for h in history if "loss" in h]
    figures: dict[str, Any] = {"losses": losses}
    if final:
        steps = max(h.get("step", 0) for h in history)
        figures.update({"train_runtime_s": final[-1]["train_runtime"], "steps": steps,
                        "s_per_step": round(final[-1]["train_runtime"] / max(steps, 1), 1)})
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the model and the project copy")
    parser.add_argument("--max-steps", type=int, default=1,
                        help="optimizer steps (each 8-20 min and 12-14 GB here; 3 ran out of memory beside other jobs)")
    parser.add_argument("--gene-sentences", type=int, default=50,
                        help="200-gene sentences in the tokenizer's corpus (more: fewer tokens per gene; 50: ~3.4)")
    parser.add_argument("--skip-finetuning", action="store_true", help="evaluate the model a previous run trained")
    parser.add_argument("--test-cells", type=int, default=4,
                        help="evaluation.max_test_cells: test cells scored (~25 s each for this model on 2 busy cores)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model_dir = args.work / "c2s_pythia410m_shape"
    if not (model_dir / "build_info.json").exists():
        build_model(model_dir, args.gene_sentences)
    results: dict[str, Any] = {"model": json.loads((model_dir / "build_info.json").read_text())}
    project = args.work / "project"
    copy_project(project, model_dir)
    if not args.skip_finetuning:
        steps = f"finetuning.training_arguments.max_steps={args.max_steps}"
        results["finetuning"] = kedro_run(project, ["--pipelines=finetuning", "--params", steps], args.work / "finetuning.log")
        results["finetuning"].update(training_figures(project))
    else:  # figures of the earlier run, from its log and saved training history
        maxrss = harness.logged_peak_rss_mb(args.work / "finetuning.log")
        results["finetuning"] = {"main_process_maxrss_mb": round(maxrss) if maxrss else None, **training_figures(project)}
    cells = ["--params", f"evaluation.max_test_cells={args.test_cells}"]
    results["cell_type_evaluation"] = kedro_run(project, ["--pipelines=cell_type_evaluation", *cells],
                                                args.work / "evaluation.log")
    metrics = project / "data" / "08_reporting" / "evaluation_metrics.json"
    if metrics.exists():
        results["cell_type_evaluation"]["metrics"] = json.loads(metrics.read_text())
    results["evaluation"] = kedro_run(project, ["--pipelines=evaluation", *cells], args.work / "evaluation_full.log")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
