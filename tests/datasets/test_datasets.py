import json
import math
import os

import anndata as ad
import numpy as np
import pytest
from kedro.io import DatasetError

from c2s_kedro.datasets import H5adDataset, MetricsDataset
from tests.helpers import make_counts_adata

FACTORY_CALLS = []


def make_small() -> ad.AnnData:
    """Factory named by dotted path in ``create_if_missing``; counts its calls."""
    FACTORY_CALLS.append(1)
    return make_counts_adata(n_cells=12, n_genes=25, seed=4)


def _same(a: ad.AnnData, b: ad.AnnData) -> bool:
    return (
        list(a.obs_names) == list(b.obs_names)
        and list(a.var_names) == list(b.var_names)
        and (a.X != b.X).nnz == 0
        and a.obs.equals(b.obs)
    )


# ---- H5adDataset -------------------------------------------------------------------------------


def test_h5ad_round_trip(tmp_path, counts_adata):
    counts_adata.layers["counts"] = counts_adata.X.copy()
    dataset = H5adDataset(filepath=str(tmp_path / "sub" / "cells.h5ad"))
    assert not dataset.exists()
    dataset.save(counts_adata)
    assert dataset.exists()
    loaded = dataset.load()
    assert _same(loaded, counts_adata)
    assert (loaded.layers["counts"] != counts_adata.layers["counts"]).nnz == 0
    assert list(tmp_path.joinpath("sub").iterdir()) == [tmp_path / "sub" / "cells.h5ad"]


def test_h5ad_load_args_open_backed(tmp_path, counts_adata):
    path = tmp_path / "cells.h5ad"
    counts_adata.write_h5ad(path)
    loaded = H5adDataset(filepath=str(path), load_args={"backed": "r"}).load()
    try:
        assert loaded.isbacked
        assert loaded.shape == counts_adata.shape
    finally:
        loaded.file.close()


def test_missing_h5ad_names_the_path_and_the_fix(tmp_path):
    path = tmp_path / "nowhere" / "cells.h5ad"
    with pytest.raises(DatasetError) as error:
        H5adDataset(filepath=str(path)).load()
    message = str(error.value)
    assert str(path.resolve()) in message
    assert "filepath" in message and "catalog" in message


def test_unreadable_h5ad_raises_dataset_error(tmp_path):
    path = tmp_path / "broken.h5ad"
    path.write_bytes(b"not an hdf5 file")
    with pytest.raises(DatasetError, match="broken.h5ad") as error:
        H5adDataset(filepath=str(path)).load()
    assert "Copy it again" in str(error.value) and "filepath" in str(error.value)


def test_a_truncated_h5ad_names_the_file_and_the_fix(tmp_path, counts_adata):
    whole = tmp_path / "whole.h5ad"
    H5adDataset(filepath=str(whole)).save(counts_adata)
    cut = tmp_path / "cut.h5ad"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 3])
    with pytest.raises(DatasetError, match="incomplete or not an h5ad file") as error:
        H5adDataset(filepath=str(cut)).load()
    assert str(cut) in str(error.value) and "Copy it again, or point the catalog entry's filepath" in str(error.value)


def test_create_if_missing_builds_the_file_once(tmp_path):
    path = tmp_path / "raw" / "small.h5ad"
    dataset = H5adDataset(filepath=str(path), create_if_missing="tests.datasets.test_datasets.make_small")
    FACTORY_CALLS.clear()
    first = dataset.load()
    assert path.exists()
    second = dataset.load()
    assert len(FACTORY_CALLS) == 1
    expected = make_counts_adata(n_cells=12, n_genes=25, seed=4)
    assert _same(first, expected)
    assert _same(second, expected)


def test_failed_save_keeps_the_previous_file_and_no_temporary(tmp_path, counts_adata, monkeypatch):
    path = tmp_path / "cells.h5ad"
    dataset = H5adDataset(filepath=str(path))
    dataset.save(counts_adata)
    before = path.read_bytes()

    def write_half_then_fail(self, filename, **kwargs):
        with open(filename, "wb") as stream:
            stream.write(b"\x89HDF half written")
        raise RuntimeError("disk full")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", write_half_then_fail)
    with pytest.raises(DatasetError, match="disk full"):
        dataset.save(make_counts_adata(n_cells=5, seed=9))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]
    assert _same(dataset.load(), counts_adata)


def test_h5ad_refuses_to_save_other_objects(tmp_path):
    with pytest.raises(DatasetError, match="AnnData"):
        H5adDataset(filepath=str(tmp_path / "x.h5ad")).save({"not": "anndata"})


# ---- MetricsDataset ----------------------------------------------------------------------------


def test_metrics_written_as_flat_json_with_nan_as_null(tmp_path):
    path = tmp_path / "reporting" / "metrics.json"
    dataset = MetricsDataset(filepath=str(path))
    dataset.save({"n_cells": 700, "r2": 0.87, "pearson": float("nan"), "ratio": float("inf")})
    on_disk = json.loads(path.read_text())
    assert on_disk == {"n_cells": 700.0, "r2": 0.87, "pearson": None, "ratio": None}
    assert dataset.load() == on_disk
    assert list(path.parent.iterdir()) == [path]


@pytest.mark.parametrize("bad", ["0.5", None, True, [1.0], {"nested": 1.0}])
def test_metrics_refuse_non_numbers(tmp_path, bad):
    path = tmp_path / "metrics.json"
    with pytest.raises(DatasetError, match="not numbers") as error:
        MetricsDataset(filepath=str(path)).save({"good": 1.0, "bad": bad})
    assert "bad" in str(error.value)
    assert not path.exists()


def test_metrics_accept_numpy_numbers(tmp_path):
    path = tmp_path / "metrics.json"
    MetricsDataset(filepath=str(path)).save({"r2": np.float32(0.5), "n_cells": np.int64(3)})
    assert json.loads(path.read_text()) == {"r2": 0.5, "n_cells": 3.0}


def test_missing_metrics_file_raises(tmp_path):
    with pytest.raises(DatasetError, match="metrics file not found"):
        MetricsDataset(filepath=str(tmp_path / "none.json")).load()


def test_metrics_logged_to_the_active_mlflow_run(tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    previous_uri = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/m.db")
    try:
        mlflow.set_experiment("metrics_dataset_test")
        dataset = MetricsDataset(filepath=str(tmp_path / "metrics.json"), prefix="bench")
        with mlflow.start_run() as run:
            dataset.save({"r2": 0.75, "n_cells": 12, "pearson": math.nan})
        metrics = MlflowClient().get_run(run.info.run_id).data.metrics
        assert metrics == {"bench/r2": 0.75, "bench/n_cells": 12.0}  # the pipeline is the chart section
        # Without an active run the JSON is still written and nothing fails.
        dataset.save({"r2": 0.5})
        assert json.loads((tmp_path / "metrics.json").read_text()) == {"r2": 0.5}
    finally:
        mlflow.set_tracking_uri(previous_uri)


def test_metric_names_mlflow_refuses_are_made_safe_there_only(tmp_path):
    import json

    import mlflow
    from mlflow import MlflowClient

    from c2s_kedro.datasets import MetricsDataset

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/names.db")
    mlflow.set_experiment("metric-names")  # a fresh store: do not reuse another test's experiment id
    dataset = MetricsDataset(filepath=str(tmp_path / "m.json"), prefix="gen")
    with mlflow.start_run() as run:
        dataset.save({"correlation[CD14+ Monocyte]": 0.9, "mean_expression_correlation[CD4+/CD25 T Reg]": 0.5,
                      "model_T1.3.pearson_delta": 0.1})
    assert json.loads((tmp_path / "m.json").read_text()) == {"correlation[CD14+ Monocyte]": 0.9,
                                                              "mean_expression_correlation[CD4+/CD25 T Reg]": 0.5,
                                                              "model_T1.3.pearson_delta": 0.1}
    assert MlflowClient().get_run(run.info.run_id).data.metrics == {
        "gen/correlation_CD14_Monocyte": 0.9, "gen/mean_expression_correlation_CD4_CD25_T_Reg": 0.5,
        "gen/model_T1_3.pearson_delta": 0.1}


# ---- permissions: atomic writes respect the umask ----------------------------------------------


@pytest.fixture
def group_readable_umask():
    previous = os.umask(0o027)
    yield 0o027
    os.umask(previous)


def test_saved_files_get_the_umask_permissions_not_private_ones(tmp_path, counts_adata, group_readable_umask):
    import stat

    from c2s_kedro.datasets import NpyDataset

    H5adDataset(filepath=str(tmp_path / "cells.h5ad")).save(counts_adata)
    MetricsDataset(filepath=str(tmp_path / "metrics.json")).save({"r2": 0.5})
    NpyDataset(filepath=str(tmp_path / "array.npy")).save(np.zeros(3))
    for name in ("cells.h5ad", "metrics.json", "array.npy"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640, name  # 0o666 & ~0o027, not mkstemp's 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["array.npy", "cells.h5ad", "metrics.json"]

