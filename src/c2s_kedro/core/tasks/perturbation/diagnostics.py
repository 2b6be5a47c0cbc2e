"""Does a perturbation model read its inputs? Teacher-forced swaps of the prompt's parts.

A model fine-tuned on "control cell + perturbation -> perturbed cell" prompts can learn to write
a plausible perturbed cell while ignoring the perturbation's name (or the control cell). Such a
model gives the real response the same likelihood whatever the prompt names: swapping the name
changes nothing. ``input_sensitivity`` measures that change, so a run can tell a model that reads
the knockdown (clearly positive) from a deaf one (about 0).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from datasets import Dataset
from tqdm.auto import tqdm

from c2s_kedro.core.errors import C2SKeyError, C2SValueError
from c2s_kedro.core.data.screen import gene_key, perturbation_targets
from c2s_kedro.core.models.inference import length_grouped_batches
from c2s_kedro.core.models.loading import LanguageModel
from c2s_kedro.core.models.training import IGNORE_INDEX, tokenize_pairs
from c2s_kedro.core.prompts.perturbation import PerturbationPromptFormatter

logger = logging.getLogger(__name__)

PAIR_COLUMNS = ("perturbation", "control_sentence", "perturbed_sentence")
# The prompt variants scored against the true prompt (input_sensitivity says what each changes)
SWAPS = ("name_swap", "name_to_control", "control_swap")
METRIC_PREFIX = "sensitivity"


def input_sensitivity(
    language_model: LanguageModel,
    pairs: Dataset,
    formatter: PerturbationPromptFormatter,
    control_label: str,
    n_pairs: int = 64,
    seed: int = 0,
    batch_size: int = 16,
    genes: Sequence[str] | None = None,
) -> tuple[dict[str, float], pd.DataFrame]:
    """How much the real response's likelihood depends on the perturbation's name and on the
    control cell, teacher-forced (nothing is sampled).

    ``pairs`` holds perturbed cells paired with controls (``perturbation``, ``control_sentence``,
    ``perturbed_sentence``, as ``perturbation.paired_sentences`` makes them; other columns are
    ignored); control -> control pairs (named ``control_label``) are left out. Up to ``n_pairs``
    pairs are drawn at random (seeded) and their response (the perturbed sentence as the
    formatter writes it, then EOS, tokenized by ``training.tokenize_pairs`` as in training) is
    scored after four prompts, all built by ``formatter.format_dataset`` with the same template
    for every variant of a pair:

    - ``true``: the pair's own prompt;
    - ``name_swap``: another perturbation of ``pairs`` (a different name, drawn seeded);
    - ``name_to_control``: ``control_label`` instead of the name;
    - ``control_swap``: the control sentence of another drawn pair (a different sentence), same name.

    Metrics (``sensitivity.<swap>_nats`` and ``..._nats_per_token``): the mean over pairs of the
    response's log-likelihood under the true prompt minus under the swapped one, in nats, in
    total and per response token; positive = the model prefers the real response under its true
    inputs, about 0 = it does not read that input. ``sensitivity.target_logprob_shift``: for pairs
    whose perturbation targets a gene the model writes (its name is one token after a space, or it
    occurs in the drawn sentences; and, with ``genes``, it is one of them), the mean over the
    response's positions of log p(target gene's token | prefix) under the true prompt minus under
    the control-label prompt (a combination: the mean over its targets that are such genes);
    negative = naming the target makes the model less likely to write it, i.e. it reads the
    knockdown. A gene name of several tokens (byte-level BPE) is scored by its first token, which
    other genes may share. A target not among ``genes`` (its name can be a token of its own) is no
    gene the model writes: not scored. ``sensitivity.written_token_mass``: the mean over pairs and
    response positions of the probability the model gives, under the true prompt, to genes the
    response has already written. A sentence names each gene once, so a model that has learnt to
    suppress what its context names gives about 0; it is the same in-context suppression a
    knockdown of the named gene needs. (The constrained sampler masks written genes either way.)
    Measured with a gene-level tokenizer only: with BPE the response's tokens repeat.
    ``sensitivity.n_pairs`` counts the pairs scored, ``sensitivity.n_target_pairs`` those with a
    target token. A metric no pair can give (fewer than 2 perturbations for ``name_swap``, one
    control sentence for ``control_swap``, no target token) is left out and logged.

    The formatter should fit samples to the context (``tokenizer`` and ``max_tokens`` set); a
    sample that still does not fit is an error. Returns the metrics and one row per pair (its
    row in ``pairs``, the names used, each log-likelihood and each difference).
    """
    missing = [c for c in PAIR_COLUMNS if c not in pairs.column_names]
    if missing:
        raise C2SKeyError(
            f"the perturbation pairs lack column(s) {', '.join(repr(c) for c in missing)}; they have "
            f"{', '.join(pairs.column_names)}. Build them with perturbation.paired_sentences"
        )
    if n_pairs < 1:
        raise C2SValueError(f"n_pairs must be at least 1, got {n_pairs}")
    if pairs.num_rows == 0:
        raise C2SValueError("there are no perturbation pairs to score")
    control = str(control_label).upper()
    names = np.asarray([str(name) for name in pairs["perturbation"]], dtype=object)
    perturbed_rows = np.flatnonzero([name.upper() != control for name in names])
    if perturbed_rows.size == 0:
        raise C2SValueError(
            f"every pair is a control -> control pair ('{control_label}'); input sensitivity needs pairs of perturbed cells"
        )
    if perturbed_rows.size < names.size:
        logger.info("input sensitivity leaves out %d control -> control pairs", names.size - perturbed_rows.size)
    # separate streams, so that which pairs are drawn does not depend on how the swaps are drawn
    rows = np.sort(np.random.default_rng([seed, 0]).choice(perturbed_rows, size=min(n_pairs, perturbed_rows.size),
                                                            replace=False))
    drawn = pairs.select(rows.tolist(), keep_in_memory=True).select_columns(list(PAIR_COLUMNS)).to_pandas()
    drawn["perturbation"] = drawn["perturbation"].astype(str)
    drawn["control_sentence"] = drawn["control_sentence"].fillna("").astype(str)
    drawn["perturbed_sentence"] = drawn["perturbed_sentence"].fillna("").astype(str)

    table = pd.DataFrame({"row": rows, "perturbation": drawn["perturbation"].to_numpy()})
    variants = {"true": drawn}
    swapped_names = _other_names(drawn["perturbation"], names[perturbed_rows], np.random.default_rng([seed, 1]))
    if swapped_names is None:
        logger.warning("input sensitivity: the pairs hold fewer than 2 perturbations, so the name swap is not measured")
    else:
        variants["name_swap"] = drawn.assign(perturbation=swapped_names)
        table["swapped_perturbation"] = swapped_names
    variants["name_to_control"] = drawn.assign(perturbation=str(control_label))
    donors = _other_sentences(drawn["control_sentence"], np.random.default_rng([seed, 2]))
    has_donor = donors >= 0
    if has_donor.any():
        # a pair without another control sentence keeps its own (its template draw stays aligned)
        # and is left out of the mean
        sentences = drawn["control_sentence"].to_numpy()
        variants["control_swap"] = drawn.assign(control_sentence=np.where(has_donor, sentences[donors], sentences))
        table["control_donor_row"] = np.where(has_donor, rows[donors], -1)
    else:
        logger.warning("input sensitivity: the drawn pairs share one control sentence, so the control swap is not measured")

    targets = _target_tokens(language_model.tokenizer, drawn, formatter, genes)
    table["target_token"] = [" ".join(language_model.tokenizer.convert_ids_to_tokens(t)) if t else None for t in targets]
    scores = _score_variants(language_model, variants, formatter, targets, batch_size)
    true_ll, n_tokens, true_target, written_mass = scores["true"]
    table["n_response_tokens"] = n_tokens
    table["log_likelihood_true"] = true_ll
    table["written_token_mass"] = written_mass
    metrics: dict[str, float] = {f"{METRIC_PREFIX}.n_pairs": float(len(rows))}
    for swap in SWAPS:
        if swap not in scores:
            continue
        log_likelihood, _, target, _ = scores[swap]
        nats = true_ll - log_likelihood
        if swap == "control_swap":
            nats = np.where(has_donor, nats, np.nan)
        table[f"log_likelihood_{swap}"] = log_likelihood
        table[f"{swap}_nats"] = nats
        table[f"{swap}_nats_per_token"] = nats / n_tokens
        if swap == "name_to_control":
            table["target_logprob_true"] = true_target
            table["target_logprob_control"] = target
            table["target_logprob_shift"] = true_target - target
        metrics[f"{METRIC_PREFIX}.{swap}_nats"] = float(np.nanmean(nats))
        metrics[f"{METRIC_PREFIX}.{swap}_nats_per_token"] = float(np.nanmean(nats / n_tokens))
    scored = int(np.isfinite(table["target_logprob_shift"]).sum())
    metrics[f"{METRIC_PREFIX}.n_target_pairs"] = float(scored)
    if scored:
        metrics[f"{METRIC_PREFIX}.target_logprob_shift"] = float(np.nanmean(table["target_logprob_shift"]))
    else:
        logger.warning(
            "input sensitivity: no drawn perturbation is a gene the model writes, so target_logprob_shift is not measured"
        )
    if np.isfinite(written_mass).any():
        metrics[f"{METRIC_PREFIX}.written_token_mass"] = float(np.nanmean(written_mass))
    else:
        logger.info("input sensitivity: the responses' tokens repeat (pieces of gene names), so written_token_mass is not measured")
    logger.info("input sensitivity over %d pairs: %s", len(rows),
                ", ".join(f"{key.removeprefix(METRIC_PREFIX + '.')} {value:.3g}" for key, value in metrics.items()))
    return metrics, table


def _other_names(own: pd.Series, available: Sequence[str], rng: np.random.Generator) -> list[str] | None:
    """For each pair, a perturbation of ``available`` whose name differs from its own (as the
    formatter writes names: upper-cased); None when there are fewer than 2 names."""
    by_name = {}
    for name in available:
        by_name.setdefault(name.upper(), name)
    if len(by_name) < 2:
        return None
    choices = np.asarray(sorted(by_name))
    swapped = []
    for name in own:
        others = choices[choices != name.upper()]
        swapped.append(by_name[str(others[rng.integers(len(others))])])
    return swapped


def _other_sentences(sentences: pd.Series, rng: np.random.Generator) -> np.ndarray:
    """For each pair, the position of another drawn pair whose control sentence differs (several
    perturbed cells may share a control); -1 where none does."""
    values = sentences.to_numpy()
    donors = np.full(len(values), -1)
    for i, sentence in enumerate(values):
        others = np.flatnonzero(values != sentence)
        if others.size:
            donors[i] = others[rng.integers(others.size)]
    return donors


def _target_tokens(tokenizer, drawn: pd.DataFrame, formatter: PerturbationPromptFormatter,
                   genes: Sequence[str] | None) -> list[list[int]]:
    """Each pair's target genes as the response writes them (after a space): the first token of
    each target (``perturbation_targets`` with the formatter's columns) that is one token of the
    vocabulary or occurs among the drawn sentences' genes, and is among ``genes`` when they are
    given; a target a gene-level tokenizer spells in characters, or that is not a gene, is no gene
    the model writes."""
    written = {gene for column in ("control_sentence", "perturbed_sentence") for text in drawn[column] for gene in text.split()}
    known = {gene_key(gene) for gene in genes} if genes is not None else None
    tokens: dict[str, int | None] = {}
    chosen = []
    for name in drawn["perturbation"]:
        ids_of_name = []
        for target in perturbation_targets(name, formatter.columns):
            if target not in tokens:
                ids = tokenizer(" " + target, add_special_tokens=False)["input_ids"]
                is_gene = known is None or target in known
                tokens[target] = ids[0] if ids and is_gene and (len(ids) == 1 or target in written) else None
            if tokens[target] is not None:
                ids_of_name.append(tokens[target])
        chosen.append(ids_of_name)
    return chosen


def _score_variants(
    language_model: LanguageModel, variants: dict[str, pd.DataFrame], formatter: PerturbationPromptFormatter,
    targets: list[list[int]], batch_size: int,
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Per variant: each pair's response log-likelihood, its number of tokens, the mean log
    probability of the pair's target tokens over the response's positions (mean over its targets;
    NaN without one), and the written-token mass (``_response_log_probs``).

    Each variant is formatted as its own dataset of the same rows in the same order: the
    formatter redraws its templates from its seed in ``format_dataset``, so row i gets the same
    template in every variant. All variants are scored together, in batches of similar length.
    """
    tokenizer = language_model.tokenizer
    input_ids: list[list[int]] = []
    labels: list[list[int]] = []
    for name, frame in variants.items():
        formatted = formatter.format_dataset(Dataset.from_pandas(frame[list(PAIR_COLUMNS)], preserve_index=False))
        tokenized = tokenize_pairs(formatted[:], tokenizer)
        input_ids += tokenized["input_ids"]
        labels += tokenized["labels"]
    context = language_model.context_length
    too_long = [i for i, ids in enumerate(input_ids) if len(ids) > context]
    if too_long:
        first = too_long[0]
        raise C2SValueError(
            f"{len(too_long)} scored samples exceed the model's context of {context} tokens (e.g. pair "
            f"{first % len(targets)} of variant '{list(variants)[first // len(targets)]}': {len(input_ids[first])} "
            "tokens); build the formatter with tokenizer=language_model.tokenizer and "
            "max_tokens=language_model.context_length so it fits every prompt"
        )
    scored = _response_log_probs(language_model, input_ids, labels, targets * len(variants), batch_size)
    n = len(targets)
    return {name: tuple(values[k * n : (k + 1) * n] for values in scored) for k, name in enumerate(variants)}


def _response_log_probs(
    language_model: LanguageModel, input_ids: list[list[int]], labels: list[list[int]], targets: list[list[int]],
    batch_size: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Summed log-probability of each sample's labelled tokens, their number, the mean log
    probability of each of ``targets[i]`` at those positions, averaged over the targets (NaN for
    none), and the written-token mass: the mean over the labelled positions after the first of the
    probability the model gives to the tokens already labelled before that position (NaN for a
    sample whose labelled tokens repeat, as a BPE tokenizer's pieces of gene names do; a cell
    sentence names each gene once, so with a gene-level tokenizer a model that has learnt this gives
    about 0); right-padded batches with attention masks."""
    tokenizer, model = language_model.tokenizer, language_model.model
    device = language_model.device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    log_likelihood = np.zeros(len(input_ids))
    n_tokens = np.zeros(len(input_ids), dtype=np.int64)
    target_logprob = np.full(len(input_ids), np.nan)
    written_mass = np.full(len(input_ids), np.nan)
    was_training = model.training
    model.eval()  # no dropout while scoring; the caller's mode is restored after
    try:
        with torch.inference_mode():
            for batch in tqdm(length_grouped_batches([len(ids) for ids in input_ids], batch_size),
                              desc="input sensitivity", unit="batch", leave=False):
                width = max(len(input_ids[i]) for i in batch)
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                label = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
                for row, i in enumerate(batch):
                    ids[row, : len(input_ids[i])] = torch.tensor(input_ids[i])
                    mask[row, : len(input_ids[i])] = 1
                    label[row, : len(labels[i])] = torch.tensor(labels[i])
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
                shifted = label[:, 1:].to(logits.device)
                rows, positions = (shifted != IGNORE_INDEX).nonzero(as_tuple=True)
                # only the response's positions go through the softmax, in float32
                log_probs = torch.log_softmax(logits[:, :-1][rows, positions].float(), dim=-1)
                picked = log_probs.gather(1, shifted[rows, positions].unsqueeze(1)).squeeze(1)
                zeros = torch.zeros(len(batch), dtype=log_probs.dtype, device=log_probs.device)
                counts = torch.bincount(rows, minlength=len(batch))
                log_likelihood[batch] = zeros.index_add(0, rows, picked).cpu().numpy()
                n_tokens[batch] = counts.cpu().numpy()
                # one column per target slot (a combination has several); a sample's unused slots are masked
                width = max(1, max(len(targets[i]) for i in batch))
                wanted = torch.tensor([targets[i] + [0] * (width - len(targets[i])) for i in batch], device=log_probs.device)
                used = np.array([[k < len(targets[i]) for k in range(width)] for i in batch])
                means = np.stack([(zeros.index_add(0, rows, log_probs.gather(1, wanted[rows, k].unsqueeze(1)).squeeze(1))
                                   / counts.clamp(min=1)).cpu().numpy() for k in range(width)], axis=1)
                with np.errstate(invalid="ignore"):
                    target_logprob[batch] = np.where(used, means, 0.0).sum(axis=1) / used.sum(axis=1)
                for row, i in enumerate(batch):
                    own = rows == row
                    tokens = shifted[row, positions[own]]
                    if tokens.numel() < 2 or tokens.unique().numel() < tokens.numel():
                        continue
                    # probs[j, k]: position j's probability of token k of the response; k < j was written
                    probs = log_probs[own][:, tokens].exp()
                    earlier = torch.ones_like(probs, dtype=torch.bool).tril(diagonal=-1)
                    written_mass[i] = float((probs * earlier).sum(dim=1)[1:].mean())
    finally:
        model.train(was_training)
    return log_likelihood, n_tokens, target_logprob, written_mass
