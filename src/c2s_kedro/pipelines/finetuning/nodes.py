"""Nodes of the finetuning pipeline."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any


# each core module loads when a node first uses it (c2s_kedro/core/__init__.py): every run imports every
# pipeline's nodes (the registry composes each pipeline with its upstream) and pays only for what its nodes use
from c2s_kedro.core.errors import C2SKeyError
from c2s_kedro import core
from c2s_kedro.parameters import ENVIRONMENT_HINT, defaults_file, read_parameters, setting_hint
from c2s_kedro.parameters.annotation import AnnotationParameters
from c2s_kedro.parameters.atlas import DataProcessingParameters, SentenceConversionParameters, as_kwargs
from c2s_kedro.parameters.training import FinetuningParameters

if TYPE_CHECKING:
    import matplotlib.pyplot as plt
    from datasets import Dataset, DatasetDict

    from c2s_kedro.core.models.loading import LanguageModel


def format_finetuning_prompts(
    cell_sentences: Dataset, data_split: dict[str, Any], foundation_model: LanguageModel, params: dict[str, Any]
) -> DatasetDict:
    """Prompts (``sample_type``, ``model_input``, ``response``) of each task for the train, val and
    test cells of ``data_split``, fitted to the model's context. Val is capped at
    ``max_eval_samples``. A custom ``formatter`` formats each cell once; ``prompt_templates`` name
    template files that replace ours per task."""
    settings = read_parameters(FinetuningParameters, params, "finetuning")
    label = settings.label_column
    if label not in cell_sentences.column_names:
        raise C2SKeyError(
            f"finetuning.label_column '{label}' is not a column of cell_sentences; available: "
            f"{', '.join(cell_sentences.column_names)}. Add it to sentence_conversion.label_columns or change "
            f"finetuning.label_column {ENVIRONMENT_HINT} (defaults: {defaults_file('finetuning')})."
        )
    if "cell_type_prediction" in settings.tasks:
        core.tasks.annotation.require_labels_to_tell_apart(
            core.tasks.annotation.training_labels(cell_sentences, data_split["train"], label), label)
    with setting_hint("finetuning.prompt_templates"):
        templates = core.prompts.formatting.read_template_files(settings.prompt_templates)
    with setting_hint("finetuning.formatter" if settings.formatter else "finetuning.tasks"):
        formatters = core.prompts.training_sets.prompt_formatters(
            settings.tasks, settings.formatter, settings.formatter_options, seed=settings.seed,
            top_k_genes=settings.top_k_genes, label_column=label, organism_column=settings.organism_column,
            tokenizer=foundation_model.tokenizer, max_tokens=foundation_model.context_length, prompt_templates=templates,
        )
    with setting_hint("finetuning.min_train_cells_per_label or task_repeats"):
        return core.prompts.training_sets.format_split_prompts(
            cell_sentences, data_split, formatters, settings.seed, settings.max_eval_samples,
            min_train_cells_per_label=settings.min_train_cells_per_label, label_column=label,
            task_repeats=settings.task_repeats,
        )


def finetune_model(
    foundation_model: LanguageModel, finetuning_prompts: DatasetDict, params: dict[str, Any]
) -> tuple[LanguageModel, list[dict[str, Any]]]:
    """Causal-LM fine-tuning with the HF Trainer (loss on the response only by default); optional
    LoRA adapters, merged into the weights afterwards so the result is a plain model directory."""
    settings = read_parameters(FinetuningParameters, params, "finetuning")
    with setting_hint("finetuning", core.models.training.TrainingSettingsError):
        return core.models.training.finetune(foundation_model, finetuning_prompts, settings.training_settings())


def record_annotator_metadata(
    trained_model: LanguageModel, cell_sentences: Dataset, data_split: dict[str, Any], params: dict[str, Any],
    data_processing: dict[str, Any], sentence_conversion: dict[str, Any],
) -> tuple[LanguageModel, LanguageModel]:
    """The trained model with what annotating new cells needs in its config.json: the train
    cells' label set and genes, and the settings its cells were processed and prompted with.
    Returned twice: to save, and in memory for the MLflow logging (no reload of a large model)."""
    settings = read_parameters(FinetuningParameters, params, "finetuning")
    processing = read_parameters(DataProcessingParameters, data_processing, "data_processing")
    conversion = read_parameters(SentenceConversionParameters, sentence_conversion, "sentence_conversion")
    with setting_hint("finetuning.prompt_templates"):
        templates = core.prompts.formatting.task_templates("cell_type_prediction", core.prompts.formatting.read_template_files(settings.prompt_templates))
    record = core.tasks.annotation.AnnotatorRecord(
        label_column=settings.label_column,
        labels=core.tasks.annotation.training_labels(cell_sentences, data_split["train"], settings.label_column),
        genes=core.tasks.annotation.training_genes(cell_sentences, data_split["train"], settings.top_k_genes),
        qc=as_kwargs(processing.qc), target_sum=processing.normalization.target_sum,
        sentence_layer=conversion.layer, sentence_seed=conversion.seed, top_k_genes=settings.top_k_genes,
        organism_column=settings.organism_column, templates=list(templates.inputs),
    )
    recorded = core.tasks.annotation.record_annotator(trained_model, record)
    return recorded, recorded


def log_annotator_model(recorded_model: LanguageModel, params: dict[str, Any]) -> dict[str, Any]:
    """The fine-tuned model with the annotation settings, logged as the MLflow model
    ``c2s_annotator`` of this run unless ``annotation.log_mlflow_model`` is false."""
    settings = read_parameters(AnnotationParameters, params, "annotation")
    uri = core.models.annotator_model.log_annotator(recorded_model, settings.labelling_options()) if settings.log_mlflow_model else None
    return {"logged": uri is not None, "model_uri": uri, "artifact_path": core.models.annotator_model.ARTIFACT_PATH}


def plot_finetuning_loss(finetuning_log: list[dict[str, Any]]) -> plt.Figure:
    """Train and eval loss against the step."""
    return core.plotting.loss_curve_plot(finetuning_log, "Fine-tuning")


def summarize_finetuning(
    finetuning_log: list[dict[str, Any]], finetuning_prompts: DatasetDict, cell_sentences: Dataset, data_split: dict[str, Any],
    params: dict[str, Any],
) -> dict[str, float]:
    """Losses, runtime, how many samples each part had, the split's cells per part and their share
    (a split that misses its fractions is logged: ``split_report``), and each part's cells without a
    label (they got no prompt)."""
    settings = read_parameters(FinetuningParameters, params, "finetuning")
    parts = {part: data_split[part] for part in ("train", "val", "test")}
    labels = {part: core.sentences.conversion.select_cells(cell_sentences, names)[settings.label_column] for part, names in parts.items()}
    return {
        **core.models.training.summarize_history(finetuning_log),
        **{f"n_{part}_samples": float(finetuning_prompts[part].num_rows) for part in finetuning_prompts},
        **core.data.splitting.split_report(parts, data_split.get("fractions")),
        **{f"n_{part}_cells_without_label": float((~core.sentences.conversion.has_label(values)).sum()) for part, values in labels.items()},
    }
