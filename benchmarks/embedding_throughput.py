"""Embedding throughput: the embedding pipeline's path against the reference's approach and the
compute floor, on the same model and the same cells, in one run. Prints one JSON object.

    python benchmarks/embedding_throughput.py [--cells 120] [--repeats 3] [--layers 4 --width 256]

(a) reference approach: 8 prompts at a time, padded in dataset order (no length grouping),
    gradients not disabled, the full causal LM run with all hidden states returned, mean over
    every position including padding.
(b) compute floor: the model body alone under torch.inference_mode() on pre-tokenized,
    length-grouped batches, nothing else (no tokenization, no pooling).
ours: c2s_kedro.core.models.inference.embed_prompts (tokenizes, groups by length, masked mean).
Also reports tokens per cell of the gene-level tokenizer at top-200 and top-2,048 genes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from c2s_kedro.core.data.pbmc68k import pbmc68k_counts  # noqa: E402
from c2s_kedro.core.data.preprocessing import normalize_log10  # noqa: E402
from c2s_kedro.core.models.inference import embed_prompts, length_grouped_batches  # noqa: E402
from c2s_kedro.core.models.loading import build_gpt_neox  # noqa: E402
from c2s_kedro.core.models.tokenizer import build_gene_tokenizer  # noqa: E402
from c2s_kedro.core.prompts.formatting import fit_prompt, load_templates, template_words  # noqa: E402
from c2s_kedro.core.sentences.conversion import cell_sentences_from_adata  # noqa: E402
from c2s_kedro.core.simulate.atlas import simulate_atlas  # noqa: E402


def reference_embed(language_model, prompts, batch_size=8):
    """The reference's way: fixed batches of 8 in order, padded, grads on, all hidden states."""
    tokenizer, model = language_model.tokenizer, language_model.model
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        outputs = model(**batch, output_hidden_states=True)
        out.append(outputs.hidden_states[-1].mean(dim=1).detach().numpy())
    return np.concatenate(out)


def floor_forward(language_model, batches):
    """Bare batched forward pass of the model body on ready tensors."""
    body = language_model.model.base_model
    with torch.inference_mode():
        for input_ids, mask in batches:
            body(input_ids=input_ids, attention_mask=mask)


def timed_interleaved(functions: dict, repeats: int) -> dict[str, float]:
    """Best time of each function over ``repeats`` rounds, the functions interleaved within each
    round so that a load change on a shared machine hits all of them alike."""
    for function in functions.values():
        function()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


def pbmc_prompts_and_model(n_cells: int, layers: int, width: int, batch_size: int, extra_words=(), trained=None,
                           answer_room: int = 0):
    """The benchmarks' shared setup: a random GPT-NeoX with the gene-level tokenizer of the PBMC
    data (or ``trained``, a loaded trained model, e.g. the fine-tuned model of ``kedro run``), the cell-type-prediction prompts of the first ``n_cells`` cells fitted to the
    context less ``answer_room`` tokens, and those prompts as ready, length-grouped, padded tensors
    (for the compute floor)."""
    adata = normalize_log10(pbmc68k_counts())
    converted = cell_sentences_from_adata(adata[:n_cells], label_columns=["cell_type"], seed=0)
    if trained is not None:
        language_model = trained
    else:
        tokenizer = build_gene_tokenizer(converted.vocabulary, template_words() + list(extra_words) + ["Homo sapiens"],
                                         model_max_length=1024)
        language_model = build_gpt_neox(
            tokenizer,
            {"num_hidden_layers": layers, "hidden_size": width, "num_attention_heads": max(1, width // 64),
             "max_position_embeddings": 1024},
        )
    language_model.model.eval()
    tokenizer = language_model.tokenizer
    template = load_templates("cell_type_prediction").inputs[0]
    prompts = [
        fit_prompt(template, s.split(), {"organism": "Homo sapiens"}, tokenizer, language_model.context_length - answer_room)[0]
        for s in converted.sentences["cell_sentence"]
    ]
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    lengths = [len(ids) for ids in encoded]
    ready = []
    for batch in length_grouped_batches(lengths, batch_size):
        padded = max(lengths[i] for i in batch)
        ids = torch.full((len(batch), padded), tokenizer.pad_token_id)
        mask = torch.zeros((len(batch), padded), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, : lengths[i]] = torch.tensor(encoded[i])
            mask[row, : lengths[i]] = 1
        ready.append((ids, mask))
    return language_model, prompts, ready


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    language_model, prompts, ready = pbmc_prompts_and_model(args.cells, args.layers, args.width, args.batch_size)
    tokenizer = language_model.tokenizer
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]

    best = timed_interleaved(
        {
            "ours": lambda: embed_prompts(language_model, prompts, batch_size=args.batch_size),
            "reference": lambda: reference_embed(language_model, prompts),
            "floor": lambda: floor_forward(language_model, ready),
        },
        args.repeats,
    )
    ours_s, reference_s, floor_s = best["ours"], best["reference"], best["floor"]

    atlas = simulate_atlas(n_cells=20, n_genes=6000, expressed_genes_per_cell=2600, seed=0)
    atlas.X = atlas.X.astype(np.float32)
    atlas_sentences = cell_sentences_from_adata(atlas, seed=0)
    atlas_tokenizer = build_gene_tokenizer(atlas_sentences.vocabulary, template_words() + ["Homo sapiens"], model_max_length=8192)
    template = load_templates("cell_type_prediction").inputs[0]
    tokens_per_cell = {}
    for k in (200, 2048):
        counts = [
            len(atlas_tokenizer(fit_prompt(template, s.split()[:k], {"organism": "Homo sapiens"}, atlas_tokenizer, None)[0],
                                add_special_tokens=False)["input_ids"])
            for s in atlas_sentences.sentences["cell_sentence"]
        ]
        genes = [min(k, len(s.split())) for s in atlas_sentences.sentences["cell_sentence"]]
        sentence_tokens = [
            len(atlas_tokenizer(" " + " ".join(s.split()[:k]), add_special_tokens=False)["input_ids"])
            for s in atlas_sentences.sentences["cell_sentence"]
        ]
        tokens_per_cell[f"top_{k}"] = {
            "prompt_tokens_per_cell": float(np.mean(counts)),
            "genes_per_cell": float(np.mean(genes)),
            "sentence_tokens_per_gene": float(np.sum(sentence_tokens) / np.sum(genes)),
        }

    n = len(prompts)
    print(json.dumps({
        "model": f"GPT-NeoX {args.layers} layers x {args.width} wide, random weights",
        "cells": n,
        "mean_prompt_tokens": float(np.mean(lengths)),
        "torch_threads": args.threads,
        "timing": f"best of {args.repeats} interleaved rounds",
        "cells_per_s": {"ours": n / ours_s, "reference_approach": n / reference_s, "compute_floor": n / floor_s},
        "ratios": {"ours_vs_reference": reference_s / ours_s, "ours_vs_floor": floor_s / ours_s},
        "targets_cpu": {"ours_vs_reference": ">= 1.25", "ours_vs_floor": ">= 0.90"},
        "gene_tokenizer": tokens_per_cell,
    }, indent=2))


if __name__ == "__main__":
    main()
