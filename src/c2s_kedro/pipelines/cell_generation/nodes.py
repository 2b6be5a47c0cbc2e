"""Nodes of the cell_generation pipeline."""

from __future__ import annotations

import logging
from typing import Any

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from datasets import Dataset
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score

from c2s_kedro.core import plotting
from c2s_kedro.core.constraints import GeneVocabularyConstraint, postprocess_sentence
from c2s_kedro.core.inference import generate_texts
from c2s_kedro.core.models import LanguageModel
from c2s_kedro.core.prompts import count_tokens, load_templates
from c2s_kedro.core.sentences import RankFit, reconstruct_expression

logger = logging.getLogger(__name__)
SETTINGS = "conf/base/parameters_cell_generation.yml"


def build_generation_prompts(
    cell_sentences: Dataset, data_split: dict[str, Any], finetuned_model: LanguageModel, params: dict[str, Any]
) -> dict[str, Any]:
    """``n_cells_per_type`` cell-type-conditioned prompts per cell type of the train cells, each asking
    for the median number of genes of that type's cells, capped so the answer fits the context."""
    label = params["label_column"]
    if label not in cell_sentences.column_names:
        raise KeyError(
            f"cell_generation.label_column '{label}' is not a column of cell_sentences; available: "
            f"{', '.join(cell_sentences.column_names)}. Set it in {SETTINGS}."
        )
    table = cell_sentences.select_columns(["cell_name", "cell_sentence", label]).to_pandas().set_index("cell_name")
    train = table.loc[data_split["train"]].dropna(subset=[label])
    train_genes = train["cell_sentence"].fillna("").str.split().str.len()
    templates = load_templates("cell_type_generation")
    template = templates.inputs[params.get("template_index", 0)]
    tokenizer, context = finetuned_model.tokenizer, finetuned_model.context_length
    sample = [s for s in train["cell_sentence"].head(20) if s]
    per_gene = float(sum(count_tokens(tokenizer, [" " + s for s in sample])) / max(1, sum(len(s.split()) for s in sample)))
    prompts, types, requested, room = [], [], [], []
    for cell_type, n_genes in train_genes.groupby(train[label].astype(str)).median().items():
        fields = {"cell_type": cell_type, "organism": params.get("organism", "Homo sapiens")}
        free = context - int(count_tokens(tokenizer, [template.format(num_genes=int(n_genes), **fields)])[0]) - 1
        k = max(1, min(int(n_genes), int((free - 2) / per_gene)))  # the answer (genes, ".", EOS) must fit
        prompt = template.format(num_genes=k, **fields)
        free = context - int(count_tokens(tokenizer, [prompt])[0]) - 1
        prompts += [prompt] * params["n_cells_per_type"]
        types += [cell_type] * params["n_cells_per_type"]
        requested += [k] * params["n_cells_per_type"]
        room += [free] * params["n_cells_per_type"]
    return {"prompt": prompts, "cell_type": types, "genes_requested": requested, "max_new_tokens": int(min(room))}


def generate_cells(
    generation_prompts: dict[str, Any], finetuned_model: LanguageModel, vocabulary: dict[str, int], params: dict[str, Any]
) -> pd.DataFrame:
    """Sampled cell sentences, constrained to vocabulary genes without repeats when ``constrained``;
    otherwise free text cleaned afterwards (non-genes dropped, repeats merged) and counted."""
    genes = [gene for gene, count in vocabulary.items() if count > 0]
    factory = (lambda: GeneVocabularyConstraint(finetuned_model.tokenizer, genes)) if params.get("constrained", True) else None
    texts = generate_texts(
        finetuned_model, generation_prompts["prompt"], max_new_tokens=generation_prompts["max_new_tokens"],
        batch_size=params.get("batch_size", 16), do_sample=True, temperature=params.get("temperature", 1.0),
        top_k=params.get("top_k"), seed=params.get("seed", 0), logits_processor_factory=factory,
    )
    rows = []
    for text, cell_type in zip(texts, generation_prompts["cell_type"]):
        sentence, n_unknown, n_repeats = postprocess_sentence(text, set(genes))
        rows.append({"cell_type": cell_type, "cell_sentence": sentence, "raw_text": text,
                     "n_genes": len(sentence.split()), "n_non_genes_dropped": n_unknown, "n_repeats_merged": n_repeats})
    table = pd.DataFrame(rows)
    table.index = [f"generated_{i}" for i in range(len(table))]
    return table


def reconstruct_generated_cells(
    generated_cells: pd.DataFrame, rank_fit: dict[str, float], processed_adata: ad.AnnData
) -> ad.AnnData:
    """Expression of the generated cells from their gene ranks (the benchmarking fit)."""
    matrix, _ = reconstruct_expression(generated_cells["cell_sentence"].tolist(), processed_adata.var_names, RankFit(**rank_fit))
    obs = generated_cells[["cell_type", "n_genes", "n_non_genes_dropped", "n_repeats_merged"]].copy()
    return ad.AnnData(X=matrix, obs=obs, var=processed_adata.var[[]].copy())


def compare_generated_with_real(
    processed_adata: ad.AnnData, generated_adata: ad.AnnData, generated_cells: pd.DataFrame, params: dict[str, Any]
) -> tuple[dict[str, float], dict[str, plt.Figure]]:
    """Real and generated cells in one PCA/UMAP space, mean expression per type side by side, and
    how close they are: per-type correlation of mean expression, how well a classifier trained on
    real cells recognises the generated cells' types, and how well one tells real from generated."""
    import umap

    label = params["label_column"]
    real_labels = processed_adata.obs[label].astype(str).to_numpy()
    real = np.asarray(processed_adata.X.todense() if hasattr(processed_adata.X, "todense") else processed_adata.X)
    fake = np.asarray(generated_adata.X.todense())
    fake_labels = generated_adata.obs["cell_type"].astype(str).to_numpy()
    types = sorted(set(fake_labels))
    real_means = np.stack([real[real_labels == t].mean(axis=0) for t in types])
    fake_means = np.stack([fake[fake_labels == t].mean(axis=0) for t in types])
    correlations = [float(np.corrcoef(r, f)[0, 1]) for r, f in zip(real_means, fake_means)]
    type_classifier = LogisticRegression(max_iter=2000).fit(real, real_labels)
    both = np.vstack([real, fake])
    origin = np.array(["real"] * len(real) + ["generated"] * len(fake))
    folds = StratifiedKFold(5, shuffle=True, random_state=params.get("seed", 0))
    metrics = {
        "n_generated_cells": float(len(fake)),
        "mean_genes_per_generated_cell": float(generated_cells["n_genes"].mean()),
        "share_non_gene_words": float(generated_cells["n_non_genes_dropped"].sum() / max(1, generated_cells["n_genes"].sum() + generated_cells["n_non_genes_dropped"].sum())),
        "mean_per_type_correlation_of_mean_expression": float(np.nanmean(correlations)),
        "real_classifier_accuracy_on_generated_types": float((type_classifier.predict(fake) == fake_labels).mean()),
        "real_vs_generated_classifier_accuracy": float(cross_val_score(LogisticRegression(max_iter=2000), both, origin, cv=folds).mean()),
    }
    for cell_type, value in zip(types, correlations):
        metrics[f"mean_expression_correlation[{cell_type}]"] = value
    pca = PCA(n_components=min(30, both.shape[1] - 1, len(real) - 1), random_state=params.get("seed", 0)).fit(real)
    coordinates = umap.UMAP(random_state=params.get("seed", 0)).fit_transform(pca.transform(both))
    figures = {
        "umap_by_cell_type.png": plotting.umap_side_by_side(
            [("real cells", coordinates[: len(real)]), ("generated cells", coordinates[len(real):])],
            [pd.Series(real_labels), pd.Series(fake_labels)],
            "Real and generated cells in one UMAP (PCA fitted on real cells)",
        ),
        "umap_by_origin.png": plotting.umap_side_by_side([("real and generated", coordinates)], pd.Series(origin), "Origin"),
        "mean_expression_heatmap.png": plotting.mean_expression_heatmap(
            real_means, fake_means, types, list(processed_adata.var_names), params.get("n_heatmap_genes", 40)
        ),
    }
    logger.info(
        "generated cells: mean per-type correlation %.2f, real-vs-generated classifier accuracy %.2f",
        metrics["mean_per_type_correlation_of_mean_expression"], metrics["real_vs_generated_classifier_accuracy"],
    )
    return metrics, figures
