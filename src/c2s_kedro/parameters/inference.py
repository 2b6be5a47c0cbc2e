"""Settings of the pipelines that use a trained model: embedding, evaluation, cell_generation."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EmbeddingPipelineParameters:
    template_index: int
    prompt_templates: dict[str, str | None]  # task -> template file in the reference format; null: ours
    pooling: str  # mean | last
    top_k_genes: int | None
    organism_column: str
    default_organism: str
    batch_size: int
    n_neighbors: int
    seed: int
    color_keys: list[str]
    label_key: str
    batch_key: str | None
    knn_k: int


@dataclass(frozen=True)
class EvaluationParameters:
    label_column: str
    organism_column: str
    top_k_genes: int | None
    seed: int
    prompt_templates: dict[str, str | None]  # task -> template file in the reference format; null: ours
    batch_size: int
    extra_new_tokens: int
    baseline_C: float
    baseline_max_iter: int
    max_test_cells: int | None  # test cells scored, drawn with the seed (null: all)


@dataclass(frozen=True)
class GenerationTrainingParameters:
    """Generation-only training of the fine-tuned model before it writes cells (cell_generation.training)."""

    epochs: float  # 0: generate with finetuned_model as it is
    checkpoint_dir: str
    mlflow_prefix: str


@dataclass(frozen=True)
class CellGenerationParameters:
    label_column: str
    organism: str
    n_cells_per_type: int
    template_index: int
    prompt_templates: dict[str, str | None]  # task -> template file in the reference format; null: ours
    constrained: bool
    temperature: float
    top_k: int | None
    training: GenerationTrainingParameters
    guidance_scale: float  # classifier-free guidance towards the asked cell type; 1: off
    max_genes: int | None  # cap of genes asked per generated cell (the fine-tuned length); null: the type's median
    batch_size: int
    seed: int
    n_comps: int
    n_neighbors: int
    n_heatmap_genes: int
