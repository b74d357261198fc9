"""Side information in the input: event types (--type-col, --types), a csv without a header (--columns) and
date-time strings as timestamps; on small files and on the shared Taobao and REES46 logs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from raysrec.data.pipeline import PrepareConfig, prepare
from raysrec.data.sources import SourceConfig, parse_times, plan_splits, read_split, resolve_source
from raysrec.data.storage import PreparedData
from raysrec.errors import InputError

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
TAOBAO = SHARED / "taobao-sample" / "UserBehavior.csv"
REES46 = SHARED / "rees46-slice" / "2019-Oct-slice.csv"
TAOBAO_COLUMNS = ["user_id", "item_id", "category_id", "behavior", "timestamp"]


def _read(cfg: SourceConfig) -> pa.Table:
    source = resolve_source(cfg)
    return pa.concat_tables([read_split(source, s) for s in plan_splits(source)])


def test_timestamps_as_numbers_or_date_times():
    text = pa.array(["1569888000", "2019-10-01 00:00:00 UTC", "2019-10-01T02:00:00+02:00", "2019-10-01 00:00:05",
                     "noon", None])
    seconds = parse_times(text)
    assert seconds[:4].tolist() == [1569888000.0, 1569888000.0, 1569888000.0, 1569888005.0]
    assert np.isnan(seconds[4:]).all()


def test_a_headerless_csv_with_named_columns_types_and_date_times(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("1,100,view,2019-10-01 00:00:00 UTC\n1,101,buy,2019-10-01 00:01:00 UTC\n2,100,cart,1569888000\n")
    table = _read(SourceConfig(path=str(path), columns=["user_id", "item_id", "event", "time"], time_col="time",
                               type_col="event"))
    assert table.column("user").to_pylist() == ["1", "1", "2"]
    assert table.column("type").to_pylist() == ["view", "buy", "cart"]
    assert table.column("timestamp").to_pylist() == [1569888000.0, 1569888060.0, 1569888000.0]
    with pytest.raises(InputError, match=r"column 'behavior' \(the type column\) not found; the columns \(source"
                                         r".columns\) are \['user_id', 'item_id', 'event', 'time'\]"):
        resolve_source(SourceConfig(path=str(path), columns=["user_id", "item_id", "event", "time"], time_col="time",
                                    type_col="behavior"))


def test_a_bad_date_time_is_named_or_counted(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id,type,timestamp\n1,100,view,2019-10-01 00:00:00 UTC\n1,101,buy,yesterday\n"
                    "1,102,,2019-10-01 00:02:00 UTC\n")
    cfg = SourceConfig(path=str(path), type_col="type")
    with pytest.raises(InputError, match=r"log.csv, line 3, field 'timestamp': expected a number .* or a date-time "
                                         r"such as 2019-10-01 00:00:00 UTC, got 'yesterday'"):
        _read(cfg)
    table = _read(cfg.replace(on_bad_row="skip"))
    assert table.column("drop_code").to_pylist() == [0, 1, 1]          # the bad time, and the empty type
    assert table.column("timestamp").to_pylist()[0] == 1569888000.0


@pytest.fixture(scope="module")
def taobao_prepared(ray_local, tmp_path_factory) -> Path:
    if not TAOBAO.is_file():
        pytest.skip(f"{TAOBAO} not found")
    out = tmp_path_factory.mktemp("taobao") / "prepared"
    prepare(PrepareConfig(source=SourceConfig(path=str(TAOBAO), columns=TAOBAO_COLUMNS, type_col="behavior",
                                              on_bad_row="skip"), output=str(out)))
    return out


def test_taobao_keeps_every_behaviour_as_its_own_event(taobao_prepared):
    """The headerless Taobao sample (README: pv 75,873, cart 4,497, fav 2,356, buy 1,750; its last line is cut
    off, a pv): every type counted, the broken line under malformed_row, types stored beside their events."""
    data = PreparedData.load(taobao_prepared)
    manifest = data.manifest
    assert manifest["rows_dropped"]["malformed_row"] == 1
    types = manifest["event_types"]
    assert types["vocabulary"] == data.event_types == ["buy", "cart", "fav", "pv"]
    assert types["read"] == {"buy": 1750, "cart": 4497, "fav": 2356, "pv": 75872}
    assert sum(types["kept"].values()) == manifest["rows_kept"]
    seqs = data.read()
    assert seqs.types is not None and len(seqs.types) == len(seqs.items)
    assert np.bincount(seqs.types, minlength=5)[1:].tolist() == [types["kept"][t] for t in data.event_types]


def test_next_buy_trains_and_scores_on_buys_with_every_behaviour_in_the_history(taobao_prepared, tmp_path):
    """train.target_types buy on Taobao: the valid and test targets are each user's last two buys, the history
    before them keeps the views, carts and favourites, and the saved model is scored on those targets."""
    from raysrec.errors import RaysrecError
    from raysrec.models.config import ModelConfig
    from raysrec.train.config import TrainConfig
    from raysrec.train.run import fit

    data = PreparedData.load(taobao_prepared)
    buy = data.event_types.index("buy") + 1
    seqs = data.read(target_types=["buy"])
    pos = seqs.positions()
    users = np.flatnonzero(pos.test_at >= 0)
    assert 50 < len(users) < len(seqs)                  # users with two buys after some history
    start = seqs.offsets[users]
    assert (seqs.types[start + pos.test_at[users]] == buy).all() and (seqs.types[start + pos.valid_at[users]] == buy).all()
    before = np.concatenate([seqs.types[s:s + at] for s, at in zip(start, pos.test_at[users])])
    assert (before != buy).mean() > 0.5                 # the history is mostly other behaviours
    cfg = TrainConfig(data=str(taobao_prepared), output=str(tmp_path / "model"), epochs=1, target_types=["buy"],
                      model=ModelConfig(hidden_dim=16, num_heads=1, num_layers=1, max_length=20))
    metrics = fit(cfg, use_ray=False)
    assert metrics["test"]["rows"] == len(users) and metrics["valid"]["rows"] == int((pos.valid_at >= 0).sum())
    assert TrainConfig.load(tmp_path / "model" / "train_config.yaml").target_types == ["buy"]
    with pytest.raises(RaysrecError, match=r"'purchase' not among the event types of .* \(buy, cart, fav, pv\)"):
        fit(cfg.replace(target_types=["purchase"], output=str(tmp_path / "wrong")), use_ray=False)


def test_types_selects_event_types(ray_local, tmp_path):
    if not TAOBAO.is_file():
        pytest.skip(f"{TAOBAO} not found")
    source = SourceConfig(path=str(TAOBAO), columns=TAOBAO_COLUMNS, type_col="behavior", on_bad_row="skip")
    manifest = prepare(PrepareConfig(source=source, output=str(tmp_path / "buys"), types=["buy", "cart"],
                                     min_sequence_length=3))
    assert manifest["event_types"]["vocabulary"] == ["buy", "cart"]
    assert manifest["rows_dropped"]["type_not_selected"] == 75872 + 2356
    assert manifest["rows_read"] == manifest["rows_kept"] + sum(manifest["rows_dropped"].values())
    small = tmp_path / "small.csv"
    small.write_text("".join(f"{u},{i},{k},{t}\n" for t, (u, i, k) in enumerate(
        [(1, 2, "pv"), (1, 3, "buy"), (1, 4, "pv"), (2, 2, "cart")])))
    with pytest.raises(InputError, match=r"prepare.types \['like'\]: none of these event types is in column "
                                         r"'behavior', which holds \['buy', 'cart', 'pv'\]"):
        prepare(PrepareConfig(source=SourceConfig(path=str(small), columns=["user_id", "item_id", "behavior",
                                                                             "timestamp"], type_col="behavior"),
                              output=str(tmp_path / "none"), types=["like"]))


def test_rees46_with_string_times_types_and_a_broken_last_line(ray_local, tmp_path):
    if not REES46.is_file():
        pytest.skip(f"{REES46} not found")
    manifest = prepare(PrepareConfig(source=SourceConfig(path=str(REES46), item_col="product_id",
                                                         time_col="event_time", type_col="event_type",
                                                         on_bad_row="skip"), output=str(tmp_path / "out"),
                                     item_features=["brand", "category_code:path", "price:numeric"]))
    assert manifest["rows_read"] == 17435 and manifest["rows_dropped"]["malformed_row"] == 1
    assert manifest["event_types"]["read"] == {"cart": 165, "purchase": 214, "view": 17055}
    data = PreparedData.load(tmp_path / "out")
    seqs = data.read()
    # 2019-10-01 00:00:00 UTC to 02:50:00 UTC
    assert seqs.times.min() >= 1569888000.0 and seqs.times.max() <= 1569888000.0 + 170 * 60
    # attributes from the event rows: the newest value per item, each feature with its vocabulary
    features = {f["name"]: f for f in manifest["item_features"]}
    assert [f["source"] for f in features.values()] == ["events"] * 3
    assert "appliances.kitchen" in features["category_code"]["vocabulary"]
    assert len(features["price"]["vocabulary"]) == 10 and features["price"]["items_with_value"] == data.num_items
    assert 0 < features["brand"]["items_with_value"] < data.num_items                # brand is often empty
    tables = data.item_features()
    vocab, tokens = tables["category_code"]
    assert tokens.shape[0] == data.num_items + 1 and not tokens[0].any()
    raw = pd.read_csv(REES46, usecols=["product_id", "category_code"], dtype=str).dropna().drop_duplicates(
        "product_id", keep="last")
    item = data.item_ids().tolist().index(int(raw["product_id"].iloc[0])) + 1
    levels = raw["category_code"].iloc[0].split(".")
    assert [vocab[t - 1] for t in tokens[item] if t] == [".".join(levels[:i + 1]) for i in range(len(levels))]


def test_item_attributes_are_used_when_the_prepared_data_has_them(ray_local, taobao_prepared, tmp_path):
    """model.use_item_features unset: on when prepare wrote item attributes, off when it did not; what was decided is
    what the model config saves. Asked for on data without any, or switched off, it says so."""
    from raysrec.errors import ConfigError
    from raysrec.models.config import ModelConfig
    from raysrec.train.config import TrainConfig
    from raysrec.train.loop import resolve_model_config

    with_attributes = tmp_path / "with"
    prepare(PrepareConfig(source=SourceConfig(path=str(TAOBAO), columns=TAOBAO_COLUMNS, type_col="behavior",
                                              on_bad_row="skip"), output=str(with_attributes),
                          item_features=["category_id"]))
    cfg = TrainConfig(data=str(with_attributes))
    assert cfg.model.use_item_features is None
    resolved, _, features = resolve_model_config(cfg, PreparedData.load(with_attributes))
    assert resolved.model.use_item_features is True and list(features) == ["category_id"]
    assert len(resolved.model.feature_vocab["category_id"]) > 100
    off, _, features = resolve_model_config(cfg.replace(model=ModelConfig(use_item_features=False)),
                                            PreparedData.load(with_attributes))
    assert off.model.use_item_features is False and off.model.feature_vocab == {} and features == {}
    plain, _, features = resolve_model_config(TrainConfig(data=str(taobao_prepared)), PreparedData.load(taobao_prepared))
    assert plain.model.use_item_features is False and plain.model.feature_vocab == {} and features == {}
    with pytest.raises(ConfigError, match="has no item attributes"):
        resolve_model_config(TrainConfig(data=str(taobao_prepared), model=ModelConfig(use_item_features=True)),
                             PreparedData.load(taobao_prepared))
    with pytest.raises(ConfigError, match="features_on_output off"):
        resolve_model_config(TrainConfig(data=str(taobao_prepared), model=ModelConfig(features_on_output=False)),
                             PreparedData.load(taobao_prepared))


def test_one_user_per_line(tmp_path):
    """``user item item ...`` (S3-Rec, RecBole and many paper releases): each item a row, in line order."""
    path = tmp_path / "seqs.txt"
    path.write_text("1 5 6 7\n\n2 9  8\n3\n")
    cfg = SourceConfig(path=str(path), format="user-lines", on_bad_row="skip")
    table = _read(cfg)
    kept = table.filter(pa.array(np.asarray(table.column("drop_code")) == 0))
    assert kept.column("user").to_pylist() == [1, 1, 1, 2, 2] and kept.column("item").to_pylist() == [5, 6, 7, 9, 8]
    assert np.all(np.diff(kept.column("timestamp").to_numpy()[:3]) > 0)             # line order = time order
    assert sorted(table.column("drop_code").to_pylist()) == [0] * 5 + [1, 2]          # "3": no item; a blank line
    with pytest.raises(InputError, match=r"seqs.txt, line 4: expected 'user item item ...'"):
        _read(cfg.replace(on_bad_row="error"))


def test_amazon_sports_in_its_own_layout():
    sports = SHARED / "amazon-sports" / "Sports_and_Outdoors.txt"
    if not sports.is_file():
        pytest.skip(f"{sports} not found")
    table = _read(SourceConfig(path=str(sports), format="user-lines"))
    # README: 35,598 users, 18,357 items, 296,337 interactions
    assert table.num_rows == 296_337 and (np.asarray(table.column("drop_code")) == 0).all()
    assert len(set(table.column("user").to_pylist())) == 35_598
    assert len(set(table.column("item").to_pylist())) == 18_357


def test_movielens_user_attributes_from_prepare_to_an_answer(ray_local, tmp_path):
    """prepare --user-features on ML-100K (RecBole's ml-100k.user is found beside the .inter): every user's age
    bucket, gender and occupation in users.parquet and the manifest; a model trained with them reads them, and
    answers a request's raw values with the same encoding."""
    from raysrec.models.config import ModelConfig
    from raysrec.serving.recommender import Query, Recommender
    from raysrec.train.config import TrainConfig
    from raysrec.train.run import fit

    folder = SHARED / "ml-100k"
    if not (folder / "ml-100k.user").is_file():
        pytest.skip(f"{folder} not found")
    manifest = prepare(PrepareConfig(source=SourceConfig(path=str(folder)), output=str(tmp_path / "prepared"),
                                     user_features=["age:numeric", "gender", "occupation"]))
    features = {f["name"]: f for f in manifest["user_features"]}
    assert features["gender"]["vocabulary"] == ["F", "M"] and len(features["occupation"]["vocabulary"]) == 21
    assert len(features["age"]["vocabulary"]) == 10 and features["age"]["kind"] == "numeric"
    assert all(f["users_with_value"] == 943 for f in features.values())
    assert manifest["users_file"]["users_with_a_row"] == 943 and manifest["users_file"]["users_without_a_row"] == 0
    data = PreparedData.load(tmp_path / "prepared")
    users = pd.read_parquet(tmp_path / "prepared" / "users.parquet").set_index("user_id")
    assert users.loc[2, "feature.gender"].tolist() == [1]                          # user 2: 53, F, other
    kind, vocab, tokens = data.user_features()["occupation"]
    assert vocab[tokens[users.loc[2, "user_index"] + 1][0] - 1] == "other"

    cfg = TrainConfig(data=str(tmp_path / "prepared"), output=str(tmp_path / "model"), epochs=2,
                      model=ModelConfig(hidden_dim=16, num_heads=1, num_layers=1, max_length=20, use_user_features=True))
    metrics = fit(cfg, use_ray=False)
    assert metrics["test"]["rows"] == 943
    rec = Recommender.load(tmp_path / "model")
    assert list(rec.model.cfg.user_feature_vocab) == ["age", "gender", "occupation"]
    history = [1, 50, 100]
    profile = {"age": 53, "gender": "F", "occupation": "other"}
    scored = [rec.run([Query(history=history, k=5, user_features=u)])[0].items for u in (profile, None)]
    assert scored[0] != scored[1]
    # the same profile as tokens (what batch recommend reads from users.parquet) gives the same answer
    row = users.loc[2, "user_index"] + 1
    as_tokens = [t[row][t[row] > 0].tolist() for _, _, t in data.user_features().values()]
    assert rec.run([Query(history=history, k=5, user_tokens=as_tokens)])[0].items == scored[0]
    # batch recommend over the prepared folder passes each user's attributes: user 2's list is its profile's
    from raysrec.serving.batch import OUTPUT_DIR, RecommendConfig, recommend
    recommend(RecommendConfig(model=str(tmp_path / "model"), data=str(tmp_path / "prepared"), k=5, now=9e8,
                              output=str(tmp_path / "recs"), num_actors=1, cpus_per_actor=0.5))
    recs = pd.read_parquet(tmp_path / "recs" / OUTPUT_DIR).set_index("user_id")
    shard = pd.concat(pd.read_parquet(f) for f in (tmp_path / "prepared" / "sequences").glob("*.parquet"))
    sequence = shard.set_index("user_id").loc[2]
    ids = data.item_ids()
    query = Query(history=[ids[i - 1] for i in sequence["sequence"]], timestamps=list(sequence["timestamps"]),
                  now=9e8, k=5)
    expected = rec.run([dataclasses.replace(query, user_features=profile)])[0].items
    assert list(recs.loc[2, "item_ids"]) == [i["item_id"] for i in expected]
    assert list(recs.loc[2, "scores"]) == pytest.approx([i["score"] for i in expected], rel=1e-5)
    assert rec.run([query])[0].items != expected                     # without the profile: other scores
    assert "reads no such user attribute" in rec.user_features_problem({"zip_code": "94043"})
    with pytest.raises(InputError, match=r"column\(s\) \['income'\] not in the users file"):
        prepare(PrepareConfig(source=SourceConfig(path=str(folder)), output=str(tmp_path / "wrong"),
                              user_features=["income:numeric"]))
