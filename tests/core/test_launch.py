"""Fine-tuning in several processes started by the training itself (core.models.launch): 2 CPU processes
with gloo train together (DDP), log their steps to the node's MLflow run, and hand back one plain
model."""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
import pytest
import torch
from datasets import DatasetDict

from c2s_kedro.core.errors import C2SError
from c2s_kedro.core.models.launch import JOB_FOLDER
from c2s_kedro.core.models.loading import build_gpt_neox
from c2s_kedro.core.models.tokenizer import build_gene_tokenizer
from c2s_kedro.core.models.training import TrainingSettings, TrainingSettingsError, finetune
from c2s_kedro.core.prompts.formatting import C2SPromptFormatter, template_words
from tests.helpers import tiny_cell_sentences

GENES = [f"GENE{i}" for i in range(300)]
ARCHITECTURE = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 128,
                "max_position_embeddings": 96}
QKV, MLP = "gpt_neox.layers.0.attention.query_key_value.weight", "gpt_neox.layers.0.mlp.dense_h_to_4h.weight"


@pytest.fixture(scope="module")
def tokenizer():
    return build_gene_tokenizer(GENES, template_words() + ["T cell", "B cell", "Homo sapiens", "blood"], model_max_length=96)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    cells = tiny_cell_sentences(GENES, n_cells=16)
    return DatasetDict({"train": C2SPromptFormatter(tokenizer=tokenizer, max_tokens=96).format_dataset(cells)})


def _settings(tmp_path, processes: int, **changes) -> TrainingSettings:
    arguments = {"max_steps": 3, "per_device_train_batch_size": 2, "learning_rate": 1e-3, "logging_steps": 1,
                 "save_strategy": "no", "use_cpu": True, **changes.pop("training_arguments", {})}
    return TrainingSettings(training_arguments=arguments, checkpoint_dir=str(tmp_path / "checkpoints"),
                            loss_on_response_only=True, loss_average="sample", mlflow_prefix="test",
                            processes=processes, **changes)


def _first_step_epoch(history) -> float:
    return next(entry["epoch"] for entry in history if "loss" in entry and entry.get("step") == 1)


def test_two_processes_train_together_log_to_the_nodes_run_and_hand_back_one_plain_model(tokenizer, prompts, tmp_path):
    import signal

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    torch_logs = set(Path(tempfile.gettempdir()).glob("torchelastic_*"))
    model = build_gpt_neox(tokenizer, ARCHITECTURE, seed=0)
    initial = {k: v.clone() for k, v in model.model.state_dict().items()}
    with mlflow.start_run() as run:
        trained, history = finetune(model, prompts, _settings(tmp_path, processes=2))
        assert mlflow.active_run().info.run_id == run.info.run_id  # the workers did not end or replace it
    _, alone = finetune(build_gpt_neox(tokenizer, ARCHITECTURE, seed=0), prompts, _settings(tmp_path / "one", processes=1))

    assert type(trained.model).__name__ == "GPTNeoXForCausalLM" and trained.tokenizer is model.tokenizer
    moved = max(float((trained.model.state_dict()[k] - initial[k]).abs().max()) for k in initial)
    assert moved > 1e-4
    # 16 prompts, 2 per process and step: the two processes take 4 per step, one process 2
    assert _first_step_epoch(history) == pytest.approx(2 * _first_step_epoch(alone)) == pytest.approx(0.25)
    client = mlflow.MlflowClient()
    logged = client.get_metric_history(run.info.run_id, "test/loss")
    assert [m.step for m in logged] == [1, 2, 3]  # rank 0 only, each step once
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert not (tmp_path / "checkpoints" / JOB_FOLDER).exists()  # the hand-over folder is removed, logs included
    assert set(Path(tempfile.gettempdir()).glob("torchelastic_*")) <= torch_logs  # nothing left in /tmp
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers  # torch's launcher's handlers are not left behind
    trained.model.save_pretrained(tmp_path / "saved")
    reopened = type(trained.model).from_pretrained(tmp_path / "saved")
    torch.testing.assert_close(reopened.state_dict()[QKV], trained.model.state_dict()[QKV])


def test_lora_in_two_processes_comes_back_merged(tokenizer, prompts, tmp_path):
    lora = {"r": 2, "lora_alpha": 4, "target_modules": ["query_key_value"]}
    model = build_gpt_neox(tokenizer, ARCHITECTURE, seed=0)
    initial = {k: v.clone() for k, v in model.model.state_dict().items()}
    trained, _ = finetune(model, prompts, _settings(tmp_path, processes=2, lora=lora))
    weights = trained.model.state_dict()
    assert set(weights) == set(initial)  # a plain model: no adapter weights left
    assert float((weights[QKV] - initial[QKV]).abs().max()) > 0
    torch.testing.assert_close(weights[MLP], initial[MLP])  # only the adapted layers moved


def test_settings_are_refused_before_any_process_starts(tokenizer, prompts, tmp_path):
    model = build_gpt_neox(tokenizer, ARCHITECTURE, seed=0)
    with pytest.raises(TrainingSettingsError, match="TrainingArguments refused.*no_such_argument"):
        finetune(model, prompts, _settings(tmp_path, processes=2, training_arguments={"no_such_argument": 1}))
    with pytest.raises(TrainingSettingsError, match="callbacks cannot be handed to training processes"):
        finetune(model, prompts, _settings(tmp_path, processes=2), callbacks=[object()])
    assert not (tmp_path / "checkpoints" / JOB_FOLDER).exists()


def test_kedro_run_under_a_launcher_is_refused_naming_the_setting(monkeypatch):
    from c2s_kedro.cli import refuse_launchers

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(C2SError, match=r"started in 2 processes.*finetuning\.processes=N"):
        refuse_launchers()
    monkeypatch.setenv("WORLD_SIZE", "1")
    refuse_launchers()
