import anndata as ad
import pytest
from kedro.io import DatasetError

from c2s_kedro.datasets import H5adDataset
from tests.helpers import make_counts_adata

CALLS = []


def make_cells(n_cells: int = 12, seed: int = 0) -> ad.AnnData:
    """Factory named by dotted path in ``create_if_missing``; records its arguments."""
    CALLS.append({"n_cells": n_cells, "seed": seed})
    return make_counts_adata(n_cells=n_cells, n_genes=25, seed=seed)


def test_create_args_reach_the_factory(tmp_path):
    CALLS.clear()
    dataset = H5adDataset(
        filepath=str(tmp_path / "cells.h5ad"),
        create_if_missing="tests.datasets.test_h5ad_create_args.make_cells",
        create_args={"n_cells": 30, "seed": 2},
    )
    loaded = dataset.load()
    assert CALLS == [{"n_cells": 30, "seed": 2}]
    assert loaded.n_obs == 30
    assert dataset._describe()["create_args"] == {"n_cells": 30, "seed": 2}


def test_without_create_args_the_factory_gets_no_arguments(tmp_path):
    CALLS.clear()
    H5adDataset(
        filepath=str(tmp_path / "cells.h5ad"),
        create_if_missing="tests.datasets.test_h5ad_create_args.make_cells",
    ).load()
    assert CALLS == [{"n_cells": 12, "seed": 0}]


def test_create_args_build_a_small_simulated_screen(tmp_path):
    dataset = H5adDataset(
        filepath=str(tmp_path / "screen.h5ad"),
        create_if_missing="c2s_kedro.core.simulate.screen.simulate_perturbseq",
        create_args={
            "n_genes": 300,
            "n_perturbations": 4,
            "cells_per_perturbation": 10,
            "n_control_cells": 40,
        },
    )
    loaded = dataset.load()
    assert loaded.shape == (80, 300)
    assert "perturbation_truth_log2fc" in loaded.varm


def test_create_args_without_a_factory_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match="create_args given without create_if_missing"):
        H5adDataset(filepath=str(tmp_path / "cells.h5ad"), create_args={"seed": 1})
