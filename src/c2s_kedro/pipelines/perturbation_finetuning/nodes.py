"""Nodes of the perturbation_finetuning pipeline: the base model (the offline default, unless your
environment sets ``perturbation_base_model``), the screen's pairs as prompts in its tokens, the
fine-tuning and its loss curves."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any


# each core module loads when a node first uses it (c2s_kedro/core/__init__.py): every run imports every
# pipeline's nodes (the registry composes each pipeline with its upstream) and pays only for what its nodes use
from c2s_kedro import core
from c2s_kedro.parameters import setting_hint
from c2s_kedro.parameters.perturbation import SECTION, perturbation_settings

if TYPE_CHECKING:
    import matplotlib.pyplot as plt
    from datasets import Dataset, DatasetDict

    from c2s_kedro.core.models.loading import LanguageModel

logger = logging.getLogger(__name__)


def initialize_perturbation_model(
    vocabulary: dict[str, int], perturbation_split: dict[str, Any], params: dict[str, Any],
) -> LanguageModel:
    """A gene-level tokenizer over the screen's genes, the prompt words and the targets that are
    not genes (each a token of its own, learnt where it is trained on, never spelt in letters), and
    an untrained GPT-NeoX sized by ``model.architecture`` (the offline default base model)."""
    settings = perturbation_settings(params)
    perturbations = [name for part in ("train", "val", "test") for name in perturbation_split[f"{part}_perturbations"]]
    architecture = settings.model.architecture
    tokenizer, targets = core.tasks.perturbation.tokens.screen_tokenizer(list(vocabulary), perturbations, settings.columns(),
                                                                         architecture["max_position_embeddings"])
    if targets:
        logger.info("the base model's tokenizer gives %d targets that are not genes a token of their own: %s",
                    len(targets), ", ".join(targets[:20]) + (" ..." if len(targets) > 20 else ""))
    with setting_hint(f"{SECTION}.model.architecture"):
        model = core.models.loading.build_gpt_neox(tokenizer, architecture, seed=settings.seed)
    logger.info("perturbation base model: %s parameters, %d tokens", f"{model.model.num_parameters():,}", len(tokenizer))
    return model


def format_perturbation_prompts(
    cell_sentences: Dataset, perturbation_split: dict[str, Any], perturbation_base_model: LanguageModel,
    params: dict[str, Any],
) -> DatasetDict:
    """Pairs (perturbed cell, control cell of the same batch) of each part as prompts: the control
    sentence and the perturbation in, the perturbed sentence out, plus synthetic knockdown pairs
    in training (``pairing.synthetic_pairs_per_control``) and the posterior's prompts (every test
    perturbation and the control label on the same control cells); test prompts leave room for the
    answer (``posterior.max_new_tokens``, ``posterior.on_overflow``)."""
    settings = perturbation_settings(params)
    pairing = settings.pairing
    with setting_hint(f"{SECTION}.sentence_conversion.label_columns, top_k_genes, control_top_k_genes, prompt_template, "
                      "pairing, posterior.prompts_per_perturbation or posterior.on_overflow"):
        return core.prompts.perturbation.perturbation_prompts(
            cell_sentences, perturbation_split, settings.columns(), perturbation_base_model.tokenizer,
            perturbation_base_model.context_length, settings.top_k_genes, pairing.seed,
            controls_per_cell=pairing.controls_per_cell, include_control_pairs=pairing.include_control_pairs,
            max_new_tokens=settings.posterior.max_new_tokens, on_overflow=settings.posterior.on_overflow,
            max_eval_samples=settings.finetuning.max_eval_samples, control_top_k_genes=settings.control_top_k_genes,
            template=settings.prompt_template, synthetic_pairs_per_control=pairing.synthetic_pairs_per_control,
            synthetic_drop_share=pairing.synthetic_drop_share, synthetic_same_cell=pairing.synthetic_same_cell,
            posterior_controls=settings.posterior.prompts_per_perturbation,
        )


def finetune_perturbation_model(
    perturbation_base_model: LanguageModel, perturbation_prompts: DatasetDict, params: dict[str, Any]
) -> tuple[LanguageModel, list[dict[str, Any]]]:
    """The fine-tuning of ``core.models.training.finetune`` on the train and val pairs of
    ``perturbation_prompts`` (loss on the perturbed sentence only, averaged as
    ``perturbation.finetuning.loss_average`` says)."""
    settings = perturbation_settings(params).finetuning
    with setting_hint("perturbation.finetuning", core.models.training.TrainingSettingsError):
        return core.models.training.finetune(perturbation_base_model, perturbation_prompts, settings.training_settings())


def plot_perturbation_loss(perturbation_finetuning_log: list[dict[str, Any]]) -> plt.Figure:
    """Train and eval loss against the step."""
    return core.plotting.loss_curve_plot(perturbation_finetuning_log, "Perturbation-response fine-tuning")
