"""Every notebook in notebooks/ executes (nbclient) with KEDRO_ENV=test against a copy of the project
after the default `kedro run --env test`, shows at least one figure, and is committed without outputs."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.helpers import PROJECT_ROOT

pytestmark = pytest.mark.e2e

NOTEBOOKS = sorted((PROJECT_ROOT / "notebooks").glob("*.ipynb"))


def test_there_is_a_notebook_per_stage_committed_without_outputs():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05"]
    for path in NOTEBOOKS:
        cells = nbformat.read(path, as_version=4).cells
        assert cells[1].source.startswith("%load_ext kedro.ipython"), path.name
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in cells if c.cell_type == "code"), path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_the_notebook_runs_in_the_test_environment(path: Path, default_run_project: Path, monkeypatch):
    monkeypatch.setenv("KEDRO_ENV", "test")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend shows the figures
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(default_run_project)}}).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{path.name} shows no figure"
