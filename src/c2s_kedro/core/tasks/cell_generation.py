"""Cell generation: sampled cell sentences per cell type, their expression, and how they compare
with real cells of the same types."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score

from c2s_kedro.core.errors import C2SKeyError, C2SValueError
from c2s_kedro.core import plotting
from c2s_kedro.core.data.preprocessing import neighbors_umap
from c2s_kedro.core.models.constraints import GeneVocabularyConstraint, postprocess_sentence
from c2s_kedro.core.models.inference import generate_texts
from c2s_kedro.core.models.loading import LanguageModel
from c2s_kedro.core.sentences.conversion import has_label
from c2s_kedro.core.sentences.rank_fit import RankFit, reconstruct_expression
from c2s_kedro.core.tasks.evaluation import report_scored_cells

logger = logging.getLogger(__name__)
GENERATED_STATS = ["n_genes", "n_non_genes_dropped", "n_repeats_merged"]
NO_LABEL = "(no label)"  # how real cells without a label show in the figures; they are in no score


def generate_cells(
    language_model: LanguageModel,
    prompts: Sequence[str],
    cell_types: Sequence[str],
    genes: Sequence[str],
    max_new_tokens: int,
    constrained: bool = True,
    batch_size: int = 16,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    guidance_scale: float = 1.0,
    unconditional_prompts: Sequence[str] | None = None,
) -> pd.DataFrame:
    """One sampled cell sentence per prompt: with ``constrained`` only genes of ``genes``, each at
    most once; otherwise free text, cleaned afterwards (non-genes dropped, repeats merged, both
    counted). ``guidance_scale`` > 1: classifier-free guidance towards the prompt against
    ``unconditional_prompts`` (e.g. the prompts without their cell type; ``inference.generate_texts``). Rows ``generated_<i>``: ``cell_type``, ``cell_sentence``, ``raw_text`` and the counts
    ``n_genes``, ``n_non_genes_dropped``, ``n_repeats_merged``."""
    genes = list(genes)
    factory = (lambda: GeneVocabularyConstraint(language_model.tokenizer, genes)) if constrained else None
    texts = generate_texts(
        language_model, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, do_sample=True,
        temperature=temperature, top_k=top_k, seed=seed, logits_processor_factory=factory, guidance_scale=guidance_scale,
        unconditional_prompts=unconditional_prompts,
    )
    known = set(genes)
    rows = []
    for text, cell_type in zip(texts, cell_types):
        sentence, n_unknown, n_repeats = postprocess_sentence(text, known)
        rows.append({"cell_type": cell_type, "cell_sentence": sentence, "raw_text": text,
                     "n_genes": len(sentence.split()), "n_non_genes_dropped": n_unknown, "n_repeats_merged": n_repeats})
    table = pd.DataFrame(rows)
    table.index = [f"generated_{i}" for i in range(len(table))]
    return table


def reconstruct_generated_cells(generated_cells: pd.DataFrame, var_names: Sequence[str], rank_fit: RankFit) -> ad.AnnData:
    """Expression of the generated cells (cells x ``var_names``) from their genes' ranks, with
    ``cell_type`` and the generation counts in ``obs``."""
    matrix, _ = reconstruct_expression(generated_cells["cell_sentence"].tolist(), var_names, rank_fit)
    return ad.AnnData(X=matrix, obs=generated_cells[["cell_type", *GENERATED_STATS]].copy(), var=pd.DataFrame(index=list(var_names)))


def real_cells_as_generated(
    sentences: Sequence[str | None], cell_types: Sequence[str], names: Sequence[str], genes_requested: Mapping[str, int],
    var_names: Sequence[str], rank_fit: RankFit,
) -> ad.AnnData:
    """Real cells in the generated cells' representation: each cell sentence cut to the number of
    genes generation asks for its type (``genes_requested``: type -> genes), turned back into
    expression with ``rank_fit`` (cells ``names`` x ``var_names``, ``obs['cell_type']``). What a
    classifier of real cells recognises in them is the most it can recognise in generated cells of
    that length. Cells of a type generation does not ask for, or without a type (``has_label``), are
    left out."""
    table = pd.DataFrame({"sentence": list(sentences), "cell_type": [str(t) for t in cell_types]}, index=list(names))
    table = table[has_label(list(cell_types))]
    asked = table["cell_type"].isin(list(genes_requested)).to_numpy()
    if not asked.all():
        logger.info("%d real cells of types generation does not ask for are not rebuilt: %s",
                    int((~asked).sum()), sorted(set(table.loc[~asked, "cell_type"])))
    table = table[asked]
    kept = [int(genes_requested[cell_type]) for cell_type in table["cell_type"]]
    matrix, _ = reconstruct_expression(table["sentence"].fillna("").tolist(), var_names, rank_fit, top_k=kept)
    return ad.AnnData(X=matrix, obs=table[["cell_type"]].copy(), var=pd.DataFrame(index=list(var_names)))


@dataclass(frozen=True)
class GenerationComparison:
    """What the comparison figures show: per-type mean expression of real and generated cells, and
    both in one UMAP (``coordinates``: the real cells first)."""

    types: list[str]
    genes: list[str]
    real_means: np.ndarray
    generated_means: np.ndarray
    coordinates: np.ndarray
    real_labels: np.ndarray
    generated_labels: np.ndarray

    @property
    def origin(self) -> np.ndarray:
        return np.array(["real"] * len(self.real_labels) + ["generated"] * len(self.generated_labels))


def _type_means(adata: ad.AnnData, labels: np.ndarray, types: Sequence[str]) -> np.ndarray:
    """Mean expression per type (rows in ``types`` order; NaN for a type without cells), with
    ``sc.get.aggregate`` on the (sparse) matrix."""
    grouped = ad.AnnData(X=adata.X, obs=pd.DataFrame({"group": pd.Categorical(labels)}, index=adata.obs_names))
    means = sc.get.aggregate(grouped, by="group", func="mean")
    table = pd.DataFrame(np.asarray(means.layers["mean"], dtype=np.float64), index=means.obs_names.astype(str))
    return table.reindex(list(types)).to_numpy()


def compare_generated_with_real(
    real: ad.AnnData,
    generated: ad.AnnData,
    generated_cells: pd.DataFrame,
    label_key: str,
    seed: int = 0,
    n_comps: int = 30,
    n_neighbors: int = 15,
    train_cells: Sequence[str] | None = None,
    reconstructed_real: ad.AnnData | None = None,
) -> tuple[dict[str, float], GenerationComparison]:
    """How close generated cells (``obs['cell_type']``) are to the real cells of their types
    (``obs[label_key]``), both log-normalized on the same genes.

    Metrics: counts of ``generated_cells`` (genes per cell, share of non-gene words), per-type
    correlation of mean expression, the accuracy on the generated cells of a logistic regression
    trained on the real cells' types (the ``train_cells``; None: all real cells), and the
    cross-validated accuracy of one telling real from generated (0.5: indistinguishable). With
    ``reconstructed_real`` (real cells not among the training cells, in the generated cells'
    representation: ``real_cells_as_generated``), the same classifier's accuracy on them,
    ``real_classifier_accuracy_on_reconstructed_real``: the ceiling of the accuracy on generated
    cells. Real cells without a label (``has_label``) are counted (``n_real_cells_without_label``)
    and left out of the type classifier and the per-type means; they stay in the PCA, the UMAP and
    the real-vs-generated classifier, which read no label. The comparison holds per-type means and a
    UMAP of both: PCA fitted on the real cells, the generated cells projected into it, then the one
    kNN -> UMAP step on that representation.
    """
    if label_key not in real.obs.columns:
        raise C2SKeyError(f"obs column '{label_key}' not found in the real cells; available: {', '.join(map(str, real.obs.columns))}.")
    if list(real.var_names) != list(generated.var_names):
        raise C2SValueError("real and generated cells must have the same genes in the same order")
    labelled = has_label(real.obs[label_key])
    real_labels = np.where(labelled, real.obs[label_key].astype(str).to_numpy(), NO_LABEL)
    fake_labels = generated.obs["cell_type"].astype(str).to_numpy()
    types = sorted(set(fake_labels))
    real_means, fake_means = _type_means(real, real_labels, types), _type_means(generated, fake_labels, types)
    correlations = [float(np.corrcoef(r, f)[0, 1]) for r, f in zip(real_means, fake_means)]
    # the classifiers and the PCA read the sparse rows of both sets, the real cells first (a dense
    # copy of an atlas's test cells x 36,000 genes is GBs)
    both = sp.vstack([sp.csr_matrix(real.X), sp.csr_matrix(generated.X)], format="csr")
    n_real = real.n_obs
    fitted = np.ones(n_real, dtype=bool) if train_cells is None else real.obs_names.isin(list(train_cells))
    if not fitted.any():
        raise C2SValueError("none of the train cells is among the real cells: the split and the data are not of the same cells")
    fitted &= labelled
    if not fitted.any():
        raise C2SValueError(f"no train cell has a '{label_key}' label: there is no classifier of real types to recognise generated cells with")
    type_classifier = LogisticRegression(max_iter=2000).fit(both[:n_real][fitted], real_labels[fitted])
    origin = np.array(["real"] * n_real + ["generated"] * generated.n_obs)
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    n_words = generated_cells["n_genes"].sum() + generated_cells["n_non_genes_dropped"].sum()
    metrics = {
        "n_real_cells_without_label": float((~labelled).sum()),
        "n_generated_cells": float(generated.n_obs),
        "mean_genes_per_generated_cell": float(generated_cells["n_genes"].mean()),
        "share_non_gene_words": float(generated_cells["n_non_genes_dropped"].sum() / max(1, n_words)),
        "mean_per_type_correlation_of_mean_expression": float(np.nanmean(correlations)),
        "real_classifier_accuracy_on_generated_types": float((type_classifier.predict(both[n_real:]) == fake_labels).mean()),
        "real_vs_generated_classifier_accuracy": float(cross_val_score(LogisticRegression(max_iter=2000), both, origin, cv=folds).mean()),
    }
    if reconstructed_real is not None:
        metrics.update(_reconstructed_real_accuracy(type_classifier, reconstructed_real, real, fitted))
    for cell_type, value in zip(types, correlations):
        metrics[f"mean_expression_correlation[{cell_type}]"] = value
    # ARPACK: scikit-learn's PCA solver for sparse input (centring implicitly)
    pca = PCA(n_components=min(n_comps, both.shape[1] - 1, n_real - 1), svd_solver="arpack", random_state=seed).fit(both[:n_real])
    joint = ad.AnnData(obs=pd.DataFrame(index=[f"cell_{i}" for i in range(both.shape[0])]), obsm={"X_pca_real": pca.transform(both)})
    del both
    neighbors_umap(joint, "X_pca_real", n_neighbors=n_neighbors, seed=seed)
    logger.info(
        "generated cells: mean per-type correlation %.2f, real-vs-generated classifier accuracy %.2f, "
        "real-cell classifier names the asked type for %.2f (on real test cells rebuilt the same way: %s)",
        metrics["mean_per_type_correlation_of_mean_expression"], metrics["real_vs_generated_classifier_accuracy"],
        metrics["real_classifier_accuracy_on_generated_types"],
        f"{metrics['real_classifier_accuracy_on_reconstructed_real']:.2f}" if reconstructed_real is not None else "not measured",
    )
    comparison = GenerationComparison(
        types=types, genes=list(real.var_names), real_means=real_means, generated_means=fake_means,
        coordinates=np.asarray(joint.obsm["X_umap"]), real_labels=real_labels, generated_labels=fake_labels,
    )
    return metrics, comparison


def _reconstructed_real_accuracy(classifier: LogisticRegression, reconstructed: ad.AnnData, real: ad.AnnData,
                                 fitted: np.ndarray) -> dict[str, float]:
    """The classifier of real types on real cells in the generated cells' representation."""
    if list(reconstructed.var_names) != list(real.var_names):
        raise C2SValueError("the rebuilt real cells must have the real cells' genes in the same order")
    seen = sorted(set(reconstructed.obs_names) & set(real.obs_names[fitted]))
    if seen:
        raise C2SValueError(
            f"{len(seen)} rebuilt real cells (e.g. {', '.join(seen[:3])}) are among the cells the classifier was trained on: "
            "rebuild held-out (test) cells, or the ceiling reads cells the classifier has seen"
        )
    truth = reconstructed.obs["cell_type"].astype(str).to_numpy()
    accuracy = float((classifier.predict(sp.csr_matrix(reconstructed.X)) == truth).mean()) if len(truth) else float("nan")
    return {"real_classifier_accuracy_on_reconstructed_real": accuracy, "n_reconstructed_real_cells": float(len(truth)),
            **report_scored_cells(len(truth), "the real test cells rebuilt as generated cells are")}


def comparison_figures(comparison: GenerationComparison, n_heatmap_genes: int = 40) -> dict[str, plt.Figure]:
    """The UMAP of real and generated cells by cell type and by origin, and the per-type mean
    expression heatmaps side by side."""
    n_real = len(comparison.real_labels)
    return {
        "umap_by_cell_type.png": plotting.umap_side_by_side(
            [("real cells", comparison.coordinates[:n_real]), ("generated cells", comparison.coordinates[n_real:])],
            [pd.Series(comparison.real_labels), pd.Series(comparison.generated_labels)],
            "Real and generated cells in one UMAP (PCA fitted on real cells)",
        ),
        "umap_by_origin.png": plotting.umap_side_by_side(
            [("real and generated", comparison.coordinates)], pd.Series(comparison.origin), "Origin"
        ),
        "mean_expression_heatmap.png": plotting.mean_expression_heatmap(
            comparison.real_means, comparison.generated_means, comparison.types, comparison.genes, n_heatmap_genes
        ),
    }
