"""The model's input: one function turns histories into the batch every model reads.

Training batches, evaluation, Serve and batch recommend all build their input with :func:`model_input` (the
idea of SASRec.pytorch's ``log2feats``), so a feature added here reaches every path and serving cannot drift
from training.

Layout. A row shows the newest ``count`` events of a history, oldest first, left-padded to the batch's longest
row: column -1 is always the newest event (with the last position embedding), padding is item 0. Per position:

* ``input_ids`` (B, L) the item; ``input_times`` (B, L) its time in seconds (0 = unknown);
* ``target_times`` (B, L) the time of the event the position predicts: the next input's time, and ``now`` for
  the newest position (in training and evaluation the target's own time, in serving the request's time), so
  the long/short model's time gap is computed the same way everywhere;
* ``input_types`` (B, L) the behaviour type (0 = unknown), when the events carry types;
* ``padding_mask`` (B, L) True on real events;
* ``user_tokens_{i}`` (B, M_i) per row, the tokens of user attribute ``i`` (0-padded; none: no value), when the
  model reads user attributes.

Item attributes are not part of the input: the model looks them up in its own item table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Optional

import numpy as np

if TYPE_CHECKING:     # torch is imported where tensors are made: reading prepared data (and the CLI) needs no torch
    import torch


@dataclasses.dataclass(frozen=True)
class Events:
    """Flat event columns that rows of a batch point into; one history's events are contiguous, oldest first."""

    items: np.ndarray                      # (E,) item index, 1..num_items
    times: np.ndarray                      # (E,) seconds, 0 = unknown
    types: Optional[np.ndarray] = None     # (E,) behaviour type index, 0 = unknown

    @classmethod
    def from_histories(cls, items: Sequence[Sequence[int]], times: Sequence[Optional[Sequence[float]]],
                       types: Optional[Sequence[Optional[Sequence[int]]]] = None) -> tuple[Events, np.ndarray]:
        """Ragged histories (a history without times or types: ``None``) -> (events, ``end`` (B,)): row r's
        events are ``[end[r] - len(items[r]), end[r])``."""
        lengths = np.array([len(h) for h in items], np.int64)
        flat = lambda parts, dtype: np.concatenate(  # noqa: E731
            [np.zeros(0, dtype)] + [np.asarray(p, dtype) if p is not None else np.zeros(n, dtype)
                                    for p, n in zip(parts, lengths)])
        events = cls(flat(items, np.int64), flat(times, np.float64),
                     flat(types, np.int64) if types is not None else None)
        return events, np.cumsum(lengths)


def window(end: np.ndarray, count: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Event positions of left-padded rows: row r shows events ``[end[r] - count[r], end[r])`` in its last
    ``count[r]`` columns. Returns ``at`` (B, L) (0 on padding, a safe index) and ``shown`` (B, L) bool."""
    col = np.arange(length)
    shown = col >= length - np.minimum(count, length)[:, None]
    at = np.where(shown, end[:, None] - length + col, 0)
    return at, shown


def model_input(events: Events, end: np.ndarray, count: np.ndarray, now: np.ndarray,
                length: Optional[int] = None, users: Sequence[np.ndarray] = ()) -> dict[str, np.ndarray]:
    """The model input of B rows (layout in the module docstring).

    Row r reads the events ``[end[r] - count[r], end[r])``, and its newest position predicts an event at time
    ``now[r]`` (0 = unknown). ``length``: the padded width; by default the longest row (a trimmed batch, whose
    outputs are those of any wider padding: positions are counted from the right and padding is masked).
    ``users``: per user attribute, the (B, M_i) tokens of each row's user.
    """
    count = np.asarray(count, np.int64)
    width = length if length is not None else max(1, int(count.max()) if len(count) else 1)
    at, shown = window(np.asarray(end, np.int64), count, width)
    times = np.where(shown, events.times[at], 0.0)
    # the time each position predicts: the next input's, and ``now`` for the newest
    following = np.concatenate([times[:, 1:], np.asarray(now, np.float64).reshape(-1, 1)], axis=1)
    out = {"input_ids": np.where(shown, events.items[at], 0).astype(np.int64),
           "input_times": times,
           "target_times": np.where(shown, following, 0.0)}
    if events.types is not None:
        out["input_types"] = np.where(shown, events.types[at], 0).astype(np.int64)
    out["padding_mask"] = shown
    for i, tokens in enumerate(users):
        out[f"user_tokens_{i}"] = np.asarray(tokens, np.int64)
    return out


def user_tokens(values: Sequence[Optional[dict]], vocab: dict[str, list[str]], kind: dict[str, str],
                width: dict[str, int]) -> list[np.ndarray]:
    """Raw user attributes of B requests (``{"age": 24, "gender": "M"}``, or None) -> per attribute the (B, M)
    tokens :func:`model_input` takes, encoded against the model's saved vocabularies (an unknown value: none)."""
    from raysrec.data.attributes import encode_value  # noqa: PLC0415

    out = []
    for name, names in vocab.items():
        tokens = np.zeros((len(values), max(1, width.get(name, 1))), np.int64)
        for r, given in enumerate(values):
            if given and given.get(name) is not None:
                found = encode_value(given[name], kind.get(name, "category"), names)  # type: ignore[arg-type]
                tokens[r, :min(len(found), tokens.shape[1])] = found[:tokens.shape[1]]
        out.append(tokens)
    return out


def to_tensors(arrays: dict[str, np.ndarray], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    import torch  # noqa: PLC0415

    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device, non_blocking=True) for k, v in arrays.items()}
