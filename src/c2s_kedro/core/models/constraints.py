"""Constrained decoding of cell sentences and clean-up of unconstrained ones.

A generated cell sentence should only name vocabulary genes, each at most once, and end with the
stop text ("." then EOS, as the training responses do). ``GeneVocabularyConstraint`` enforces that
while decoding; ``postprocess_sentence`` repairs free-running output after the fact.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import LogitsProcessor

from c2s_kedro.core.errors import C2SValueError

logger = logging.getLogger(__name__)

ROOT = 0


@dataclass
class _GeneTrie:
    """Token-id trie of the genes as written after the prompt (``" " + gene``).

    Node 0 is the root. A gene of the gene-level tokenizer is one edge from the root; a gene of a
    byte-level BPE tokenizer is a path of several tokens, and genes share the nodes of common
    prefixes (" CD" for CD3D and CD8A).
    """

    children: list[dict[int, int]] = field(default_factory=lambda: [{}])
    gene_at: list[int] = field(default_factory=lambda: [-1])  # gene ending at the node, -1 for none
    genes_below: list[int] = field(default_factory=lambda: [0])  # genes ending at the node or under it
    paths: list[list[int]] = field(default_factory=list)  # nodes of each gene, root excluded
    first_tokens: list[int] = field(default_factory=list)  # first token of each gene

    def add(self, token_ids: Sequence[int]) -> int | None:
        """Insert one gene; returns its index, or None when its tokens are already a gene."""
        node, path = ROOT, []
        for token in token_ids:
            child = self.children[node].get(token)
            if child is None:
                child = len(self.children)
                self.children[node][token] = child
                self.children.append({})
                self.gene_at.append(-1)
                self.genes_below.append(0)
            node = child
            path.append(node)
        if self.gene_at[node] >= 0:
            return None
        gene = len(self.paths)
        self.gene_at[node] = gene
        for visited in [ROOT, *path]:
            self.genes_below[visited] += 1
        self.paths.append(path)
        self.first_tokens.append(int(token_ids[0]))
        return gene


@dataclass
class _SequenceState:
    """Where one generated sequence stands in the grammar ``gene+ [stop] EOS``."""

    node: int = ROOT  # trie node of the gene being written (ROOT before the first gene)
    stop_progress: int = -1  # tokens of the stop text written so far; -1 while writing genes
    finished: bool = False  # EOS written, or a token outside the grammar (then only EOS is allowed)
    used: set[int] = field(default_factory=set)
    used_below: dict[int, int] = field(default_factory=dict)  # node -> used genes ending at or under it


# Hand-written: transformers' constraints (prefix_allowed_tokens_fn, force/bad words) keep no
# per-row record of genes written, which "each gene at most once" over multi-token genes needs.
class GeneVocabularyConstraint(LogitsProcessor):
    """Lets a model write only vocabulary genes, each at most once, then the stop.

    At each step a sequence may take a token that continues a gene it has not written yet, or,
    at a word boundary after at least one gene, the stop: the tokens of ``stop_text`` followed by
    EOS, or EOS directly. Every other token gets ``-inf``. A sequence that has written every gene
    may only stop. With ``min_genes`` a sequence may stop only once it has written that many
    genes (or every gene, when the vocabulary has fewer): a model whose EOS comes too early still
    writes sentences as long as the cells it learned from; a sequence also needs room for them
    (``max_new_tokens``). Genes are matched as token paths of ``" " + gene``, so the same
    constraint works for the gene-level tokenizer (one token per gene) and for byte-level BPE
    tokenizers (several tokens per gene).

    State is kept per batch row and advanced with the tokens generated since the previous call
    (``input_ids[:, prompt_length:]``); it is rebuilt from the generated ids whenever the rows
    no longer continue what was seen (a new batch, reordered rows). ``prompt_length`` defaults
    to the width of the first ``input_ids`` it is called with, which is the (left-padded) prompt
    width in ``model.generate``. Use one instance per generation call.
    """

    def __init__(self, tokenizer, genes: Sequence[str], stop_text: str = ".", prompt_length: int | None = None,
                 min_genes: int | None = None):
        if min_genes is not None and min_genes < 1:
            raise C2SValueError(f"min_genes must be at least 1 (or None: a sequence may stop after any gene), got {min_genes}")
        if tokenizer.eos_token_id is None:
            raise C2SValueError("the tokenizer has no EOS token; constrained decoding needs one to end sentences")
        self.eos_token_id = int(tokenizer.eos_token_id)
        self.stop_ids = list(tokenizer(stop_text, add_special_tokens=False)["input_ids"]) if stop_text else []
        self.genes: list[str] = []
        self.trie = _GeneTrie()
        unknown = tokenizer.unk_token_id
        skipped = 0
        names = list(dict.fromkeys(str(g) for g in genes))
        for gene, ids in zip(names, tokenizer([" " + g for g in names], add_special_tokens=False)["input_ids"]):
            if not ids or (unknown is not None and unknown in ids) or self.eos_token_id in ids:
                skipped += 1
                continue
            if self.trie.add(ids) is not None:
                self.genes.append(gene)
        if skipped:
            logger.warning("%d genes cannot be written by this tokenizer (unknown tokens) and are left out", skipped)
        if not self.genes:
            raise C2SValueError("none of the genes can be written with this tokenizer; check the gene names")
        self.min_genes = min(min_genes, len(self.genes)) if min_genes is not None else 1
        self.fixed_prompt_length = prompt_length
        self.prompt_length = prompt_length
        self.states: list[_SequenceState] = []
        self.seen = 0
        self.start_mask: torch.Tensor | None = None  # per row: first tokens of genes not yet written
        self._exhausted: list[tuple[int, int]] = []  # (row, first token) to clear in start_mask, in one write
        self._last: torch.Tensor | None = None  # last token of each row at the previous call

    @property
    def tokens_per_gene(self) -> float:
        """Mean tokens of a vocabulary gene as written after another (``" " + gene``)."""
        return float(np.mean([len(path) for path in self.trie.paths]))

    def _start(self, input_ids: torch.Tensor, vocab_size: int) -> None:
        rows = input_ids.shape[0]
        self.states = [_SequenceState() for _ in range(rows)]
        self.seen = self.prompt_length
        self._last = None
        starts = torch.zeros(vocab_size, dtype=torch.bool, device=input_ids.device)
        starts[list(self.trie.children[ROOT])] = True
        self.start_mask = starts.expand(rows, -1).clone()
        self._exhausted = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows, width = input_ids.shape
        same_batch = bool(self.states) and len(self.states) == rows and self.seen <= width
        continues = same_batch and (
            self._last is None or bool((input_ids[:, self.seen - 1] == self._last).all())
        )
        if not continues:
            if not same_batch:
                self.prompt_length = self.fixed_prompt_length if self.fixed_prompt_length is not None else width
            if self.prompt_length > width:
                raise C2SValueError(f"prompt_length {self.prompt_length} is longer than the input ({width} tokens)")
            self._start(input_ids, scores.shape[1])
        for row, tokens in enumerate(input_ids[:, self.seen :].tolist()):
            for token in tokens:
                self._advance(row, token)
        self.seen = width
        self._last = input_ids[:, -1].clone() if width > self.prompt_length else None
        if self._exhausted:
            self._clear(self.start_mask, self._exhausted)
            self._exhausted = []
        return torch.where(self._allowed(scores.shape[1], scores.device), scores, float("-inf"))

    @staticmethod
    def _clear(mask: torch.Tensor, cells: list[tuple[int, int]]) -> None:
        # one indexed write per step instead of one per row: each tensor write costs far more than the Python
        rows, tokens = zip(*cells)
        mask[torch.tensor(rows, device=mask.device), torch.tensor(tokens, device=mask.device)] = False

    def _commit(self, row: int, state: _SequenceState, gene: int) -> None:
        state.used.add(gene)
        for node in self.trie.paths[gene]:
            state.used_below[node] = state.used_below.get(node, 0) + 1
        first = self.trie.paths[gene][0]
        if state.used_below[first] == self.trie.genes_below[first]:
            self._exhausted.append((row, self.trie.first_tokens[gene]))

    def _advance(self, row: int, token: int) -> None:
        state = self.states[row]
        if state.finished:
            return
        if state.stop_progress >= 0:
            if state.stop_progress < len(self.stop_ids) and token == self.stop_ids[state.stop_progress]:
                state.stop_progress += 1
            else:
                state.finished = True
            return
        child = self.trie.children[state.node].get(token)
        if child is not None and state.used_below.get(child, 0) < self.trie.genes_below[child]:
            state.node = child  # the gene in progress goes on (preferred over a boundary reading)
            return
        gene = self.trie.gene_at[state.node]
        if state.node == ROOT or gene < 0 or gene in state.used:
            state.finished = True  # outside the grammar: the processor was bypassed; only EOS from here
            return
        self._commit(row, state, gene)
        if token == self.eos_token_id:
            state.finished = True
        elif self.stop_ids and token == self.stop_ids[0]:
            state.stop_progress = 1
        elif token in self.trie.children[ROOT]:
            state.node = self.trie.children[ROOT][token]
        else:
            state.finished = True

    def _allowed(self, vocab_size: int, device: torch.device) -> torch.Tensor:
        allowed = torch.zeros((len(self.states), vocab_size), dtype=torch.bool, device=device)
        rows, tokens, boundary_rows, blocked = [], [], [], []
        for row, state in enumerate(self.states):
            if state.finished or state.stop_progress >= len(self.stop_ids):
                rows.append(row)
                tokens.append(self.eos_token_id)
                continue
            if state.stop_progress >= 0:
                rows.append(row)
                tokens.append(self.stop_ids[state.stop_progress])
                continue
            if state.node == ROOT:
                boundary_rows.append(row)  # the first gene: any gene start
                continue
            for token, child in self.trie.children[state.node].items():
                if state.used_below.get(child, 0) < self.trie.genes_below[child]:
                    rows.append(row)
                    tokens.append(token)
            gene = self.trie.gene_at[state.node]
            if gene >= 0 and gene not in state.used:
                boundary_rows.append(row)
                first = self.trie.paths[gene][0]
                if state.used_below.get(first, 0) + 1 == self.trie.genes_below[first]:
                    blocked.append((row, self.trie.first_tokens[gene]))  # writing this gene exhausts its first token
                if len(state.used) + 1 >= self.min_genes:  # the gene in progress counts
                    rows.extend([row] * (1 + bool(self.stop_ids)))
                    tokens.extend([self.eos_token_id, *self.stop_ids[:1]])
        if boundary_rows:
            index = torch.tensor(boundary_rows, device=device)
            allowed[index] = self.start_mask[index]
        if blocked:
            self._clear(allowed, blocked)
        if rows:
            allowed[torch.tensor(rows, device=device), torch.tensor(tokens, device=device)] = True
        return allowed


def postprocess_sentence(text: str, genes: Sequence[str] | set[str]) -> tuple[str, int, int]:
    """Clean an unconstrained generated cell sentence.

    Words that are not vocabulary genes are dropped; a gene written several times is kept once,
    at the mean of its positions (positions counted in the generated text), and the genes are
    ordered by that mean. Returns the sentence (genes joined by single spaces), the number of
    unknown words dropped and the number of repeated occurrences merged away.
    """
    vocabulary = genes if isinstance(genes, set) else set(genes)
    words = text.strip().split()
    if words and words[-1].endswith(".") and words[-1] not in vocabulary:
        words[-1] = words[-1][:-1]  # the sentence's closing period
    positions: dict[str, list[int]] = {}
    unknown = 0
    for position, word in enumerate(words):
        if word in vocabulary:
            positions.setdefault(word, []).append(position)
        elif word:
            unknown += 1
    merged = sum(len(p) - 1 for p in positions.values())
    order = sorted(positions, key=lambda gene: float(np.mean(positions[gene])))  # stable: first occurrence breaks ties
    return " ".join(order), unknown, merged
