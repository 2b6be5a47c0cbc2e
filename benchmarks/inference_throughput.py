"""Inference throughput: label scoring, batched generation and posterior sampling against the
reference's approach and the compute floor, on the same model and the same cells, in one run.
Prints one JSON object.

    python benchmarks/inference_throughput.py [--cells 120] [--repeats 5] [--layers 4 --width 256] [--skip-sampling]
    python benchmarks/inference_throughput.py --model data/06_models/finetuned_model --skip-sampling

Cells per second on the cell-type-prediction prompts of PBMC cells:
(i)  ours_label_scoring: c2s_kedro.core.models.inference.score_labels over the 10 PBMC labels;
(ii) ours_batched_generation: c2s_kedro.core.models.inference.generate_texts as the evaluation pipeline
     calls it: greedy, batched, the label answers given as expected answers, max_new_tokens =
     longest label answer in tokens + 2; ours_generation_without_expected_answers: the same
     without them (token by token);
(a)  reference_one_cell_at_a_time: model.generate per cell (batch size 1), same max_new_tokens;
(b)  compute_floor: one bare batched forward pass of the model body over the same prompts under
     torch.inference_mode() (length-grouped, pre-tokenized, no LM head).
Also naive label scoring (one full forward per (cell, label), as a reader would write it) on a
subset of cells. Posterior sampling, samples per second for one prompt: sample_continuations
(one pass over the prompt, cache copied to every sample) against separate generate calls, and
against one generate call with num_return_sequences (which re-reads the prompt per sample).

The model is a random GPT-NeoX (``--layers``, ``--width``) unless ``--model`` names a trained
one. A random model never says EOS, so every path writes max_new_tokens; a trained one stops
after its answer, which makes (a) cheaper and lets expected answers skip most decoding steps:
report both.

Every path is warmed up once, then the paths run one after another in each of ``--repeats``
rounds with the same torch thread count. Speeds are the best round of each path; ratios are
given from the best rounds and as the median over rounds of the ratio within a round (paths of
one round ran seconds apart, so a load change on a shared machine hits them alike). The load
average before and after the run is printed with the results.
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
from embedding_throughput import floor_forward, pbmc_prompts_and_model, timed_interleaved  # noqa: E402
from transformers import GenerationConfig  # noqa: E402

from c2s_kedro.core.data.pbmc68k import pbmc68k_counts  # noqa: E402
from c2s_kedro.core.data.preprocessing import normalize_log10  # noqa: E402
from c2s_kedro.core.models.constraints import GeneVocabularyConstraint  # noqa: E402
from c2s_kedro.core.models.inference import generate_texts, match_answer, sample_continuations, score_labels
from c2s_kedro.core.models.loading import load_model  # noqa: E402
from c2s_kedro.core.sentences.conversion import vocabulary_names  # noqa: E402


def reference_generate(language_model, prompts, max_new_tokens):
    """The reference's way: one cell at a time through model.generate, answer cut from the output."""
    tokenizer, model = language_model.tokenizer, language_model.model
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id)
    answers = []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        output = model.generate(**inputs, generation_config=config)
        answers.append(tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    return answers


def naive_label_scores(language_model, prompts, labels):
    """One full forward pass per (cell, label) over prompt + answer."""
    tokenizer, model = language_model.tokenizer, language_model.model
    answers = [tokenizer(" " + label + ".", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for label in labels]
    scores = np.zeros((len(prompts), len(labels)))
    with torch.inference_mode():
        for i, prompt in enumerate(prompts):
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            for j, answer in enumerate(answers):
                log_probs = model(torch.tensor([ids + answer])).logits[0, len(ids) - 1 : -1].log_softmax(-1)
                scores[i, j] = float(log_probs[torch.arange(len(answer)), torch.tensor(answer)].sum())
    return scores


def separate_samples(language_model, prompt, n_samples, max_new_tokens, temperature, one_call=False):
    """Posterior samples with plain generate: n calls of one sample each, or one call with
    num_return_sequences=n (the prompt is expanded to n rows and read n times)."""
    tokenizer, model = language_model.tokenizer, language_model.model
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                              num_return_sequences=n_samples if one_call else 1)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    width = inputs["input_ids"].shape[1]
    outputs = [model.generate(**inputs, generation_config=config)] if one_call else [
        model.generate(**inputs, generation_config=config) for _ in range(n_samples)
    ]
    return [tokenizer.decode(row[width:], skip_special_tokens=True) for output in outputs for row in output]


def timed_rounds(functions: dict, repeats: int) -> tuple[dict[str, float], dict[str, list[float]]]:
    """``timed_interleaved`` that also keeps each round's time: (best, per-round times) by name."""
    rounds: dict[str, list[float]] = {name: [] for name in functions}

    def recorded(name, function):
        def run():
            start = time.perf_counter()
            function()
            rounds[name].append(time.perf_counter() - start)
        return run

    best = timed_interleaved({name: recorded(name, function) for name, function in functions.items()}, repeats)
    return best, {name: times[1:] for name, times in rounds.items()}  # times[0] is the warm-up


def speedups(times: dict, pairs: dict[str, tuple[str, str]]) -> dict[str, float]:
    """``slower time / faster time`` for each named (slower, faster) pair."""
    return {name: times[slower] / times[faster] for name, (slower, faster) in pairs.items()}


def median_speedups(rounds: dict[str, list[float]], pairs: dict[str, tuple[str, str]]) -> dict[str, float]:
    """The median over rounds of each pair's ratio within a round."""
    repeats = len(next(iter(rounds.values())))
    per_round = [speedups({name: times[r] for name, times in rounds.items()}, pairs) for r in range(repeats)]
    return {name: float(np.median([ratios[name] for ratios in per_round])) for name in pairs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--naive-cells", type=int, default=12, help="cells for the naive per-label scoring")
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--sample-tokens", type=int, default=50)
    parser.add_argument("--skip-sampling", action="store_true", help="only the cell-type inference comparison")
    parser.add_argument("--model", default=None, help="a trained model directory (default: random weights)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="weights and activations of every path, the reference's included (bfloat16 pays off on CPUs with AMX)")
    args = parser.parse_args()
    load_before = os.getloadavg()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    adata = normalize_log10(pbmc68k_counts())
    labels = sorted(str(v) for v in adata.obs["cell_type"].unique())
    # the foundation model's tokenizer (pipelines/pretraining): genes, template words, labels, organism
    expected = [" " + label + "." for label in labels]  # the evaluation pipeline's answers
    trained = load_model(args.model, device="cpu", dtype="float32") if args.model else None
    room = 0
    if trained is not None:
        room = max(len(ids) for ids in trained.tokenizer(expected, add_special_tokens=False)["input_ids"]) + 2
    language_model, prompts, ready = pbmc_prompts_and_model(args.cells, args.layers, args.width, args.batch_size, labels,
                                                            trained=trained, answer_room=room)
    language_model.model.to(getattr(torch, args.dtype))
    tokenizer = language_model.tokenizer
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    lengths = [len(ids) for ids in encoded]
    answer_tokens = [len(ids) for ids in tokenizer(expected, add_special_tokens=False)["input_ids"]]
    max_new_tokens = max(answer_tokens) + 2
    naive_prompts = prompts[: args.naive_cells]

    # same answers either way (greedy), so the comparison is like for like
    ours_answers = generate_texts(language_model, prompts, max_new_tokens, batch_size=args.batch_size, expected_answers=expected)
    token_by_token_answers = generate_texts(language_model, prompts, max_new_tokens, batch_size=args.batch_size)
    reference_answers = reference_generate(language_model, prompts, max_new_tokens)
    scores = score_labels(language_model, prompts, labels, batch_size=args.batch_size)
    naive = naive_label_scores(language_model, naive_prompts, labels)

    best, rounds = timed_rounds(
        {
            "ours_label_scoring": lambda: score_labels(language_model, prompts, labels, batch_size=args.batch_size),
            "ours_batched_generation": lambda: generate_texts(language_model, prompts, max_new_tokens, batch_size=args.batch_size,
                                                              expected_answers=expected),
            "ours_generation_without_expected_answers": lambda: generate_texts(language_model, prompts, max_new_tokens,
                                                                               batch_size=args.batch_size),
            "reference_one_cell_at_a_time": lambda: reference_generate(language_model, prompts, max_new_tokens),
            "compute_floor": lambda: floor_forward(language_model, ready),
            "naive_label_scoring_subset": lambda: naive_label_scores(language_model, naive_prompts, labels),
        },
        args.repeats,
    )
    n = len(prompts)
    cells_per_s = {name: n / seconds for name, seconds in best.items()}
    cells_per_s["naive_label_scoring_subset"] = len(naive_prompts) / best["naive_label_scoring_subset"]
    pairs = {
        "label_scoring_vs_reference": ("reference_one_cell_at_a_time", "ours_label_scoring"),
        "label_scoring_vs_floor": ("compute_floor", "ours_label_scoring"),
        "batched_generation_vs_reference": ("reference_one_cell_at_a_time", "ours_batched_generation"),
        "batched_generation_vs_floor": ("compute_floor", "ours_batched_generation"),
        "generation_without_expected_answers_vs_reference": ("reference_one_cell_at_a_time",
                                                             "ours_generation_without_expected_answers"),
    }
    results = {
        "model": (f"{args.model} ({language_model.model.config.num_hidden_layers} layers x "
                  f"{language_model.model.config.hidden_size} wide), vocabulary {len(tokenizer)} tokens" if args.model else
                  f"GPT-NeoX {args.layers} layers x {args.width} wide, random weights, vocabulary {len(tokenizer)} tokens"),
        "cells": n,
        "labels": len(labels),
        "mean_prompt_tokens": float(np.mean(lengths)),
        "prompt_tokens_range": [int(min(lengths)), int(max(lengths))],
        "label_answer_tokens": {"min": int(min(answer_tokens)), "max": int(max(answer_tokens)), "plus_eos": 1},
        "max_new_tokens": max_new_tokens,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "torch_threads": args.threads,
        "timing": f"best of {args.repeats} interleaved rounds after a warm-up of each path",
        "checks": {
            "batched_answers_equal_one_at_a_time": ours_answers == reference_answers,
            "answers_with_and_without_expected_answers_equal": ours_answers == token_by_token_answers,
            "mean_new_tokens_one_at_a_time": float(np.mean([len(ids) for ids in tokenizer(reference_answers, add_special_tokens=False)["input_ids"]])),
            "label_scores_max_abs_diff_vs_naive": float(np.abs(scores[: len(naive_prompts)] - naive).max()),
            "generated_answers_that_are_known_labels": sum(match_answer(a, labels) is not None for a in ours_answers),
        },
        "cells_per_s": cells_per_s,
        "ratios": {
            **speedups(best, pairs),
            "label_scoring_vs_naive_scoring": cells_per_s["ours_label_scoring"] / cells_per_s["naive_label_scoring_subset"],
        },
        "ratios_median_over_rounds": median_speedups(rounds, pairs),
        "targets_cpu": {"label_scoring_vs_reference": ">= 2", "label_scoring_vs_floor": ">= 0.80",
                        "batched_generation_vs_reference": ">= 2"},
    }
    if not args.skip_sampling:
        results["posterior_sampling"] = posterior_sampling(args, language_model, adata, prompts[0], lengths[0])
    results["load_average_1_5_15_min"] = {"before": list(load_before), "after": list(os.getloadavg())}
    print(json.dumps(results, indent=2))


def posterior_sampling(args, language_model, adata, sample_prompt: str, prompt_tokens: int) -> dict:
    """Samples per second for one prompt: sample_continuations against plain generate."""
    tokenizer = language_model.tokenizer
    genes = list(dict.fromkeys(vocabulary_names(adata.var_names)))
    samples = {
        "ours": sample_continuations(language_model, sample_prompt, args.samples, args.sample_tokens, temperature=1.0, seed=0),
        "separate": separate_samples(language_model, sample_prompt, args.samples, args.sample_tokens, 1.0),
    }
    torch.manual_seed(0)
    posterior = timed_interleaved(
        {
            "ours_sample_continuations": lambda: sample_continuations(
                language_model, sample_prompt, args.samples, args.sample_tokens, temperature=1.0, seed=0),
            "separate_generate_calls": lambda: separate_samples(
                language_model, sample_prompt, args.samples, args.sample_tokens, 1.0),
            "generate_num_return_sequences": lambda: separate_samples(
                language_model, sample_prompt, args.samples, args.sample_tokens, 1.0, one_call=True),
            "ours_constrained_to_genes": lambda: sample_continuations(
                language_model, sample_prompt, args.samples, args.sample_tokens, temperature=1.0, seed=0,
                logits_processor=GeneVocabularyConstraint(tokenizer, genes)),
        },
        args.repeats,
    )
    samples_per_s = {name: args.samples / seconds for name, seconds in posterior.items()}

    def new_tokens(texts):
        return float(np.mean([len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]))

    return {
        "prompt_tokens": prompt_tokens,
        "samples": args.samples,
        "max_new_tokens": args.sample_tokens,
        "mean_new_tokens": {"ours": new_tokens(samples["ours"]), "separate": new_tokens(samples["separate"])},
        "samples_per_s": samples_per_s,
        "ratio_vs_separate_calls": posterior["separate_generate_calls"] / posterior["ours_sample_continuations"],
        "ratio_vs_num_return_sequences": posterior["generate_num_return_sequences"] / posterior["ours_sample_continuations"],
        "target_cpu": {"ratio_vs_separate_calls": ">= 5"},
    }


if __name__ == "__main__":
    main()
