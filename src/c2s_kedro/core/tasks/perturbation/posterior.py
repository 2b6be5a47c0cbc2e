"""The posterior over a perturbation's response: the model's answers sampled with constrained
decoding (``sample_posterior``; ``sample_test_posterior`` on the test prompts), turned into
expression with the rank fit and summarised per perturbation and temperature
(``posterior_expression``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
from datasets import Dataset
from tqdm.auto import tqdm

from c2s_kedro.core.errors import C2SKeyError, C2SValueError
from c2s_kedro.core.data.screen import ScreenColumns, perturbation_label
from c2s_kedro.core.models.constraints import GeneVocabularyConstraint, postprocess_sentence
from c2s_kedro.core.models.inference import sample_continuations
from c2s_kedro.core.models.loading import LanguageModel
from c2s_kedro.core.prompts.formatting import ContextTooSmallError, count_tokens
from c2s_kedro.core.sentences.rank_fit import RankFit, reconstruct_expression

logger = logging.getLogger(__name__)

MISSING_GENE_CAVEAT = (
    "A sample is a cell sentence cut to the genes the model wrote (at most top_k_genes); a gene "
    "absent from a sample is counted as expression 0 in that sample, although in the cell it may "
    "be expressed below the top k. Means are therefore biased towards 0 for genes outside the "
    "typical top k, and variances include the present/absent spread."
)


def sample_posterior(
    language_model: LanguageModel,
    prompts: Sequence[str],
    genes: Sequence[str],
    n_samples: int = 100,
    temperatures: Sequence[float] = (0.7, 1.0, 1.3),
    max_new_tokens: int = 202,
    seed: int = 0,
    batch_size: int | None = None,
    min_genes: int | None = None,
) -> pd.DataFrame:
    """``n_samples`` responses per prompt at each temperature, with constrained decoding (only
    genes of ``genes``, none twice; with ``min_genes``, at least that many before the end) and
    one pass over each prompt shared by all its samples.

    Refuses (before sampling anything) a prompt whose length plus ``max_new_tokens`` exceeds the
    model's context. Returns one row per sample: ``prompt_index``, ``temperature``,
    ``sample_index``, ``sentence`` (genes only), ``n_genes``, ``n_unknown`` and ``n_repeated``
    (words post-processing would have removed; 0 under the constraint).
    """
    if n_samples < 1:
        raise C2SValueError(f"n_samples must be at least 1, got {n_samples}")
    if not temperatures or any(t <= 0 for t in temperatures):
        raise C2SValueError(f"temperatures must be positive, got {list(temperatures)}")
    tokenizer = language_model.tokenizer
    lengths = count_tokens(tokenizer, prompts)
    context = language_model.context_length
    too_long = np.flatnonzero(lengths + max_new_tokens > context)
    if too_long.size:
        first = int(too_long[0])
        raise ContextTooSmallError(
            f"prompt {first} has {int(lengths[first])} tokens and {max_new_tokens} new tokens are requested: "
            f"{int(lengths[first]) + max_new_tokens} > the model's context of {context} ({too_long.size} prompts). "
            "Nothing was sampled. Format the prompts with response_budget=max_new_tokens so the control sentence "
            "is shortened to fit, or lower top_k_genes"
        )
    if min_genes is not None:
        constraint = GeneVocabularyConstraint(tokenizer, genes, min_genes=min_genes)
        needed = int(np.ceil(constraint.min_genes * constraint.tokens_per_gene)) + 1  # and EOS
        if needed > max_new_tokens:
            raise C2SValueError(
                f"min_genes={min_genes} needs about {needed} new tokens ({constraint.tokens_per_gene:.2f} per gene and "
                f"EOS) but max_new_tokens is {max_new_tokens}: samples would be cut short. Nothing was sampled. Raise "
                "max_new_tokens or lower min_genes"
            )
    vocabulary = set(genes)
    rows = []
    jobs = [(i, t) for i in range(len(prompts)) for t in temperatures]
    for job, (index, temperature) in enumerate(tqdm(jobs, desc="posterior samples", unit="prompt x temperature")):
        constraint = GeneVocabularyConstraint(tokenizer, genes, min_genes=min_genes)
        texts = sample_continuations(
            language_model, prompts[index], n_samples, max_new_tokens, temperature=temperature,
            seed=seed + job, logits_processor=constraint, batch_size=batch_size,
        )
        for sample, text in enumerate(texts):
            sentence, unknown, repeated = postprocess_sentence(text, vocabulary)
            rows.append((index, float(temperature), sample, sentence, len(sentence.split()), unknown, repeated))
    return pd.DataFrame(rows, columns=["prompt_index", "temperature", "sample_index", "sentence", "n_genes",
                                       "n_unknown", "n_repeated"])


def choose_perturbations(
    available: Sequence[str], which: int | Sequence[str] | None, seed: int = 0, columns: ScreenColumns = ScreenColumns(),
) -> list[str]:
    """The held-out perturbations to sample, sorted: all of ``available`` (``which`` None), that many
    drawn at random (an integer; seeded), or the ones named (a list; matched as the screen's labels
    are written, ``perturbation_label``: upper-cased, combinations by ``columns``' separator)."""
    available = sorted({str(name) for name in available})
    if which is None:
        return available
    if isinstance(which, bool) or not isinstance(which, int | list | tuple):
        raise C2SValueError(f"the perturbations to sample must be null (all), a number or a list of names, got {which!r}")
    if isinstance(which, int):
        if which < 1:
            raise C2SValueError(f"the number of perturbations to sample must be at least 1, got {which}")
        if which >= len(available):
            return available
        # its own stream, so that the prompts drawn for a perturbation do not depend on this choice
        return sorted(np.random.default_rng([seed, 7]).choice(available, size=which, replace=False).tolist())
    names = sorted({perturbation_label(str(name), columns) for name in which})
    unknown = [name for name in names if name not in set(available)]
    if unknown or not names:
        raise C2SValueError(
            f"perturbations {unknown or '[]'} are not among the {len(available)} held-out perturbations with test prompts "
            f"(e.g. {', '.join(available[:5])}); name held-out ones, or give a number or null"
        )
    return names


def choose_posterior_prompts(
    posterior_prompts: Dataset, seed: int = 0, perturbations: int | Sequence[str] | None = None,
    seen_perturbations: int | Sequence[str] | None = None, columns: ScreenColumns = ScreenColumns(),
) -> pd.DataFrame:
    """The rows of the ``posterior`` prompts to sample: the held-out perturbations that
    ``choose_perturbations`` picks with ``perturbations`` (None: every one), the seen ones it picks
    with ``seen_perturbations`` (its own draw), and every control-label row."""
    needed = ["evaluation", "perturbation", "control_cell", "model_input", "n_control_genes", "max_new_tokens"]
    missing = [c for c in needed if c not in posterior_prompts.column_names]
    if missing:
        raise C2SKeyError(f"the posterior prompts lack column(s) {missing}; they have {', '.join(posterior_prompts.column_names)}. "
                       "Rerun perturbation_data so its prompts have a posterior part")
    table = posterior_prompts.select_columns(needed).to_pandas()
    if not (table["evaluation"] == "heldout").any():
        raise C2SValueError("there are no held-out perturbation prompts to sample from")
    keep = table["evaluation"] == "control"
    for evaluation, which, stream in (("heldout", perturbations, seed), ("seen", seen_perturbations, seed + 1)):
        rows = table["evaluation"] == evaluation
        if rows.any():
            keep |= rows & table["perturbation"].isin(choose_perturbations(table.loc[rows, "perturbation"], which, stream,
                                                                           columns))
    return table[keep].reset_index(drop=True)


def sample_test_posterior(
    language_model: LanguageModel,
    posterior_prompts: Dataset,
    genes: Sequence[str],
    n_samples: int = 100,
    temperatures: Sequence[float] = (0.7, 1.0),
    seed: int = 0,
    batch_size: int | None = None,
    perturbations: int | Sequence[str] | None = None,
    seen_perturbations: int | Sequence[str] | None = None,
    min_genes: int | None = None,
    columns: ScreenColumns = ScreenColumns(),
) -> pd.DataFrame:
    """``sample_posterior`` on the ``posterior`` prompts that ``choose_posterior_prompts`` picks
    (held-out perturbations, seen ones, and the control label on the same control cells),
    generating the prompts' ``max_new_tokens`` (at least ``min_genes`` genes each, when set); each
    sample row also names its ``evaluation``, ``perturbation``, ``control_cell``, the prompt's
    ``n_control_genes`` and the run's wall seconds per sample (``seconds_per_sample``)."""
    prompts = choose_posterior_prompts(posterior_prompts, seed, perturbations, seen_perturbations, columns)
    logger.info("sampling %d prompts: %s", len(prompts),
                ", ".join(f"{n} {e}" for e, n in prompts.groupby("evaluation")["perturbation"].nunique().items()))
    started = time.perf_counter()
    samples = sample_posterior(
        language_model, prompts["model_input"].tolist(), list(genes), n_samples=n_samples, temperatures=temperatures,
        max_new_tokens=int(prompts["max_new_tokens"].iloc[0]), seed=seed, batch_size=batch_size, min_genes=min_genes,
    )
    samples = samples.join(prompts[["evaluation", "perturbation", "control_cell", "n_control_genes"]], on="prompt_index")
    samples["seconds_per_sample"] = (time.perf_counter() - started) / max(1, len(samples))
    if samples["n_unknown"].sum() or samples["n_repeated"].sum():
        logger.warning("constrained samples contained %d unknown and %d repeated genes", samples["n_unknown"].sum(),
                       samples["n_repeated"].sum())
    logger.info("%d posterior samples, median %d genes each", len(samples), int(samples["n_genes"].median()))
    return samples


def posterior_statistics(
    expression: sp.spmatrix | np.ndarray, groups: pd.DataFrame
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, np.ndarray]:
    """Per group of samples (rows of ``groups``, e.g. perturbation x temperature, in order of first
    appearance): the mean, the variance (ddof=1; 0 for a single sample) and the share of samples
    in which each gene is present, over the rows of ``expression`` (samples x genes; an absent
    gene is 0), with scanpy's ``sc.get.aggregate`` on the sparse samples.

    Returns the groups (one row each, with ``n_samples``), mean, variance, present share.
    """
    matrix = sp.csr_matrix(expression, dtype=np.float64)  # float64: aggregate's variance keeps its precision
    if matrix.shape[0] != len(groups):
        raise C2SValueError(f"{matrix.shape[0]} samples but {len(groups)} group rows")
    keys = groups.reset_index(drop=True)
    codes, uniques = pd.MultiIndex.from_frame(keys.astype(str)).factorize()
    n_groups = len(uniques)
    by_group = ad.AnnData(matrix, obs=pd.DataFrame({"group": pd.Categorical.from_codes(codes, categories=range(n_groups))},
                                                   index=[str(i) for i in range(len(codes))]))
    aggregated = sc.get.aggregate(by_group, by="group", func=["mean", "var", "count_nonzero"], dof=0)
    counts = np.bincount(codes, minlength=n_groups)
    mean = np.asarray(aggregated.layers["mean"])
    scale = np.where(counts > 1, counts / np.maximum(counts - 1, 1), 0.0)[:, None]  # ddof=1, and 0 for one sample
    variance = np.maximum(np.asarray(aggregated.layers["var"]) * scale, 0.0)
    present = np.asarray(aggregated.layers["count_nonzero"], dtype=np.float64) / counts[:, None]
    first = pd.Series(np.arange(len(codes))).groupby(codes).first().to_numpy()
    table = keys.iloc[first].reset_index(drop=True)
    table["n_samples"] = counts.astype(int)
    return table, mean, variance, present


def posterior_expression(samples: pd.DataFrame, genes: Sequence[str], rank_fit: RankFit) -> tuple[ad.AnnData, ad.AnnData]:
    """The posterior samples as expression and their statistics per perturbation and temperature.

    Each sample's sentence becomes expression with ``rank_fit`` (a gene absent from a sample is 0):
    one row per sample, ``.obs`` the sample's columns (``sentence`` last). The statistics
    (``posterior_statistics``): one row ``<perturbation>@T<temperature>`` per group, the mean in
    ``X``, ``layers["variance"]`` and ``layers["present_share"]``. Both carry the caveat about
    absent genes in ``.uns["caveat"]``; the samples also the rank fit in ``.uns["rank_fit"]``.
    """
    missing = [c for c in ("sentence", "perturbation", "temperature") if c not in samples.columns]
    if missing:
        raise C2SKeyError(f"the posterior samples lack column(s) {missing}; they have {', '.join(map(str, samples.columns))}")
    genes = list(genes)
    sentences = samples["sentence"].fillna("")
    matrix, n_unknown = reconstruct_expression(sentences.tolist(), genes, rank_fit)
    if n_unknown:
        logger.warning("%d words of the samples are not genes of the screen", n_unknown)
    obs = samples.drop(columns=["sentence"]).astype({"temperature": float}).reset_index(drop=True)
    obs.index = [f"sample-{i}" for i in range(len(obs))]
    obs["sentence"] = sentences.to_numpy()
    expression = ad.AnnData(matrix, obs=obs, var=pd.DataFrame(index=genes))
    expression.uns["caveat"] = MISSING_GENE_CAVEAT
    expression.uns["rank_fit"] = rank_fit.to_dict()
    groups, mean, variance, present = posterior_statistics(matrix, obs[["perturbation", "temperature"]])
    groups.index = [f"{p}@T{t}" for p, t in zip(groups["perturbation"], groups["temperature"])]
    statistics = ad.AnnData(mean.astype(np.float32), obs=groups, var=pd.DataFrame(index=genes))
    statistics.layers["variance"] = variance.astype(np.float32)
    statistics.layers["present_share"] = present.astype(np.float32)
    statistics.uns["caveat"] = MISSING_GENE_CAVEAT
    statistics.uns["variance"] = "sample variance over a group's samples (ddof=1), absent genes counted as 0"
    return expression, statistics
