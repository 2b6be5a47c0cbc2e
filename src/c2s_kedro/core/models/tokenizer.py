"""Gene-level tokenizer for the models trained here: every vocabulary gene is exactly one token.

Built with the ``tokenizers`` library as a WordPiece model whose vocabulary holds, for every gene
and every prompt word, the bare form and the form with a leading-space marker (``▁CD3D``), plus
every printable ASCII character in both forms. Any text therefore tokenizes without unknown
tokens (words outside the vocabulary fall back to characters), genes cost one token each, and the
Metaspace decoder restores the exact text: ``decode(encode(text)) == text``.
"""

from __future__ import annotations

import string
from collections.abc import Iterable

from datasets import Dataset
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPACE_MARKER = "\u2581"
SPECIAL_TOKENS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<bos>", "eos_token": "<eos>"}
_CHARACTERS = [c for c in string.printable if c not in " \t\r\x0b\x0c"]


def build_gene_tokenizer(
    genes: Iterable[str], words: Iterable[str] = (), model_max_length: int = 1024
) -> PreTrainedTokenizerFast:
    """A Hugging Face fast tokenizer in which each gene and each word is a single token.

    Args:
        genes: gene names as they appear in cell sentences (upper-cased vocabulary).
        words: prompt words and labels (e.g. template words, cell-type names); punctuation at the
            end of a word is split off, so pass words without it or with it, both work.
        model_max_length: the context length the tokenizer reports.
    """
    vocabulary: dict[str, int] = {}
    for token in SPECIAL_TOKENS.values():
        vocabulary[token] = len(vocabulary)
    for word in [*genes, *_clean_words(words), *_CHARACTERS]:
        for form in (word, SPACE_MARKER + word):
            vocabulary.setdefault(form, len(vocabulary))
    vocabulary.setdefault(SPACE_MARKER, len(vocabulary))

    tokenizer = Tokenizer(
        models.WordPiece(
            vocabulary, unk_token=SPECIAL_TOKENS["unk_token"], continuing_subword_prefix="", max_input_chars_per_word=10_000
        )
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
            # Punctuation that ends a word ("is:", "CD3D.") is its own token; dots and dashes
            # inside gene names (RP11-34P13.3) stay.
            pre_tokenizers.Split(Regex(r"[.,:;!?()]+(?=\s|$)"), behavior="isolated"),
            pre_tokenizers.Metaspace(replacement=SPACE_MARKER, prepend_scheme="never", split=True),
        ]
    )
    tokenizer.decoder = decoders.Metaspace(replacement=SPACE_MARKER, prepend_scheme="never", split=True)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=model_max_length, **SPECIAL_TOKENS)


def label_words(cell_sentences: Dataset, columns: Iterable[str]) -> list[str]:
    """Every distinct value of those ``columns`` that the dataset has (cell types, organisms), as
    words for ``build_gene_tokenizer``; missing values and absent columns are skipped."""
    words: list[str] = []
    for column in columns:
        if column in cell_sentences.column_names:
            words += [str(v) for v in cell_sentences.unique(column) if v is not None]
    return words


def _clean_words(words: Iterable[str]) -> list[str]:
    cleaned = []
    for word in words:
        for part in str(word).replace("\n", " ").split():
            part = part.rstrip(".,:;!?()")
            if part:
                cleaned.append(part)
    return cleaned
