"""Training in several processes on one machine (one per GPU, or CPU processes with gloo), started
by the training node itself: Kedro runs once, the node hands the model and prompts to N workers
through torch's elastic launcher (what ``torchrun`` runs), they train together with the HF
Trainer (DDP, or FSDP with ``fsdp`` in the training arguments), and rank 0 writes the trained
model, gathered (``Trainer.save_model``), which the node opens and returns.

The hand-over is a folder under the training's ``checkpoint_dir``: ``model/`` (save_pretrained),
``prompts/`` (the DatasetDict), ``job.json`` (the settings and the MLflow run to log to);
``trained/`` and ``log_history.json`` come back. It is removed once the model is read back.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import threading
import uuid
from pathlib import Path
from typing import Any

from c2s_kedro.core.errors import C2SRuntimeError, C2SValueError

logger = logging.getLogger(__name__)

JOB_FOLDER = "launch"


def mlflow_target() -> dict[str, str] | None:
    """The active MLflow run (its id and tracking URI), for workers to log their steps to."""
    import mlflow

    run = mlflow.active_run()
    return None if run is None else {"run_id": run.info.run_id, "tracking_uri": mlflow.get_tracking_uri()}


def write_job(folder: Path, language_model, prompts, settings) -> Path:
    """Everything the workers need, in ``folder``: the model, the prompts, the settings."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    language_model.model.save_pretrained(folder / "model", safe_serialization=True)
    language_model.tokenizer.save_pretrained(folder / "model")
    prompts.save_to_disk(str(folder / "prompts"))
    job = {"settings": dataclasses.asdict(settings), "mlflow": mlflow_target(),
           "dtype": str(language_model.model.dtype).removeprefix("torch.")}
    (folder / "job.json").write_text(json.dumps(job, indent=1))
    return folder


def train_worker(folder: str) -> str | None:
    """One worker process (``RANK``, ``WORLD_SIZE`` set by the launcher): trains with the others
    and, on rank 0, writes the trained model and the Trainer's log history into ``folder``."""
    from datasets import DatasetDict

    from c2s_kedro.core.models.loading import load_model
    from c2s_kedro.core.models.training import TrainingSettings, finetune

    folder = Path(folder)
    job = json.loads((folder / "job.json").read_text())
    settings = TrainingSettings(**{**job["settings"], "processes": 1})
    language_model = load_model(folder / "model", device="cpu", dtype=job["dtype"])  # the Trainer places it
    prompts = DatasetDict.load_from_disk(str(folder / "prompts"))
    _, log_history = finetune(language_model, prompts, settings, mlflow_run=job["mlflow"], save_to=str(folder / "trained"))
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    (folder / "log_history.json").write_text(json.dumps(log_history))
    return str(folder / "trained")


def launch_settings(processes: int, folder: Path) -> Any:
    """torch's ``LaunchConfig`` for ``processes`` workers on this machine (a free local port), its
    logs in the hand-over ``folder`` (torch's default is a new folder in /tmp per launch, never
    removed)."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.launcher.api import LaunchConfig

    return LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=processes, run_id=f"c2s-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=1, start_method="spawn",
        logs_specs=DefaultLogsSpecs(log_dir=str(folder / "logs")),
    )


def finetune_in_processes(language_model, prompts, settings) -> tuple[Any, list[dict[str, Any]]]:
    """``core.models.training.finetune`` in ``settings.processes`` worker processes; returns the trained
    model (read back from what rank 0 wrote, LoRA adapters merged) and the Trainer's log history."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    from c2s_kedro.core.models.loading import LanguageModel, load_model

    import torch

    from c2s_kedro.core.models.training import training_arguments

    if settings.processes < 2:
        raise C2SValueError(f"processes is {settings.processes}: training in several processes needs 2 or more")
    arguments = training_arguments(settings.training_arguments, settings.checkpoint_dir)  # refused here, not N times
    if arguments.fsdp and not torch.cuda.is_available():
        logger.warning("fsdp is set but this machine has no GPU: accelerate shards only on GPUs, so the %d processes "
                       "train with DDP (a full copy of the model each)", settings.processes)
    original_device = language_model.model.device
    folder = write_job(Path(settings.checkpoint_dir) / JOB_FOLDER, language_model, prompts, settings)
    language_model.model.to("cpu")  # the GPUs are the workers'
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    logger.info("training in %d processes (torch elastic launch; hand-over in %s)", settings.processes, folder)
    # torch's launcher leaves its own handlers for these signals in this process: the caller's
    # (Ctrl-C ends the run as stopped) are put back
    watched = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT]
    handlers = {sig: signal.getsignal(sig) for sig in watched} if threading.current_thread() is threading.main_thread() else {}
    try:
        results = elastic_launch(launch_settings(settings.processes, folder), train_worker)(str(folder))
    except SignalException as error:  # Ctrl-C or kill while the processes trained: a stop, not a failure
        raise KeyboardInterrupt(f"training processes stopped by signal {error.sigval.name}") from error
    except ChildFailedError as error:
        raise C2SRuntimeError(
            f"training in {settings.processes} processes failed: {error.get_first_failure()[1].message}. The workers' "
            "output above says why; run with processes: 1 to see the error in this process."
        ) from error
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    trained = Path(results[0])
    log_history = json.loads((folder / "log_history.json").read_text())
    if settings.lora:
        from peft import PeftModel

        model = PeftModel.from_pretrained(language_model.model, trained).merge_and_unload().to(original_device)
    else:
        dtype = str(language_model.model.dtype).removeprefix("torch.")
        model = load_model(trained, device=str(original_device), dtype=dtype).model
    result = LanguageModel(model, language_model.tokenizer, language_model.source)
    shutil.rmtree(folder, ignore_errors=True)
    return result, log_history
