"""What the ranks of a DDP training compare before the first step: the data each built itself."""

from datasets import Dataset, load_from_disk

from c2s_kedro.core.models.training import data_fingerprint, require_same_data_on_every_rank


def test_the_same_rows_give_the_same_fingerprint_wherever_they_come_from(tmp_path):
    built = Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5], [6]], "labels": [[1, 2, 3], [4, 5], [6]]})
    built.save_to_disk(str(tmp_path / "saved"))
    assert data_fingerprint(built) == data_fingerprint(load_from_disk(str(tmp_path / "saved")))  # rank 0 reads, rank 1 built


def test_the_fingerprint_changes_with_the_order_the_lengths_and_a_filter():
    rows = Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5], [6]]})
    reordered = rows.select([1, 0, 2])  # an indices mapping, as after a shuffle or filter
    assert data_fingerprint(rows) != data_fingerprint(reordered)
    assert data_fingerprint(rows) != data_fingerprint(Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5], [6, 7]]}))
    assert data_fingerprint(rows) != data_fingerprint(rows.filter(lambda ids: len(ids) > 1, input_columns="input_ids"))
    assert data_fingerprint(rows, None) != data_fingerprint(rows, rows)


def test_one_process_always_agrees_with_itself():
    require_same_data_on_every_rank(Dataset.from_dict({"input_ids": [[1, 2]]}), None)
