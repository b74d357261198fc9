"""`raysrec prepare` end to end on a real local Ray: counts, determinism, accounting, errors."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from raysrec.data.pipeline import PrepareConfig, prepare
from raysrec.data.sources import SourceConfig
from raysrec.errors import InputError


def digest(folder):
    files = sorted(p for p in folder.rglob("*.parquet"))
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_ml100k_recbole_counts(ml100k_prepared):
    manifest = json.loads((ml100k_prepared / "manifest.json").read_text())
    assert manifest["num_users"] == 943
    assert manifest["num_items"] == 1682
    assert manifest["rows_read"] == manifest["rows_kept"] == 100_000
    assert sum(manifest["rows_dropped"].values()) == 0
    assert manifest["inputs"][0]["sha256"] == hashlib.sha256((manifest["inputs"][0]["path"]).encode() and
                                                             open(manifest["inputs"][0]["path"], "rb").read()).hexdigest()
    items = pq.read_table(ml100k_prepared / "items.parquet").to_pandas()
    assert items["item_index"].tolist() == list(range(1, 1683))
    assert items["item_id"].tolist() == list(range(1, 1683))  # ints stay ints, natural order
    assert items.loc[0, "title"] == "Toy Story" and "Animation" in items.loc[0, "categories"]
    assert items["count"].sum() == 100_000
    seqs = pq.read_table(ml100k_prepared / "sequences").to_pandas()
    assert len(seqs) == 943 and seqs["sequence"].map(len).sum() == 100_000
    assert (ml100k_prepared / "prepare_config.yaml").is_file()


def test_same_input_and_config_give_identical_outputs_whichever_shuffle(ray_local, ml100k_dir, tmp_path, monkeypatch):
    """Twice, with the task shuffle prepare uses on small inputs and with Ray Data's default (aggregator actors),
    which it keeps for large ones: the same bytes, and the driver's own shuffle setting is left as it was."""
    from raysrec.data import pipeline

    context = ray_local.data.DataContext.get_current()
    driver_default = context.shuffle_strategy
    outs = []
    for name, limit in (("a", pipeline.TASK_SHUFFLE_MAX_SPLITS), ("b", -1)):
        monkeypatch.setattr(pipeline, "TASK_SHUFFLE_MAX_SPLITS", limit)
        cfg = PrepareConfig(source=SourceConfig(path=str(ml100k_dir)), output=str(tmp_path / name),
                            min_rating=3.0, user_k_core=5, item_k_core=5, max_sequence_length=50)
        manifest = prepare(cfg)
        outs.append(tmp_path / name)
        assert manifest["rows_read"] == manifest["rows_kept"] + sum(manifest["rows_dropped"].values())
        assert manifest["rows_dropped"]["rating_below_min"] == 17_480
        assert manifest["rows_dropped"]["truncated"] > 0
        assert context.shuffle_strategy == driver_default
        assert manifest["shuffle"] == ("sort_shuffle_pull_based" if name == "a" else driver_default.value)
    assert digest(outs[0]) == digest(outs[1])


def test_accounting_holds_with_bad_rows_duplicates_and_short_users(ray_local, tmp_path):
    lines = ["1\t10\t5\t100", "1\t11\t5\t101", "1\t12\t5\t102", "1\t12\t5\t102",  # duplicate
             "2\t10\t1\t100", "2\t11\t4\t101", "2\t13\t4\t102",                    # low rating on one
             "3\t10\t4\t100", "oops", "", "4\t10\t4\t5", "4\t11\t4\t4", "4\t12\t4\t4"]
    (tmp_path / "u.data").write_text("\n".join(lines) + "\n")
    manifest = prepare(PrepareConfig(source=SourceConfig(path=str(tmp_path / "u.data"), on_bad_row="skip"),
                                     output=str(tmp_path / "out"), min_rating=2))
    dropped = manifest["rows_dropped"]
    assert manifest["rows_read"] == len(lines)
    assert dropped["duplicate"] == 1 and dropped["malformed_row"] == 1 and dropped["blank_line"] == 1
    assert dropped["rating_below_min"] == 1
    assert dropped["user_too_short"] == 3  # user 2 has 2 left, user 3 has 1
    assert manifest["rows_kept"] == 6 and manifest["num_users"] == 2
    seqs = pq.read_table(tmp_path / "out" / "sequences").to_pandas().sort_values("user_id")
    # user 4: ties at t=4 keep input order (11 before 12), then t=5.
    items = pq.read_table(tmp_path / "out" / "items.parquet").to_pandas().set_index("item_index")["item_id"]
    assert [items[i] for i in seqs.iloc[1]["sequence"]] == [11, 12, 10]


def test_sasrec_text_keeps_each_users_line_order(ray_local, tmp_path):
    pairs = [(1, 5), (2, 1), (1, 3), (1, 9), (2, 2), (1, 1), (2, 7), (1, 5)]
    (tmp_path / "x.txt").write_text("".join(f"{u} {i}\n" for u, i in pairs))
    prepare(PrepareConfig(source=SourceConfig(path=str(tmp_path / "x.txt"), format="sasrec"),
                          output=str(tmp_path / "out"), split_bytes=1024))
    seqs = pq.read_table(tmp_path / "out" / "sequences").to_pandas().set_index("user_id")["sequence"]
    items = pq.read_table(tmp_path / "out" / "items.parquet").to_pandas().set_index("item_index")["item_id"]
    for user in (1, 2):
        assert [items[i] for i in seqs[user]] == [i for u, i in pairs if u == user]


def test_empty_result_after_filtering_is_an_error_and_leaves_no_output(ray_local, tmp_path):
    (tmp_path / "u.data").write_text("1\t10\t5\t100\n1\t11\t5\t101\n")
    with pytest.raises(InputError, match="no user left after filtering"):
        prepare(PrepareConfig(source=SourceConfig(path=str(tmp_path / "u.data")), output=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize("args, fragment", [
    (["--input", "nowhere.csv"], "input not found"),
    (["--input", "{tmp}/bad.data", "--format", "ml-100k"], "line 2, field 'timestamp': expected a number"),
    (["--input", "{tmp}/bad.data", "--format", "tiktok"], "invalid choice: 'tiktok'"),
])
def test_cli_errors_exit_nonzero_with_the_reason(tmp_path, args, fragment):
    (tmp_path / "bad.data").write_text("1\t2\t3\t4\n1\t2\t3\tnoon\n")
    cmd = [sys.executable, "-m", "raysrec.cli", "prepare", "--output", str(tmp_path / "out"), "--num-cpus", "1"]
    cmd += [a.format(tmp=tmp_path) for a in args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert fragment in proc.stderr
    assert not (tmp_path / "out").exists()
