import os

os.environ["KEDRO_DISABLE_TELEMETRY"] = "1"
os.environ["MPLBACKEND"] = "Agg"

import tempfile  # noqa: E402

import anndata as ad  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from tests.helpers import make_counts_adata  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _temporary_files_under_pytest(tmp_path_factory):
    """Conversion writes its Arrow files to a fresh temporary directory; keep them under pytest's."""
    previous = tempfile.tempdir
    tempfile.tempdir = str(tmp_path_factory.mktemp("tempfiles"))
    yield
    tempfile.tempdir = previous


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture
def counts_adata() -> ad.AnnData:
    """60 cells x 40 genes of raw counts (CSR float32), two cell types, three MT- genes."""
    return make_counts_adata()


@pytest.fixture(scope="session")
def pbmc_counts() -> ad.AnnData:
    """The project's default data (700 PBMCs); shared, so tests must copy before changing it."""
    from c2s_kedro.core.data.pbmc68k import pbmc68k_counts

    return pbmc68k_counts()


@pytest.fixture(scope="session")
def default_run_project(tmp_path_factory):
    """A copy of the project after the default `kedro run --env test`, made once per test session
    (the end-to-end checks and the notebooks read it)."""
    import subprocess
    import sys

    from tests.helpers import copy_project

    root = copy_project(tmp_path_factory.mktemp("project"))
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "MPLBACKEND": "Agg"}
    result = subprocess.run([sys.executable, "-m", "kedro", "run", "--env", "test"], cwd=root, env=env,
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, f"kedro run --env test failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    (root / "run.log").write_text(result.stdout + result.stderr)
    return root
