"""Inference with causal LMs: cell embeddings, label scoring, batched generation and sampling.

Answers follow the training format: the text of a sample is ``model_input + " " + response`` then
EOS, and a cell-type response is ``"{cell_type}."``. Prompts are tokenized without special
tokens, as in training, and must leave room in the model's context for what comes after them.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import (
    AttentionInterface,
    Cache,
    DynamicCache,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StaticCache,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from c2s_kedro.core.errors import C2SValueError
from c2s_kedro.core.models.loading import LanguageModel
from c2s_kedro.core.prompts.formatting import load_templates, response_tokens
from c2s_kedro.core.sentences.conversion import label_key

logger = logging.getLogger(__name__)


def length_grouped_batches(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Indices in batches of at most ``batch_size`` prompts of similar length (longest first), so
    little compute goes to padding. When the prompts do not fill whole batches, the one smaller
    batch goes to whichever end, longest or shortest prompts, leaves less padding (a few very
    long prompts then share a batch of their own instead of widening a full one)."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    smaller_last = list(range(0, len(order), batch_size))
    remainder = len(order) % batch_size
    smaller_first = [0, *range(remainder, len(order), batch_size)] if remainder else smaller_last

    def padded_tokens(starts: list[int]) -> int:
        ends = starts[1:] + [len(order)]
        return sum((end - start) * lengths[order[start]] for start, end in zip(starts, ends))

    starts = min(smaller_last, smaller_first, key=padded_tokens)
    return [order[start:end] for start, end in zip(starts, starts[1:] + [len(order)])]


POOLINGS = ("mean", "last")


@torch.inference_mode()
def embed_prompts(
    language_model: LanguageModel, prompts: Sequence[str], batch_size: int = 16, pooling: str = "mean"
) -> np.ndarray:
    """One vector per prompt from the last hidden layer: ``pooling="mean"`` averages it over the
    prompt's real tokens, ``"last"`` takes the last real token (the one a causal model has read
    the whole prompt at).

    Prompts are padded on the tokenizer's ``padding_side`` with position ids counted from each
    prompt's first token, and padding positions are left out of the pooling, so a prompt's
    embedding does not depend on the other prompts of its batch. Only the transformer body runs
    (no LM head), in batches grouped by length, without gradients. Prompts must fit the model's
    context (see ``prompts.fit_prompt``).
    """
    if pooling not in POOLINGS:
        raise C2SValueError(f"unknown pooling '{pooling}'; choose one of: {', '.join(POOLINGS)}")
    tokenizer, model = language_model.tokenizer, language_model.model
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    too_long = [i for i, ids in enumerate(encoded) if len(ids) > language_model.context_length]
    if too_long:
        raise C2SValueError(
            f"{len(too_long)} prompts exceed the model's context of {language_model.context_length} tokens "
            f"(e.g. prompt {too_long[0]}: {len(encoded[too_long[0]])} tokens); fit them with prompts.fit_prompt first"
        )
    empty = [i for i, ids in enumerate(encoded) if not ids]
    if empty:
        raise C2SValueError(f"{len(empty)} prompts are empty (e.g. prompt {empty[0]}); nothing to embed")
    body = model.base_model
    device = language_model.device
    side = getattr(tokenizer, "padding_side", "right")
    embeddings = np.zeros((len(encoded), model.config.hidden_size), dtype=np.float32)
    batches = length_grouped_batches([len(ids) for ids in encoded], batch_size)
    for batch in tqdm(batches, desc="embedding", unit="batch", leave=False):
        input_ids, mask = _padded(tokenizer, [encoded[i] for i in batch], side, device)
        hidden = body(input_ids=input_ids, attention_mask=mask, position_ids=_positions(mask)).last_hidden_state.float()
        real = mask.bool().unsqueeze(-1)
        if pooling == "mean":
            # where, not a product: a left-padding position may hold NaN (it attends to nothing)
            pooled = torch.where(real, hidden, 0.0).sum(dim=1) / real.sum(dim=1)
        else:
            last = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)  # the last real position, on either side
            pooled = hidden[torch.arange(len(batch), device=device), last]
        embeddings[batch] = pooled.cpu().numpy()
    return embeddings


CELL_TYPE_RESPONSE = load_templates("cell_type_prediction").response  # "{cell_type}."
ANSWER_END = "."  # how a cell-type response ends
MASKABLE_ATTENTION = ("eager", "sdpa")


def _encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    empty = [i for i, ids in enumerate(encoded) if not ids]
    if empty:
        raise C2SValueError(f"{len(empty)} prompts are empty (e.g. prompt {empty[0]}); a prompt needs at least one token")
    return encoded


def _padded(tokenizer, rows: Sequence[Sequence[int]], side: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids padded on ``side`` to the longest row (``tokenizer.pad``), and the attention mask."""
    if tokenizer.pad_token_id is None:
        raise C2SValueError(
            "the tokenizer has no pad token, so prompts cannot be batched; set one first "
            "(tokenizer.pad_token = tokenizer.eos_token, as models.load_model does)"
        )
    padded = tokenizer.pad({"input_ids": [list(ids) for ids in rows]}, padding=True, padding_side=side,
                           return_attention_mask=True, return_tensors="pt")
    return padded["input_ids"].to(device), padded["attention_mask"].to(device)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 at each row's first real token (left padding)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


# Hand-written: no library scores every candidate answer of a prompt in one pass (a prefix tree
# under a tree attention mask); transformers would run one forward pass per (prompt, label).
class _AnswerTree:
    """The candidate answers' token ids as a prefix tree, for scoring them all in one pass.

    Answers that share leading tokens share tree nodes. Every node that has children (every
    proper prefix of an answer) is appended once after the prompt and attends to the prompt and
    to its own ancestors only; its logits give the log-probabilities of its children. The
    root's children are scored from the prompt's last position.
    """

    def __init__(self, answers: Sequence[Sequence[int]]):
        prefixes: dict[tuple[int, ...], int] = {}
        for answer in answers:
            for end in range(1, len(answer)):
                prefixes.setdefault(tuple(answer[:end]), len(prefixes))
        nodes = sorted(prefixes, key=len)  # parents before children
        index = {prefix: i for i, prefix in enumerate(nodes)}
        self.tokens = torch.tensor([prefix[-1] for prefix in nodes], dtype=torch.long)
        self.depths = torch.tensor([len(prefix) for prefix in nodes], dtype=torch.long)
        # node i may see node j when j's prefix begins i's prefix (ancestor or itself)
        self.visible = torch.tensor(
            [[len(other) <= len(prefix) and prefix[: len(other)] == other for other in nodes] for prefix in nodes],
            dtype=torch.bool,
        ).reshape(len(nodes), len(nodes))
        self.first_tokens = torch.tensor([answer[0] for answer in answers], dtype=torch.long)
        answer_of, node_of, token_of = [], [], []
        for a, answer in enumerate(answers):
            for end in range(1, len(answer)):
                answer_of.append(a)
                node_of.append(index[tuple(answer[:end])])
                token_of.append(answer[end])
        self.answer_of = torch.tensor(answer_of, dtype=torch.long)
        self.node_of = torch.tensor(node_of, dtype=torch.long)
        self.token_of = torch.tensor(token_of, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.tokens)

    def attention_mask(self, prompt_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Additive 4D mask (batch, 1, width + nodes, width + nodes) for one pass over left-padded
        prompts followed by the tree: prompt tokens attend causally to real prompt tokens, tree
        nodes to the whole real prompt and to their ancestors. A padding position attends to
        itself only, so that no row of the mask is empty."""
        rows, width = prompt_mask.shape
        total = width + len(self)
        device = prompt_mask.device
        allowed = torch.ones((total, total), dtype=torch.bool, device=device).tril_()
        allowed[width:, width:] = self.visible.to(device)
        real_keys = torch.cat([prompt_mask.bool(), torch.ones((rows, len(self)), dtype=torch.bool, device=device)], dim=-1)
        visible = (allowed & real_keys[:, None, :]) | torch.eye(total, dtype=torch.bool, device=device)
        blocked = torch.zeros(visible.shape, dtype=dtype, device=device)
        return blocked.masked_fill_(~visible, torch.finfo(dtype).min)[:, None]


@torch.inference_mode()
def score_labels(
    language_model: LanguageModel, prompts: Sequence[str], labels: Sequence[str], batch_size: int = 16
) -> np.ndarray:
    """Log-probability of each label as the answer to each prompt, shape (n_prompts, n_labels).

    The answer to a prompt is ``" " + label + "."`` followed by EOS, as in training; its score is
    the sum of the log-probabilities of those tokens given the prompt. Each prompt batch
    (left-padded, length-grouped) runs through the model once, followed in the same pass by the
    label tokens arranged as a prefix tree (shared leading tokens once) under a tree attention
    mask, so every label is scored without reading the prompt again and without a key/value
    cache. Prompt plus longest answer must fit the model's context.
    """
    tokenizer, model = language_model.tokenizer, language_model.model
    labels = [str(label) for label in labels]
    if not labels:
        raise C2SValueError("no labels to score; pass the candidate cell types")
    if len(set(labels)) != len(labels):
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        raise C2SValueError(f"labels must be unique; repeated: {', '.join(repeated)}")
    attention = getattr(model.config, "_attn_implementation", "sdpa")
    if attention not in MASKABLE_ATTENTION:
        raise C2SValueError(
            f"label scoring needs an attention implementation that takes a 4D mask ({', '.join(MASKABLE_ATTENTION)}); "
            f"the model uses '{attention}'. Call model.set_attn_implementation('sdpa') first"
        )
    encoded = _encode_prompts(tokenizer, prompts)
    answers = [
        ids + [tokenizer.eos_token_id]
        for ids in tokenizer([" " + label + ANSWER_END for label in labels], add_special_tokens=False)["input_ids"]
    ]
    longest = max(len(ids) for ids in answers)
    context = language_model.context_length
    too_long = [i for i, ids in enumerate(encoded) if len(ids) + longest > context]
    if too_long:
        first = too_long[0]
        raise C2SValueError(
            f"{len(too_long)} prompts leave no room for the answer: prompt {first} has {len(encoded[first])} tokens "
            f"and the longest label answer {longest}, together more than the model's context of {context} tokens. "
            f"Fit the prompts to {context - longest} tokens with prompts.fit_prompt first"
        )
    tree = _AnswerTree(answers)
    device = language_model.device
    first_tokens, node_tokens, depths = tree.first_tokens.to(device), tree.tokens.to(device), tree.depths.to(device)
    answer_of, node_of, token_of = tree.answer_of.to(device), tree.node_of.to(device), tree.token_of.to(device)
    scores = np.zeros((len(encoded), len(labels)), dtype=np.float64)
    batches = length_grouped_batches([len(ids) for ids in encoded], batch_size)
    for batch in tqdm(batches, desc="scoring labels", unit="batch", leave=False):
        prompt_ids, mask = _padded(tokenizer, [encoded[i] for i in batch], "left", device)
        rows = len(batch)
        # logits of the prompt's last position (scores the first answer tokens) and of every tree node
        logits = model(
            input_ids=torch.cat([prompt_ids, node_tokens.expand(rows, -1)], dim=-1),
            attention_mask=tree.attention_mask(mask, model.dtype),
            position_ids=torch.cat([_positions(mask), mask.sum(-1, keepdim=True) + depths - 1], dim=-1),
            use_cache=False,
            logits_to_keep=len(tree) + 1,
        ).logits
        log_probs = logits.float().log_softmax(-1)
        batch_scores = log_probs[:, 0, first_tokens].index_add(1, answer_of, log_probs[:, 1 + node_of, token_of])
        scores[batch] = batch_scores.double().cpu().numpy()
    logger.info("scored %d prompts against %d labels (%d tree tokens per prompt)", len(encoded), len(labels), len(tree))
    return scores


def predict_labels(
    language_model: LanguageModel, prompts: Sequence[str], labels: Sequence[str], batch_size: int = 16
) -> tuple[list[str], np.ndarray]:
    """The most likely label of each prompt and the label probabilities (softmax of the label
    scores over the candidates, rows sum to 1). The prediction is always one of ``labels``."""
    scores = score_labels(language_model, prompts, labels, batch_size=batch_size)
    shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
    probabilities = shifted / shifted.sum(axis=1, keepdims=True)
    predicted = [str(labels[i]) for i in probabilities.argmax(axis=1)]
    return predicted, probabilities


def _check_room(encoded: Sequence[Sequence[int]], max_new_tokens: int, context: int) -> None:
    if max_new_tokens < 1:
        raise C2SValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    too_long = [i for i, ids in enumerate(encoded) if len(ids) + max_new_tokens > context]
    if too_long:
        first = too_long[0]
        raise C2SValueError(
            f"prompt {first} has {len(encoded[first])} tokens and max_new_tokens is {max_new_tokens}: "
            f"{len(encoded[first]) + max_new_tokens} tokens, more than the model's context of {context} "
            f"({len(too_long)} prompts affected). Generating past the context produces garbage, so nothing was "
            f"generated. Fit the prompts to {context - max_new_tokens} tokens with prompts.fit_prompt "
            "(max_tokens = context - max_new_tokens) or lower max_new_tokens"
        )


_last_room: tuple[int, float | None] | None = None


def log_generation_room(
    prompt_tokens: int, max_new_tokens: int, context: int, tokens_per_gene: float | None = None, repeat: bool = True
) -> str:
    """Log (and return) how many new tokens the longest prompt of ``prompt_tokens`` leaves in the
    context and how many of them will be generated, both also in genes when ``tokens_per_gene``
    is known: with a long prompt the room, not the request, decides how long a cell can be.
    ``repeat=False`` logs at INFO only when ``max_new_tokens`` or ``tokens_per_gene`` changed since
    the last call (one line per sampling run, not per prompt), at DEBUG otherwise."""
    global _last_room
    room = context - prompt_tokens
    per_gene = f" ≈ {int(room / tokens_per_gene)} genes" if tokens_per_gene else ""
    asked = f" ≈ {int(max_new_tokens / tokens_per_gene)} genes" if tokens_per_gene else ""
    rate = f" ({tokens_per_gene:.2f} tokens per vocabulary gene)" if tokens_per_gene else ""
    message = (
        f"prompt of {prompt_tokens} tokens leaves room for {room} new tokens{per_gene} in the context of {context}; "
        f"generating at most {max_new_tokens} new tokens{asked}{rate}"
    )
    key = (max_new_tokens, None if tokens_per_gene is None else round(tokens_per_gene, 3))
    logger.log(logging.INFO if repeat or key != _last_room else logging.DEBUG, message)
    _last_room = key
    return message


def _generation_config(tokenizer, max_new_tokens: int, do_sample: bool, guidance_scale: float = 1.0) -> GenerationConfig:
    settings = {}
    if guidance_scale != 1.0:  # transformers' classifier-free guidance, before any other logits processor
        settings["guidance_scale"] = guidance_scale
    if do_sample:
        # Pinned to "off" and applied by our own warpers after any constraint: generate() would
        # otherwise fill unset values from the model's and global defaults (top_k=50) and run
        # its warpers before a custom logits processor.
        settings.update(temperature=1.0, top_k=0, top_p=1.0)
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        num_beams=1,
        disable_compile=True,  # generate() would compile the forward on GPU when given a StaticCache
        pad_token_id=_pad_id(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        **settings,
    )


def _processors(
    constraint: LogitsProcessor | None, do_sample: bool, temperature: float, top_k: int | None, top_p: float | None
) -> LogitsProcessorList:
    processors = LogitsProcessorList([constraint] if constraint is not None else [])
    if do_sample:
        if temperature <= 0:
            raise C2SValueError(f"temperature must be positive for sampling, got {temperature}")
        if temperature != 1.0:
            processors.append(TemperatureLogitsWarper(temperature))
        if top_k:
            processors.append(TopKLogitsWarper(top_k))
        if top_p is not None and top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p))
    return processors


def _decode_new(tokenizer, sequences: torch.Tensor, prompt_width: int) -> list[str]:
    return tokenizer.batch_decode(sequences[:, prompt_width:].tolist(), skip_special_tokens=True)


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Sampling seeded with ``seed`` on a forked RNG, so the caller's RNG state is left as it was."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


@torch.inference_mode()
def generate_texts(
    language_model: LanguageModel,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    logits_processor_factory: Callable[[], LogitsProcessor] | None = None,
    expected_answers: Sequence[str] | None = None,
    guidance_scale: float = 1.0,
    unconditional_prompts: Sequence[str] | None = None,
) -> list[str]:
    """The text each prompt's model continues with (new tokens only, special tokens skipped), in
    the order of ``prompts``.

    Greedy by default; with ``do_sample`` tokens are sampled at ``temperature`` (optionally cut to
    ``top_k`` / ``top_p``), seeded with ``seed``. Prompts are batched by length and padded on the
    left, with position ids counted from each prompt's first token, so a prompt's output does not
    depend on its batch neighbours. ``logits_processor_factory`` makes a fresh logits processor
    per batch (e.g. a ``constraints.GeneVocabularyConstraint``); it runs before the sampling
    warpers. Refuses, before generating anything, prompts whose length plus ``max_new_tokens``
    exceeds the model's context.

    ``expected_answers`` (greedy decoding only, e.g. ``" {label}."`` for each known cell type)
    speeds up answers the model is likely to give without changing any output: whenever the
    tokens written so far begin expected answers that all go on the same way, that continuation
    (up to EOS) is proposed and checked in one forward pass, and kept as far as the model's own
    greedy choice at each position agrees with it. An answer that is not expected is generated
    token by token.

    ``guidance_scale`` > 1 is classifier-free guidance (transformers' ``guidance_scale`` and
    ``negative_prompt_ids``): each step's log-probabilities ``c`` become ``u + scale * (c - u)``,
    ``u`` those of the same continuation after the prompt's ``unconditional_prompts`` entry (e.g.
    the prompt without its cell type; without them, the prompt's last token alone), computed in
    one more forward pass per step, so what the prompt says beyond that weighs more. 1: off.
    """
    if guidance_scale < 1.0:
        raise C2SValueError(f"guidance_scale must be at least 1 (1: no guidance), got {guidance_scale}")
    if unconditional_prompts is not None and len(unconditional_prompts) != len(prompts):
        raise C2SValueError(f"{len(unconditional_prompts)} unconditional prompts for {len(prompts)} prompts: give one per prompt")
    tokenizer, model = language_model.tokenizer, language_model.model
    encoded = _encode_prompts(tokenizer, prompts)
    _check_room(encoded, max_new_tokens, language_model.context_length)
    device = language_model.device
    if expected_answers is not None:
        if do_sample or logits_processor_factory is not None or guidance_scale != 1.0:
            raise C2SValueError(
                "expected_answers speed up greedy decoding only; leave them out when sampling, with "
                "guidance or when a logits processor is given"
            )
        return _generate_with_drafts(language_model, encoded, max_new_tokens, batch_size, expected_answers)
    config = _generation_config(tokenizer, max_new_tokens, do_sample, guidance_scale)
    guided = guidance_scale != 1.0 and unconditional_prompts is not None
    negatives = _encode_prompts(tokenizer, unconditional_prompts) if guided else None
    if negatives is not None:
        _check_room(negatives, max_new_tokens, language_model.context_length)
    texts: list[str] = [""] * len(encoded)
    with _seeded(seed, device):
        for number, batch in enumerate(tqdm(length_grouped_batches([len(ids) for ids in encoded], batch_size),
                                            desc="generating", unit="batch", leave=False)):
            input_ids, mask = _padded(tokenizer, [encoded[i] for i in batch], "left", device)
            constraint = logits_processor_factory() if logits_processor_factory is not None else None
            if number == 0:  # the first batch holds the longest prompts
                log_generation_room(input_ids.shape[1], max_new_tokens, language_model.context_length,
                                    getattr(constraint, "tokens_per_gene", None))
            negative = {}
            if negatives is not None:  # left-padded too; rotary positions only count relative offsets
                negative_ids, negative_mask = _padded(tokenizer, [negatives[i] for i in batch], "left", device)
                negative = {"negative_prompt_ids": negative_ids, "negative_prompt_attention_mask": negative_mask}
            sequences = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                **negative,
                # written in place; the default DynamicCache copies the whole batch's cache at every step
                cache=StaticCache(config=model.config, max_cache_len=input_ids.shape[1] + max_new_tokens),
                generation_config=config,
                logits_processor=_processors(constraint, do_sample, temperature, top_k, top_p),
            )
            for i, text in zip(batch, _decode_new(tokenizer, sequences, input_ids.shape[1])):
                texts[i] = text
    return texts


# Hand-written: transformers' prompt-lookup and assisted decoding run one sequence at a time;
# these drafts come from the known answers and are checked for a whole batch in one pass.
class _DraftTrie:
    """Expected answers as token ids (each ending in EOS), keyed by prefix: the tokens that may
    follow each prefix of an answer."""

    def __init__(self, answers: Sequence[Sequence[int]]):
        self.next: dict[tuple[int, ...], set[int]] = {}
        for answer in answers:
            for end in range(len(answer)):
                self.next.setdefault(tuple(answer[:end]), set()).add(answer[end])

    def draft(self, written: Sequence[int], limit: int) -> list[int]:
        """The tokens that every expected answer beginning with ``written`` continues with, until
        the answers part ways or end (at most ``limit`` tokens); empty when none begins so."""
        node, tokens = tuple(written), []
        while len(tokens) < limit:
            following = self.next.get(node)
            if following is None or len(following) != 1:
                break
            (token,) = following
            tokens.append(token)
            node += (token,)
        return tokens


def _generate_with_drafts(
    language_model: LanguageModel,
    encoded: list[list[int]],
    max_new_tokens: int,
    batch_size: int,
    expected_answers: Sequence[str],
) -> list[str]:
    tokenizer = language_model.tokenizer
    answers = tokenizer([str(a) for a in expected_answers], add_special_tokens=False)["input_ids"]
    trie = _DraftTrie([ids + [tokenizer.eos_token_id] for ids in answers])
    texts: list[str] = [""] * len(encoded)
    for batch in tqdm(length_grouped_batches([len(ids) for ids in encoded], batch_size), desc="generating",
                      unit="batch", leave=False):
        written = _drafted_greedy_batch(language_model, [encoded[i] for i in batch], max_new_tokens, trie)
        for i, text in zip(batch, tokenizer.batch_decode(written, skip_special_tokens=True)):
            texts[i] = text
    return texts


def _drafted_greedy_batch(
    language_model: LanguageModel, rows: list[list[int]], max_new_tokens: int, trie: _DraftTrie
) -> list[list[int]]:
    """Greedy decoding of one batch with drafts from ``trie`` checked in the same forward pass.

    Each step feeds every unfinished row its last chosen token followed by its draft (rows
    padded on the right to the longest draft). The logits at each fed position give the model's
    greedy choice there; a row keeps its draft up to the first token the model would not have
    chosen, and the model's choice after the kept part becomes its next token. Key/value cache
    entries of rejected draft tokens and padding stay in the (dynamic) cache but are masked out
    for every later step, and position ids count only the tokens kept, so each row sees exactly
    the sequence plain greedy decoding would have produced.
    """
    tokenizer, model, device = language_model.tokenizer, language_model.model, language_model.device
    eos, pad = tokenizer.eos_token_id, _pad_id(tokenizer)
    input_ids, mask = _padded(tokenizer, rows, "left", device)
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=_positions(mask), past_key_values=cache,
                   use_cache=True, logits_to_keep=1).logits
    chosen = dict(enumerate(logits[:, -1].argmax(-1).tolist()))  # row -> next token, for unfinished rows
    written: list[list[int]] = [[] for _ in rows]
    next_position = [len(ids) for ids in rows]
    while True:
        for row, token in chosen.items():
            written[row].append(token)
        active = [row for row in chosen if written[row][-1] != eos and len(written[row]) < max_new_tokens]
        if not active:
            return written
        drafts = {row: trie.draft(written[row], max_new_tokens - len(written[row])) for row in active}
        width = 1 + max(len(tokens) for tokens in drafts.values())
        step_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        step_mask = torch.zeros((len(rows), width), dtype=torch.long)
        step_positions = torch.zeros((len(rows), width), dtype=torch.long)
        for row in active:
            fed = [written[row][-1], *drafts[row]]
            step_ids[row, : len(fed)] = torch.tensor(fed, dtype=torch.long)
            step_mask[row, : len(fed)] = 1
            step_positions[row] = next_position[row] + torch.arange(width)
        mask = torch.cat([mask, step_mask.to(device)], dim=-1)
        greedy = model(input_ids=step_ids.to(device), attention_mask=mask, position_ids=step_positions.to(device),
                       past_key_values=cache, use_cache=True).logits.argmax(-1).tolist()
        chosen = {}
        for row in active:
            draft, kept = drafts[row], 0
            while kept < len(draft) and greedy[row][kept] == draft[kept]:
                kept += 1
            written[row].extend(draft[:kept])
            mask[row, mask.shape[1] - width + 1 + kept :] = 0  # rejected draft tokens and padding
            next_position[row] += 1 + kept
            if written[row][-1] != eos and len(written[row]) < max_new_tokens:
                chosen[row] = greedy[row][kept]


SHARED_PREFIX_ATTENTION = "c2s_shared_prefix"


class _UnsupportedAttention(Exception):
    """The model's attention is not plain softmax attention over cached keys (soft-capping, sinks, a window)."""


class _SharedPrefix:
    """Keys and values of one prompt, stored once, and of each row's own generated tokens.

    Every sample of a prompt attends to the same prompt keys: kept as one copy, they are read
    once per step for all rows (one matrix product per layer and head group) instead of once per
    row from a cache copied to every row, and each row's own tokens are read only as far as they
    are written, not over a cache preallocated to the whole generation.
    """

    def __init__(self, prefix: Cache):
        layers = prefix.layers
        # [kv heads, head dim, prompt] and [kv heads, prompt, head dim]: the operands of the prompt's products
        self.prompt_keys = [layer.keys[0].transpose(1, 2).contiguous() for layer in layers]
        self.prompt_values = [layer.values[0].contiguous() for layer in layers]
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.length = 0  # generated tokens stored per row
        self.calls = 0  # attention calls during the current forward pass

    def start(self, rows: int, capacity: int) -> None:
        self.keys = [k.new_empty((rows, k.shape[0], capacity, k.shape[1])) for k in self.prompt_keys]
        self.values = [v.new_empty((rows, v.shape[0], capacity, v.shape[2])) for v in self.prompt_values]
        self.length = 0

    def keep(self, index: torch.Tensor) -> None:
        """Only the rows at ``index`` go on (finished rows are dropped); copies the written part."""
        for stored in (self.keys, self.values):
            for i, tensor in enumerate(stored):
                kept = tensor.new_empty((len(index), *tensor.shape[1:]))
                kept[:, :, : self.length] = tensor[index, :, : self.length]
                stored[i] = kept

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float) -> torch.Tensor:
        """Attention of each row's new token (query [rows, heads, 1, dim]; its key and value [rows,
        kv heads, 1, dim]) over the prompt and the row's tokens so far, new one included; returns
        [rows, 1, heads, value dim] as transformers' attention functions do."""
        rows, heads, _, dim = query.shape
        kv_heads, prompt = self.prompt_keys[layer].shape[0], self.prompt_keys[layer].shape[2]
        groups = heads // kv_heads  # query heads sharing a key/value head (grouped-query attention)
        self.keys[layer][:, :, self.length] = key[:, :, 0]
        self.values[layer][:, :, self.length] = value[:, :, 0]
        own_keys = self.keys[layer][:, :, : self.length + 1]
        own_values = self.values[layer][:, :, : self.length + 1]
        q = (query * scaling).reshape(rows, kv_heads, groups, dim)
        # all rows' queries against the one copy of the prompt: [kv heads, rows * groups, prompt]
        on_prompt = torch.matmul(q.permute(1, 0, 2, 3).reshape(kv_heads, rows * groups, dim), self.prompt_keys[layer])
        on_own = torch.matmul(q, own_keys.transpose(2, 3))  # [rows, kv heads, groups, length]
        scores = torch.cat([on_prompt.view(kv_heads, rows, groups, prompt).permute(1, 0, 2, 3), on_own], dim=-1)
        weights = scores.softmax(-1, dtype=torch.float32).to(value.dtype)  # in float32, as eager attention
        from_prompt = torch.matmul(
            weights[..., :prompt].permute(1, 0, 2, 3).reshape(kv_heads, rows * groups, prompt), self.prompt_values[layer]
        )
        output = from_prompt.view(kv_heads, rows, groups, -1).permute(1, 0, 2, 3) + torch.matmul(
            weights[..., prompt:], own_values
        )
        return output.reshape(rows, 1, heads, -1)


def _shared_prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention function (transformers' ``AttentionInterface``) reading the prompt's keys once for
    all rows; the state comes with the forward pass as the ``shared_prefix`` keyword."""
    state: _SharedPrefix | None = kwargs.get("shared_prefix")
    if state is None:
        raise C2SValueError(f"the '{SHARED_PREFIX_ATTENTION}' attention needs the shared_prefix keyword in the forward pass")
    layer = getattr(module, "layer_idx", None)
    # math other than softmax(q k / sqrt(d)) v over every cached position, or a step of more than one token
    altered = any(kwargs.get(name) is not None for name in ("softcap", "s_aux", "sliding_window"))
    if altered or dropout or layer is None or query.shape[2] != 1 or layer >= len(state.prompt_keys):
        raise _UnsupportedAttention
    state.calls += 1
    return state.attend(layer, query, key, value, query.shape[-1] ** -0.5 if scaling is None else scaling), None


AttentionInterface.register(SHARED_PREFIX_ATTENTION, _shared_prefix_attention)


@contextmanager
def _attention_implementation(model, implementation: str) -> Iterator[None]:
    original = getattr(model.config, "_attn_implementation", "sdpa")
    model.set_attn_implementation(implementation)
    try:
        yield
    finally:
        model.set_attn_implementation(original)


class _SharedPrefixDecoder:
    """Decoding steps whose attention reads the prompt's one cached copy (``_SharedPrefix``)."""

    def __init__(self, model, prefix: Cache, capacity: int):
        self.model, self.capacity = model, capacity
        self.state = _SharedPrefix(prefix)

    def start(self, rows: int) -> None:
        self.state.start(rows, self.capacity)

    def step(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        self.state.calls = 0
        logits = self.model(input_ids=tokens[:, None], position_ids=torch.full_like(tokens, position)[:, None],
                            use_cache=False, shared_prefix=self.state).logits[:, -1]
        if self.state.calls != len(self.state.prompt_keys):  # a layer that bypassed the attention interface
            raise _UnsupportedAttention
        self.state.length += 1
        return logits

    def keep(self, index: torch.Tensor) -> None:
        self.state.keep(index)

    def works(self, token: int, position: int, device: torch.device) -> bool:
        """Whether every layer of the model attends through this decoder (one step of one row;
        models with other attention math or layers of their own are decoded from a copied cache)."""
        self.start(1)
        try:
            self.step(torch.tensor([token], device=device), position)
        except _UnsupportedAttention:
            return False
        return True


class _CacheDecoder:
    """Decoding steps over the prompt's cache copied to every row: for models whose cache is not
    plain keys and values of every position (sliding-window layers keep only the window)."""

    def __init__(self, model, prefix: Cache):
        self.model, self.prefix = model, prefix
        self.cache: Cache | None = None

    def start(self, rows: int) -> None:
        self.cache = copy.deepcopy(self.prefix)
        self.cache.batch_repeat_interleave(rows)

    def step(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        return self.model(input_ids=tokens[:, None], position_ids=torch.full_like(tokens, position)[:, None],
                          cache=self.cache, use_cache=True).logits[:, -1]

    def keep(self, index: torch.Tensor) -> None:
        self.cache.batch_select_indices(index)


def _gumbel_max(scores: torch.Tensor) -> torch.Tensor:
    """One token per row drawn from softmax(scores): argmax(scores + G) with G independent Gumbel
    noise is exactly such a draw (the Gumbel-max trick). Cheaper than ``torch.multinomial``, which
    builds the probabilities and their cumulative sums; tokens at -inf are never drawn. The noise,
    -log(-log U), comes from float32 uniforms (steps of 2^-24): a token's chance is off by at most
    about 1e-7, as much as rounding the float32 scores already moves it."""
    noise = torch.rand(scores.shape, device=scores.device).log_().neg_().log_()  # log(-log U) = -G
    best, tokens = (scores.float() - noise).max(-1)
    if not bool(torch.isfinite(best).all()):
        raise C2SValueError("a row has no token to sample (every score is -inf or NaN after the logits processors)")
    return tokens


# Hand-written decoding loop: generate() copies the prompt's cache to every row, reads it whole at
# every step, and samples with torch.multinomial; here the prompt's keys are read once for all rows.
def _sample_rows(decoder, processors: LogitsProcessorList, prompt_ids: torch.Tensor, first_logits: torch.Tensor,
                 rows: int, max_new_tokens: int, eos: int, pad: int) -> torch.Tensor:
    """``rows`` sampled continuations of the prompt (``prompt_ids`` [length], ``first_logits`` the
    prompt's next-token logits): prompt followed by the new tokens, padded with ``pad`` after a
    row's EOS, as ``generate`` returns them. ``processors`` see every row at every step, finished
    rows included, as in ``generate``; only unfinished rows run through the model, the finished
    ones are dropped whenever they make up a quarter of those decoded (fewer, smaller copies)."""
    device, length = prompt_ids.device, len(prompt_ids)
    sequences = torch.full((rows, length + max_new_tokens), pad, dtype=torch.long, device=device)
    sequences[:, :length] = prompt_ids
    decoder.start(rows)
    decoded = torch.arange(rows, device=device)  # for each row the decoder holds, its row in sequences
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    logits = first_logits.float().expand(rows, -1).clone()  # processors may write in place
    steps = 0
    while True:
        if len(decoded) < rows:  # rows dropped earlier score nothing; the processors only allow them EOS
            scores = logits.new_zeros((rows, logits.shape[1])).index_copy_(0, decoded, logits)
        else:
            scores = logits
        scores = processors(sequences[:, : length + steps], scores)
        finished = done[decoded]
        tokens = _gumbel_max(scores[decoded] if len(decoded) < rows else scores).masked_fill_(finished, pad)
        sequences[decoded, length + steps] = tokens
        done[decoded] = finished | (tokens == eos)
        steps += 1
        if steps == max_new_tokens or bool(done.all()):
            return sequences[:, : length + steps]
        going = ~done[decoded]
        if 4 * int((~going).sum()) >= len(decoded):
            index = going.nonzero().squeeze(1)
            decoder.keep(index)
            decoded, tokens = decoded[index], tokens[index]
        logits = decoder.step(tokens, length + steps - 1).float()


# Hand-written shared prefill: generate(num_return_sequences=n) re-reads the prompt once per sample.
@torch.inference_mode()
def sample_continuations(
    language_model: LanguageModel,
    prompt: str,
    n_samples: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    logits_processor: LogitsProcessor | None = None,
    batch_size: int | None = None,
) -> list[str]:
    """``n_samples`` sampled continuations of one prompt that share a single pass over the prompt.

    The prompt runs through the model once; its next-token logits start every sample and its
    keys and values are kept once, attended to by every sample's decoding steps (a registered
    attention function) instead of being copied to one cache row per sample. Tokens are drawn by
    the Gumbel-max trick, exactly from softmax(scores / temperature) after ``logits_processor``;
    rows stop at EOS or after ``max_new_tokens``. ``batch_size`` caps the rows decoded at once;
    the default decodes all samples together. ``logits_processor`` (e.g. a
    ``GeneVocabularyConstraint``) runs before the temperature and sees every row at every step,
    as in ``generate``; it must start over when called with a new batch of rows. Models with
    sliding-window layers (or attention this cannot reproduce) decode from the prompt's cache
    copied to every row.
    """
    if n_samples < 1:
        raise C2SValueError(f"n_samples must be at least 1, got {n_samples}")
    tokenizer, model = language_model.tokenizer, language_model.model
    ids = _encode_prompts(tokenizer, [prompt])[0]
    _check_room([ids], max_new_tokens, language_model.context_length)
    log_generation_room(len(ids), max_new_tokens, language_model.context_length,
                        getattr(logits_processor, "tokens_per_gene", None), repeat=False)
    device = language_model.device
    prompt_ids = torch.tensor(ids, dtype=torch.long, device=device)
    prefill = model(input_ids=prompt_ids[None], use_cache=True, logits_to_keep=1)
    first_logits, prefix = prefill.logits[0, -1], prefill.cache
    processors = _processors(logits_processor, True, temperature, None, None)
    rows_per_batch = batch_size or n_samples
    eos, pad = tokenizer.eos_token_id, _pad_id(tokenizer)
    plain = not any(prefix.is_sliding) and all(isinstance(getattr(layer, "keys", None), torch.Tensor)
                                               for layer in prefix.layers)
    texts: list[str] = []
    with ExitStack() as attention:
        decoder = _CacheDecoder(model, prefix)
        if plain:
            attention.enter_context(_attention_implementation(model, SHARED_PREFIX_ATTENTION))
            shared = _SharedPrefixDecoder(model, prefix, max_new_tokens)
            if shared.works(ids[-1], len(ids), device):
                decoder = shared
            else:
                attention.close()  # the model's own attention, over the copied cache
        with _seeded(seed, device):
            for start in range(0, n_samples, rows_per_batch):
                rows = min(rows_per_batch, n_samples - start)
                sequences = _sample_rows(decoder, processors, prompt_ids, first_logits, rows, max_new_tokens, eos, pad)
                texts.extend(_decode_new(tokenizer, sequences, len(ids)))
    return texts


def generate_labels(
    language_model: LanguageModel, prompts: Sequence[str], labels: Sequence[str], extra_new_tokens: int = 2, batch_size: int = 16
) -> tuple[list[str], list[str | None]]:
    """Greedy answers to cell-type-prediction prompts and the label each names (None when it is
    not one of ``labels``, see ``match_answer``).

    Up to ``extra_new_tokens`` tokens past the longest label answer are generated. The label
    answers are given as ``expected_answers``: once the model has begun one, the rest is checked
    in a single pass instead of one pass per token; the model still writes whatever it would have
    written without them.
    """
    answers_in_training_form = [" " + CELL_TYPE_RESPONSE.format(cell_type=label) for label in labels]
    max_new = response_tokens(language_model.tokenizer, [a[1:] for a in answers_in_training_form]) + extra_new_tokens
    answers = generate_texts(language_model, prompts, max_new_tokens=max_new, batch_size=batch_size,
                             expected_answers=answers_in_training_form)
    return answers, [match_answer(answer, labels) for answer in answers]


def normalize_answer(text: str) -> str:
    """An answer in the form used to compare it with labels (``sentences.label_key``: one Unicode
    form, whitespace runs one space, case folded) without the period that ends every answer."""
    text = label_key(text)
    if text.endswith(ANSWER_END):
        text = text[: -len(ANSWER_END)].rstrip()
    return text


def match_answer(text: str, labels: Sequence[str]) -> str | None:
    """The label a generated answer names, or None when it is not one of ``labels``: the answer
    without its ending period is compared with each label as it is (``label_key``), so a label that
    itself ends in a period ("Mono.", answered "Mono..") is named too; an answer that stopped before
    its period is read as written."""
    keys = {label_key(str(label)): str(label) for label in labels}
    return keys.get(normalize_answer(text)) or keys.get(label_key(text))
