"""`kedro run` (c2s_kedro.cli): an error the project raises on purpose is one line with its fix;
any other error keeps its traceback."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner
from kedro.io import DatasetError

from c2s_kedro.cli import quiet_errors, raised_on_purpose, user_error
from c2s_kedro.datasets import H5adDataset


def _missing_file_error(tmp_path) -> DatasetError:
    with pytest.raises(DatasetError) as raised:
        H5adDataset(filepath=str(tmp_path / "nope.h5ad")).load()
    return raised.value


def test_an_error_raised_by_the_project_is_recognised_through_kedros_wrapper(tmp_path):
    ours = _missing_file_error(tmp_path)
    assert raised_on_purpose(ours)
    try:
        raise DatasetError("Failed while loading data from dataset raw_adata.") from ours  # as Kedro wraps it
    except DatasetError as wrapped:
        assert not raised_on_purpose(wrapped)  # Kedro's own wrapper is not a message of the project
        assert user_error(wrapped) is ours


def test_a_bug_or_a_librarys_error_is_not_taken_for_a_message():
    from c2s_kedro.core.tracking import mlflow_metrics

    with pytest.raises(ValueError) as library:
        mlflow_metrics({"a": "not a number"})  # float() fails inside the package: not a raise statement
    assert user_error(library.value) is None
    with pytest.raises(AttributeError) as bug:
        mlflow_metrics(None)
    assert user_error(bug.value) is None


def test_the_package_raises_its_own_errors_only():
    # An error raised on purpose is a C2SError, so that `kedro run` prints it as one line: a bare
    # `raise ValueError(...)` added to the package would silently turn its message into a traceback
    import ast
    from pathlib import Path

    import c2s_kedro

    builtin = {"ValueError", "KeyError", "TypeError", "IndexError", "RuntimeError", "LookupError", "OSError",
               "FileNotFoundError", "PermissionError", "DatasetError", "Exception"}
    found = []
    for path in Path(c2s_kedro.__file__).parent.rglob("*.py"):
        if path.name == "harness.py":  # tooling of the tests and benchmarks, never part of a run
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name) \
                    and node.exc.func.id in builtin:
                found.append(f"{path.name}:{node.lineno} {node.exc.func.id}")
    assert not found, found


def _command(failure):
    @click.command()
    def run():
        failure()

    return quiet_errors(run)


def test_run_prints_the_projects_error_as_one_line_and_exits_1(tmp_path):
    result = CliRunner().invoke(_command(lambda: H5adDataset(filepath=str(tmp_path / "nope.h5ad")).load()))
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: h5ad file not found")
    assert "point the catalog entry's filepath at your data (e.g. in conf/local/catalog.yml)" in lines[0]
    assert "Traceback" not in result.output


def test_run_keeps_the_traceback_of_anything_else(monkeypatch, tmp_path):
    result = CliRunner().invoke(_command(lambda: {}["missing"]))
    assert isinstance(result.exception, KeyError) and result.exit_code != 0 and "Error:" not in result.output
    monkeypatch.setenv("C2S_TRACEBACK", "1")  # and of the project's errors too, when asked for
    result = CliRunner().invoke(_command(lambda: H5adDataset(filepath=str(tmp_path / "nope.h5ad")).load()))
    assert isinstance(result.exception, DatasetError)


def test_python_m_c2s_kedro_runs_the_same_command():
    from kedro.framework.cli.utils import find_run_command

    from c2s_kedro import cli

    assert find_run_command("c2s_kedro") is cli.run is cli.cli.commands["run"]


def test_a_malformed_yaml_file_in_conf_is_one_line_naming_the_file_and_line(tmp_path):
    from kedro.config import OmegaConfigLoader

    (tmp_path / "base").mkdir()
    (tmp_path / "local").mkdir()
    malformed = tmp_path / "base" / "parameters_finetuning.yml"
    malformed.write_text("finetuning:\n  epochs: [1, 2\n  learning_rate: 3\n")
    loader = OmegaConfigLoader(str(tmp_path), base_env="base", default_run_env="local")
    result = CliRunner().invoke(_command(lambda: loader["parameters"]))
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    assert lines[0].startswith(f"Error: {malformed.as_posix()}, line 3, column ")  # counted from 1, as editors do
    assert "malformed YAML (" in lines[0]
    assert "expected ',' or ']'" in lines[0]
