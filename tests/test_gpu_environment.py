"""conf/gpu: the notes' production settings on top of conf/base (kedro run --env gpu)."""

from __future__ import annotations

from pathlib import Path

from kedro.config import OmegaConfigLoader

from c2s_kedro.settings import CONFIG_LOADER_ARGS

CONF = Path(__file__).resolve().parents[1] / "conf"


def _config(env: str) -> OmegaConfigLoader:
    args = {key: value for key, value in CONFIG_LOADER_ARGS.items() if key != "default_run_env"}
    return OmegaConfigLoader(str(CONF), env=env, **args)


def test_gpu_environment_overrides_only_what_it_names():
    base, gpu = _config("base")["parameters"], _config("gpu")["parameters"]
    finetuning = gpu["finetuning"]
    assert finetuning["top_k_genes"] == 200 and finetuning["training_arguments"]["bf16"] is True
    assert finetuning["tasks"] == ["cell_type_prediction"]
    # keys conf/gpu does not name keep their base values (merged key by key, not replaced)
    assert finetuning["loss_average"] == base["finetuning"]["loss_average"]
    assert finetuning["training_arguments"]["metric_for_best_model"] == "eval_loss"
    assert gpu["evaluation"]["batch_size"] == 64 and gpu["evaluation"]["top_k_genes"] == 200
    assert gpu["evaluation"]["label_column"] == base["evaluation"]["label_column"]


def test_gpu_environment_fine_tunes_the_hub_c2s_model_in_bf16():
    catalog = _config("gpu")["catalog"]
    assert catalog["foundation_model"]["path"] == "vandijklab/C2S-Pythia-410m-cell-type-prediction"
    assert catalog["foundation_model"]["load_args"]["dtype"] == "bf16"
    assert catalog["finetuned_model"]["path"] != _config("base")["catalog"]["finetuned_model"]["path"]


def test_gpu_training_arguments_are_accepted_by_the_trainer(tmp_path):
    # conf/gpu once named warmup_ratio, which transformers 5 refuses: the first GPU run would stop there
    from c2s_kedro.core.models.training import training_arguments

    arguments = training_arguments(_config("gpu")["parameters"]["finetuning"]["training_arguments"], str(tmp_path))
    assert arguments.bf16 and arguments.gradient_accumulation_steps == 4
    assert arguments.get_warmup_steps(1000) == 50  # 5% of the steps, as the notes warm up


def test_max_test_cells_scores_the_same_seeded_subset_for_every_method():
    # a 410m-shaped model on this CPU takes ~25 s a test cell; benchmarks/gpu_env_on_cpu.py scores a subset
    import pytest

    from c2s_kedro.core.tasks.evaluation import evaluated_test_cells

    cells = [f"c{i}" for i in range(70)]
    chosen = evaluated_test_cells(cells, 8, seed=0)
    assert len(chosen) == 8 and chosen == [c for c in cells if c in chosen]  # split order kept
    assert chosen == evaluated_test_cells(cells, 8, seed=0) != evaluated_test_cells(cells, 8, seed=1)
    assert evaluated_test_cells(cells, None) == cells == evaluated_test_cells(cells, 500)
    assert _config("base")["parameters"]["evaluation"]["max_test_cells"] is None
    with pytest.raises(ValueError, match="max_test_cells must be at least 1"):
        evaluated_test_cells(cells, 0)
