"""The project tooling the tests and benchmark scripts share (c2s_kedro.harness)."""

from __future__ import annotations

import sys

import pytest

from c2s_kedro.harness import PROJECT_ROOT, TreeMemory, copy_inputs, copy_project, logged_peak_rss_mb, run_command, run_kedro


def test_an_empty_copy_has_the_project_conf_an_empty_conf_local_and_no_data(tmp_path):
    root = copy_project(tmp_path / "copy")
    assert (root / "conf" / "base" / "catalog.yml").read_text() == (PROJECT_ROOT / "conf/base/catalog.yml").read_text()
    assert list((root / "conf" / "local").iterdir()) == []
    assert (root / "pyproject.toml").exists() and (root / ".telemetry").exists()
    assert list((root / "src").iterdir()) == []
    assert not (root / "data").exists()


def test_a_new_copy_replaces_an_old_one_unless_its_data_is_kept(tmp_path):
    root = copy_project(tmp_path / "copy")
    (root / "data").mkdir()
    (root / "data" / "kept.txt").write_text("x")
    (root / "conf" / "local" / "parameters.yml").write_text("a: 1\n")
    copy_project(root, keep_data=True)
    assert (root / "data" / "kept.txt").exists()
    assert list((root / "conf" / "local").iterdir()) == []
    copy_project(root)
    assert not (root / "data").exists()


def test_inputs_are_copied_from_the_source_and_a_missing_one_is_named(tmp_path):
    source = tmp_path / "source"
    (source / "data" / "models" / "model").mkdir(parents=True)
    (source / "data" / "models" / "model" / "weights.bin").write_text("w")
    (source / "data" / "split.json").write_text("{}")
    root = copy_project(tmp_path / "copy")
    copy_inputs(root, source, {"data/split.json": "data/split.json", "data/models/base": "data/models/model"}, "a run")
    assert (root / "data" / "split.json").read_text() == "{}"
    assert (root / "data" / "models" / "base" / "weights.bin").read_text() == "w"

    other = copy_project(tmp_path / "other")
    with pytest.raises(FileNotFoundError, match="source/data/absent.json is missing: --source must be a finished run"):
        copy_inputs(other, source, ["data/split.json", "data/absent.json"], "a finished run")
    assert not (other / "data").exists()  # nothing half-copied


def test_a_command_is_run_with_telemetry_off_and_its_figures_logged(tmp_path):
    code = "import os, sys; print(os.environ['KEDRO_DISABLE_TELEMETRY'], os.environ['EXTRA']); b = b'x' * (64 * 2**20); sys.exit(3)"
    log = tmp_path / "run.log"
    run = run_command([sys.executable, "-c", code], tmp_path, log, env={"EXTRA": "yes"}, poll_s=0.05)
    assert run.returncode == 3
    assert log.read_text().startswith("1 yes\n")
    assert run.peak_rss_mb > 64  # the child's own peak, the 64 MiB buffer included
    assert logged_peak_rss_mb(log) == pytest.approx(run.peak_rss_mb)
    assert run.wall_s > 0


def test_kedro_run_of_an_unknown_pipeline_in_a_copy_fails_and_says_so_in_its_log(tmp_path):
    root = copy_project(tmp_path / "copy")
    log = tmp_path / "kedro.log"
    run = run_kedro(root, ["run", "--pipelines=no_such_pipeline"], log)
    assert run.returncode != 0
    assert "no_such_pipeline" in log.read_text()
    assert run.peak_rss_mb > 0 and run.peak_tree_rss > 0


def test_tree_memory_sees_memory_this_process_takes():
    memory = TreeMemory(interval=0.01)
    memory.reset()
    before = memory.peak_rss
    block = b"x" * (128 * 2**20)
    memory.current()
    memory.stop()
    assert memory.peak_rss - before > 100 * 2**20
    del block


def test_the_first_node_is_noticed_in_the_log_and_the_memory_traced(tmp_path):
    code = "import time; time.sleep(0.3); print('Running node: a', flush=True); time.sleep(1.3)"
    log = tmp_path / "run.log"
    run = run_command([sys.executable, "-c", code], tmp_path, log, poll_s=0.05, first_node=True,
                      rss_trace=tmp_path / "run.rss.tsv")
    assert run.returncode == 0
    assert 0.3 <= run.first_node_s < run.wall_s
    rows = [line.split("\t") for line in (tmp_path / "run.rss.tsv").read_text().splitlines()]
    assert rows and all(float(unix_time) > 0 and float(gb) >= 0 for unix_time, gb in rows)
