"""Cell-sentence conversion throughput: the project's vectorized conversion vs per-cell loops.

Run by hand (not part of the tests); prints one JSON object on stdout:

    python benchmarks/conversion_throughput.py                       # full size
    python benchmarks/conversion_throughput.py --cells 3000 --genes 5000 --genes-per-cell 500 \
        --ref-cells 1000 --backed-cells 20000                        # quick

1. Simulates an atlas (``--cells`` x ``--genes``, about ``--genes-per-cell`` expressed genes per
   cell), normalizes it (``normalize_total``, to the median total) and takes log10(1 + x), as the
   reference package's tutorial does.
2. Times ``cell_sentences_from_adata`` on it in memory (cells/s, RSS growth).
3. Times two per-cell Python loops on the first ``--ref-cells`` cells of the same matrix: one
   written the way the reference package converts (sklearn ``shuffle``, stable argsort of the
   negated values, a list comprehension over gene names, ``" ".join``), and a tuned one (numpy
   permutation, object-array indexing, join).
4. Checks that the project's sentences equal the reference loop's up to the order of tied
   values: values along each sentence never increase and each distinct value holds the same genes.
5. Writes a ``--backed-cells`` x ``--genes`` h5ad chunk by chunk and converts it, opened backed,
   in a separate process so that its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger("conversion_throughput")

SCRATCH_NAMES = ("in_memory_sentences", "backed_sentences", "backed_atlas.h5ad")
LABEL_COLUMNS = ("cell_type", "tissue", "batch_condition", "organism", "sex")


class PeakRSS:
    """Samples this process's resident set size in a thread; ``peak`` in bytes."""

    def __init__(self, interval: float = 0.01):
        import psutil

        self._process = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.start_rss = self._process.memory_info().rss
        self.peak = self.start_rss
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(self._interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def log10_normalize(adata) -> None:
    """normalize_total then log10(1 + x) on the stored values (float32, CSR stays sparse)."""
    import scanpy as sc

    sc.pp.normalize_total(adata)
    adata.X.data = np.log10(1.0 + adata.X.data, dtype=np.float32)


def reference_loop(matrix, gene_names: list[str], n_cells: int, seed: int) -> list[str]:
    """Per-cell conversion written the way the reference package does it."""
    from sklearn.utils import shuffle

    random_state = np.random.RandomState(seed)
    sentences = []
    for cell in range(n_cells):
        start, end = matrix.indptr[cell], matrix.indptr[cell + 1]
        columns, values = shuffle(
            matrix.indices[start:end], matrix.data[start:end], random_state=random_state
        )
        order = np.argsort(-values, kind="stable")
        sentences.append(" ".join([gene_names[column] for column in columns[order]]))
    return sentences


def tuned_loop(matrix, gene_names: np.ndarray, n_cells: int, seed: int) -> list[str]:
    """Per-cell conversion with numpy only: permutation, stable argsort, object-array take."""
    rng = np.random.default_rng(seed)
    sentences = []
    for cell in range(n_cells):
        start, end = matrix.indptr[cell], matrix.indptr[cell + 1]
        permutation = rng.permutation(end - start)
        columns = matrix.indices[start:end][permutation]
        values = matrix.data[start:end][permutation]
        sentences.append(" ".join(gene_names[columns[np.argsort(-values, kind="stable")]]))
    return sentences


def gene_indices(sentence: str, name_to_index: dict[str, int]) -> np.ndarray:
    words = sentence.split(" ") if sentence else []
    return np.array([name_to_index[word] for word in words], dtype=np.int64)


def compare_up_to_ties(matrix, name_to_index: dict[str, int], project, reference) -> dict:
    """Sentences agree if each is non-increasing in value and both hold the same genes at
    every distinct value."""
    mismatches, non_monotone, identical, cells_with_ties = 0, 0, 0, 0
    dense_row = np.zeros(matrix.shape[1], dtype=matrix.dtype)
    for cell, (ours, theirs) in enumerate(zip(project, reference)):
        start, end = matrix.indptr[cell], matrix.indptr[cell + 1]
        dense_row[matrix.indices[start:end]] = matrix.data[start:end]
        identical += ours == theirs
        ours_idx = gene_indices(ours, name_to_index)
        theirs_idx = gene_indices(theirs, name_to_index)
        ours_values, theirs_values = dense_row[ours_idx], dense_row[theirs_idx]
        monotone = bool(np.all(np.diff(ours_values) <= 0) and np.all(np.diff(theirs_values) <= 0))
        non_monotone += not monotone
        same = ours_idx.size == theirs_idx.size == end - start
        if same:
            # Canonical form: by value descending, ties by gene index; equal iff same gene
            # sets at every distinct value.
            canonical_ours = ours_idx[np.lexsort((ours_idx, -ours_values))]
            canonical_theirs = theirs_idx[np.lexsort((theirs_idx, -theirs_values))]
            same = bool(np.array_equal(canonical_ours, canonical_theirs))
        mismatches += not (same and monotone)
        cells_with_ties += np.unique(ours_values).size < ours_values.size
        dense_row[matrix.indices[start:end]] = 0
    return {
        "cells_checked": len(project),
        "mismatches": int(mismatches),
        "non_monotone_sentences": int(non_monotone),
        "identical_strings": int(identical),
        "cells_with_tied_values": int(cells_with_ties),
    }


def in_memory_benchmark(args, out_dir: Path) -> dict:
    import pyarrow.compute as pc

    from c2s_kedro.core.sentences.conversion import cell_sentences_from_adata, vocabulary_names
    from c2s_kedro.core.simulate.atlas import simulate_atlas

    started = time.perf_counter()
    adata = simulate_atlas(
        n_cells=args.cells,
        n_genes=args.genes,
        expressed_genes_per_cell=args.genes_per_cell,
        seed=args.seed,
    )
    simulate_seconds = time.perf_counter() - started
    log10_normalize(adata)
    matrix = adata.X
    expressed = np.diff(matrix.indptr)
    logger.info("simulated %s in %.1f s", adata.shape, simulate_seconds)

    cache_dir = out_dir / SCRATCH_NAMES[0]

    def clear_scratch():
        # Outside the timed region: remove the previous run's files and flush dirty pages, so a
        # run does not compete with the write-back of the one before.
        shutil.rmtree(cache_dir, ignore_errors=True)
        os.sync()

    def convert(cells):
        return cell_sentences_from_adata(
            cells,
            label_columns=LABEL_COLUMNS,
            seed=args.seed,
            chunk_size=args.chunk_size,
            cache_dir=cache_dir,
        )

    convert(adata[: min(1024, adata.n_obs)].copy())  # warm-up: lazy imports, Arrow kernels
    project_runs = []
    with PeakRSS() as rss:
        for _ in range(args.repeats):
            result = None
            clear_scratch()
            started = time.perf_counter()
            result = convert(adata)
            project_runs.append(time.perf_counter() - started)
    project_seconds = float(np.median(project_runs))
    sentences = result.sentences

    # Every cell's sentence has exactly its expressed genes; the vocabulary counts cells.
    words = pc.add(pc.count_substring(sentences.data.column("cell_sentence"), " "), 1)
    words_match = bool(np.array_equal(words.to_numpy(), np.maximum(expressed, 1)))
    vocabulary_match = list(result.vocabulary.values()) == np.bincount(
        matrix.indices, minlength=matrix.shape[1]
    ).tolist()

    names = vocabulary_names(adata.var_names)
    n_ref = min(args.ref_cells, adata.n_obs)
    name_list, name_objects = names.tolist(), names.astype(object)
    reference_runs, tuned_runs = [], []
    for _ in range(args.repeats):
        started = time.perf_counter()
        reference = reference_loop(matrix, name_list, n_ref, args.seed)
        reference_runs.append(time.perf_counter() - started)
        started = time.perf_counter()
        tuned_loop(matrix, name_objects, n_ref, args.seed)
        tuned_runs.append(time.perf_counter() - started)
    reference_seconds = float(np.median(reference_runs))
    tuned_seconds = float(np.median(tuned_runs))

    project_sentences = sentences.select(range(n_ref))["cell_sentence"]
    name_to_index = {name: index for index, name in enumerate(name_list)}
    check = compare_up_to_ties(matrix, name_to_index, project_sentences, reference)
    check["word_counts_match_expressed_genes_all_cells"] = words_match
    check["vocabulary_matches_cell_counts"] = vocabulary_match

    project_rate = adata.n_obs / project_seconds
    reference_rate = n_ref / reference_seconds
    tuned_rate = n_ref / tuned_seconds
    return {
        "matrix": {
            "cells": adata.n_obs,
            "genes": adata.n_vars,
            "stored_values": int(matrix.nnz),
            "expressed_genes_per_cell_mean": round(float(expressed.mean()), 1),
            "expressed_genes_per_cell_p5_p50_p95": np.percentile(expressed, [5, 50, 95]).tolist(),
            "values": "normalize_total then log10(1 + x), float32",
            "simulate_seconds": round(simulate_seconds, 2),
        },
        "project": {
            "cells": adata.n_obs,
            "seconds_median": round(project_seconds, 2),
            "seconds_runs": [round(t, 2) for t in project_runs],
            "cells_per_s": round(project_rate, 1),
            "chunk_size": args.chunk_size,
            "rss_before_mib": round(rss.start_rss / 2**20, 1),
            "peak_rss_mib": round(rss.peak / 2**20, 1),
            "peak_rss_increase_mib": round((rss.peak - rss.start_rss) / 2**20, 1),
        },
        "reference_loop": {
            "cells": n_ref,
            "seconds_median": round(reference_seconds, 2),
            "seconds_runs": [round(t, 2) for t in reference_runs],
            "cells_per_s": round(reference_rate, 1),
        },
        "tuned_loop": {
            "cells": n_ref,
            "seconds_median": round(tuned_seconds, 2),
            "seconds_runs": [round(t, 2) for t in tuned_runs],
            "cells_per_s": round(tuned_rate, 1),
        },
        "speedup_project_vs_reference_loop": round(project_rate / reference_rate, 1),
        "speedup_project_vs_tuned_loop": round(project_rate / tuned_rate, 1),
        "check_vs_reference_loop": check,
    }


def backed_benchmark(args, out_dir: Path) -> dict:
    from c2s_kedro.core.simulate.atlas import write_atlas_h5ad

    genes_per_cell = args.backed_genes_per_cell or args.genes_per_cell
    # float32 value + int32 index per stored value, then about as much again for the sentences.
    needed = args.backed_cells * genes_per_cell * 8 * 2.5
    free = shutil.disk_usage(out_dir).free
    if free < needed:
        raise SystemExit(
            f"{out_dir} has {free / 2**30:.1f} GiB free; the backed benchmark needs about "
            f"{needed / 2**30:.1f} GiB. Lower --backed-cells or --backed-genes-per-cell, or "
            "choose another --out-dir."
        )
    path = out_dir / SCRATCH_NAMES[2]
    started = time.perf_counter()
    write_atlas_h5ad(
        path,
        n_cells=args.backed_cells,
        n_genes=args.genes,
        chunk_size=10_000,
        expressed_genes_per_cell=genes_per_cell,
        seed=args.seed,
    )
    write_seconds = time.perf_counter() - started
    file_bytes = path.stat().st_size
    logger.info("wrote %s (%.1f GiB) in %.0f s", path, file_bytes / 2**30, write_seconds)

    worker_command = [
        sys.executable,
        __file__,
        "--backed-worker",
        str(path),
        "--out-dir",
        str(out_dir / SCRATCH_NAMES[1]),
        "--chunk-size",
        str(args.chunk_size),
        "--seed",
        str(args.seed),
    ]
    # Linux carries the exec'ing process's high-water RSS into the new program's ru_maxrss, so
    # a worker exec'd from this (large) process would report our peak. A shell forks the worker
    # from its own small image instead; "; exit $?" stops the shell from exec'ing it directly.
    worker = subprocess.run(
        ["/bin/sh", "-c", shlex.join(worker_command) + "; exit $?"],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    figures = json.loads(worker.stdout)
    figures.update(
        {
            "genes": args.genes,
            "expressed_genes_per_cell_target": genes_per_cell,
            "values": "raw counts (as written by write_atlas_h5ad)",
            "h5ad_gib": round(file_bytes / 2**30, 2),
            "write_seconds": round(write_seconds, 1),
        }
    )
    return figures


def backed_worker(path: str, args) -> None:
    """Runs in its own process: convert a backed h5ad, print peak RSS and throughput as JSON."""
    import anndata as ad

    from c2s_kedro.core.sentences.conversion import cell_sentences_from_adata

    rss_after_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    adata = ad.read_h5ad(path, backed="r")
    stored_values = int(adata.file["X"]["indices"].shape[0])
    started = time.perf_counter()
    result = cell_sentences_from_adata(
        adata,
        label_columns=LABEL_COLUMNS,
        seed=args.seed,
        chunk_size=args.chunk_size,
        cache_dir=args.out_dir,
    )
    seconds = time.perf_counter() - started
    n_rows = result.sentences.num_rows
    arrow_bytes = sum(f.stat().st_size for f in Path(args.out_dir).glob("*.arrow"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    high_water = next(
        int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")
    )
    json.dump(
        {
            "cells": adata.n_obs,
            "stored_values": stored_values,
            "expressed_genes_per_cell_mean": round(stored_values / adata.n_obs, 1),
            "dataset_rows": n_rows,
            "seconds": round(seconds, 1),
            "cells_per_s": round(adata.n_obs / seconds, 1),
            "peak_rss_kib": int(peak),
            "peak_rss_gib": round(peak / 2**20, 3),
            "vm_hwm_kib": high_water,
            "rss_after_imports_kib": int(rss_after_imports),
            "arrow_gib": round(arrow_bytes / 2**30, 2),
            "chunk_size": args.chunk_size,
        },
        sys.stdout,
    )


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=30_000)
    parser.add_argument("--genes", type=int, default=36_000)
    parser.add_argument("--genes-per-cell", type=int, default=2_000)
    parser.add_argument("--ref-cells", type=int, default=5_000, help="cells for the per-cell loops")
    parser.add_argument(
        "--backed-cells", type=int, default=250_000, help="cells of the backed file (0 skips it)"
    )
    parser.add_argument(
        "--backed-genes-per-cell",
        type=int,
        default=None,
        help="expressed genes per cell in the backed file (default: --genes-per-cell)",
    )
    parser.add_argument("--chunk-size", type=int, default=1024, help="cells per conversion chunk")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=None, help="scratch (default: a temp dir)")
    parser.add_argument("--backed-worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    if args.backed_worker:
        backed_worker(args.backed_worker, args)
        return
    out_dir = Path(args.out_dir or tempfile.mkdtemp(prefix="c2s_conversion_benchmark_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = [out_dir / name for name in SCRATCH_NAMES]
    try:
        report = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "cpu_count": os.cpu_count(),
            "load_average_1m_at_start": round(os.getloadavg()[0], 2),
            "in_memory": in_memory_benchmark(args, out_dir),
        }
        report["backed"] = (
            backed_benchmark(args, out_dir) if args.backed_cells > 0 else "skipped"
        )
    finally:
        # Only what this run wrote goes; a user-chosen --out-dir itself stays.
        for path in scratch:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if args.out_dir is None:
            shutil.rmtree(out_dir, ignore_errors=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
