"""The evaluation split: leave-one-out positions and the global time cut, on sequences and in `prepare`."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from raysrec.data.examples import evaluation_examples, training_examples
from raysrec.data.split import SplitConfig, SplitSpec, parse_time
from raysrec.data.storage import PreparedData, SequenceSet
from raysrec.errors import ConfigError
from raysrec.evaluation import without_items

# user 0 lives in all three periods, user 1 only before the validation cut, user 2 starts in the test
# period, user 3 has one event before the cut and its next one in the test period.
SEQS = [[1, 2, 3, 4, 5, 6], [7, 8, 9], [3, 4], [5, 6, 7]]
TIMES = [[1, 2, 10, 12, 20, 21], [1, 2, 3], [25, 26], [5, 22, 30]]
CUT = SplitSpec("global_time", valid_from=10.0, test_from=20.0)


def test_leave_one_out_holds_out_the_last_two_of_every_user():
    seqs = SequenceSet.from_lists(SEQS[:2] + [[1, 2, 3, 4]])
    pos = seqs.positions()
    assert pos.train_end.tolist() == [4, 1, 2]
    assert pos.valid_at.tolist() == [4, 1, 2] and pos.test_at.tolist() == [5, 2, 3]
    test = evaluation_examples(seqs, 3, "test")
    assert test.target_ids[:, -1].tolist() == [6, 9, 4]
    assert test.input_ids.tolist() == [[3, 4, 5], [0, 7, 8], [1, 2, 3]]


def test_global_time_cut_positions_and_examples():
    seqs = SequenceSet.from_lists(SEQS, TIMES, CUT)
    pos = seqs.positions()
    assert pos.train_end.tolist() == [2, 3, 0, 1]
    assert pos.valid_at.tolist() == [2, -1, -1, -1]     # only user 0 has an event in [10, 20) after a history
    assert pos.test_at.tolist() == [4, -1, -1, 1]       # user 2 has no history before its test event
    valid = evaluation_examples(seqs, 4, "valid")
    assert valid.user_index.tolist() == [0] and valid.target_ids[0, -1] == 3
    assert valid.input_ids[0].tolist() == [0, 0, 1, 2]
    test = evaluation_examples(seqs, 4, "test")
    assert test.user_index.tolist() == [0, 3]
    assert test.target_ids[:, -1].tolist() == [5, 6]
    # the history is everything before the target, the validation period included; it is the seen-item mask
    assert test.input_ids.tolist() == [[1, 2, 3, 4], [0, 0, 0, 5]]
    assert test.history(np.arange(2)).tolist() == [[1, 2, 3, 4], [5, 0, 0, 0]]
    # training targets come only from before the validation cut: nothing at t >= 10 is trained on
    train = training_examples(seqs, 4)
    trained = train.target_ids[train.target_ids > 0]
    assert sorted(trained.tolist()) == [2, 8, 9]
    assert train.target_times[train.target_ids > 0].max() < 10


def test_global_time_accounting_names_every_event_and_user():
    seqs = SequenceSet.from_lists(SEQS, TIMES, CUT)
    acc = CUT.accounting(seqs.offsets, seqs.times)
    assert acc["events"] == {"train_period": 6, "valid_period": 2, "test_period": 6}
    assert sum(acc["events"].values()) == len(seqs.items)
    assert acc["train_targets"] == 1 + 2 + 0 + 0
    assert acc["valid_users"] == 1 and acc["test_users"] == 2
    assert acc["test_users_without_history"] == 1           # user 2
    assert acc["users_without_test_events"] == 1            # user 1
    assert acc["users_without_valid_events"] == 3            # users 1, 2, 3
    assert acc["valid_users_without_history"] == 0


def test_cold_item_removal_keeps_the_time_split_targets():
    seqs = SequenceSet.from_lists(SEQS, TIMES, CUT)
    drop = np.zeros(10, bool)
    drop[[2, 5]] = True       # item 5 is user 0's test target and user 3's history
    out = without_items(seqs, drop)
    test = evaluation_examples(out, 4, "test")
    assert test.user_index.tolist() == [0] and test.target_ids[0, -1] == 5    # user 3 lost its only history
    assert 2 not in test.input_ids


def test_cuts_from_quantiles_times_and_dates():
    times = np.arange(100, dtype=float)
    assert SplitConfig(protocol="global_time").cuts(times) == (79.0, 89.0)
    assert SplitConfig(protocol="global_time", valid_time="1970-01-01T00:01:00", test_time=90).cuts(times) == (60, 90)
    # only the test date: the validation cut is at 0.8 / 0.9 of the events before it
    assert SplitConfig(protocol="global_time", test_time=45).cuts(times) == (np.quantile(np.arange(45.0), 0.8 / 0.9,
                                                                                         method="lower"), 45)
    assert parse_time("2024-01-31", "x") == pd.Timestamp("2024-01-31", tz="UTC").timestamp()
    with pytest.raises(ConfigError, match="before the test cut"):
        SplitConfig(protocol="global_time", valid_time=50, test_time=40).cuts(times)
    with pytest.raises(ConfigError, match="ISO date"):
        SplitConfig(protocol="global_time", test_time="last tuesday").validate()
    with pytest.raises(ConfigError, match="valid_quantile < test_quantile"):
        SplitConfig(valid_quantile=0.9, test_quantile=0.5).validate()


@pytest.mark.slow
def test_prepare_with_a_global_time_split(ray_local, ml100k_dir, tmp_path):
    from raysrec.data.pipeline import PrepareConfig, prepare
    from raysrec.data.sources import SourceConfig

    inter = pd.read_csv(ml100k_dir / "ml-100k.inter", sep="\t")
    t = inter["timestamp:float"].to_numpy()
    manifest = prepare(PrepareConfig(source=SourceConfig(path=str(ml100k_dir)), output=str(tmp_path / "p"),
                                     min_sequence_length=1, split=SplitConfig(protocol="global_time")))
    splits = manifest["splits"]
    assert splits["valid_from"] == np.quantile(t, 0.8, method="lower")      # cut on every cleaned event
    assert splits["test_from"] == np.quantile(t, 0.9, method="lower")
    # items first seen after the cut are not in the vocabulary; their events are counted, not kept
    known = set(inter.loc[inter["timestamp:float"] < splits["valid_from"], "item_id:token"])
    unknown = ~inter["item_id:token"].isin(known)
    assert manifest["rows_dropped"]["item_not_in_training"] == int(unknown.sum()) > 0
    inter = inter[~unknown]
    t = inter["timestamp:float"].to_numpy()
    assert splits["events"] == {"train_period": int((t < splits["valid_from"]).sum()),
                                "valid_period": int(((t >= splits["valid_from"]) & (t < splits["test_from"])).sum()),
                                "test_period": int((t >= splits["test_from"]).sum())}
    first = inter.sort_values("timestamp:float", kind="stable").groupby("user_id:token")["timestamp:float"].min()
    after = inter[inter["timestamp:float"] >= splits["test_from"]].groupby("user_id:token").size()
    with_history = [u for u in after.index if first[u] < splits["test_from"]]
    assert splits["test_users"] == len(with_history)
    assert splits["test_users_without_history"] == len(after) - len(with_history)
    assert json.loads((tmp_path / "p" / "manifest.json").read_text())["splits"] == splits
    seqs = PreparedData.load(tmp_path / "p").read()
    assert seqs.split == SplitSpec("global_time", splits["valid_from"], splits["test_from"])
    test = evaluation_examples(seqs, 50, "test")
    assert len(test) == splits["test_users"]
    assert (test.target_times[:, -1] >= splits["test_from"]).all()
    assert (test.input_times[test.input_ids > 0] < test.target_times[:, -1:].repeat(50, 1)[test.input_ids > 0]).all()


def test_global_time_needs_timestamps(tmp_path):
    import subprocess
    import sys

    (tmp_path / "log.csv").write_text("user_id,item_id\n1,2\n1,3\n")
    out = subprocess.run([sys.executable, "-m", "raysrec.cli", "prepare", "-i", str(tmp_path / "log.csv"),
                          "-o", str(tmp_path / "p"), "--split", "global_time", "--time-col", "none"],
                         capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    assert "global_time needs a timestamp column" in out.stderr and str(tmp_path / "log.csv") in out.stderr


def test_global_time_filters_and_vocabulary_count_training_events_only(ray_local, tmp_path):
    """The k-cores, the vocabulary and the popularity counts of a time split see events before the validation cut
    only: an item first seen after it (3) is not in the vocabulary, and one with 2 training events (2) fails an
    item k-core of 3 although the whole log has 5 of it. Before, both stayed, counted on the whole log."""
    from raysrec.data.pipeline import PrepareConfig, prepare
    from raysrec.data.sources import SourceConfig

    events = [(1, 1, 10), (1, 2, 11), (1, 1, 150), (1, 3, 250),
              (2, 1, 12), (2, 2, 13), (2, 2, 160), (2, 2, 260),
              (3, 1, 14), (3, 4, 15), (3, 4, 16), (3, 4, 170), (3, 1, 270),
              (4, 1, 17), (4, 4, 18), (4, 3, 180), (4, 2, 280)]
    (tmp_path / "log.csv").write_text("user_id,item_id,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in events))
    manifest = prepare(PrepareConfig(
        source=SourceConfig(path=str(tmp_path / "log.csv")), output=str(tmp_path / "p"), min_sequence_length=1,
        item_k_core=3, split=SplitConfig(protocol="global_time", valid_time=100, test_time=200)))
    assert manifest["rows_dropped"]["item_below_k_core"] == 2            # item 2's training events
    assert manifest["rows_dropped"]["item_not_in_training"] == 5         # items 2 and 3 after the cut
    assert manifest["rows_kept"] == len(events) - 7
    data = PreparedData.load(tmp_path / "p")
    items = data.items.set_index("item_id")
    assert list(items.index) == [1, 4]
    assert items["count"].to_dict() == {1: 6, 4: 4}                      # serving's popularity: every kept event
    assert items["train_count"].to_dict() == {1: 4, 4: 3}                # the sampled softmax's: training events
    assert list(data.item_popularity()) == [0, 4, 3]
    assert manifest["splits"]["events"] == {"train_period": 7, "valid_period": 2, "test_period": 1}


def test_leave_one_out_popularity_counts_training_positions_only(ray_local, tmp_path):
    from raysrec.data.pipeline import PrepareConfig, prepare
    from raysrec.data.sources import SourceConfig

    events = [(1, 1, 1), (1, 2, 2), (1, 3, 3), (1, 4, 4), (2, 1, 1), (2, 3, 2), (2, 4, 3)]
    (tmp_path / "log.csv").write_text("user_id,item_id,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in events))
    prepare(PrepareConfig(source=SourceConfig(path=str(tmp_path / "log.csv")), output=str(tmp_path / "p")))
    # training positions: user 1's items 1, 2; user 2's item 1 (the last two of each are valid and test)
    assert list(PreparedData.load(tmp_path / "p").item_popularity()) == [0, 2, 1, 0, 0]
