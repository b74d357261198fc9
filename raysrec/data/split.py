"""Where each user's sequence splits into training events, a validation target and a test target.

Two protocols (``prepare.split.protocol``):

* ``leave_one_out`` (default; SASRec, BERT4Rec, RecBole): per user, the last event is the test
  target, the one before it the validation target, the rest train.
* ``global_time``: one cut in time for everyone, as a model retrained nightly meets the data. Events
  before ``valid_from`` train; a user's first event in ``[valid_from, test_from)`` is the validation
  target and the first at or after ``test_from`` the test target, each predicted from everything the
  user did before it. Leave-one-out lets a model train on interactions later than the ones it is
  tested on (Ji et al., "A Critical Study on Data Leakage in Recommender System Offline Evaluation",
  TOIS 2023; Hidasi & Czapp, RecSys 2023); a global cut does not.

The cut is kept in the prepared data's manifest and applied when sequences are read
(:meth:`SplitSpec.positions`), so the shards hold each user's whole sequence once.

**Target types** (``train.target_types``, e.g. next-buy prediction): only events of the chosen types are
targets, while every event stays in the history the model reads. Leave-one-out then holds out each user's last
event of a chosen type (test) and the one before it (valid), each predicted from everything the user did before
it; the events after the test target are not used. Under ``global_time`` the held-out targets are the first
events of a chosen type in each period. Training targets are the chosen-type events before the validation
target (users without two such targets train on all their events: they are not evaluated).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Literal, Optional, Union

import numpy as np

from raysrec.config import Config, check, option
from raysrec.errors import ConfigError

Protocol = Literal["leave_one_out", "global_time"]


@dataclasses.dataclass
class SplitConfig(Config):
    """``prepare.split``: the evaluation protocol and, for ``global_time``, where the cuts fall."""

    protocol: Protocol = option("leave_one_out", "leave_one_out (last two events held out) or global_time (one cut in time)")
    valid_time: Optional[Union[str, float]] = option(None, "global_time: validation period start (epoch seconds or an ISO date, UTC)")
    test_time: Optional[Union[str, float]] = option(None, "global_time: test period start (epoch seconds or an ISO date, UTC)")
    valid_quantile: float = option(0.8, "global_time without valid_time: cut at this quantile of event times (with "
                                        "only test_time: at valid/test_quantile of the events before it)")
    test_quantile: float = option(0.9, "global_time without test_time: cut at this quantile of event times")

    def validate(self) -> None:
        check(0.0 < self.valid_quantile < self.test_quantile < 1.0,
              "prepare.split: expected 0 < valid_quantile < test_quantile < 1")
        times = {name: parse_time(getattr(self, name), f"prepare.split.{name}")
                 for name in ("valid_time", "test_time") if getattr(self, name) is not None}
        if len(times) == 2 and not times["valid_time"] < times["test_time"]:
            raise ConfigError(f"prepare.split: the validation cut ({_iso(times['valid_time'])}) must come before "
                              f"the test cut ({_iso(times['test_time'])})")

    def cuts(self, times: np.ndarray) -> tuple[float, float]:
        """``(valid_from, test_from)`` in epoch seconds: the given times, or quantiles of ``times``."""
        valid = parse_time(self.valid_time, "prepare.split.valid_time") if self.valid_time is not None else None
        test = parse_time(self.test_time, "prepare.split.test_time") if self.test_time is not None else None
        if test is None:
            test = float(np.quantile(times, self.test_quantile, method="lower")) if len(times) else 0.0
        if valid is None:
            # with only the test date given, the validation cut keeps the quantiles' proportion of what
            # comes before it (0.8 / 0.9 of the events before the test cut, by default)
            pool, q = times, self.valid_quantile
            if self.test_time is not None:
                pool, q = times[times < test], self.valid_quantile / self.test_quantile
            valid = float(np.quantile(pool, q, method="lower")) if len(pool) else test - 1.0
        if not valid < test:
            raise ConfigError(f"prepare.split: the validation cut ({_iso(valid)}) must come before the test cut "
                              f"({_iso(test)})")
        return valid, test


def parse_time(value: str | float | int, where: str) -> float:
    """Epoch seconds from a number or an ISO 8601 date/time (naive = UTC)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        stamp = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"{where}: expected epoch seconds or an ISO date like 2024-01-31, got {text!r}") from None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=dt.timezone.utc)
    return stamp.timestamp()


def _iso(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).isoformat()


@dataclasses.dataclass(frozen=True)
class Positions:
    """Per user: ``train_end`` (events ``[0, train_end)`` give training targets) and the positions of the
    validation and test targets in the user's sequence (-1: the user has none)."""

    train_end: np.ndarray
    valid_at: np.ndarray
    test_at: np.ndarray

    def target(self, split: Literal["valid", "test"]) -> np.ndarray:
        return self.valid_at if split == "valid" else self.test_at


@dataclasses.dataclass(frozen=True)
class SplitSpec:
    """The split as applied to sequences: the protocol and, for ``global_time``, the two cuts."""

    protocol: Protocol = "leave_one_out"
    valid_from: Optional[float] = None
    test_from: Optional[float] = None
    target_types: tuple[int, ...] = ()     # event type indices that can be targets (empty: every event)

    @classmethod
    def from_manifest(cls, manifest: dict) -> SplitSpec:
        splits = manifest.get("splits", {})
        if splits.get("protocol") == "global_time":
            return cls("global_time", float(splits["valid_from"]), float(splits["test_from"]))
        return cls()

    def targets(self, types: Optional[np.ndarray]) -> Optional[np.ndarray]:
        """(E,) bool: which events can be targets, or None when every event can."""
        if not self.target_types:
            return None
        if types is None:
            raise ConfigError("train.target_types: the data has no event types (prepare --type-col)")
        return np.isin(types, self.target_types)

    def positions(self, offsets: np.ndarray, times: np.ndarray, types: Optional[np.ndarray] = None) -> Positions:
        """The split of CSR sequences (``offsets``, per-user time-ordered ``times``, and the event ``types`` when
        ``target_types`` is set)."""
        lengths = np.diff(offsets)
        eligible = self.targets(types)
        if eligible is not None:
            return self._typed_positions(offsets, times, eligible)
        if self.protocol == "leave_one_out":
            ok = lengths >= 3
            return Positions(np.maximum(lengths - 2, 0), np.where(ok, lengths - 2, -1), np.where(ok, lengths - 1, -1))
        before_valid = _count_per_user(times < self.valid_from, offsets)
        before_test = _count_per_user(times < self.test_from, offsets)
        valid_at = np.where((before_valid < before_test) & (before_valid >= 1), before_valid, -1)
        test_at = np.where((before_test < lengths) & (before_test >= 1), before_test, -1)
        return Positions(before_valid, valid_at, test_at)

    def _typed_positions(self, offsets: np.ndarray, times: np.ndarray, eligible: np.ndarray) -> Positions:
        lengths = np.diff(offsets)
        at = np.arange(len(times), dtype=np.int64) - np.repeat(offsets[:-1], lengths)     # position in its user
        if self.protocol == "leave_one_out":
            test_at = _per_user(np.where(eligible, at, -1), offsets, np.maximum, -1)
            earlier = eligible & (at < np.repeat(test_at, lengths))
            valid_at = _per_user(np.where(earlier, at, -1), offsets, np.maximum, -1)
            ok = valid_at >= 1                      # a valid target with some history before it
            return Positions(np.where(ok, valid_at, lengths), np.where(ok, valid_at, -1), np.where(ok, test_at, -1))
        before_valid = _count_per_user(times < self.valid_from, offsets)
        late = np.iinfo(np.int64).max
        in_valid = eligible & (times >= self.valid_from) & (times < self.test_from)
        valid_at = _per_user(np.where(in_valid, at, late), offsets, np.minimum, late)
        test_at = _per_user(np.where(eligible & (times >= self.test_from), at, late), offsets, np.minimum, late)
        return Positions(before_valid, np.where((valid_at < late) & (valid_at >= 1), valid_at, -1),
                         np.where((test_at < late) & (test_at >= 1), test_at, -1))

    def accounting(self, offsets: np.ndarray, times: np.ndarray) -> dict:
        """What the split makes of every kept event and user (the manifest's ``splits``)."""
        pos = self.positions(offsets, times)
        lengths = np.diff(offsets)
        out: dict = {"protocol": self.protocol, "users": int(len(lengths)),
                     "train_targets": int(np.maximum(pos.train_end - 1, 0).sum()),
                     "valid_users": int((pos.valid_at >= 0).sum()), "test_users": int((pos.test_at >= 0).sum())}
        if self.protocol == "leave_one_out":
            out["description"] = "leave-one-out by time: train = all but the last two, valid = item n-1, test = item n"
            return out
        before_test = _count_per_user(times < self.test_from, offsets)
        in_valid = before_test - pos.train_end
        out.update({
            "description": "global time: train = events before valid_from; valid/test = each user's first event "
                           "at or after valid_from / test_from, predicted from everything before it; the k-core "
                           "filters and the item vocabulary count training events only",
            "valid_from": self.valid_from, "test_from": self.test_from,
            "valid_from_iso": _iso(self.valid_from), "test_from_iso": _iso(self.test_from),
            "events": {"train_period": int(pos.train_end.sum()), "valid_period": int(in_valid.sum()),
                       "test_period": int((lengths - before_test).sum())},
            # users with events in a period but nothing before it: no history to predict from (cold users)
            "valid_users_without_history": int(((in_valid > 0) & (pos.train_end == 0)).sum()),
            "test_users_without_history": int(((lengths > before_test) & (before_test == 0)).sum()),
            "users_without_valid_events": int((in_valid == 0).sum()),
            "users_without_test_events": int((lengths == before_test).sum()),
        })
        return out


LEAVE_ONE_OUT = SplitSpec()


def _per_user(values: np.ndarray, offsets: np.ndarray, op: np.ufunc, empty: int) -> np.ndarray:
    """``op`` (np.maximum, np.minimum) reduced over each user's events; ``empty`` for users without events."""
    lengths = np.diff(offsets)
    out = np.full(len(lengths), empty, np.int64)
    has = lengths > 0
    if has.any():
        out[has] = op.reduceat(values, offsets[:-1][has])
    return out


def _count_per_user(flags: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per user, how many of its events are flagged (CSR ``offsets``; empty users count 0)."""
    cum = np.concatenate([[0], np.cumsum(flags, dtype=np.int64)])
    return cum[offsets[1:]] - cum[offsets[:-1]]
