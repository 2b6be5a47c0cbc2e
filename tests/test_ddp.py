"""Several processes run one pipeline (torchrun, accelerate launch): every rank runs rank 0's list
of nodes, only rank 0 writes, and only rank 0 runs the plugins' hooks (one MLflow run)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from kedro.io import DataCatalog, DatasetError, MemoryDataset
from kedro.pipeline import Pipeline, node
from kedro_datasets.json import JSONDataset

from c2s_kedro import runner as runner_module
from c2s_kedro.runner import KeptInMemory, UpstreamRunner, UserEntryMissingError, plugins_off_this_rank


def test_a_non_zero_rank_keeps_saves_in_memory(tmp_path):
    target = tmp_path / "never_written.json"
    kept = KeptInMemory(JSONDataset(filepath=str(target)))
    assert not kept.exists()
    kept.save({"a": 1})
    assert kept.load() == {"a": 1} and kept.exists() and not target.exists()


def test_a_file_rank_zero_makes_on_first_load_is_waited_for_not_made_again(tmp_path):
    target = tmp_path / "raw.json"
    kept = KeptInMemory(JSONDataset(filepath=str(target)), poll_s=0.05)
    writer = threading.Timer(0.3, lambda: JSONDataset(filepath=str(target)).save({"made_by": "rank 0"}))
    writer.start()
    try:
        assert kept.load() == {"made_by": "rank 0"}
    finally:
        writer.cancel()


def test_waiting_for_rank_zero_has_a_limit_that_names_the_dataset(tmp_path):
    kept = KeptInMemory(JSONDataset(filepath=str(tmp_path / "raw.json")), timeout_s=0.1, poll_s=0.02)
    with pytest.raises(DatasetError, match=r"waited 0 s for rank 0 to write .*raw\.json"):
        kept.load()


def test_only_rank_zero_runs_the_plugins_hooks(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    assert plugins_off_this_rank() == ()
    monkeypatch.setenv("RANK", "1")
    assert {"kedro_mlflow", "kedro-viz"} <= set(plugins_off_this_rank())
    monkeypatch.delenv("RANK")
    assert plugins_off_this_rank() == ()


def _make_raw() -> dict:
    return {"values": [1, 2, 3]}


def _process(raw: dict) -> dict:
    return {"values": [2 * v for v in raw["values"]]}


def test_when_rank_zero_cannot_plan_every_rank_stops(tmp_path, monkeypatch):
    """Rank 0 refuses (a user entry is missing): it tells the other ranks, which stop instead of
    waiting for a plan until the timeout."""
    project = Pipeline([node(_make_raw, None, "raw", name="make_raw"), node(_process, "raw", "processed", name="process")])
    target = project.only_nodes("process")
    catalog = DataCatalog({name: JSONDataset(filepath=str(tmp_path / f"{name}.json")) for name in ("raw", "processed")})
    sent = []
    monkeypatch.setattr(runner_module, "share_plan", lambda names: sent.append(names))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(UserEntryMissingError):
        UpstreamRunner(project_pipeline=project, user_entries=["raw"]).run(target, catalog)
    assert sent == [None]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(runner_module, "share_plan", lambda names: None)
    with pytest.raises(SystemExit):
        UpstreamRunner(project_pipeline=project).run(target, catalog)
    assert not (tmp_path / "processed.json").exists()


# Run by torchrun with 2 processes (gloo): the runner's real plan broadcast, the ranks' saves, a
# collective step that only lines up when both ranks run the same nodes, and the check that both
# ranks train on the same data (accelerate reusing the runner's process group).
TWO_RANKS = textwrap.dedent('''
    import json, sys
    from pathlib import Path

    import torch
    import torch.distributed as dist
    from kedro.io import DataCatalog
    from kedro.pipeline import Pipeline, node
    from kedro_datasets.json import JSONDataset

    from c2s_kedro.runner import UpstreamRunner, process_rank

    root, rank = Path(sys.argv[1]), process_rank()
    ran = []

    def make_raw():
        ran.append("make_raw")
        return {"values": [1, 2, 3], "written_by": rank}

    def process(raw):
        ran.append("process")
        return {"values": [2 * v for v in raw["values"]], "written_by": rank}

    def train(processed):  # a collective step, as the Trainer's: hangs unless every rank gets here
        ran.append("train")
        total = torch.tensor([sum(processed["values"])])
        dist.all_reduce(total)
        return {"total": int(total), "written_by": rank}

    project = Pipeline([node(make_raw, None, "raw", name="make_raw"), node(process, "raw", "processed", name="process"),
                        node(train, "processed", "model", name="train")])

    class HalfWritten(JSONDataset):  # what rank 1 could see while rank 0 writes: "exists", unreadable
        def _exists(self):
            return True

        def load(self):
            raise ValueError("half-written file read")

    data = root / "data"
    catalog = DataCatalog({name: JSONDataset(filepath=str(data / f"{name}.json")) for name in ("raw", "processed", "model")})
    if rank == 1:
        catalog["processed"] = HalfWritten(filepath=str(data / "processed.json"))
    UpstreamRunner(project_pipeline=project).run(project.only_nodes("train"), catalog)

    from accelerate import PartialState
    from datasets import Dataset

    from c2s_kedro.core.training import require_same_data_on_every_rank

    PartialState(cpu=True)
    same = Dataset.from_dict({"input_ids": [[1, 2], [3, 4, 5]]})
    require_same_data_on_every_rank(same, None)
    differs = Dataset.from_dict({"input_ids": [[1, 2], [3] * (4 + rank)]})
    try:
        require_same_data_on_every_rank(differs, None)
        message = None
    except ValueError as error:
        message = str(error)
    (root / f"rank{rank}.json").write_text(json.dumps({"ran": ran, "mismatch": message}))

    import time
    if rank == 0:  # rank 0 ends last: rank 1 must not tear its connections down first (abort at exit)
        time.sleep(1)
''')


def test_two_ranks_run_rank_zeros_nodes_and_only_rank_zero_writes(tmp_path):
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", str(script), str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = tmp_path / "data"
    for name in ("raw", "processed", "model"):
        assert json.loads((data / f"{name}.json").read_text())["written_by"] == 0
    assert json.loads((data / "model.json").read_text())["total"] == 2 * 12  # both ranks took the step
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    # rank 1 ran rank 0's plan although its own view said "processed" was saved
    assert ranks[0]["ran"] == ranks[1]["ran"] == ["make_raw", "process", "train"]
    for rank in ranks:
        assert rank["mismatch"] and "built different training or eval sets" in rank["mismatch"]


def test_a_kept_dataset_is_never_wrapped_twice(tmp_path):
    catalog = DataCatalog({"a": JSONDataset(filepath=str(tmp_path / "a.json")), "m": MemoryDataset()})
    runner_module.keep_saves_in_memory(catalog, ["a", "m", "absent"])
    first = catalog.get("a")
    runner_module.keep_saves_in_memory(catalog, ["a"])
    assert isinstance(first, KeptInMemory) and catalog.get("a") is first
    assert isinstance(catalog.get("m"), MemoryDataset) and catalog.get("absent") is None


def test_dataset_factory_patterns_are_kept_in_memory_too(tmp_path):
    """The screen's datasets (perturbation.*) come from patterns, resolved only when asked for."""
    catalog = DataCatalog.from_config({"{namespace}.rank_fit": {"type": "json.JSONDataset",
                                                                "filepath": str(tmp_path / "{namespace}_rank_fit.json")}})
    runner_module.keep_saves_in_memory(catalog, ["perturbation.rank_fit"])
    catalog.save("perturbation.rank_fit", {"slope": -1.0})
    assert catalog.load("perturbation.rank_fit") == {"slope": -1.0}
    assert not (tmp_path / "perturbation_rank_fit.json").exists()



def test_the_process_group_opened_for_the_plan_is_closed_at_exit(monkeypatch):
    import socket

    import torch.distributed as dist

    with socket.socket() as probe:  # a free port for the one-rank group
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    at_exit = []
    monkeypatch.setattr(runner_module.atexit, "register", at_exit.append)
    assert not dist.is_initialized()
    try:
        assert runner_module.share_plan(["a", "b"]) == ["a", "b"]
        assert dist.is_initialized() and len(at_exit) == 1
        at_exit[0]()  # what the interpreter runs at exit
        assert not dist.is_initialized()
        at_exit[0]()  # closed already (e.g. by the Trainer): nothing to do
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
