"""``train.init_from``: start a training run from an earlier model trained on an older log.

The newer prepared data may have new items (and users; users have no parameters). Items are matched by
their original id (event types by name, in the type table): a known item keeps its learned row of the item
table, a new item keeps the fresh row
the model was built with (zero when the model fuses text, so a new item starts from its text vector alone:
the cold-start representation ``id_dropout`` trains for). Every other parameter is copied as is, so the
architecture must match the checkpoint's; the text vectors come from the new data. The output checkpoint's
item index is the new data's.

By default the carried weights are shrunk and perturbed (``init_shrink`` 0.5, ``init_perturb`` 0.1): on
ML-100K's global time split that reached a better validation and test NDCG@10 than the plain copy, in fewer
epochs (``bench/warm_start.py``); 1.0 and 0.0 copy bit for bit. The optimizer starts afresh
(``train.init_optimizer: reset``, the default) or takes the checkpoint's AdamW moments, item rows matched
like the weights (``carry``), which measured no better.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from raysrec.errors import ConfigError
from raysrec.models.sequential import SequentialRecommender

# Parameters and buffers with a row per item (index 0: padding), matched by original id, not copied by shape; the
# event-type table and each item or user attribute's table likewise, by name.
ITEM_TABLES = ("item_emb.weight",)


def _from_data(name: str) -> bool:
    """The new data's (text vectors, attribute tokens per item), set by the training loop, never copied."""
    return name == "text_vectors" or name.startswith("feature_tokens_")


def vocabulary_matches(model: SequentialRecommender, source: SequentialRecommender, old_items: np.ndarray,
                       where: str) -> dict[str, np.ndarray]:
    """Per table with a row per vocabulary entry: ``old[i - 1]``, the source row of this model's row ``i``."""
    for what, ours, theirs in (("item", model.cfg.feature_vocab, source.cfg.feature_vocab),
                               ("user", model.cfg.user_feature_vocab, source.cfg.user_feature_vocab)):
        if list(theirs) != list(ours):
            raise ConfigError(f"{where}: train.init_from needs the same {what} attributes; the checkpoint has "
                              f"{list(theirs)}, this data {list(ours)}")
    out = {"item_emb.weight": old_items,
           "type_emb.weight": match_items(np.array(source.cfg.type_names), np.array(model.cfg.type_names))}
    for i, name in enumerate(model.cfg.feature_vocab):
        out[f"feature_emb.{i}.weight"] = match_items(np.array(source.cfg.feature_vocab[name]),
                                                     np.array(model.cfg.feature_vocab[name]))
    for i, name in enumerate(model.cfg.user_feature_vocab):
        out[f"user_feature_emb.{i}.weight"] = match_items(np.array(source.cfg.user_feature_vocab[name]),
                                                          np.array(model.cfg.user_feature_vocab[name]))
    return out


def match_items(source_ids: np.ndarray, target_ids: np.ndarray) -> np.ndarray:
    """``old[i - 1]``: the source index of the new data's item ``i`` (0: an item the source never saw)."""
    position = {v: i + 1 for i, v in enumerate(source_ids.tolist())}
    return np.array([position.get(v, 0) for v in target_ids.tolist()], dtype=np.int64)


def warm_start(model: SequentialRecommender, source: SequentialRecommender, source_ids: np.ndarray,
               target_ids: np.ndarray, where: str, shrink: float = 1.0, perturb: float = 0.0) -> dict[str, Any]:
    """Copy ``source``'s parameters into ``model`` (in place); ``*_ids[i - 1]`` is the original id of item
    index ``i`` in each. Returns how many items were carried over, new, and left behind.

    ``shrink``/``perturb`` < 1/> 0: shrink and perturb (Ash & Adams, "On Warm-Starting Neural Network
    Training", NeurIPS 2020): every carried parameter becomes ``shrink * learned + perturb * fresh`` (fresh:
    the model's own new initialisation), which closes part of the generalisation gap warm starts show."""
    src, dst = source.state_dict(), model.state_dict()
    params = {name for name, _ in model.named_parameters()}
    if set(src) != set(dst):
        diff = sorted(set(src) ^ set(dst))
        raise ConfigError(f"{where}: train.init_from needs the same architecture; parameters differ: "
                          f"{', '.join(diff[:5])}")
    old = match_items(source_ids, target_ids)
    matched = vocabulary_matches(model, source, old, where)
    for name, value in src.items():
        if name in matched or _from_data(name):
            continue
        if value.shape != dst[name].shape:
            raise ConfigError(f"{where}: train.init_from needs the same architecture; {name} is "
                              f"{tuple(value.shape)} there and {tuple(dst[name].shape)} here")
    known = np.flatnonzero(old) + 1                                                     # new indices
    with torch.no_grad():
        for name, value in src.items():
            if _from_data(name):
                continue
            mix = name in params and (shrink != 1.0 or perturb != 0.0)
            if name in matched:
                rows = torch.from_numpy(np.flatnonzero(matched[name]) + 1)
                learned = value[torch.from_numpy(matched[name][rows.numpy() - 1])].to(dst[name].dtype)
                dst[name][rows] = shrink * learned + perturb * dst[name][rows] if mix else learned
            elif mix:
                dst[name].copy_(shrink * value.to(dst[name].dtype) + perturb * dst[name])
            else:
                dst[name].copy_(value)
    model.load_state_dict(dst)
    return {"known_items": int(len(known)), "new_items": int(len(target_ids) - len(known)),
            "dropped_items": int(len(source_ids) - len(known))}


def carry_optimizer(optimizer: torch.optim.Optimizer, model: torch.nn.Module, saved: dict[str, Any],
                    old: np.ndarray, where: str) -> None:
    """Load the source run's optimizer state (``saved``, an AdamW ``state_dict``) into ``optimizer`` for
    ``model``: per-parameter moments as they were, item-table rows matched by ``old`` (from
    :func:`match_items`), zero moments for new items. Learning rate and the other hyper-parameters stay
    this run's."""
    named = list(model.named_parameters())
    if len(saved.get("param_groups", [{}])[0].get("params", [])) != len(named):
        raise ConfigError(f"{where}: the checkpoint's optimizer state does not match this model's parameters")
    known = torch.from_numpy(np.flatnonzero(old) + 1)
    rows = torch.from_numpy(old[np.flatnonzero(old)])
    state = {}
    for i, (name, param) in enumerate(named):
        entry = saved["state"].get(i)
        if entry is None:
            continue
        if name in ITEM_TABLES:
            mapped = {}
            for key, value in entry.items():
                if torch.is_tensor(value) and value.dim() == param.dim() and value.shape[1:] == param.shape[1:]:
                    fresh = torch.zeros(param.shape, dtype=value.dtype)
                    fresh[known] = value[rows]
                    mapped[key] = fresh
                else:
                    mapped[key] = value    # step
            entry = mapped
        elif any(torch.is_tensor(v) and v.dim() > 0 and v.shape != param.shape for v in entry.values()):
            raise ConfigError(f"{where}: the checkpoint's optimizer state for {name} has another shape")
        state[i] = entry
    current = optimizer.state_dict()
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})
