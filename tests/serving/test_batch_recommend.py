"""`raysrec recommend`: offline top-k for every user (Ray Data actors), equal to what the endpoint answers."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests

from raysrec.errors import ConfigError
from raysrec.serving.batch import OUTPUT_DIR, RecommendConfig, recommend

NOW = 1.8e9


def _read(folder) -> pd.DataFrame:
    return pq.read_table(folder / OUTPUT_DIR).to_pandas()


def test_a_histories_file_keeps_every_row_and_names_unknown_ids(ray_local, synth_prepared, trained_model, tmp_path):
    items = pq.read_table(synth_prepared / "items.parquet").column("item_id").to_pylist()
    table = pa.table({"user_id": ["a", "b", "c"],
                      "history": [items[:5], [], [items[3], 987654321]]})
    pq.write_table(table, tmp_path / "histories.parquet")
    out = tmp_path / "recs"
    recommend(RecommendConfig(model=str(trained_model), histories=str(tmp_path / "histories.parquet"),
                              output=str(out), k=5, now=NOW, cpus_per_actor=0.5))
    recs = _read(out).set_index("user_id")
    assert sorted(recs.index) == ["a", "b", "c"]
    assert recs.loc["b", "fallback"] == "popularity" and len(recs.loc["b", "item_ids"]) == 5
    assert list(recs.loc["c", "unknown_items"]) == ["987654321"] and pd.isna(recs.loc["c", "fallback"])
    assert not set(items[:5]) & set(recs.loc["a", "item_ids"])


def test_a_histories_file_without_the_columns_is_refused_before_ray(trained_model, tmp_path):
    pq.write_table(pa.table({"user": [1], "items": [[1, 2]]}), tmp_path / "bad.parquet")
    with pytest.raises(ConfigError, match="bad.parquet: needs columns user_id and history"):
        recommend(RecommendConfig(model=str(trained_model), histories=str(tmp_path / "bad.parquet"),
                                  output=str(tmp_path / "o")))


def test_cli_recommend_with_a_wrong_path_is_one_line_and_exit_2(trained_model, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "raysrec.cli", "recommend", "--model", str(trained_model),
                           "--histories", "no-such-file.parquet", "-o", "recs"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and "no-such-file.parquet does not exist" in lines[0], proc.stderr
    assert not (tmp_path / "recs").exists()
    np.testing.assert_equal(proc.stdout, "")


# Last in the module: the endpoint it starts holds a CPU until the module ends.
def test_every_user_gets_the_endpoints_answer(ray_local, synth_prepared, trained_model, request, tmp_path):
    out = tmp_path / "recs"
    summary = recommend(RecommendConfig(model=str(trained_model), data=str(synth_prepared), output=str(out), k=10,
                                        now=NOW, batch_size=64, num_actors=2, cpus_per_actor=0.5))
    endpoint = request.getfixturevalue("endpoint")   # started after the batch job: both need the 2 CPUs
    recs = _read(out)
    shards = pq.read_table(synth_prepared / "sequences").to_pandas()
    items = pq.read_table(synth_prepared / "items.parquet").to_pandas().set_index("item_index")["item_id"]
    # every user read is answered once
    assert summary["rows"] == len(recs) == len(shards) and recs["user_id"].is_unique
    assert set(recs["user_id"]) == set(shards["user_id"])
    assert (recs["item_ids"].map(len) == 10).all() and recs["fallback"].isna().all()
    assert (out / "recommend_config.yaml").is_file() and (out / "summary.json").is_file()
    by_user = recs.set_index("user_id")
    for _, row in shards.sample(20, random_state=0).iterrows():
        history = [int(items[i]) for i in row["sequence"]]
        body = {"history": history, "timestamps": list(row["timestamps"]), "now": NOW, "k": 10}
        answer = requests.post(f"{endpoint}/recommend", json=body, timeout=30).json()
        assert list(by_user.loc[row["user_id"], "item_ids"]) == [i["item_id"] for i in answer["items"]]
        assert list(by_user.loc[row["user_id"], "scores"]) == pytest.approx([i["score"] for i in answer["items"]],
                                                                             rel=1e-5)
        assert not set(history) & set(by_user.loc[row["user_id"], "item_ids"])      # seen items left out
