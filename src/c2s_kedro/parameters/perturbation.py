"""Settings of the perturbation pipelines (``params:perturbation``, one section for all three)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from c2s_kedro.parameters import at_least, between, greater_than, read_parameters
from c2s_kedro.parameters.atlas import DataProcessingParameters, RankFitParameters, SentenceConversionParameters
from c2s_kedro.parameters.training import TrainingParameters

if TYPE_CHECKING:  # core.data.screen imports scanpy and datasets: settings are read by runs that use neither
    from c2s_kedro.core.data.screen import ScreenColumns


@dataclass(frozen=True)
class ScreenSplitParameters:
    mode: str  # perturbations | cells
    fractions: dict[str, float] = between(0, 1)
    test_perturbations: list[str] | None
    seed: int = at_least(0)
    seen_test_fraction: float = between(0, 1)  # of each training perturbation's cells, held out as the seen evaluation (0: none)


@dataclass(frozen=True)
class PairingParameters:
    controls_per_cell: int = at_least(1)
    include_control_pairs: bool
    seed: int = at_least(0)
    synthetic_pairs_per_control: int = at_least(0)  # synthetic knockdown pairs per training control cell (0: none)
    synthetic_drop_share: float | None = between(0, 1)  # null: measured on the training cells
    synthetic_same_cell: bool  # the response is the prompt's control cell knocked down (else another control)


@dataclass(frozen=True)
class PerturbationModelParameters:
    architecture: dict[str, Any]


@dataclass(frozen=True)
class PosteriorParameters:
    n_samples: int = at_least(1)
    temperatures: list[float] = greater_than(0)
    prompts_per_perturbation: int = at_least(1)
    max_new_tokens: int | None = at_least(1)
    on_overflow: str  # shorten | error
    batch_size: int | None = at_least(1)
    seed: int = at_least(0)
    # held-out perturbations sampled (and scored): null = all, a number drawn at random, or a list
    # of names (Any: one of three kinds; core.tasks.perturbation.posterior.choose_perturbations checks it)
    perturbations: Any
    seen_perturbations: Any  # the same, for the seen perturbations with held-out cells
    min_genes: int | None = at_least(1)  # genes a sample writes before it may end; null: it may end after any gene


@dataclass(frozen=True)
class PerturbationEvaluationParameters:
    top_n_de: int = at_least(1)
    interval: float = between(0, 1)
    baseline_pca_components: int = at_least(1)
    max_plot_panels: int = at_least(1)
    sensitivity_pairs: int = at_least(1)  # test pairs of the input-sensitivity probe


@dataclass(frozen=True)
class ScreenBenchmarkingParameters:
    rank_fit: RankFitParameters


@dataclass(frozen=True)
class PerturbationParameters:
    perturbation_column: str
    control_label: str
    batch_column: str | None
    combination_separator: str | None  # joins a combination's targets (GENE1+GENE2); null or empty: none
    data_processing: DataProcessingParameters
    sentence_conversion: SentenceConversionParameters
    benchmarking: ScreenBenchmarkingParameters
    top_k_genes: int | None = at_least(1)
    control_top_k_genes: int | None = at_least(1)  # the control sentence of a prompt (null: top_k_genes)
    prompt_template: int | None = at_least(0)  # one template for every prompt (its index); null: one drawn per prompt
    split: ScreenSplitParameters
    pairing: PairingParameters
    seed: int = at_least(0)
    model: PerturbationModelParameters
    finetuning: TrainingParameters
    posterior: PosteriorParameters
    evaluation: PerturbationEvaluationParameters

    def columns(self) -> ScreenColumns:
        """Where the screen keeps what the pipelines read."""
        from c2s_kedro.core.data.screen import ScreenColumns

        return ScreenColumns(
            perturbation=self.perturbation_column, control_label=str(self.control_label), batch=self.batch_column,
            gene_symbol=self.data_processing.gene_symbol_column, combination_separator=self.combination_separator or None,
        )


SECTION = "perturbation"


def perturbation_settings(params: dict[str, Any]) -> PerturbationParameters:
    """``params:perturbation`` read and checked (``read_parameters``): the one reader of the three
    perturbation pipelines' nodes."""
    return read_parameters(PerturbationParameters, params, SECTION)
