"""Pure transforms: grouping, ties, duplicates, k-core attribution, dense index and truncation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from raysrec.data import transforms
from raysrec.data.sources import DropReason


def events(rows):
    frame = pd.DataFrame(rows, columns=["user", "item", "timestamp", "rating", "ord", "drop_code"])
    return frame.astype({"user": "int64", "item": "int64", "timestamp": "float64", "ord": "int64", "drop_code": "int8"})


def test_grouping_sorts_by_time_keeps_ties_in_input_order_and_drops_exact_duplicates():
    frame = events([
        (1, 10, 5.0, 1.0, 0, 0),
        (1, 11, 3.0, 1.0, 1, 0),
        (1, 12, 5.0, 1.0, 2, 0),   # tie with item 10: input order decides
        (1, 10, 5.0, 1.0, 3, 0),   # exact duplicate of row 0
        (1, 10, 5.0, 2.0, 4, 0),   # same time, other rating: not a duplicate
        (2, 13, 1.0, 1.0, 5, int(DropReason.RATING_BELOW_MIN)),
        (2, 14, 2.0, 5.0, 6, 0),
    ])
    table, counts, _ = transforms.group_user_sequences(frame)
    assert table.column("user").to_pylist() == [1, 2]
    assert table.column("items").to_pylist() == [[11, 10, 12, 10], [14]]
    assert counts == {"kept": 5, "duplicate": 1, "rating_below_min": 1}


def test_event_types_are_part_of_an_event_and_can_be_selected():
    """A view and a buy of the same item in the same second are two events; an exact repeat (type included) is a
    duplicate; ``types`` keeps the chosen types and counts the others; the types follow their events through the
    k-core filter, the vocabulary and truncation."""
    rows = [(1, 10, 5.0, None, 0, 0, "view"), (1, 10, 5.0, None, 1, 0, "buy"), (1, 10, 5.0, None, 2, 0, "buy"),
            (1, 11, 6.0, None, 3, 0, "cart"), (1, 12, 7.0, None, 4, 0, "view"), (2, 10, 1.0, None, 5, 0, "view")]
    frame = pd.DataFrame(rows, columns=["user", "item", "timestamp", "rating", "ord", "drop_code", "type"])
    table, counts, per_type = transforms.group_user_sequences(frame, with_types=True)
    assert table.column("items").to_pylist() == [[10, 10, 11, 12], [10]]
    assert table.column("types").to_pylist() == [["view", "buy", "cart", "view"], ["view"]]
    assert counts == {"kept": 5, "duplicate": 1} and per_type == {"view": 3, "buy": 2, "cart": 1}
    chosen, counts, per_type = transforms.group_user_sequences(frame, ["buy", "cart"], with_types=True)
    assert chosen.column("types").to_pylist() == [["buy", "cart"]]
    assert counts == {"kept": 2, "duplicate": 1, "type_not_selected": 3} and per_type["view"] == 3
    kept, _ = transforms.filter_sequences(table, pa.array([10, 12]), user_k=0, min_length=1)
    assert kept.column("types").to_pylist() == [["view", "buy", "view"], ["view"]]       # item 11's cart left
    final, _ = transforms.finalize_sequences(kept, pd.Index([10, 12]), pd.Index([1, 2]), max_length=2,
                                             type_vocab=pd.Index(["buy", "cart", "view"]))
    assert final.column("sequence").to_pylist() == [[1, 2], [1]]
    assert final.column("types").to_pylist() == [[1, 3], [3]]                         # buy = 1, view = 3


def test_filter_attributes_each_event_to_the_first_reason():
    table = pa.table({"user": [1, 2, 3], "items": [[1, 2, 3, 9], [9, 9], [1, 2, 3]],
                      "timestamps": [[0.0, 1, 2, 3], [0.0, 1], [0.0, 1, 2]]})
    out, counts = transforms.filter_sequences(table, pa.array([1, 2, 3]), user_k=3, min_length=4)
    # user 1 loses item 9 (k-core) then has 3 items, below min_length 4; user 2 loses both 9s.
    assert counts == {"item_below_k_core": 3, "user_too_short": 6}
    assert out.num_rows == 0


def test_finalize_maps_to_dense_indices_and_keeps_the_newest_items():
    table = pa.table({"user": ["b", "a"], "items": [["x", "y", "z"], ["z"]], "timestamps": [[1.0, 2, 3], [4.0]]})
    items = pd.Index(transforms.sorted_vocabulary(np.array(["z", "x", "y"], dtype=object)))
    users = pd.Index(["a", "b"])
    out, counts = transforms.finalize_sequences(table, items, users, max_length=2)
    assert out.column("user_index").to_pylist() == [0, 1]
    assert out.column("sequence").to_pylist() == [[3], [2, 3]]  # x=1, y=2, z=3; oldest 'x' truncated
    assert out.column("timestamps").to_pylist() == [[4.0], [2.0, 3.0]]
    assert counts == {"truncated": 1}


def test_shards_are_stable_and_spread():
    users = np.arange(10_000)
    a = transforms.shard_of(users, 8)
    assert (a == transforms.shard_of(users.copy(), 8)).all()
    assert np.bincount(a, minlength=8).min() > 1000
    s = transforms.shard_of(np.array(["u1", "u2"], dtype=object), 8)
    assert s.tolist() == transforms.shard_of(np.array(["u1", "u2"], dtype=object), 8).tolist()


def test_ids_become_ints_only_when_all_are_canonical():
    assert transforms.ids_as_ints_if_possible(np.array(["3", "12"], dtype=object)).dtype == np.int64
    assert transforms.ids_as_ints_if_possible(np.array(["3", "012"], dtype=object)).dtype == object
    assert transforms.ids_as_ints_if_possible(np.array(["3", "a"], dtype=object)).dtype == object
