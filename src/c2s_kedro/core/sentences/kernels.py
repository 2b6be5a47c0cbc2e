"""Compiled inner loops of the cell-sentence conversion (numba, released GIL).

A stored (cell, gene, value) entry becomes one 64-bit sort key: the value's order-preserving
32-bit code in the high word, random tie-break bits, then the gene index in the low bits. Keys
are stored inverted so that numpy's ascending (SIMD) sort yields descending values; padding is
all ones and sorts last. The tie-break bits come from a hash of (seed, cell index, entry
position), so the result does not depend on chunking or threads; rows come in canonical form
(indices sorted, see ``sentences._scan``), so the position is the gene's place among the cell's
expressed genes, whatever the storage.
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
    # At most 16 tie bits per entry, so one 64-bit hash serves four entries.
    tie_bits = min(32 - gene_bits, 16)
    tie_mask = (np.uint64(1) << np.uint64(tie_bits)) - np.uint64(1)
    seed_mix = _hash(np.uint64(seed) + np.uint64(0x9E3779B97F4A7C15))
    for i in range(rows.size):
        row = rows[i]
        start = indptr[row]
        cell_mix = _hash(seed_mix ^ (np.uint64(first_row + row) * np.uint64(0xD1B54A32D192ED03)))
        random_bits = np.uint64(0)
        n = indptr[row + 1] - start
        keys[i, n:] = PADDING
        # Positions count from the row's last entry: rows stored in descending gene order (as the
        # default data, scanpy's pbmc68k_reduced, stores them) keep the tie order they had before
        # rows were sorted, so the default data's sentences are unchanged.
        for p in range(n):
            j = n - 1 - p
            if p % 4 == 0:
                random_bits = _hash(cell_mix + np.uint64(p))
            ties = (random_bits >> np.uint64(16 * (p % 4))) & tie_mask
            value = np.uint64(value_codes[start + j])
            keys[i, j] = ~((value << np.uint64(32)) | (ties << np.uint64(gene_bits)) | np.uint64(indices[start + j]))


@njit(cache=True, nogil=True)
def sentence_lengths(indptr, indices, name_lengths, gene_counts):
    """Bytes of each row's sentence (its gene names joined by single spaces); adds each stored
    gene to ``gene_counts`` (cells expressing it)."""
    n_rows = indptr.size - 1
    lengths = np.zeros(n_rows, np.int64)
    for row in range(n_rows):
        total = 0
        for j in range(indptr[row], indptr[row + 1]):
            gene = indices[j]
            total += name_lengths[gene] + 1
            gene_counts[gene] += 1
        lengths[row] = max(total - 1, 0)
    return lengths


@njit(cache=True, nogil=True)
def write_sentences(sorted_keys, rows, counts, byte_offsets, name_words, name_lengths, gene_bits, out_words):
    """Write the sentences of a block of rows (genes in sorted-key order) into ``out_words``.

    ``name_words`` holds each gene's name followed by a space, zero-padded to whole 64-bit words
    (little-endian). A name is copied a word at a time, shifted into place when the output is not
    word-aligned; the bytes past it are overwritten by the next name. Names near a row's end are
    copied byte by byte, so nothing lands in the neighbouring row and rows can be written in any
    order.
    ``out_words`` needs one name width plus a word of slack at its end.
    """
    gene_mask = (np.uint64(1) << np.uint64(gene_bits)) - np.uint64(1)
    n_words = name_words.shape[1]
    out_bytes = out_words.view(np.uint8)
    for i in range(rows.size):
        row = rows[i]
        n = counts[row]
        position = byte_offsets[row]
        row_end = byte_offsets[row + 1]
        for j in range(n):
            gene = (~sorted_keys[i, j]) & gene_mask
            length = name_lengths[gene]
            word_index = position >> 3
            offset = position & 7
            if (word_index + n_words + 1) * 8 > row_end:
                # near the row's end: exact bytes, nothing written past the sentence
                name_bytes = name_words[gene].view(np.uint8)
                for k in range(length):
                    out_bytes[position + k] = name_bytes[k]
                if j < n - 1:
                    out_bytes[position + length] = 32
            elif n_words == 2:  # names under 16 bytes, the usual case: the copy unrolled
                first, second = name_words[gene, 0], name_words[gene, 1]
                if offset == 0:
                    out_words[word_index] = first
                    out_words[word_index + 1] = second
                else:
                    shift = np.uint64(offset * 8)
                    back = np.uint64(64 - offset * 8)
                    kept = out_words[word_index] & ((np.uint64(1) << shift) - np.uint64(1))
                    out_words[word_index] = kept | (first << shift)
                    out_words[word_index + 1] = (first >> back) | (second << shift)
                    out_words[word_index + 2] = second >> back
            elif offset == 0:
                for w in range(n_words):
                    out_words[word_index + w] = name_words[gene, w]
            else:
                shift = np.uint64(offset * 8)
                back = np.uint64(64 - offset * 8)
                carry = out_words[word_index] & ((np.uint64(1) << shift) - np.uint64(1))
                for w in range(n_words):
                    word = name_words[gene, w]
                    out_words[word_index + w] = carry | (word << shift)
                    carry = word >> back
                out_words[word_index + n_words] = carry
            position += length + 1


@njit(cache=True, nogil=True)
def extract_genes(sorted_keys, rows, counts, offsets, genes, gene_bits):
    """Gene indices of each row in key order into ``genes[offsets[row]:offsets[row + 1]]``."""
    gene_mask = (np.uint64(1) << np.uint64(gene_bits)) - np.uint64(1)
    for i in range(rows.size):
        row = rows[i]
        start = offsets[row]
        for j in range(counts[row]):
            genes[start + j] = np.int32((~sorted_keys[i, j]) & gene_mask)
