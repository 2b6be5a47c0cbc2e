"""Settings of the annotation pipeline (and of the annotator the finetuning run logs to MLflow)."""

from __future__ import annotations

from dataclasses import dataclass

from c2s_kedro.parameters import at_least, between


@dataclass(frozen=True)
class AnnotationParameters:
    counts_source: str  # auto | X | raw | a layer's name
    accept_non_integer_counts: bool  # ambient-corrected counts (non-negative, fractional) are counts
    input_is_normalized: bool
    gene_symbol_column: str | None
    label_column: str | None  # obs column of known labels to score against; null: the model's training label column
    min_probability: float = between(0, 1)
    template_index: int | None = at_least(0)
    seed: int = at_least(0)
    default_organism: str
    batch_size: int = at_least(1)
    log_mlflow_model: bool

    def labelling_options(self) -> dict[str, object]:
        """The keyword arguments of ``core.tasks.annotation.annotate_counts`` these settings give."""
        return {
            "min_probability": self.min_probability, "input_is_normalized": self.input_is_normalized,
            "gene_symbol_column": self.gene_symbol_column, "template_index": self.template_index, "seed": self.seed,
            "default_organism": self.default_organism, "batch_size": self.batch_size,
            "counts_source": self.counts_source, "accept_non_integer_counts": self.accept_non_integer_counts,
        }
