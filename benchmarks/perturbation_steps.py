"""How many optimizer steps until the offline perturbation model reads its inputs?

The default run fine-tunes the perturbation model for one epoch (about 90 steps of 16 pairs), and
the diagnostics say it reads neither the perturbation's name nor the control cell. This script
trains the same kind of model on the same prompts for many more steps and runs the pipeline's
input-sensitivity probe (``core.tasks.perturbation.diagnostics.input_sensitivity``, 32 pairs of each
test set) every ``--probe-every`` steps, so one run gives the learning curve of "does it read the
name" (``name_to_control_nats``, ``target_logprob_shift``) and "does it read the control cell"
(``control_swap_nats``) against steps and training seconds, beside ``written_token_mass`` (how
much probability the model still gives to genes its response already wrote).

The prompts are ``core.prompts.perturbation.perturbation_prompts`` on the screen of ``--source`` (a project
where ``kedro run --pipelines=perturbation_data`` has run); the model is
``core.models.loading.build_gpt_neox`` with the base model's tokenizer. Training is a plain loop (AdamW,
warm-up then cosine, gradient clipping at 1, the loss on the response only, as the pipeline's
settings) so that the probe can run between steps; one JSON object per probe is printed and
appended to ``--out``.

    .venv/bin/python benchmarks/perturbation_steps.py --source S --layers 2 --synthetic 2 \\
        --steps 2000 --probe-every 250 --threads 1 --out results.jsonl

``--synthetic-top N`` draws the synthetic pairs' targets among the control cells' top N genes
(a benchmark-only variant of ``synthetic_knockdown_pairs``: genes the model writes early and often).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, load_from_disk

from c2s_kedro import core
from c2s_kedro.core.data.screen import ScreenColumns
from c2s_kedro.core.models.training import tokenize_dataset
from c2s_kedro.core.prompts.perturbation import PerturbationPromptFormatter
from c2s_kedro.core.tasks.perturbation.diagnostics import input_sensitivity

COLUMNS = ScreenColumns(perturbation="gene", control_label="non-targeting", batch="gem_group")  # conf/base's screen
CONTEXT = 512


def top_targets(per_top: int):
    """``synthetic_knockdown_pairs`` with the target drawn among the response cell's top ``per_top``
    genes; the response is the cell's whole top-k sentence less the target when it was dropped."""
    draw = core.tasks.perturbation.pairs.synthetic_knockdown_pairs

    def pairs(obs, controls, sentences, columns, per_control, drop_share, seed=0, same_cell=False):
        cut = {cell: " ".join(sentence.split()[:per_top]) for cell, sentence in sentences.items()}
        rows = draw(obs, controls, cut, columns, per_control, drop_share, seed=seed, same_cell=same_cell).to_pandas()
        dropped = [len(r.perturbed_sentence.split()) < len(cut[r.perturbed_cell].split()) for r in rows.itertuples()]
        rows["perturbed_sentence"] = [
            " ".join(g for g in sentences[r.perturbed_cell].split() if not (gone and g == r.perturbation))
            for r, gone in zip(rows.itertuples(), dropped)
        ]
        rows["control_sentence"] = [sentences[c] for c in rows["control_cell"]]
        return Dataset.from_pandas(rows, preserve_index=False)

    return pairs


def padded(rows: list[list[int]], value: int) -> torch.Tensor:
    out = torch.full((len(rows), max(len(r) for r in rows)), value)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, required=True, help="a project after `kedro run --pipelines=perturbation_data`")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--untied", action="store_true", help="separate input and output embeddings")
    parser.add_argument("--positions", choices=["rotary", "learned"], default="rotary",
                        help="rotary: GPT-NeoX (Pythia); learned: GPT-2's absolute position embeddings")
    parser.add_argument("--template", type=int, default=6, help="prompt template index (6: the name in a fixed slot, 'The perturbation is X.'); -1: one drawn per pair")
    parser.add_argument("--synthetic", type=int, default=0, help="synthetic knockdown pairs per training control cell")
    parser.add_argument("--same-cell", action="store_true", help="synthetic pairs answer with the prompt's own cell")
    parser.add_argument("--synthetic-top", type=int, default=0, help="draw synthetic targets among the controls' top N genes")
    parser.add_argument("--target-unlikelihood", type=float, default=0.0,
                        help="weight of a loss term -log(1 - p(named target)) at every response position of the pairs whose "
                             "response does not write the target")
    parser.add_argument("--control-top-k", type=int, default=50)
    parser.add_argument("--top-k", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--probe-every", type=int, default=250)
    parser.add_argument("--probe-pairs", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...: where the model trains and is probed")
    parser.add_argument("--tag", default="")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.synthetic_top:
        # patched where the prompts look it up: core.prompts.perturbation imports it by name
        core.prompts.perturbation.synthetic_knockdown_pairs = top_targets(args.synthetic_top)

    split = json.loads((args.source / "data/05_model_input/perturbation_split.json").read_text())
    vocabulary = json.loads((args.source / "data/04_feature/perturbation_vocabulary.json").read_text())
    sentences = load_from_disk(str(args.source / "data/04_feature/perturbation_cell_sentences"))
    names = [n for part in ("train", "val", "test") for n in split[f"{part}_perturbations"]]
    tokenizer, _ = core.tasks.perturbation.tokens.screen_tokenizer(list(vocabulary), names, COLUMNS, CONTEXT)
    architecture = {"num_hidden_layers": args.layers, "hidden_size": args.hidden, "num_attention_heads": args.heads,
                    "intermediate_size": 4 * args.hidden, "max_position_embeddings": CONTEXT,
                    "tie_word_embeddings": not args.untied}
    if args.positions == "rotary":
        language_model = core.models.loading.build_gpt_neox(tokenizer, architecture, seed=args.seed)
    else:
        from transformers import GPT2Config, GPT2LMHeadModel
        torch.manual_seed(args.seed)
        config = GPT2Config(vocab_size=len(tokenizer), n_positions=CONTEXT, n_embd=args.hidden, n_layer=args.layers,
                            n_head=args.heads, n_inner=4 * args.hidden, tie_word_embeddings=not args.untied,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
        language_model = core.models.loading.LanguageModel(model=GPT2LMHeadModel(config), tokenizer=tokenizer, source="built")
    template = None if args.template < 0 else args.template
    prompts = core.prompts.perturbation.perturbation_prompts(
        sentences, split, COLUMNS, tokenizer, CONTEXT, args.top_k, args.seed, control_top_k_genes=args.control_top_k,
        template=template, synthetic_pairs_per_control=args.synthetic, synthetic_same_cell=args.same_cell,
        max_eval_samples=200)
    train = tokenize_dataset(prompts["train"], tokenizer, CONTEXT)
    ids, labels = train["input_ids"], train["labels"]
    target_ids = []  # each training pair's named gene as a token id (-1: the control label, a combination, no token)
    for name in prompts["train"]["perturbation"]:
        tokens = tokenizer(" " + core.data.screen.gene_key(str(name)), add_special_tokens=False)["input_ids"]  # as sentences write it
        named = str(name).upper() != COLUMNS.control_label.upper() and len(tokens) == 1 and tokens[0] != tokenizer.unk_token_id
        target_ids.append(int(tokens[0]) if named else -1)
    assert len(target_ids) == len(ids), "a training prompt was dropped by tokenize_dataset"
    formatter = PerturbationPromptFormatter(top_k_genes=args.top_k, seed=args.seed, tokenizer=tokenizer, max_tokens=CONTEXT,
                                            control_top_k_genes=args.control_top_k, template=template, columns=COLUMNS)
    obs = sentences.select_columns(["cell_name", "gene", "gem_group"]).to_pandas().set_index("cell_name")
    lookup = core.tasks.perturbation.pairs.top_k_sentences(sentences, args.top_k)
    tests = {part: core.prompts.perturbation.paired_sentences(core.tasks.perturbation.pairs.control_pairs(obs, split, part, COLUMNS, args.seed + 7),
                                                              lookup)
             for part in ("test", "test_seen") if part in split}

    model = language_model.model.to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = 10
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    settings = {k: v for k, v in vars(args).items() if k not in ("source", "out")}
    print(json.dumps({"settings": settings, "train_pairs": len(ids), "parameters": model.num_parameters()}), flush=True)

    def probe(step: int, seconds: float, loss: float | None) -> None:
        model.eval()
        row = {"tag": args.tag, "step": step, "train_seconds": round(seconds, 1), "samples_seen": step * args.batch_size,
               "train_loss_last_50": None if loss is None else round(loss, 4)}
        for part, pairs in tests.items():
            metrics, _ = input_sensitivity(language_model, pairs, formatter, COLUMNS.control_label,
                                           n_pairs=args.probe_pairs, seed=0, genes=list(vocabulary))
            prefix = "" if part == "test" else "seen."
            for key in ("name_to_control_nats", "name_swap_nats", "control_swap_nats", "target_logprob_shift",
                        "written_token_mass"):
                row[prefix + key] = round(metrics.get(f"sensitivity.{key}", float("nan")), 3)
        model.train()
        print(json.dumps(row), flush=True)
        if args.out:
            with args.out.open("a") as handle:
                handle.write(json.dumps({**row, "settings": settings}) + "\n")

    rng = np.random.default_rng(args.seed)
    order: list[int] = []
    losses: list[float] = []
    seconds = 0.0
    model.train()
    probe(0, 0.0, None)
    for step in range(1, args.steps + 1):
        if len(order) < args.batch_size:
            order = [int(i) for i in rng.permutation(len(ids))]
        batch = [order.pop() for _ in range(args.batch_size)]
        inputs = padded([ids[i] for i in batch], tokenizer.pad_token_id)
        targets = padded([labels[i] for i in batch], -100)
        mask = padded([[1] * len(ids[i]) for i in batch], 0)
        start = time.perf_counter()
        inputs, targets, mask = inputs.to(args.device), targets.to(args.device), mask.to(args.device)
        output = model(input_ids=inputs, attention_mask=mask, labels=targets)
        loss = output.loss
        if args.target_unlikelihood:
            named = torch.tensor([target_ids[i] for i in batch], device=args.device)
            # only where the data say so: a named target the response does not write
            rows = (named >= 0) & ~(targets == named.view(-1, 1)).any(dim=1)
            if rows.any():
                log_p = torch.log_softmax(output.logits[rows, :-1].float(), dim=-1)
                index = named[rows].view(-1, 1, 1).expand(-1, log_p.shape[1], 1)
                p_target = log_p.gather(-1, index).squeeze(-1).exp()
                positions = (targets[rows, 1:] != -100).float()
                penalty = -(torch.log1p(-p_target.clamp(max=1 - 1e-6)) * positions).sum() / positions.sum()
                loss = loss + args.target_unlikelihood * penalty
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if torch.device(args.device).type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start
        losses.append(loss.item())
        if step % args.probe_every == 0 or step == args.steps:
            probe(step, seconds, float(np.mean(losses[-50:])))


if __name__ == "__main__":
    main()
