"""Item attributes: parsing a feature, its tokens per kind, the newest value from event rows with conflicts counted,
and the fusion into the model's item representation (on and off, warm start with new values)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from raysrec.data import attributes
from raysrec.errors import ConfigError, InputError
from raysrec.models.sequential import ModelConfig, build_model
from raysrec.train.warm_start import warm_start


def test_a_feature_is_a_column_and_a_kind():
    assert attributes.FeatureSpec.parse("brand") == attributes.FeatureSpec("brand", "category")
    assert attributes.FeatureSpec.parse("category_code:path").kind == "path"
    with pytest.raises(InputError, match="expected COLUMN or COLUMN:KIND with KIND one of"):
        attributes.FeatureSpec.parse("price:bucket")


def test_tokens_per_kind():
    assert attributes.tokens_of("appliances.kitchen.mixer", "path") == [
        "appliances", "appliances.kitchen", "appliances.kitchen.mixer"]
    assert attributes.tokens_of("Action|Comedy|Action", "multi") == ["Action", "Comedy"]
    assert attributes.tokens_of("  ", "category") == [] and attributes.tokens_of(None, "category") == []
    tokens, vocab = attributes.encode(pd.Series(["b", None, "a", "b"]), "category")
    assert vocab == ["a", "b"] and tokens == [[2], [], [1], [2]]
    prices = pd.Series([str(p) for p in range(1, 21)] + [None, "n/a"])
    tokens, vocab = attributes.encode(prices, "numeric")
    assert len(vocab) == attributes.NUMERIC_BUCKETS and vocab[0] == "[1, 2]" and vocab[-1] == "[19, 20]"
    assert [t[0] for t in tokens[:20]] == [b for b in range(1, 11) for _ in range(2)] and tokens[20:] == [[], []]
    assert attributes.token_matrix([[1, 2], [], None, [3]], 4).tolist() == [[0, 0], [1, 2], [0, 0], [0, 0], [3, 0]]


def test_event_rows_give_the_newest_value_and_count_conflicts():
    """REES46 carries attributes on every event: per item the newest non-empty value; an item seen with two
    values is a conflict. Two splits, as two Ray Data tasks would read them."""
    first = pa.table({"item": ["1", "1", "2"], "time": ["2019-10-01 00:00:00 UTC", "2019-10-01 00:05:00 UTC",
                                                          "2019-10-01 00:01:00 UTC"],
                      "brand": ["acme", "", "zeta"], "price": ["10.0", "12.0", "3.5"]})
    second = pa.table({"item": ["1", "2"], "time": ["2019-10-01 00:03:00 UTC", "2019-10-01 00:00:30 UTC"],
                       "brand": ["", "omega"], "price": ["11.0", "3.5"]})
    seen = pd.concat([attributes.observations(t, "item", "time", ["brand", "price"], base)
                      for t, base in ((first, 0), (second, 100))])
    brand, brand_conflicts = attributes.latest_values(seen, "brand")
    price, price_conflicts = attributes.latest_values(seen, "price")
    assert brand.to_dict() == {"1": "acme", "2": "zeta"} and brand_conflicts == 1      # item 2: zeta is newer
    assert price.to_dict() == {"1": "12.0", "2": "3.5"} and price_conflicts == 1       # item 1: 10, 12, 11


def _model(vocab, width=2, num_items=4, **kwargs):
    torch.manual_seed(0)
    cfg = ModelConfig(num_items=num_items, hidden_dim=8, num_heads=2, num_layers=1, max_length=4,
                      use_item_features=True, feature_vocab=vocab, feature_width={n: width for n in vocab}, **kwargs)
    return build_model(cfg)


@pytest.mark.parametrize("name", ["sasrec", "longshort"])
def test_attributes_are_fused_into_both_sides_of_the_item_table(name):
    model = _model({"genre": ["a", "b", "c"]}, name=name)
    plain = model.item_emb.weight.detach().clone()
    model.set_item_features({"genre": np.array([[0, 0], [1, 2], [1, 0], [0, 0], [3, 0]])})
    with torch.no_grad():
        table = model.item_rows()
        rows = model.item_rows(torch.tensor([[1, 2, 3]]))
    torch.testing.assert_close(rows[0], table[1:4])                   # input side = output side (tied)
    assert torch.equal(table[3], plain[3]) and torch.equal(table[0], plain[0])   # no value (and padding): ID alone
    assert not torch.allclose(table[1], plain[1]) and not torch.allclose(table[1], table[2])
    batch = {"input_ids": torch.tensor([[0, 1, 4]]), "input_times": torch.tensor([[0.0, 1.0, 2.0]]),
             "target_times": torch.tensor([[0.0, 2.0, 3.0]])}
    with torch.no_grad():
        with_genres = model(batch).user
        model.feature_tokens_0.zero_()                                  # the same model, its attributes taken away
        assert not torch.allclose(model(batch).user, with_genres)     # the sequence encoder reads them
    with pytest.raises(ConfigError, match="item attribute tokens of shape"):
        model.set_item_features({"genre": np.zeros((5, 3), np.int64)})


def test_attributes_on_the_input_side_only():
    """features_on_output off: items are scored by their ID rows, the sequence still reads the attributes."""
    model = _model({"genre": ["a", "b", "c"]}, features_on_output=False)
    model.set_item_features({"genre": np.array([[0, 0], [1, 2], [1, 0], [0, 0], [3, 0]])})
    with torch.no_grad():
        assert torch.equal(model.item_rows(), model.item_emb.weight)                          # output: IDs alone
        assert torch.equal(model.score_items(torch.ones(1, 8), torch.tensor([[1]]))[0],
                           model.item_emb.weight[1].sum(0, keepdim=True))
        fused = model.item_rows(torch.tensor([1, 2]), side="input")
        assert not torch.allclose(fused, model.item_emb.weight[1:3])                          # input: fused
        batch = {"input_ids": torch.tensor([[0, 1, 4]]), "input_times": torch.tensor([[0.0, 1.0, 2.0]]),
                 "target_times": torch.tensor([[0.0, 2.0, 3.0]])}
        user = model(batch).user
        model.feature_tokens_0.zero_()
        assert not torch.allclose(model(batch).user, user)
    with pytest.raises(ConfigError, match="features_on_output"):
        ModelConfig(features_on_output=False, use_item_features=False).validate()
    ModelConfig(features_on_output=False).validate()     # unset: decided with the data (test_side_inputs.py)


def test_warm_start_keeps_attribute_rows_by_value_and_new_values_start_fresh():
    old = _model({"brand": ["acme", "zeta"]})
    new = _model({"brand": ["acme", "omega", "zeta"]})
    fresh = new.feature_emb[0].weight.detach().clone()
    ids = np.arange(1, 5)
    warm_start(new, old, ids, ids, "old-model")
    assert torch.equal(new.feature_emb[0].weight[1], old.feature_emb[0].weight[1])      # acme
    assert torch.equal(new.feature_emb[0].weight[3], old.feature_emb[0].weight[2])      # zeta
    assert torch.equal(new.feature_emb[0].weight[2], fresh[2])                          # omega: new
    other = _model({"category": ["acme", "zeta"]})
    with pytest.raises(ConfigError, match="the same item attributes"):
        warm_start(other, old, ids, ids, "old-model")


def test_attributes_from_an_items_file_come_before_the_event_rows(tmp_path):
    """S3-Rec's item2attributes.json and a csv items file are read on the driver; a column the items file has is
    taken from it, one only the event rows have from them, one in neither fails before Ray starts."""
    from raysrec.data.pipeline import PrepareConfig, attribute_sources
    from raysrec.data.sources import SourceConfig, resolve_source

    json_items = attributes.read_attribute_table(b'{"1": [4, 7], "2": [4]}', "x.json", "item_id", [], " ", "utf-8")
    assert json_items.to_dict("list") == {"item_id": ["1", "2"], "attributes": ["4|7", "4"]}
    log, items = tmp_path / "log.csv", tmp_path / "items.csv"
    log.write_text("user_id,item_id,timestamp,brand\n1,10,1,acme\n1,11,2,zeta\n")
    items.write_text("item_id,brand,genre\n10,acme-from-items,a|b\n")
    cfg = PrepareConfig(source=SourceConfig(path=str(log), items_path=str(items)), output=str(tmp_path / "out"),
                        item_features=["genre:multi", "brand"])
    where, frame = attribute_sources(cfg, resolve_source(cfg.source))
    assert where == {"genre": "items", "brand": "items"} and frame["genre"].tolist() == ["a|b"]
    cfg = cfg.replace(source=cfg.source.replace(items_path=None), item_features=["brand"])
    assert attribute_sources(cfg, resolve_source(cfg.source))[0] == {"brand": "events"}
    with pytest.raises(InputError, match="column 'colour' is in neither the items nor the event rows"):
        attribute_sources(cfg.replace(item_features=["colour"]), resolve_source(cfg.source))


def test_movielens_genres_come_from_the_recbole_items_file():
    """ML-100K in RecBole's layout: `class:token_seq` genres (space-separated) are the `categories` attribute,
    multi-valued, one token per genre."""
    from raysrec.data.pipeline import PrepareConfig, attribute_sources
    from raysrec.data.sources import SourceConfig, resolve_source

    folder = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "ml-100k"
    if not (folder / "ml-100k.item").is_file():
        pytest.skip(f"MovieLens-100K not found at {folder}")
    cfg = PrepareConfig(source=SourceConfig(path=str(folder)), output="unused", item_features=["categories:multi"])
    where, frame = attribute_sources(cfg, resolve_source(cfg.source))
    assert where == {"categories": "items"} and len(frame) == 1682
    genres = frame.set_index(frame.columns[0])["categories"]
    assert attributes.tokens_of(genres.loc["1"], "multi") == ["Animation", "Children's", "Comedy"]   # Toy Story
    vocab = sorted({t for value in genres for t in attributes.tokens_of(value, "multi")})
    assert len(vocab) == 19 and "Film-Noir" in vocab                   # the 19 MovieLens genres


def test_a_requests_raw_user_values_are_encoded_against_the_saved_vocabulary():
    assert attributes.encode_value("M", "category", ["F", "M"]) == [2]
    assert attributes.encode_value("X", "category", ["F", "M"]) == []                 # never seen: no token
    assert attributes.encode_value("a|c|z", "multi", ["a", "b", "c"]) == [1, 3]
    assert attributes.encode_value("a.b", "path", ["a", "a.b", "a.c"]) == [1, 2]
    tokens, vocab = attributes.encode(pd.Series(["7", "20", "33", "50", "61"]), "numeric")
    assert attributes.encode_value(20, "numeric", vocab) == tokens[1]                 # the bucket training used
    assert attributes.encode_value(99, "numeric", vocab) == [len(vocab)]              # above every bucket: the top
    assert attributes.encode_value("old", "numeric", vocab) == [] and attributes.encode_value(None, "category", []) == []


def test_user_attributes_join_every_position_and_a_missing_one_adds_nothing():
    from raysrec.models.inputs import user_tokens

    vocab = {"gender": ["F", "M"], "age": ["[7, 20]", "[33, 61]"]}
    kind = {"gender": "category", "age": "numeric"}
    torch.manual_seed(0)
    model = build_model(ModelConfig(num_items=4, hidden_dim=8, num_heads=2, num_layers=1, max_length=4,
                                    use_user_features=True, user_feature_vocab=vocab, user_feature_kind=kind,
                                    user_feature_width={"gender": 1, "age": 1}))
    model.eval()
    tokens = user_tokens([{"gender": "M", "age": 40}, {"gender": "F"}, None, {"gender": "nobody"}], vocab, kind,
                         {"gender": 1, "age": 1})
    assert [t.tolist() for t in tokens] == [[[2], [1], [0], [0]], [[2], [0], [0], [0]]]
    batch = {"input_ids": torch.tensor([[0, 1, 2]] * 4), "input_times": torch.zeros(4, 3),
             "target_times": torch.zeros(4, 3)}
    with torch.no_grad():
        plain = model(batch).user
        users = model({**batch, **{f"user_tokens_{i}": torch.from_numpy(t) for i, t in enumerate(tokens)}}).user
    assert not torch.allclose(users[0], plain[0]) and not torch.allclose(users[0], users[1])
    torch.testing.assert_close(users[2], plain[2])          # no attributes sent: the sequence alone
    torch.testing.assert_close(users[3], plain[3])          # a value the model never saw: nothing added


def test_warm_start_keeps_user_attribute_rows_by_value():
    def model(genders):
        torch.manual_seed(len(genders))
        return build_model(ModelConfig(num_items=4, hidden_dim=8, num_heads=2, num_layers=1, max_length=4,
                                       use_user_features=True, user_feature_vocab={"gender": genders},
                                       user_feature_kind={"gender": "category"}, user_feature_width={"gender": 1}))

    old, new = model(["F", "M"]), model(["F", "M", "X"])
    fresh = new.user_feature_emb[0].weight.detach().clone()
    ids = np.arange(1, 5)
    warm_start(new, old, ids, ids, "old-model")
    assert torch.equal(new.user_feature_emb[0].weight[1:3], old.user_feature_emb[0].weight[1:3])
    assert torch.equal(new.user_feature_emb[0].weight[3], fresh[3])


def test_a_users_file_named_with_users_path_is_read_and_a_missing_one_refused(tmp_path):
    """source.users_path (--users): a csv of users read on the driver for prepare.user_features; without a users
    file the run is refused before Ray starts."""
    from raysrec.data.pipeline import PrepareConfig, user_attributes
    from raysrec.data.sources import SourceConfig, resolve_source

    (tmp_path / "log.csv").write_text("user_id,item_id,timestamp\nu1,10,1\nu2,11,2\n")
    (tmp_path / "people.csv").write_text("user_id,age,tier\nu1,31,gold\nu2,,silver\n")
    cfg = PrepareConfig(source=SourceConfig(path=str(tmp_path / "log.csv"), users_path=str(tmp_path / "people.csv")),
                        output=str(tmp_path / "out"), user_features=["age:numeric", "tier"])
    where, frame = user_attributes(cfg, resolve_source(cfg.source))
    assert str(where).endswith("people.csv") and frame.to_dict("list") == {
        "user_id": ["u1", "u2"], "age": ["31", ""], "tier": ["gold", "silver"]}
    bare = cfg.replace(source=cfg.source.replace(users_path=None))
    with pytest.raises(InputError, match="prepare.user_features needs a users file"):
        user_attributes(bare, resolve_source(bare.source))
