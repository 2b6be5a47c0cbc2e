"""Nodes of the cell_generation pipeline: they read the settings once and call core."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any


# each core module loads when a node first uses it (c2s_kedro/core/__init__.py): every run imports every
# pipeline's nodes (the registry composes each pipeline with its upstream) and pays only for what its nodes use
from c2s_kedro import core
from c2s_kedro.parameters import read_parameters, setting_hint
from c2s_kedro.parameters.inference import CellGenerationParameters
from c2s_kedro.parameters.training import FinetuningParameters

if TYPE_CHECKING:
    import anndata as ad
    import matplotlib.pyplot as plt
    import pandas as pd
    from datasets import Dataset, DatasetDict

    from c2s_kedro.core.models.loading import LanguageModel


GENERATION_TASK = "cell_type_generation"


def train_generation_model(
    finetuned_model: LanguageModel, finetuning_prompts: DatasetDict, finetuning_params: dict[str, Any], params: dict[str, Any]
) -> tuple[LanguageModel, list[dict[str, Any]]]:
    """The fine-tuned model trained ``cell_generation.training.epochs`` more epochs on the
    fine-tuning's generation prompts only (its train and val cells; the other settings of
    ``finetuning`` but its ``max_steps``, the last model kept): generation learns the asked type from generation passes,
    which the joint fine-tuning gives too few of (benchmarks/README.md, "Levers"). The annotation
    pipelines keep using ``finetuned_model``. With 0 epochs the fine-tuned model is returned as it is."""
    from dataclasses import replace

    settings = read_parameters(CellGenerationParameters, params, "cell_generation").training
    finetuning = read_parameters(FinetuningParameters, finetuning_params, "finetuning")
    with setting_hint("finetuning.tasks"):
        core.models.training.require_task(finetuned_model, GENERATION_TASK)
    if settings.epochs == 0:  # a negative number is refused when the parameters are read
        return finetuned_model, []
    with setting_hint("finetuning.tasks"):
        prompts = core.prompts.training_sets.task_prompts(finetuning_prompts, GENERATION_TASK)
    # epochs, not the fine-tuning's step cap, say how long (max_steps would override num_train_epochs)
    arguments = {key: value for key, value in finetuning.training_arguments.items() if key != "max_steps"}
    arguments.update(num_train_epochs=settings.epochs, load_best_model_at_end=False)
    training = replace(finetuning, training_arguments=arguments, checkpoint_dir=settings.checkpoint_dir,
                       mlflow_prefix=settings.mlflow_prefix, lora=None)
    with setting_hint("finetuning", core.models.training.TrainingSettingsError):
        return core.models.training.finetune(finetuned_model, prompts, training.training_settings())


def plot_generation_training_loss(generation_training_log: list[dict[str, Any]]) -> plt.Figure:
    """Train and eval loss of the generation-only training against the step."""
    return core.plotting.loss_curve_plot(generation_training_log, "Generation-only training")


def build_generation_prompts(
    cell_sentences: Dataset, data_split: dict[str, Any], finetuned_model: LanguageModel, params: dict[str, Any]
) -> dict[str, Any]:
    """``n_cells_per_type`` cell-type-conditioned prompts per cell type of the train cells, each asking
    for the median number of genes of that type's cells (at most ``max_genes``), or fewer so that the
    answer fits the context. Train cells without a label ask for nothing."""
    settings = read_parameters(CellGenerationParameters, params, "cell_generation")
    with setting_hint("finetuning.tasks"):
        core.models.training.require_task(finetuned_model, "cell_type_generation")
    label = settings.label_column
    with setting_hint("cell_generation.label_column"):
        table = core.prompts.formatting.sentence_table(cell_sentences, [label])
    train = table.loc[data_split["train"]]
    with setting_hint("cell_generation.prompt_templates"):
        templates = core.prompts.formatting.task_templates("cell_type_generation", core.prompts.formatting.read_template_files(settings.prompt_templates))
    with setting_hint("cell_generation.template_index or max_genes", IndexError, ValueError):
        return core.prompts.formatting.cell_generation_prompts(
            train["cell_sentence"].tolist(), train[label].tolist(), finetuned_model.tokenizer,
            finetuned_model.context_length, settings.n_cells_per_type, settings.template_index, settings.organism,
            templates=templates, max_genes=settings.max_genes,
        )


def generate_cells(
    generation_prompts: dict[str, Any], finetuned_model: LanguageModel, vocabulary: dict[str, int], params: dict[str, Any]
) -> pd.DataFrame:
    """Sampled cell sentences, constrained to vocabulary genes without repeats when ``constrained``;
    otherwise free text cleaned afterwards (non-genes dropped, repeats merged) and counted."""
    settings = read_parameters(CellGenerationParameters, params, "cell_generation")
    return core.tasks.cell_generation.generate_cells(
        finetuned_model, generation_prompts["prompt"], generation_prompts["cell_type"],
        [gene for gene, count in vocabulary.items() if count > 0], generation_prompts["max_new_tokens"],
        constrained=settings.constrained, batch_size=settings.batch_size, temperature=settings.temperature,
        top_k=settings.top_k, seed=settings.seed, guidance_scale=settings.guidance_scale,
        unconditional_prompts=generation_prompts["unconditional_prompt"],
    )


def reconstruct_generated_cells(
    generated_cells: pd.DataFrame, rank_fit: dict[str, float], processed_adata: ad.AnnData
) -> ad.AnnData:
    """Expression of the generated cells from their gene ranks (the benchmarking fit)."""
    return core.tasks.cell_generation.reconstruct_generated_cells(generated_cells, processed_adata.var_names, core.sentences.rank_fit.RankFit.from_dict(rank_fit))


def reconstruct_real_test_cells(
    cell_sentences: Dataset, data_split: dict[str, Any], generation_prompts: dict[str, Any], rank_fit: dict[str, float],
    processed_adata: ad.AnnData, params: dict[str, Any],
) -> ad.AnnData:
    """The real test cells as generated cells are: each sentence cut to the genes generation asks
    for its type, expression from the ranks (the benchmarking fit); cells without a label are left out."""
    settings = read_parameters(CellGenerationParameters, params, "cell_generation")
    label = settings.label_column
    with setting_hint("cell_generation.label_column"):
        table = core.prompts.formatting.sentence_table(cell_sentences, [label])
    test = table.loc[list(data_split["test"])]
    return core.tasks.cell_generation.real_cells_as_generated(
        test["cell_sentence"].tolist(), test[label].tolist(), list(test.index),
        dict(zip(generation_prompts["cell_type"], generation_prompts["genes_requested"])),
        processed_adata.var_names, core.sentences.rank_fit.RankFit.from_dict(rank_fit),
    )


def compare_generated_with_real(
    processed_adata: ad.AnnData, generated_adata: ad.AnnData, generated_cells: pd.DataFrame,
    reconstructed_real_adata: ad.AnnData, data_split: dict[str, Any], params: dict[str, Any],
) -> tuple[dict[str, float], dict[str, plt.Figure]]:
    """Real and generated cells in one PCA/UMAP space, mean expression per type side by side, and
    how close they are: per-type correlation of mean expression, how well a classifier trained on
    the real train cells recognises the generated cells' types (and, its ceiling, the types of real
    test cells rebuilt the same way), and how well one tells real from generated."""
    settings = read_parameters(CellGenerationParameters, params, "cell_generation")
    with setting_hint("cell_generation.label_column"):
        metrics, comparison = core.tasks.cell_generation.compare_generated_with_real(
            processed_adata, generated_adata, generated_cells, settings.label_column,
            seed=settings.seed, n_comps=settings.n_comps, n_neighbors=settings.n_neighbors,
            train_cells=data_split["train"], reconstructed_real=reconstructed_real_adata,
        )
    return metrics, core.tasks.cell_generation.comparison_figures(comparison, settings.n_heatmap_genes)
