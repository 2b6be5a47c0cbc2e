"""Perturbation targets as tokens: the offline base model's gene-level tokenizer for a screen, with a
token for every target (``screen_tokenizer``), and the refusal of a gene-level tokenizer that would
spell a target letter by letter (``check_target_tokens``)."""

from __future__ import annotations

from collections.abc import Sequence

from c2s_kedro.core.errors import C2SError
from c2s_kedro.core.data.screen import ScreenColumns, perturbation_targets
from c2s_kedro.core.models.tokenizer import build_gene_tokenizer
from c2s_kedro.core.prompts.formatting import PERTURBATION_TASK, count_tokens, template_words


def target_words(perturbations: Sequence[str], vocabulary: Sequence[str], columns: ScreenColumns) -> list[str]:
    """The targets of ``perturbations`` that are not words of ``vocabulary`` (the sentences'
    genes), sorted: a gene-level tokenizer needs them as words of their own."""
    known = set(vocabulary)
    return sorted({target for name in perturbations for target in perturbation_targets(name, columns)} - known)


def screen_tokenizer(vocabulary: Sequence[str], perturbations: Sequence[str], columns: ScreenColumns,
                     model_max_length: int):
    """The offline base model's gene-level tokenizer for a screen: a token per gene of ``vocabulary``,
    per word of the perturbation templates, the control label, "and" (which joins a combination's
    targets in prompts) and each target of ``perturbations`` that is not a gene (``target_words``: a
    token of its own, never spelt in letters). Returns the tokenizer and those targets."""
    targets = target_words(perturbations, vocabulary, columns)
    words = template_words((PERTURBATION_TASK,)) + [str(columns.control_label).upper(), "and"] + targets
    return build_gene_tokenizer(vocabulary, words, model_max_length=model_max_length), targets


class TargetTokenError(C2SError, LookupError):
    """A gene-level tokenizer has no token for a perturbation target (no setting changes that: the
    model's tokenizer does)."""


def check_target_tokens(tokenizer, perturbations: Sequence[str], columns: ScreenColumns, genes: Sequence[str]) -> None:
    """Refuse a gene-level tokenizer (each of ``genes`` one token, as the offline base model's) that
    would spell a target of ``perturbations`` in characters: such a model would read the name as
    letters. A subword tokenizer (a hub model's) reads genes and targets alike in pieces: nothing
    to check."""
    sample = list(dict.fromkeys(genes))[:50]
    if not sample or (count_tokens(tokenizer, [" " + gene for gene in sample]) != 1).any():
        return
    targets = sorted({target for name in perturbations for target in perturbation_targets(name, columns)})
    if not targets:
        return
    spelled = [target for target, n in zip(targets, count_tokens(tokenizer, [" " + t for t in targets])) if n != 1]
    if spelled:
        raise TargetTokenError(
            f"the model's tokenizer has a token for every gene but not for perturbation target(s) "
            f"{', '.join(spelled[:10])}{' ...' if len(spelled) > 10 else ''} ({len(spelled)} of {len(targets)}): it would "
            "read them letter by letter. Rebuild the base model from this screen (the offline base model's tokenizer "
            "gives every target a token of its own), or start from a model with a subword tokenizer"
        )
