"""Nodes of the perturbation_finetuning pipeline."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any


# each core module loads when a node first uses it (c2s_kedro/core/__init__.py): every run imports every
# pipeline's nodes (the registry composes each pipeline with its upstream) and pays only for what its nodes use
from c2s_kedro import core
from c2s_kedro.parameters import read_parameters, setting_hint
from c2s_kedro.parameters.perturbation import PerturbationParameters

if TYPE_CHECKING:
    import matplotlib.pyplot as plt
    from datasets import DatasetDict

    from c2s_kedro.core.models.loading import LanguageModel


def finetune_perturbation_model(
    perturbation_base_model: LanguageModel, perturbation_prompts: DatasetDict, params: dict[str, Any]
) -> tuple[LanguageModel, list[dict[str, Any]]]:
    """The fine-tuning of ``core.models.training.finetune`` on the train and val pairs of
    ``perturbation_prompts`` (loss on the perturbed sentence only, averaged as
    ``perturbation.finetuning.loss_average`` says)."""
    settings = read_parameters(PerturbationParameters, params, "perturbation").finetuning
    with setting_hint("perturbation.finetuning", core.models.training.TrainingSettingsError):
        return core.models.training.finetune(perturbation_base_model, perturbation_prompts, settings.training_settings())


def plot_perturbation_loss(perturbation_finetuning_log: list[dict[str, Any]]) -> plt.Figure:
    """Train and eval loss against the step."""
    return core.plotting.loss_curve_plot(perturbation_finetuning_log, "Perturbation-response fine-tuning")
