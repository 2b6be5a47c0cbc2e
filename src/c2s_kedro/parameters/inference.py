"""Settings of the pipelines that use a trained model: embedding, evaluation, cell_generation."""

from __future__ import annotations

from dataclasses import dataclass

from c2s_kedro.parameters import at_least, greater_than


@dataclass(frozen=True)
class EmbeddingPipelineParameters:
    template_index: int = at_least(0)
    prompt_templates: dict[str, str | None]  # task -> template file in the reference format; null: ours
    pooling: str  # mean | last
    top_k_genes: int | None = at_least(1)
    organism_column: str
    default_organism: str
    batch_size: int = at_least(1)
    n_neighbors: int = at_least(2)  # a cell's neighbours include itself
    seed: int = at_least(0)
    color_keys: list[str]
    label_key: str
    batch_key: str | None
    knn_k: int = at_least(1)


@dataclass(frozen=True)
class EvaluationParameters:
    label_column: str
    organism_column: str
    top_k_genes: int | None = at_least(1)
    seed: int = at_least(0)
    prompt_templates: dict[str, str | None]  # task -> template file in the reference format; null: ours
    batch_size: int = at_least(1)
    extra_new_tokens: int = at_least(0)
    baseline_C: float = greater_than(0)
    baseline_max_iter: int = at_least(1)
    max_test_cells: int | None = at_least(1)  # test cells scored, drawn with the seed (null: all)


@dataclass(frozen=True)
class GenerationTrainingParameters:
    """Generation-only training of the fine-tuned model before it writes cells (cell_generation.training)."""

    epochs: float = at_least(0)  # 0: generate with finetuned_model as it is
    checkpoint_dir: str
    mlflow_prefix: str


@dataclass(frozen=True)
class CellGenerationParameters:
    label_column: str
    organism: str
    n_cells_per_type: int = at_least(1)
    template_index: int = at_least(0)
    prompt_templates: dict[str, str | None]  # task -> template file in the reference format; null: ours
    constrained: bool
    temperature: float = greater_than(0)
    top_k: int | None = at_least(1)
    training: GenerationTrainingParameters
    guidance_scale: float = at_least(0)  # classifier-free guidance towards the asked cell type; 1: off
    max_genes: int | None = at_least(1)  # cap of genes asked per generated cell (the fine-tuned length); null: the type's median
    batch_size: int = at_least(1)
    seed: int = at_least(0)
    n_comps: int = at_least(1)
    n_neighbors: int = at_least(2)  # a cell's neighbours include itself
    n_heatmap_genes: int = at_least(1)
