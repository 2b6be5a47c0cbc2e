"""A screen's cells for training and evaluation: the train/val/test split (``split_screen``), each
perturbed cell paired with control cells of its batch (``pair_with_controls``, ``control_pairs``),
synthetic knockdown pairs made of control cells (``synthetic_knockdown_pairs``) and the cells'
top-k sentences by name (``top_k_sentences``)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.compute as pc
from datasets import Dataset

from c2s_kedro.core.errors import C2SValueError
from c2s_kedro.core.data.screen import ScreenColumns, perturbation_label, perturbation_targets
from c2s_kedro.core.data.splitting import split_names
from c2s_kedro.core.sentences.conversion import has_label

logger = logging.getLogger(__name__)

# Control cells of a part (train, test) below which its pairs reuse a handful of control cells: warned
FEW_CONTROLS = 20


def control_pairs(
    obs: pd.DataFrame, split: dict[str, Any], part: str, columns: ScreenColumns, seed: int, controls_per_cell: int = 1,
    include_control_pairs: bool = True,
) -> pd.DataFrame:
    """The pairs of a part of the split: each perturbed cell with controls of its batch and, in the
    train and val parts, control -> control pairs labelled with the control label (they teach the model
    that "no perturbation" means "the same state")."""
    controls = split[f"control_{'test' if part == 'test_seen' else part}"]  # both test sets pair with the test controls
    pairs = pair_with_controls(obs, split[part], controls, columns, seed=seed, controls_per_cell=controls_per_cell)
    if part in ("train", "val") and include_control_pairs:
        pairs = pd.concat([pairs, pair_with_controls(obs, controls, controls, columns, seed=seed + 1)], ignore_index=True)
    return pairs


def knockdown_drop_share(obs: pd.DataFrame, split: dict[str, Any], columns: ScreenColumns, sentences: dict[str, str]) -> float:
    """How often a knockdown takes its target out of a top-k sentence, measured on the training
    cells: 1 - (share of perturbed cells whose sentence holds their target) / (share of control
    cells whose sentence holds it), pooled over the targets of the training perturbations (each
    target of a combination) that are genes of the sentences (0 when none is). CRISPRi on the
    default screen: about 0.97."""
    labels = obs[columns.perturbation].astype(str)
    perturbed = pd.Index(split["train"])
    controls = [set(sentences[c].split()) for c in split["control_train"]]
    held, expected = 0.0, 0.0
    for name, cells in pd.Series(perturbed, index=perturbed).groupby(labels.loc[perturbed].to_numpy()):
        for target in perturbation_targets(name, columns):
            in_controls = float(np.mean([target in genes for genes in controls])) if controls else 0.0
            if in_controls == 0.0:
                continue  # not a gene of the sentences, or never in a control's top k: nothing to measure
            held += sum(target in sentences[c].split() for c in cells)
            expected += in_controls * len(cells)
    return float(np.clip(1.0 - held / expected, 0.0, 1.0)) if expected else 0.0


def synthetic_knockdown_pairs(
    obs: pd.DataFrame, controls: Sequence[str], sentences: dict[str, str], columns: ScreenColumns, per_control: int,
    drop_share: float, seed: int = 0, same_cell: bool = False,
) -> Dataset:
    """Synthetic CRISPRi pairs: each control cell paired ``per_control`` times (with itself when
    ``same_cell``, else with another control of its batch by ``pair_with_controls``, as a real
    pair) with a target; the response is that cell's sentence with the target taken out when it
    holds it (with probability ``drop_share``, the screen's own rate; otherwise left as it is).
    Many targets with a few cells each, so that a model learns to knock down whatever gene is named
    rather than the few targets of the screen. Columns as ``paired_sentences``.

    The target is drawn independently of the response cell, as a guide is: from the genes of the
    ``controls``' sentences, each as often as those sentences hold it. Drawn from the response
    cell's own genes it would tell the model that the cell expressed the target highly, so that
    naming a gene would raise its co-expressed genes: the opposite of a knockdown's effect."""
    if per_control < 0:
        raise C2SValueError(f"synthetic pairs per control cell must be 0 or more, got {per_control}")
    rng = np.random.default_rng(seed)
    if same_cell:  # the control cell itself, knocked down: its sentence is the answer but for the target
        cells = [str(c) for c in controls for _ in range(per_control)]
        pairs = pd.DataFrame({"control_cell": cells, "perturbed_cell": cells})
    else:
        pairs = pd.concat([pair_with_controls(obs, controls, controls, columns, seed=seed + k) for k in range(per_control)],
                          ignore_index=True)
    rows: dict[str, list[str]] = {key: [] for key in ("perturbation", "control_cell", "perturbed_cell", "control_sentence",
                                                       "perturbed_sentence")}
    pool = pd.Series([gene for cell in controls for gene in set(sentences[str(cell)].split())]).value_counts()
    if pool.empty:
        raise C2SValueError("synthetic pairs need control cells with genes in their sentences; none has any")
    names = rng.choice(pool.index.to_numpy(), size=len(pairs), p=(pool / pool.sum()).to_numpy())
    for control, response, name in zip(pairs["control_cell"], pairs["perturbed_cell"], names):
        genes = sentences[response].split()
        if not genes:
            continue
        if name in genes and rng.random() < drop_share:
            genes = [gene for gene in genes if gene != name]
        rows["perturbation"].append(str(name))
        rows["control_cell"].append(str(control))
        rows["perturbed_cell"].append(str(response))
        rows["control_sentence"].append(sentences[control])
        rows["perturbed_sentence"].append(" ".join(genes))
    logger.info("%d synthetic knockdown pairs (%d targets; target dropped with probability %.2f)",
                len(rows["perturbation"]), len(set(rows["perturbation"])), drop_share)
    return Dataset.from_dict(rows)


def top_k_sentences(sentences: Dataset, top_k_genes: int | None, batch_size: int = 8192) -> dict[str, str]:
    """Each cell's sentence cut to its first ``top_k_genes`` genes (None: whole), by cell name.
    Prompts never use more (``PerturbationPromptFormatter`` cuts both sentences there), and a
    screen's whole sentences as Python strings are GBs: the cut runs in Arrow, a batch at a time."""
    table = sentences.select_columns(["cell_name", "cell_sentence"]).with_format("arrow")
    lookup: dict[str, str] = {}
    for start in range(0, table.num_rows, batch_size):
        batch = table[start : start + batch_size]
        text = pc.fill_null(batch.column("cell_sentence"), "")
        if top_k_genes is not None:
            text = pc.binary_join(pc.list_slice(pc.split_pattern(text, " "), 0, top_k_genes), " ")
        lookup.update(zip(batch.column("cell_name").to_pylist(), text.to_pylist()))
    return lookup


def pair_with_controls(
    obs: pd.DataFrame, perturbed: Sequence[str], controls: Sequence[str], columns: ScreenColumns, seed: int = 0,
    controls_per_cell: int = 1,
) -> pd.DataFrame:
    """Pair each perturbed cell with ``controls_per_cell`` control cells drawn at random (seeded),
    from the same batch when ``columns.batch`` is set.

    A perturbed cell whose batch has no control in ``controls`` is paired with a control from any
    batch, and so is a cell without a batch (``has_label``; its ``batch`` written empty); such pairs
    are counted in the log and flagged in the ``same_batch`` column. Returns one
    row per pair: ``perturbed_cell``, ``control_cell``, ``perturbation``, ``batch``, ``same_batch``.
    """
    if controls_per_cell < 1:
        raise C2SValueError(f"controls_per_cell must be at least 1, got {controls_per_cell}")
    controls = pd.Index(controls)
    if len(controls) == 0:
        raise C2SValueError("no control cell to pair with: the control part of the split is empty")
    rng = np.random.default_rng(seed)
    perturbed = pd.Index(perturbed)
    if columns.batch is not None:
        batch_of = obs[columns.batch].astype(str)
        known = pd.Series(has_label(obs[columns.batch]), index=obs.index)
    else:
        batch_of, known = pd.Series("all", index=obs.index), pd.Series(True, index=obs.index)
    batched = controls[known.loc[controls].to_numpy()]  # a control without a batch is in no batch's pool
    by_batch = {batch: np.asarray(names) for batch, names in pd.Series(batched, index=batched).groupby(batch_of.loc[batched].to_numpy())}
    everywhere = np.asarray(controls)
    rows = []
    outside = unbatched = 0
    for cell in perturbed:
        batch = batch_of.loc[cell]
        has_batch = bool(known.loc[cell])
        pool = by_batch.get(batch) if has_batch else None
        same = pool is not None
        if not same:
            pool = everywhere
            outside += has_batch
            unbatched += not has_batch
        for control in rng.choice(pool, size=controls_per_cell, replace=len(pool) < controls_per_cell):
            rows.append((cell, str(control), str(obs.at[cell, columns.perturbation]), batch if has_batch else "", same))
    if outside:
        logger.warning("%d perturbed cells have no control in their batch: paired with controls of other batches", outside)
    if unbatched:  # split_perturbation_screen warns once with the screen's count
        logger.info("%d cells have no batch (.obs['%s'] empty): paired with controls of any batch", unbatched,
                       columns.batch)
    return pd.DataFrame(rows, columns=["perturbed_cell", "control_cell", "perturbation", "batch", "same_batch"])


SPLIT_PARTS = ("train", "val", "test")
# The screen cuts each permutation test first, then val, then train (the atlas: train, val, test),
# so a screen's held-out perturbations stay those it had before the splitters were merged.
_SCREEN_CUT_ORDER = ("test", "val", "train")


def split_screen(
    obs: pd.DataFrame,
    columns: ScreenColumns,
    mode: str = "perturbations",
    fractions: dict[str, float] | None = None,
    seed: int = 0,
    test_perturbations: Sequence[str] | None = None,
    seen_test_fraction: float = 0.0,
) -> dict[str, Any]:
    """Train/val/test parts of a screen's cells, cut by ``core.data.splitting.split_names`` from one
    seeded generator (controls of each batch in sorted batch order, then the perturbations).

    ``mode="perturbations"``: whole perturbations are held out (``test_perturbations`` when given,
    else a random ``fractions["test"]`` of them), so test perturbations are never seen in training.
    ``mode="cells"``: every perturbation's cells are split by ``fractions``, so the test asks for
    held-out cells of perturbations seen in training. Control cells are always split by cells,
    within each batch, so that every part can pair its cells with controls of their own batch.
    Every list is sorted, except the controls: sorted within each batch, batches in sorted order.

    ``seen_test_fraction`` (held-out perturbations only) also holds out that share of each training
    perturbation's cells as ``test_seen``, the second evaluation: held-out cells of perturbations
    seen in training (``test_seen_perturbations``). Both test sets pair with ``control_test``.
    """
    fractions = dict(fractions or {"train": 0.8, "val": 0.1, "test": 0.1})
    if mode not in ("perturbations", "cells"):
        raise C2SValueError(f"split mode must be 'perturbations' or 'cells', got '{mode}'")
    if sorted(fractions) != sorted(SPLIT_PARTS):
        raise C2SValueError(f"split fractions must name exactly train, val and test; got {fractions}")
    fractions = {part: float(fractions[part]) for part in SPLIT_PARTS}
    if isinstance(seen_test_fraction, bool) or not 0.0 <= float(seen_test_fraction) < 1.0:
        raise C2SValueError(f"seen_test_fraction must be at least 0 and below 1, got {seen_test_fraction!r}")
    if seen_test_fraction and mode != "perturbations":
        raise C2SValueError("seen_test_fraction holds out cells of seen perturbations beside held-out perturbations: it needs "
                         "mode 'perturbations' (mode 'cells' already tests held-out cells of seen perturbations); set it to 0")
    cut = {part: fractions[part] for part in _SCREEN_CUT_ORDER}
    labels = obs[columns.perturbation].astype(str)
    rng = np.random.default_rng(seed)
    is_control = (labels == columns.control_label).to_numpy()
    control_obs = obs[is_control]
    control_parts: dict[str, list[str]] = {part: [] for part in SPLIT_PARTS}
    batches = control_obs[columns.batch].astype(str) if columns.batch is not None else pd.Series("all", index=control_obs.index)
    for _, cells in control_obs.groupby(batches.to_numpy(), sort=True):  # every batch keeps controls in every part
        for part, names in split_names(cells.index, cut, rng).items():
            control_parts[part] += sorted(names)
    names = sorted(labels[~is_control].unique())
    parts: dict[str, list[str]] = {part: [] for part in SPLIT_PARTS}
    if mode == "perturbations":
        if test_perturbations:
            test_perturbations = sorted({perturbation_label(name, columns) for name in test_perturbations})
            unknown = sorted(set(test_perturbations) - set(names))
            if unknown:
                raise C2SValueError(f"test_perturbations {unknown} are not perturbations of the screen")
            rest = [n for n in names if n not in set(test_perturbations)]
            val = min(1.0, fractions["val"] / max(1e-9, 1.0 - fractions["test"]))  # of the perturbations not held out
            chosen = split_names(rest, {"val": val, "train": 1.0 - val}, rng)
            chosen["test"] = sorted(test_perturbations)
        else:
            if len(names) < 3:
                raise C2SValueError(
                    f"holding out perturbations needs at least 3 of them (train, val, test); the screen has {len(names)}. "
                    "Hold out cells instead (mode 'cells')."
                )
            chosen = split_names(names, cut, rng)
        for part in parts:
            keep = labels.isin(chosen[part]).to_numpy() & ~is_control
            parts[part] = sorted(obs.index[keep])
        perturbations = {part: sorted(chosen[part]) for part in SPLIT_PARTS}
        if seen_test_fraction:
            seen = {"test_seen": seen_test_fraction, "train": 1.0 - seen_test_fraction}
            train, held = [], []
            for name in perturbations["train"]:
                cells = split_names(obs.index[(labels == name).to_numpy()], seen, rng)
                train += cells["train"]
                held += cells["test_seen"]
            parts["train"], parts["test_seen"] = sorted(train), sorted(held)
            perturbations["test_seen"] = sorted(labels.loc[held].unique())
    else:
        for name in names:
            cells = split_names(obs.index[(labels == name).to_numpy()], cut, rng)
            for part in parts:
                parts[part] += cells[part]
        perturbations = {part: sorted(labels.loc[parts[part]].unique()) for part in parts}
    parts = {part: sorted(cells) for part, cells in parts.items()}
    if not parts["test"] or not parts["train"]:
        raise C2SValueError("the split left no training or no test cells; use more cells or other fractions")
    for part in ("train", "test"):
        if parts[part] and len(control_parts[part]) < FEW_CONTROLS:
            logger.warning(
                "only %d %s control cells (fewer than %d) for %d %s perturbed cells: their pairs reuse these few controls, "
                "so a prediction starts from a handful of control states. The screen has %d control cells; use a screen "
                "with more, or raise split.fractions.%s", len(control_parts[part]), part, FEW_CONTROLS, len(parts[part]),
                part, int(is_control.sum()), part,
            )
    if seen_test_fraction and not parts["test_seen"]:
        raise C2SValueError(f"seen_test_fraction {seen_test_fraction} holds out no cell of the seen perturbations (too few "
                         "cells each); raise it, or set it to 0")
    return {
        "mode": mode,
        "seed": seed,
        "fractions": fractions,
        **({"seen_test_fraction": float(seen_test_fraction)} if seen_test_fraction else {}),
        **parts,
        **{f"control_{part}": cells for part, cells in control_parts.items()},
        **{f"{part}_perturbations": list(values) for part, values in perturbations.items()},
    }
