"""Compiled inner loops of the cell-sentence conversion (numba, released GIL).

A stored (cell, gene, value) entry becomes one 64-bit sort key: the value's order-preserving
32-bit code in the high word, random tie-break bits, then the gene index in the low bits. Keys
are stored inverted so that numpy's ascending (SIMD) sort yields descending values; padding is
all ones and sorts last. The tie-break bits come from a hash of (seed, cell index, entry
position), so the result does not depend on chunking or threads.
"""

from __future__ import annotations

import numpy as np
from numba import njit

PADDING = np.uint64(0xFFFFFFFFFFFFFFFF)


@njit(cache=True, nogil=True, inline="always")
def _hash(x):
    # splitmix64 finalizer: a cheap, well-mixed 64-bit hash
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@njit(cache=True, nogil=True)
def fill_sort_keys(indptr, indices, value_codes, rows, keys, seed, first_row, gene_bits):
    """Inverted sort keys of ``rows`` of a CSR chunk into ``keys``, one row per line, padded."""
    keys[:] = PADDING
    # At most 16 tie bits per entry, so one 64-bit hash serves four entries.
    tie_bits = min(32 - gene_bits, 16)
    tie_mask = (np.uint64(1) << np.uint64(tie_bits)) - np.uint64(1)
    seed_mix = _hash(np.uint64(seed) + np.uint64(0x9E3779B97F4A7C15))
    for i in range(rows.size):
        row = rows[i]
        start = indptr[row]
        cell_mix = _hash(seed_mix ^ (np.uint64(first_row + row) * np.uint64(0xD1B54A32D192ED03)))
        random_bits = np.uint64(0)
        for j in range(indptr[row + 1] - start):
            if j % 4 == 0:
                random_bits = _hash(cell_mix + np.uint64(j))
            ties = (random_bits >> np.uint64(16 * (j % 4))) & tie_mask
            value = np.uint64(value_codes[start + j])
            keys[i, j] = ~((value << np.uint64(32)) | (ties << np.uint64(gene_bits)) | np.uint64(indices[start + j]))


@njit(cache=True, nogil=True)
def scan_chunk(indptr, indices, values, name_lengths, gene_counts):
    """One pass over a CSR chunk: each row's sentence length in bytes (gene names joined by single
    spaces), cells expressing each gene (added to ``gene_counts``), and the numbers of negative,
    NaN and zero stored values (when any is non-zero the other outputs are not meaningful)."""
    n_rows = indptr.size - 1
    lengths = np.zeros(n_rows, np.int64)
    negative = nan = zero = 0
    for row in range(n_rows):
        total = 0
        for j in range(indptr[row], indptr[row + 1]):
            value = values[j]
            if value != value:
                nan += 1
            elif value < 0:
                negative += 1
            elif value == 0:
                zero += 1
            gene = indices[j]
            total += name_lengths[gene] + 1
            gene_counts[gene] += 1
        lengths[row] = max(total - 1, 0)
    return lengths, negative, nan, zero


@njit(cache=True, nogil=True)
def write_sentences(genes, gene_offsets, byte_offsets, name_words, name_lengths, out_words):
    """Write each row's genes as space-separated names, rows in order, into ``out_words``.

    ``name_words`` holds each gene's name followed by a space, zero-padded to whole 64-bit words
    (little-endian); a name is copied a word at a time, shifted into place when the output
    position is not word-aligned. Rows are written in order, so bytes written past a name's end
    are overwritten by what follows; ``out_words`` needs one name width plus a word of slack.
    """
    n_words = name_words.shape[1]
    for row in range(gene_offsets.size - 1):
        position = byte_offsets[row]
        for j in range(gene_offsets[row], gene_offsets[row + 1]):
            gene = genes[j]
            word_index = position >> 3
            shift = np.uint64((position & 7) * 8)
            if shift == 0:
                for w in range(n_words):
                    out_words[word_index + w] = name_words[gene, w]
            else:
                back = np.uint64(64) - shift
                carry = out_words[word_index] & ((np.uint64(1) << shift) - np.uint64(1))
                for w in range(n_words):
                    word = name_words[gene, w]
                    out_words[word_index + w] = carry | (word << shift)
                    carry = word >> back
                out_words[word_index + n_words] = carry
            position += name_lengths[gene] + 1


@njit(cache=True, nogil=True)
def extract_genes(sorted_keys, rows, counts, offsets, genes, gene_bits):
    """Gene indices of each row in key order into ``genes[offsets[row]:offsets[row + 1]]``."""
    gene_mask = (np.uint64(1) << np.uint64(gene_bits)) - np.uint64(1)
    for i in range(rows.size):
        row = rows[i]
        start = offsets[row]
        for j in range(counts[row]):
            genes[start + j] = np.int32((~sorted_keys[i, j]) & gene_mask)
