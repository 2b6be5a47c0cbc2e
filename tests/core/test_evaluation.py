import numpy as np
import pandas as pd
import pytest

from c2s_kedro.core.sentences.rank_fit import cluster_agreement, knn_overlap
from c2s_kedro.core.tasks.evaluation import (
    cell_type_test_prompts,
    embedding_scores,
    logistic_regression_baseline,
    score_predictions,
    sentence_rank_baseline,
)


@pytest.fixture
def points():
    return np.random.default_rng(0).normal(size=(200, 5))


def test_knn_overlap_is_one_for_identical_and_rescaled_embeddings(points):
    assert knn_overlap(points, points, k=10) == pytest.approx(1.0)
    assert knn_overlap(points, 3.0 * points + 7.0, k=10) == pytest.approx(1.0)


def test_knn_overlap_is_low_for_shuffled_cells(points):
    shuffled = points[np.random.default_rng(1).permutation(len(points))]
    # By chance a neighbour is shared with probability about k / n = 0.05.
    assert knn_overlap(points, shuffled, k=10) < 0.15


def test_knn_overlap_counts_shared_neighbours():
    # Points on a line with distinct gaps (no ties); moving the last point next to the first
    # changes the nearest neighbour of points 0 and 4 only.
    a = np.array([[0.0], [1.0], [3.0], [6.0], [20.0]])
    b = np.array([[0.0], [1.0], [3.0], [6.0], [-0.4]])
    # a: 0->1, 1->0, 2->1, 3->2, 4->3.  b: 0->4, 1->0, 2->1, 3->2, 4->0.  Shared: 1, 2, 3.
    assert knn_overlap(a, b, k=1) == pytest.approx(3 / 5)


def test_knn_overlap_caps_k_and_needs_two_cells():
    two = np.array([[0.0], [1.0]])
    assert knn_overlap(two, two, k=15) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="two cells"):
        knn_overlap(two[:1], two[:1])


def test_cluster_agreement():
    labels = np.array(["a", "a", "b", "b", "c", "c"])
    assert cluster_agreement(labels, labels) == pytest.approx(1.0)
    # Renaming clusters does not matter.
    assert cluster_agreement(labels, [2, 2, 0, 0, 1, 1]) == pytest.approx(1.0)
    # One cluster for everything agrees no better than chance.
    assert cluster_agreement(labels, ["x"] * 6) == pytest.approx(0.0)
    rng = np.random.default_rng(0)
    random_a, random_b = rng.integers(0, 5, 2000), rng.integers(0, 5, 2000)
    assert abs(cluster_agreement(random_a, random_b)) < 0.02


def test_scores_count_each_method_on_the_same_cells_and_unmatched_answers_as_wrong():
    truth = ["A", "A", "B", "B"]
    cells = ["c1", "c2", "c3", "c4"]
    generation = pd.DataFrame({"cell_name": cells, "label": truth, "answer": [" A.", " hm", " B.", " A."], "prediction": ["A", None, "B", "A"]})
    scoring = pd.DataFrame({"cell_name": cells, "label": truth, "prediction": ["A", "A", "B", "B"]})
    metrics, per_class, matrices, combined = score_predictions({"generation": generation, "label_scoring": scoring}, ["A", "B"])
    assert list(metrics) == ["n_test_cells", "n_cells_without_label", "n_scored_cells", "generation_accuracy", "generation_macro_f1", "label_scoring_accuracy",
                             "label_scoring_macro_f1", "generation_answers_not_a_label"]
    assert metrics["n_test_cells"] == 4 and metrics["generation_accuracy"] == 0.5 and metrics["label_scoring_accuracy"] == 1.0
    assert metrics["generation_answers_not_a_label"] == 0.25 and "label_scoring_answers_not_a_label" not in metrics
    # A: precision 1/2, recall 1/2; B: precision 1, recall 1/2
    assert metrics["generation_macro_f1"] == pytest.approx((0.5 + 2 / 3) / 2)
    np.testing.assert_array_equal(matrices["generation"], [[1, 0], [1, 1]])  # the unmatched answer is in no column
    np.testing.assert_array_equal(matrices["label_scoring"], [[2, 0], [0, 2]])
    rows = per_class.set_index(["method", "cell_type"])
    assert rows.loc[("generation", "B"), "precision"] == 1.0 and rows.loc[("generation", "B"), "recall"] == 0.5
    assert rows.loc[("generation", "A"), "support"] == 2
    assert list(combined.columns) == ["cell_name", "label", "generation_prediction", "label_scoring_prediction", "generation_answer"]
    assert combined["generation_answer"].tolist() == generation["answer"].tolist()


def test_baseline_fits_on_train_cells_and_predicts_the_test_cells(counts_adata):
    from c2s_kedro.core.data.preprocessing import normalize_log10

    adata = normalize_log10(counts_adata)
    names = list(adata.obs_names)
    predicted = logistic_regression_baseline(adata, names[::3], names[1::3], "cell_type", C=1.0, max_iter=500)
    assert predicted["cell_name"].tolist() == names[1::3]
    assert predicted["label"].tolist() == adata[names[1::3]].obs["cell_type"].astype(str).tolist()
    assert (predicted["prediction"] == predicted["label"]).all()  # marker genes separate the two types
    one_type = logistic_regression_baseline(adata, names[: len(names) // 2 : 2] + names[-3:], names[1:5], "cell_type", C=1e-6)
    assert set(one_type["prediction"]) == {"T cell"}  # almost no fit: the majority train label
    with pytest.raises(KeyError, match="'annotation' not found"):
        logistic_regression_baseline(adata, names[::2], names[1::2], "annotation")


def test_sentence_baseline_reads_only_the_genes_each_prompt_carries(counts_adata):
    from c2s_kedro.core.data.preprocessing import normalize_log10
    from c2s_kedro.core.sentences.rank_fit import RankFit

    adata = normalize_log10(counts_adata)
    genes = np.array(adata.var_names)
    # sentences: expressed genes by descending expression; the first half's markers are T-cell ones
    table = pd.DataFrame({
        "cell_sentence": [" ".join(genes[np.argsort(-row, kind="stable")][: np.count_nonzero(row)]) for row in adata.X.toarray()],
        "cell_type": adata.obs["cell_type"].astype(str).to_numpy(),
    }, index=adata.obs_names)
    fit = RankFit(slope=-1.0, intercept=2.0, r2=1.0, pearson_r=-1.0, spearman_r=-1.0, n_cells=1, n_points=1, log_rank_cutoff=3.0)
    names = list(adata.obs_names)
    train, test = names[::2], names[1::2]
    predicted = sentence_rank_baseline(table, train, test, [10] * len(test), "cell_type", genes, fit)
    assert predicted["cell_name"].tolist() == test and predicted["label"].tolist() == table.loc[test, "cell_type"].tolist()
    assert (predicted["prediction"] == predicted["label"]).all()  # the leading genes are the markers
    # prompts that carry no gene: nothing to read, one answer for every cell, half of them wrong
    empty = sentence_rank_baseline(table, train, test, [0] * len(test), "cell_type", genes, fit)
    assert empty["prediction"].nunique() == 1 and (empty["prediction"] == empty["label"]).mean() == 0.5
    with pytest.raises(ValueError, match="gene counts for 30 test cells"):
        sentence_rank_baseline(table, train, test, [10], "cell_type", genes, fit)


def test_test_prompts_take_labels_from_train_and_leave_room_for_every_answer(caplog):
    from c2s_kedro.core.models.tokenizer import build_gene_tokenizer
    from c2s_kedro.core.prompts.formatting import template_words

    genes = [f"GENE{i}" for i in range(80)]
    tokenizer = build_gene_tokenizer(genes, template_words() + ["T cell", "B cell", "NK"], model_max_length=64)
    table = pd.DataFrame({
        "cell_sentence": [" ".join(genes[i : i + 60]) for i in range(6)],
        "cell_type": ["T cell", "B cell", "T cell", "NK", "B cell", None],
    }, index=[f"c{i}" for i in range(6)])
    prompts = cell_type_test_prompts(table, ["c0", "c1", "c2", "c5"], ["c3", "c4"], "cell_type", "organism", tokenizer, 64,
                                     extra_new_tokens=2, seed=0)
    assert prompts["labels"] == ["B cell", "T cell"] and prompts["cell_name"] == ["c3", "c4"] and prompts["label"] == ["NK", "B cell"]
    room = max(len(tokenizer(f" {label}.")["input_ids"]) for label in prompts["labels"]) + 1 + 2
    for prompt in prompts["prompt"]:
        assert len(tokenizer(prompt)["input_ids"]) + room <= 64 and "Homo sapiens" in prompt
    assert "never seen in training: ['NK']" in caplog.text
    with pytest.raises(ValueError, match="no train cell has a 'cell_type' label"):
        cell_type_test_prompts(table, ["c5"], ["c3"], "cell_type", None, tokenizer, 64, 2)


def test_embedding_scores_need_the_label_column(counts_adata):
    import anndata as ad

    cells = ad.AnnData(obs=counts_adata.obs.copy(), obsm={"X_c2s": np.random.default_rng(0).normal(size=(counts_adata.n_obs, 4))})
    cells.obs["genes_in_prompt"] = 7
    scores = embedding_scores(cells, "cell_type", batch_key="tissue", k=5)
    assert set(scores) == {"n_cells", "embedding_dim", "c2s_silhouette_label", "c2s_knn_label_accuracy", "mean_genes_in_prompt",
                           "n_cells_without_label", "n_scored_cells"}
    assert scores["embedding_dim"] == 4 and scores["mean_genes_in_prompt"] == 7  # one tissue: no batch metric
    with pytest.raises(KeyError, match="'annotation' not found"):
        embedding_scores(cells, "annotation")


def test_cells_without_a_label_are_predicted_but_never_scored_nor_a_class(caplog):
    cells = ["c1", "c2", "c3", "c4", "c5"]
    truth = ["A", None, "B", "nan", "B"]  # None: no label; "nan": a missing label read back from a CSV or str()
    scoring = pd.DataFrame({"cell_name": cells, "label": truth, "prediction": ["A", "A", "B", "B", "A"]})
    metrics, per_class, matrices, combined = score_predictions({"label_scoring": scoring}, ["A", "B"])
    assert metrics["n_test_cells"] == 5 and metrics["n_cells_without_label"] == 2 and metrics["n_scored_cells"] == 3
    assert metrics["label_scoring_accuracy"] == pytest.approx(2 / 3)  # c1 right, c3 right, c5 wrong
    assert set(per_class["cell_type"]) == {"A", "B"} and per_class["support"].sum() == 3
    assert matrices["label_scoring"].sum() == 3
    assert combined["cell_name"].tolist() == cells  # the unlabelled cells' predictions are still written
    assert "2 of 5 test cells have no label: their predictions are written but not scored" in caplog.text
    assert "the cell-type predictions are scored on 3 cells, fewer than 20" in caplog.text
    with pytest.raises(ValueError, match="none of the 2 test cells has a label"):
        score_predictions({"label_scoring": scoring.iloc[[1, 3]]}, ["A", "B"])
    other = scoring.assign(cell_name=cells[::-1])
    with pytest.raises(ValueError, match="the baseline predictions are not of the same cells"):
        score_predictions({"label_scoring": scoring, "baseline": other}, ["A", "B"])


def test_enough_scored_cells_give_no_caution(caplog):
    table = pd.DataFrame({"cell_name": [f"c{i}" for i in range(20)], "label": ["A", "B"] * 10, "prediction": ["A", "B"] * 10})
    metrics = score_predictions({"baseline": table}, ["A", "B"])[0]
    assert metrics["n_scored_cells"] == 20 and "fewer than" not in caplog.text


def test_labels_missing_in_train_or_test_are_no_label_of_the_set(counts_adata):
    from c2s_kedro.core.data.preprocessing import normalize_log10
    from c2s_kedro.core.models.tokenizer import build_gene_tokenizer
    from c2s_kedro.core.prompts.formatting import template_words

    genes = [f"GENE{i}" for i in range(80)]
    tokenizer = build_gene_tokenizer(genes, template_words() + ["T cell", "B cell"], model_max_length=64)
    table = pd.DataFrame({"cell_sentence": [" ".join(genes[i : i + 30]) for i in range(6)],
                          "cell_type": ["T cell", "nan", None, "B cell", np.nan, "T cell"]}, index=[f"c{i}" for i in range(6)])
    prompts = cell_type_test_prompts(table, ["c0", "c1", "c2", "c3"], ["c4", "c5"], "cell_type", None, tokenizer, 64, 2)
    assert prompts["labels"] == ["B cell", "T cell"] and prompts["label"] == [None, "T cell"]
    assert prompts["cell_name"] == ["c4", "c5"]  # the unlabelled test cell is prompted all the same

    adata = normalize_log10(counts_adata)
    cell_type = adata.obs["cell_type"].astype(object)
    cell_type.iloc[::5] = np.nan  # every fifth cell unlabelled, train and test alike
    adata.obs["cell_type"] = pd.Categorical(cell_type)
    names = list(adata.obs_names)
    predicted = logistic_regression_baseline(adata, names[::2], names[1::2], "cell_type")
    assert set(predicted["prediction"]) == {"T cell", "B cell"}  # no class "nan" learnt
    assert predicted["label"].isna().sum() == sum(1 for name in names[1::2] if pd.isna(cell_type[name]))


def test_embedding_and_cluster_scores_leave_unlabelled_cells_out(counts_adata):
    import anndata as ad

    labels = counts_adata.obs["cell_type"].astype(str).to_numpy(dtype=object)
    assert cluster_agreement(labels, labels) == pytest.approx(1.0)
    holes = labels.copy()
    holes[::3] = None  # unlabelled cells are no cluster of their own: the labelled ones still agree perfectly
    assert cluster_agreement(labels, holes) == pytest.approx(1.0)

    embedding = np.random.default_rng(0).normal(size=(counts_adata.n_obs, 4))
    cells = ad.AnnData(obs=counts_adata.obs.copy(), obsm={"X_c2s": embedding})
    cells.obs["genes_in_prompt"] = 7
    cells.obs["cell_type"] = pd.Categorical(holes)
    scores = embedding_scores(cells, "cell_type", k=5)
    assert scores["n_cells"] == 60 and scores["n_cells_without_label"] == 20 and scores["n_scored_cells"] == 40
    labelled = ad.AnnData(obs=cells.obs[cells.obs["cell_type"].notna()].copy(), obsm={"X_c2s": embedding[cells.obs["cell_type"].notna().to_numpy()]})
    expected = embedding_scores(labelled, "cell_type", k=5)
    assert scores["c2s_silhouette_label"] == pytest.approx(expected["c2s_silhouette_label"])
    assert scores["c2s_knn_label_accuracy"] == pytest.approx(expected["c2s_knn_label_accuracy"])
