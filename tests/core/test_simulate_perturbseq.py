import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from c2s_kedro.core.simulate import screen as simulator
from c2s_kedro.core.simulate.screen import CONTROL_LABEL, default_perturbseq, simulate_perturbseq, write_perturbseq_h5ad

OBS_COLUMNS = [
    "gene",
    "gene_id",
    "sgID_AB",
    "gem_group",
    "UMI_count",
    "core_adjusted_UMI_count",
    "mitopercent",
]
TRUTH_KEYS = {
    "perturbation",
    "target_gene_id",
    "knockdown_residual",
    "module",
    "module_log2fc",
    "complex",
    "has_downstream_effect",
}


@pytest.fixture(scope="module")
def screen():
    return default_perturbseq()


@pytest.fixture(scope="module")
def clean(screen):
    """Singlet, healthy cells with counts normalised to 10,000 per cell."""
    flagged = set(screen.uns["qc_truth"]["doublet"]) | set(screen.uns["qc_truth"]["high_mito"])
    cells = screen[~screen.obs_names.isin(flagged)]
    totals = np.asarray(cells.X.sum(axis=1)).ravel()
    normalized = sp.diags(1e4 / totals) @ cells.X
    return cells, sp.csr_matrix(normalized)


def _mean(matrix: sp.csr_matrix, rows: np.ndarray) -> np.ndarray:
    return np.asarray(matrix[rows].mean(axis=0)).ravel()


def _n_genes(adata: ad.AnnData) -> np.ndarray:
    return np.diff(adata.X.indptr)


def test_counts_are_raw_integers_in_csr(screen):
    assert sp.issparse(screen.X) and screen.X.format == "csr"
    assert screen.X.dtype == np.float32
    data = screen.X.data
    assert (data > 0).all()
    np.testing.assert_array_equal(data, np.round(data))
    np.testing.assert_allclose(
        screen.obs["UMI_count"], np.asarray(screen.X.sum(axis=1)).ravel(), rtol=1e-6
    )


def test_default_size_and_schema(screen):
    assert screen.shape == (24 * 80 + 800, 2000)
    assert list(screen.obs.columns) == OBS_COLUMNS
    assert screen.obs_names.is_unique and screen.var_names.is_unique
    assert screen.var_names.str.fullmatch(r"ENSG\d{11}").all()
    symbols = screen.var["gene_name"]
    assert symbols.is_unique
    # HGNC style: upper case, apart from the "orf" of open-reading-frame names (C1orf12).
    without_orf = symbols.str.replace("orf", "")
    assert (without_orf == without_orf.str.upper()).all()
    assert symbols.str.startswith("MT-").sum() == 13
    assert set(screen.obs["gem_group"]) == {1, 2, 3, 4}
    assert ((screen.obs["mitopercent"] >= 0) & (screen.obs["mitopercent"] <= 100)).all()


def test_controls_are_non_targeting_and_guides_match_targets(screen):
    obs = screen.obs
    controls = obs["gene"] == CONTROL_LABEL
    assert controls.sum() == 800
    assert (obs.loc[controls, "gene_id"] == CONTROL_LABEL).all()
    assert obs.loc[controls, "sgID_AB"].str.startswith(CONTROL_LABEL).all()
    perturbed = obs[~controls]
    assert (perturbed.groupby("gene", observed=True).size() == 80).all()
    assert (perturbed["sgID_AB"].str.split("_").str[0] == perturbed["gene"]).all()
    # The gene_id is the Ensembl id of the targeted symbol.
    symbol_of = pd.Series(screen.var["gene_name"].to_numpy(), index=screen.var_names)
    assert (symbol_of[perturbed["gene_id"].astype(str)].to_numpy() == perturbed["gene"]).all()


def test_controls_and_perturbed_cells_share_every_gem_group(screen):
    is_control = screen.obs["gene"] == CONTROL_LABEL
    groups = screen.obs.groupby("gem_group")
    assert (groups.apply(lambda cells: (cells["gene"] == CONTROL_LABEL).sum()) > 50).all()
    assert (groups.apply(lambda cells: (cells["gene"] != CONTROL_LABEL).sum()) > 50).all()
    # Gem groups differ in depth; core_adjusted_UMI_count removes it on the control cells.
    control_medians = screen.obs[is_control].groupby("gem_group")
    raw = control_medians["UMI_count"].median()
    adjusted = control_medians["core_adjusted_UMI_count"].median()
    assert raw.max() / raw.min() > 1.05
    np.testing.assert_allclose(adjusted, adjusted.iloc[0], rtol=1e-9)


def test_typical_depth_and_genes_per_cell(clean):
    cells, _ = clean
    assert 6000 < cells.obs["UMI_count"].median() < 10000
    assert 600 < np.median(_n_genes(cells)) < 1600
    umi = cells.obs["UMI_count"]
    assert np.percentile(umi, 90) / np.percentile(umi, 10) > 2
    assert 3 < cells.obs["mitopercent"].median() < 10


def test_truth_is_stored_beside_the_counts(screen):
    truth = screen.varm["perturbation_truth_log2fc"]
    table = screen.uns["perturbation_truth"]
    assert set(table) == TRUTH_KEYS
    assert isinstance(truth, pd.DataFrame)
    assert list(truth.index) == list(screen.var_names)
    assert list(truth.columns) == table["perturbation"]
    assert set(table["perturbation"]) == set(screen.obs["gene"]) - {CONTROL_LABEL}
    effect = np.asarray(table["has_downstream_effect"])
    # The default quarter of 24 perturbations has no downstream effect.
    assert (~effect).sum() == 6
    for index, name in enumerate(table["perturbation"]):
        column = truth[name]
        target = screen.var_names.get_loc(table["target_gene_id"][index])
        residual = table["knockdown_residual"][index]
        assert 0.05 <= residual <= 0.40
        assert column.iloc[target] == pytest.approx(np.log2(residual))
        changed = set(np.flatnonzero(column.to_numpy() != 0)) - {target}
        if effect[index]:
            module = table["module"][index]
            assert table["complex"][index] >= 0
            assert 0.5 <= abs(table["module_log2fc"][index]) <= 2.0
            assert changed == set(np.flatnonzero(screen.var["module"] == module))
            assert np.sign(column.iloc[list(changed)]).nunique() == 1
        else:
            assert table["module"][index] == -1 and table["complex"][index] == -1
            assert table["module_log2fc"][index] == 0
            assert not changed
    assert {np.sign(x) for x in table["module_log2fc"]} >= {-1.0, 1.0}


def test_complex_partners_share_module_and_direction(screen):
    table = pd.DataFrame(screen.uns["perturbation_truth"])
    complexes = table[table["complex"] >= 0].groupby("complex")
    assert (complexes.size() >= 2).all()
    assert (complexes["module"].nunique() == 1).all()
    assert (complexes["module_log2fc"].apply(lambda fc: np.sign(fc).nunique()) == 1).all()


def test_targets_are_among_the_top_expressed_genes(clean):
    cells, normalized = clean
    control_mean = _mean(normalized, (cells.obs["gene"] == CONTROL_LABEL).to_numpy())
    rank = np.argsort(np.argsort(-control_mean))
    targets = cells.var_names.get_indexer(cells.uns["perturbation_truth"]["target_gene_id"])
    assert (rank[targets] < 250).all()


def test_every_perturbation_knocks_down_its_target(clean):
    cells, normalized = clean
    gene = cells.obs["gene"].to_numpy()
    control_mean = _mean(normalized, gene == CONTROL_LABEL)
    table = cells.uns["perturbation_truth"]
    for name, gene_id in zip(table["perturbation"], table["target_gene_id"]):
        target = cells.var_names.get_loc(gene_id)
        perturbed_mean = _mean(normalized, gene == name)
        assert perturbed_mean[target] < 0.6 * control_mean[target], name


def test_module_shifts_follow_the_truth_and_no_effect_leaves_modules_alone(clean):
    cells, normalized = clean
    gene = cells.obs["gene"].to_numpy()
    module_of_gene = cells.var["module"].to_numpy()
    modules = np.unique(module_of_gene[module_of_gene >= 0])
    control_mean = _mean(normalized, gene == CONTROL_LABEL)
    truth = cells.varm["perturbation_truth_log2fc"]
    table = cells.uns["perturbation_truth"]
    for index, name in enumerate(table["perturbation"]):
        perturbed_mean = _mean(normalized, gene == name)
        shift = {
            module: np.log2(
                perturbed_mean[module_of_gene == module].sum()
                / control_mean[module_of_gene == module].sum()
            )
            for module in modules
        }
        own = table["module"][index]
        if table["has_downstream_effect"][index]:
            in_module = module_of_gene == own
            expected = np.log2(
                (control_mean[in_module] * np.exp2(truth[name].to_numpy()[in_module])).sum()
                / control_mean[in_module].sum()
            )
            assert np.sign(shift[own]) == np.sign(table["module_log2fc"][index]), name
            assert shift[own] == pytest.approx(expected, abs=0.3), name
        for module, value in shift.items():
            if module != own:
                assert abs(value) < 0.25, (name, module, value)


def test_complex_targets_co_vary_in_control_cells(clean):
    cells, normalized = clean
    controls = normalized[(cells.obs["gene"] == CONTROL_LABEL).to_numpy()]
    table = pd.DataFrame(cells.uns["perturbation_truth"])
    table = table[table["complex"] >= 0]
    columns = cells.var_names.get_indexer(table["target_gene_id"])
    expression = np.log1p(controls[:, columns].toarray())
    correlation = np.corrcoef(expression, rowvar=False)
    same = table["complex"].to_numpy()[:, None] == table["complex"].to_numpy()[None, :]
    off_diagonal = ~np.eye(len(table), dtype=bool)
    assert correlation[same & off_diagonal].mean() > correlation[~same].mean() + 0.05


def test_qc_material_is_there_for_the_users_filters(screen):
    obs = screen.obs
    n_genes = _n_genes(screen)
    doublet = obs_names_in(screen, "doublet")
    high_mito = obs_names_in(screen, "high_mito")
    assert doublet.sum() == round(0.02 * screen.n_obs)
    assert high_mito.sum() == round(0.03 * screen.n_obs)
    assert not (doublet & high_mito).any()

    single = ~doublet & ~high_mito
    assert obs.loc[doublet, "UMI_count"].median() > 1.7 * obs.loc[single, "UMI_count"].median()
    assert np.median(n_genes[doublet]) > 1.15 * np.median(n_genes[single])
    # Doublets are enriched among the highest-UMI cells.
    top = obs["UMI_count"].to_numpy() >= np.percentile(obs["UMI_count"], 90)
    assert doublet[top].mean() > 4 * doublet.mean()

    assert (obs.loc[high_mito, "mitopercent"].between(15, 55)).all()
    # Healthy cells have a tail of mito percent, but few reach the threshold.
    assert (obs.loc[single, "mitopercent"] < 15).mean() > 0.99

    passes = (
        obs["UMI_count"].between(1000, 40000, inclusive="neither")
        & (n_genes > 500)
        & (n_genes < 6000)
        & (obs["mitopercent"] < 15)
    ).to_numpy()
    assert not passes[high_mito].any()
    assert 0.02 < 1 - passes.mean() < 0.08
    assert passes[single].mean() > 0.98


def obs_names_in(adata: ad.AnnData, kind: str) -> np.ndarray:
    return adata.obs_names.isin(adata.uns["qc_truth"][kind])


SMALL = dict(n_genes=400, n_perturbations=6, cells_per_perturbation=20, n_control_cells=100)


def test_same_seed_gives_same_screen_and_other_seed_differs():
    first = simulate_perturbseq(**SMALL, seed=5)
    second = simulate_perturbseq(**SMALL, seed=5)
    other = simulate_perturbseq(**SMALL, seed=6)
    assert (first.X != second.X).nnz == 0
    assert first.obs.equals(second.obs)
    assert list(first.var_names) == list(second.var_names)
    assert first.varm["perturbation_truth_log2fc"].equals(second.varm["perturbation_truth_log2fc"])
    assert first.uns["perturbation_truth"] == second.uns["perturbation_truth"]
    assert first.X.shape == other.X.shape
    assert (first.X != other.X).nnz > 0


def test_settings_are_recorded_and_sizes_follow_them():
    adata = simulate_perturbseq(**SMALL, n_gem_groups=2, fraction_no_effect=0.5, seed=2)
    assert adata.shape == (6 * 20 + 100, 400)
    assert set(adata.obs["gem_group"]) == {1, 2}
    assert sum(adata.uns["perturbation_truth"]["has_downstream_effect"]) == 3
    settings = adata.uns["simulation"]
    assert {key: settings[key] for key in SMALL} == SMALL
    assert settings["fraction_no_effect"] == 0.5 and settings["seed"] == 2


def test_all_no_effect_perturbations_still_knock_down():
    adata = simulate_perturbseq(**SMALL, fraction_no_effect=1.0, seed=1)
    truth = adata.varm["perturbation_truth_log2fc"]
    assert ((truth != 0).sum(axis=0) == 1).all()
    assert not any(adata.uns["perturbation_truth"]["has_downstream_effect"])


def test_round_trip_through_h5ad_keeps_the_truth(tmp_path):
    adata = simulate_perturbseq(**SMALL, seed=3)
    path = tmp_path / "screen.h5ad"
    adata.write_h5ad(path)
    loaded = ad.read_h5ad(path)
    assert (loaded.X != adata.X).nnz == 0
    pd.testing.assert_frame_equal(loaded.obs, adata.obs)
    pd.testing.assert_frame_equal(
        loaded.varm["perturbation_truth_log2fc"], adata.varm["perturbation_truth_log2fc"]
    )
    for key, values in adata.uns["perturbation_truth"].items():
        assert list(loaded.uns["perturbation_truth"][key]) == values, key
    for key, values in adata.uns["qc_truth"].items():
        assert list(loaded.uns["qc_truth"][key]) == values, key
    assert loaded.uns["simulation"]["seed"] == 3


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"n_genes": 0}, "n_genes must be at least 1"),
        ({"cells_per_perturbation": 0}, "cells_per_perturbation must be at least 1"),
        ({"n_control_cells": -5}, "n_control_cells must be at least 1"),
        ({"n_gem_groups": 0}, "n_gem_groups must be at least 1"),
        ({"n_perturbations": 2.5}, "n_perturbations must be an integer"),
        ({"fraction_no_effect": 1.5}, r"fraction_no_effect must lie in \[0, 1\]"),
        ({"doublet_fraction": -0.1}, r"doublet_fraction must lie in \[0, 1\]"),
        ({"doublet_fraction": 0.6, "high_mito_fraction": 0.6}, "must not exceed 1"),
        ({"median_umi": 0}, "median_umi must be positive"),
        ({"seed": -1}, "seed must be a non-negative integer"),
        ({"n_perturbations": 600}, "n_perturbations=600 is more than the 500 genes eligible"),
        ({"n_genes": 60, "n_perturbations": 2}, "n_genes=60 is too small"),
        ({"n_perturbations": 3, "n_double_perturbations": 4}, "n_double_perturbations=4 is more than the 3 pairs"),
        ({"n_double_perturbations": -1}, "n_double_perturbations must be an integer of at least 0"),
    ],
)
def test_bad_arguments_raise(arguments, message):
    with pytest.raises(ValueError, match=message):
        simulate_perturbseq(**arguments)


def test_more_perturbations_than_the_200_most_abundant_genes_each_with_its_truth():
    adata = simulate_perturbseq(n_genes=1200, n_perturbations=260, cells_per_perturbation=1, n_control_cells=40, seed=1)
    truth = adata.varm["perturbation_truth_log2fc"]
    perturbations = adata.uns["perturbation_truth"]["perturbation"]
    assert len(set(perturbations)) == 260 and list(truth.columns) == perturbations
    symbol_of = dict(zip(adata.var_names, adata.var["gene_name"]))
    for name, target in zip(perturbations, adata.uns["perturbation_truth"]["target_gene_id"]):
        assert symbol_of[target] == name
        assert truth.at[target, name] < 0  # its knockdown
    assert set(adata.obs["gene"]) == set(perturbations) | {CONTROL_LABEL}


def test_written_chunk_by_chunk_equals_the_screen_in_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(simulator, "_BLOCK_ENTRIES", 400 * 30)  # 30 cells a block
    monkeypatch.setattr(simulator, "_WRITE_CHUNK_CELLS", 50)  # an append every other block
    expected = simulate_perturbseq(**SMALL, seed=4)
    expected.write_h5ad(tmp_path / "expected.h5ad")
    expected = ad.read_h5ad(tmp_path / "expected.h5ad")
    written = ad.read_h5ad(write_perturbseq_h5ad(tmp_path / "chunks.h5ad", **SMALL, seed=4))
    assert written.X.format == "csr" and written.X.dtype == np.float32
    assert (written.X != expected.X).nnz == 0
    pd.testing.assert_frame_equal(written.obs, expected.obs)
    pd.testing.assert_frame_equal(written.var, expected.var)
    pd.testing.assert_frame_equal(written.varm["perturbation_truth_log2fc"], expected.varm["perturbation_truth_log2fc"])
    for section in ("perturbation_truth", "qc_truth", "simulation"):
        for key, values in expected.uns[section].items():
            np.testing.assert_array_equal(written.uns[section][key], values)


def test_double_perturbations_add_their_singles_effects_and_leave_the_singles_as_they_were():
    singles = simulate_perturbseq(**SMALL, seed=7)
    screen = simulate_perturbseq(**SMALL, seed=7, n_double_perturbations=3)
    assert "double_perturbations" not in singles.uns and singles.uns["simulation"]["n_double_perturbations"] == 0
    doubles = screen.uns["double_perturbations"]
    assert len(doubles["perturbation"]) == 3 and all(label == "+".join(pair) for label, pair in
                                                     zip(doubles["perturbation"], doubles["singles"]))
    truth = screen.varm["perturbation_truth_log2fc"]
    single_names = screen.uns["perturbation_truth"]["perturbation"]
    # the singles are the same perturbations with the same truth; a double's truth is the sum of its singles'
    assert single_names == singles.uns["perturbation_truth"]["perturbation"]
    pd.testing.assert_frame_equal(truth[single_names], singles.varm["perturbation_truth_log2fc"])
    for label, (a, b) in zip(doubles["perturbation"], doubles["singles"]):
        np.testing.assert_allclose(truth[label], truth[a] + truth[b])
    counts = screen.obs["gene"].value_counts()
    assert (counts[doubles["perturbation"]] == SMALL["cells_per_perturbation"]).all()
    assert set(counts.index) == set(single_names) | set(doubles["perturbation"]) | {CONTROL_LABEL}
    # both targets of a double are knocked down in its cells
    totals = np.asarray(screen.X.sum(axis=1)).ravel()
    normalized = sp.csr_matrix(sp.diags(1e4 / totals) @ screen.X)
    gene = screen.obs["gene"].to_numpy()
    control = _mean(normalized, gene == CONTROL_LABEL)
    symbol = list(screen.var["gene_name"])
    for label, pair in zip(doubles["perturbation"], doubles["singles"]):
        mean = _mean(normalized, gene == label)
        guides = screen.obs.loc[gene == label, "sgID_AB"].iloc[0]
        for target in pair:
            assert mean[symbol.index(target)] < 0.6 * control[symbol.index(target)], (label, target)
            assert guides.count(f"{target}_+_") == 1


def test_writer_names_its_arguments():
    with pytest.raises(TypeError, match="write_perturbseq_h5ad .*arguments of simulate_perturbseq"):
        write_perturbseq_h5ad("unused.h5ad", n_cells=10)
