"""`train.init_from`: a newer log with new items starts from an older model, items matched by original id."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from raysrec import artifact
from raysrec.errors import ConfigError
from raysrec.models.sequential import ModelConfig, build_model
from raysrec.train.config import TrainConfig
from raysrec.train.loop import LocalSession, train_loop
from raysrec.train.warm_start import carry_optimizer, match_items, warm_start

SMALL = ModelConfig(hidden_dim=16, num_heads=2, num_layers=1, max_length=10)


@pytest.mark.parametrize("name", ["sasrec", "longshort"])
def test_known_items_keep_their_rows_bit_for_bit_and_new_items_start_fresh(name):
    torch.manual_seed(0)
    old = build_model(SMALL.replace(name=name, num_items=5))
    new = build_model(SMALL.replace(name=name, num_items=6))
    fresh = new.item_emb.weight.detach().clone()
    old_ids = np.array([10, 20, 30, 40, 50])          # index i -> id old_ids[i-1]
    new_ids = np.array([30, 60, 10, 70, 50, 80])      # 30, 10, 50 known; 60, 70, 80 new; 20, 40 gone
    stats = warm_start(new, old, old_ids, new_ids, "old-model")
    assert stats == {"known_items": 3, "new_items": 3, "dropped_items": 2}
    for new_index, old_index in ((1, 3), (3, 1), (5, 5)):
        assert torch.equal(new.item_emb.weight[new_index], old.item_emb.weight[old_index])
    for new_index in (2, 4, 6):
        assert torch.equal(new.item_emb.weight[new_index], fresh[new_index])
    assert torch.equal(new.item_emb.weight[0], fresh[0])                       # padding stays padding
    for key, value in old.state_dict().items():
        if key not in ("item_emb.weight", "text_vectors"):
            assert torch.equal(new.state_dict()[key], value), key


def test_event_types_keep_their_rows_by_name_and_a_new_type_starts_fresh():
    torch.manual_seed(0)
    old = build_model(SMALL.replace(num_items=3, type_names=["buy", "view"]))
    new = build_model(SMALL.replace(num_items=3, type_names=["buy", "cart", "view"]))
    fresh = new.type_emb.weight.detach().clone()
    ids = np.array([1, 2, 3])
    warm_start(new, old, ids, ids, "old-model")
    assert torch.equal(new.type_emb.weight[1], old.type_emb.weight[1])          # buy
    assert torch.equal(new.type_emb.weight[3], old.type_emb.weight[2])          # view
    assert torch.equal(new.type_emb.weight[2], fresh[2])                        # cart: new
    assert torch.equal(new.item_emb.weight, old.item_emb.weight)
    untyped = build_model(SMALL.replace(num_items=3))
    with pytest.raises(ConfigError, match="parameters differ: type_emb.weight"):
        warm_start(untyped, old, ids, ids, "old-model")


def test_shrink_and_perturb_mixes_learned_and_fresh_weights():
    torch.manual_seed(0)
    old = build_model(SMALL.replace(num_items=5))
    new = build_model(SMALL.replace(num_items=6))
    fresh = {k: v.detach().clone() for k, v in new.state_dict().items()}
    warm_start(new, old, np.array([10, 20, 30, 40, 50]), np.array([30, 60, 10, 70, 50, 80]), "old",
               shrink=0.5, perturb=0.1)
    got, learned = new.state_dict(), old.state_dict()
    assert torch.allclose(got["pos_emb.weight"], 0.5 * learned["pos_emb.weight"] + 0.1 * fresh["pos_emb.weight"])
    assert torch.allclose(got["item_emb.weight"][1], 0.5 * learned["item_emb.weight"][3] + 0.1 * fresh["item_emb.weight"][1])
    assert torch.equal(got["item_emb.weight"][2], fresh["item_emb.weight"][2])         # a new item: fresh


def test_carried_optimizer_moments_follow_the_items():
    torch.manual_seed(0)
    old = build_model(SMALL.replace(num_items=5))
    old_opt = torch.optim.AdamW(old.parameters(), lr=1e-3)
    for _ in range(3):
        old_opt.zero_grad()
        old({"input_ids": torch.tensor([[1, 2, 3, 4, 5]])}).hidden.pow(2).mean().backward()
        old_opt.step()
    new = build_model(SMALL.replace(num_items=6))
    old_ids, new_ids = np.array([10, 20, 30, 40, 50]), np.array([30, 60, 10, 70, 50, 80])
    warm_start(new, old, old_ids, new_ids, "old-model")
    new_opt = torch.optim.AdamW(new.parameters(), lr=5e-4)
    carry_optimizer(new_opt, new, old_opt.state_dict(), match_items(old_ids, new_ids), "old-model")
    saved = {name: old_opt.state[p] for name, p in old.named_parameters()}
    for name, p in new.named_parameters():
        got = new_opt.state[p]
        assert float(got["step"]) == 3.0
        if name == "item_emb.weight":
            for key in ("exp_avg", "exp_avg_sq"):
                for new_index, old_index in ((1, 3), (3, 1), (5, 5)):
                    assert torch.equal(got[key][new_index], saved[name][key][old_index])
                assert not got[key][[0, 2, 4, 6]].any()          # padding and new items start at zero
        else:
            assert torch.equal(got["exp_avg_sq"], saved[name]["exp_avg_sq"]), name
    assert new_opt.param_groups[0]["lr"] == 5e-4                 # this run's hyper-parameters
    new_opt.zero_grad()
    new({"input_ids": torch.tensor([[1, 2, 6]])}).hidden.pow(2).mean().backward()
    new_opt.step()                                               # the carried state is usable


def test_another_architecture_is_refused_in_one_line():
    old = build_model(SMALL.replace(num_items=5))
    new = build_model(SMALL.replace(num_items=5, hidden_dim=32))
    with pytest.raises(ConfigError, match="old-model: train.init_from needs the same architecture; .* is"):
        warm_start(new, old, np.arange(5), np.arange(5), "old-model")
    with pytest.raises(ConfigError, match="exclude each other"):
        TrainConfig(init_from="a", resume_from="b").validate()


@pytest.fixture(scope="module")
def newer_prepared(ray_local, tmp_path_factory):
    """A newer log of the same synthetic world: 260 items where synth_prepared has 200 (ids 1..260)."""
    from raysrec.data.pipeline import PrepareConfig, prepare
    from raysrec.data.sources import SourceConfig
    from raysrec.data.synth import SynthConfig, write

    root = tmp_path_factory.mktemp("newer")
    write(SynthConfig(output=str(root / "raw"), num_users=300, num_items=260, num_events=30_000,
                      num_categories=8, seed=2))
    prepare(PrepareConfig(source=SourceConfig(path=str(root / "raw")), output=str(root / "prepared"), num_shards=2))
    return root / "prepared"


def test_training_on_a_newer_log_starts_from_the_older_model(synth_prepared, newer_prepared, tmp_path):
    torch.set_num_threads(1)
    first = LocalSession(tmp_path / "first")
    first.verbose = False
    train_loop(TrainConfig(data=str(synth_prepared), model=SMALL, epochs=1), first)
    old_ids = artifact.item_ids(tmp_path / "first")
    old_model, _, _ = artifact.load_checkpoint(tmp_path / "first")

    second = LocalSession(tmp_path / "second", last_dir=tmp_path / "second-last")
    second.verbose = False
    train_loop(TrainConfig(data=str(newer_prepared), model=SMALL, epochs=1, init_from=str(tmp_path / "first")),
               second)
    new_ids = artifact.item_ids(tmp_path / "second")
    state = json.loads((tmp_path / "second" / "state.json").read_text())
    known = np.isin(new_ids, old_ids)
    assert state["init_from"]["known_items"] == int(known.sum()) > 100
    assert state["init_from"]["new_items"] == int((~known).sum()) > 0
    # the output's item index is the newer data's, and the run trained (rows moved from where they started)
    new_model, _, _ = artifact.load_checkpoint(tmp_path / "second")
    assert new_model.cfg.num_items == len(new_ids) != old_model.cfg.num_items
    assert np.isfinite(second.history[-1]["train_loss"])
