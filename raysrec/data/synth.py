"""Seeded synthetic interaction logs with long-term tastes and short-lived session interests.

The generative story (all vectorised with NumPy, ~1M events/s on one core):

* items belong to latent categories; popularity inside a category is Zipf-like (long tail);
  items inside a category also have an order, and sessions often walk along it (a short-term,
  sequential signal: "the next episode", "the matching accessory");
* every user has a stable long-term taste: a few favourite categories with Dirichlet weights;
* activity is long-tailed (log-normal events per user) and split into sessions (geometric
  length). Minutes separate events inside a session, days separate sessions;
* a session's interest is one category: drawn from the long-term taste with probability
  ``p_long``, otherwise a random category the user may never revisit (drift). Inside a session
  a share ``p_off_session`` of the events come from the long-term taste anyway.

A model that only sees the current session cannot know which category the next session
picks, nor the long-term items sprinkled in; a model with the whole history and the time since
the last event can. That is the gap the long/short-term model is meant to close.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from raysrec.config import Config, check, option

_ADJECTIVES = ["Silent", "Golden", "Broken", "Hidden", "Crimson", "Electric", "Lonely", "Wild", "Frozen",
               "Secret", "Last", "Midnight", "Brave", "Lost", "Bright", "Savage", "Gentle", "Iron"]
_CATEGORY_NAMES = ["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi", "Documentary", "Animation",
                   "Thriller", "Fantasy", "Mystery", "Western", "Musical", "Crime", "War", "Family",
                   "Sports", "History", "Travel", "Cooking", "Music", "Nature", "Gaming", "Fashion"]
_NOUNS = {name: [f"{name} {w}" for w in ("Story", "Road", "City", "Night", "Game", "Return", "Legacy",
                                         "Files", "Show", "Quest", "Hour", "Chronicles")]
          for name in _CATEGORY_NAMES}

_SCHEMA = pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()), ("timestamp", pa.int64())])


@dataclasses.dataclass
class SynthConfig(Config):
    """Sizes and behaviour of the synthetic log.

    The defaults (1,200 users, 800 items, 200k events) are the "synthetic default" the demo and the
    accuracy benchmark use: big enough to show the long/short-term effects, small enough to train
    in minutes on two cores. Scale every size up for load tests.
    """

    output: str = option("", 'output folder')
    num_users: int = option(1200, 'users')
    num_items: int = option(800, 'items')
    num_events: int = option(200_000, 'events')
    num_categories: int = 20
    tastes_per_user: int = 3
    mean_session_length: float = 8.0
    p_long: float = 0.7
    p_off_session: float = 0.15
    p_follow: float = 0.5
    zipf_exponent: float = 1.0
    seed: int = option(0, 'random seed')
    format: Literal["csv", "parquet"] = option("parquet", 'file format of the log')

    def validate(self) -> None:
        check(self.num_users >= 1 and self.num_items >= 2, "synth: need at least one user and two items")
        check(self.num_events >= 5 * self.num_users, "synth.num_events must be >= 5 x num_users")
        check(1 <= self.num_categories <= len(_CATEGORY_NAMES), f"synth.num_categories must be in [1, {len(_CATEGORY_NAMES)}]")
        check(self.num_items >= self.num_categories, "synth.num_items must be >= num_categories")
        check(1 <= self.tastes_per_user <= self.num_categories, "synth.tastes_per_user must be in [1, num_categories]")
        check(self.mean_session_length >= 1, "synth.mean_session_length must be >= 1")
        for name in ("p_long", "p_off_session", "p_follow"):
            check(0.0 <= getattr(self, name) <= 1.0, f"synth.{name} must be in [0, 1]")


@dataclasses.dataclass
class Simulation:
    """A generated log and the latent variables that produced it (what an oracle would know)."""

    interactions: pd.DataFrame
    items: pd.DataFrame
    item_cat: np.ndarray         # (items,) category of each item (0-based item index)
    weight: np.ndarray           # (items,) popularity inside its category (sums to 1 per category)
    cat_start: np.ndarray        # (categories,) first item of each category; items of a category are contiguous
    cat_sizes: np.ndarray
    tastes: np.ndarray           # (users, tastes_per_user) long-term categories
    taste_w: np.ndarray          # (users, tastes_per_user) their weights
    first: np.ndarray            # (users,) row of each user's first event; rows are per user, in time order
    counts: np.ndarray           # (users,) events per user
    session_start: np.ndarray    # (events,) bool
    session_cat: np.ndarray      # (events,) the category of the event's session
    anchor: np.ndarray           # (events,) last non-walking event at or before this one
    base: np.ndarray             # (events,) the popularity draw of each event (a walk starts from its anchor's)


def generate(cfg: SynthConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return ``(interactions, items)``: columns user_id, item_id, timestamp / item_id, title, categories."""
    sim = simulate(cfg)
    return sim.interactions, sim.items


@dataclasses.dataclass
class _World:
    """Items and users before any event is drawn."""

    item_cat: np.ndarray
    weight: np.ndarray
    cat_start: np.ndarray
    cat_sizes: np.ndarray
    local_rank: np.ndarray
    cdf: np.ndarray
    tastes: np.ndarray
    taste_w: np.ndarray
    counts: np.ndarray


def _world(cfg: SynthConfig, rng: np.random.Generator) -> _World:
    n_users, n_items, n_cats = cfg.num_users, cfg.num_items, cfg.num_categories
    # Items: contiguous by category; Zipf popularity inside each category.
    cat_sizes = np.maximum(1, rng.multinomial(n_items - n_cats, rng.dirichlet(np.full(n_cats, 3.0))) + 1)
    cat_start = np.concatenate([[0], np.cumsum(cat_sizes)[:-1]])
    item_cat = np.repeat(np.arange(n_cats), cat_sizes)
    local_rank = np.arange(n_items) - cat_start[item_cat]
    weight = 1.0 / (1.0 + rng.permutation(n_items) % np.maximum(cat_sizes[item_cat], 1)) ** cfg.zipf_exponent
    weight /= np.bincount(item_cat, weights=weight)[item_cat]
    # Searching cat + u in the concatenated per-category CDFs samples an item of category cat.
    cdf = item_cat + np.concatenate([np.cumsum(weight[item_cat == c]) for c in range(n_cats)])
    cdf[np.r_[cat_start[1:] - 1, n_items - 1]] = np.arange(1, n_cats + 1) - 1e-12
    # Users: long-term tastes over categories (popular categories more often), long-tailed activity.
    cat_pop = rng.dirichlet(np.full(n_cats, 1.0))
    tastes = np.stack([rng.choice(n_cats, cfg.tastes_per_user, replace=False, p=cat_pop) for _ in range(n_users)])
    taste_w = rng.dirichlet(np.full(cfg.tastes_per_user, 1.0), size=n_users)
    activity = rng.lognormal(0.0, 1.0, n_users)
    counts = 5 + np.floor((cfg.num_events - 5 * n_users) * activity / activity.sum()).astype(np.int64)
    np.add.at(counts, rng.choice(n_users, cfg.num_events - counts.sum(), replace=True), 1)
    return _World(item_cat, weight, cat_start, cat_sizes, local_rank, cdf, tastes, taste_w, counts)


def _events(cfg: SynthConfig, w: _World, lo: int, hi: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The events of users ``lo..hi-1``, per user in time order; ``anchor`` indexes this chunk's rows."""
    n_items, n_cats = cfg.num_items, cfg.num_categories
    counts = w.counts[lo:hi]
    user = np.repeat(np.arange(lo, hi), counts)
    n = len(user)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    is_user_start = np.zeros(n, bool)
    is_user_start[first] = True

    def sample_items(cats: np.ndarray) -> np.ndarray:
        return np.minimum(np.searchsorted(w.cdf, cats + rng.random(len(cats))), n_items - 1)

    def taste_draw(users: np.ndarray) -> np.ndarray:
        tw = w.taste_w[users]
        pick = (rng.random(len(users))[:, None] > np.cumsum(tw, axis=1)).sum(axis=1)
        return w.tastes[users, np.minimum(pick, cfg.tastes_per_user - 1)]

    # Sessions: geometric lengths; a session's category is long-term (p_long) or a passing interest.
    session_start = is_user_start | (rng.random(n) < 1.0 / cfg.mean_session_length)
    session_id = np.cumsum(session_start) - 1
    starts = np.flatnonzero(session_start)
    s_users = user[starts]
    s_cat = np.where(rng.random(len(starts)) < cfg.p_long, taste_draw(s_users), rng.integers(0, n_cats, len(starts)))
    event_cat = s_cat[session_id]
    off = ~session_start & (rng.random(n) < cfg.p_off_session)
    event_cat[off] = taste_draw(user[off])

    # Items: a popularity draw, or a walk along the category order from the session's last draw.
    follow = ~session_start & ~off & (rng.random(n) < cfg.p_follow)
    base = sample_items(event_cat)
    anchor = np.maximum.accumulate(np.where(follow, 0, np.arange(n)))
    steps = np.arange(n) - anchor
    anchor_item = base[anchor]
    c = w.item_cat[anchor_item]
    walked = w.cat_start[c] + (w.local_rank[anchor_item] + steps) % w.cat_sizes[c]
    item = np.where(follow & (w.item_cat[anchor_item] == event_cat), walked, base)

    # Time: minutes inside sessions, days between them; users start anywhere in a year.
    gaps = np.where(session_start, rng.exponential(2 * 86400.0, n), rng.exponential(180.0, n)) + 1.0
    gaps[is_user_start] = rng.uniform(0, 365 * 86400.0, hi - lo)
    t0 = 1_600_000_000.0
    cum = np.cumsum(gaps)
    timestamp = np.floor(t0 + cum - np.repeat(cum[first] - gaps[first], counts)).astype(np.int64)
    return {"user": user, "item": item, "timestamp": timestamp, "first": first, "session_start": session_start,
            "session_cat": s_cat[session_id], "anchor": anchor, "base": base}


def _interactions(ev: dict[str, np.ndarray]) -> pd.DataFrame:
    return pd.DataFrame({"user_id": ev["user"] + 1, "item_id": ev["item"] + 1, "timestamp": ev["timestamp"]})


def _items_table(cfg: SynthConfig, w: _World) -> pd.DataFrame:
    names = [_CATEGORY_NAMES[i] for i in range(cfg.num_categories)]
    titles = [f"{_ADJECTIVES[(i * 7) % len(_ADJECTIVES)]} {_NOUNS[names[w.item_cat[i]]][w.local_rank[i] % 12]} "
              f"{w.local_rank[i] + 1}" for i in range(cfg.num_items)]
    return pd.DataFrame({"item_id": np.arange(1, cfg.num_items + 1), "title": titles,
                         "categories": [names[k] for k in w.item_cat]})


def simulate(cfg: SynthConfig) -> Simulation:
    """Generate the log in one piece and keep the latent variables (for :func:`oracle_ndcg`)."""
    rng = np.random.default_rng(cfg.seed)
    w = _world(cfg, rng)
    ev = _events(cfg, w, 0, cfg.num_users, rng)
    return Simulation(_interactions(ev), _items_table(cfg, w), w.item_cat, w.weight, w.cat_start, w.cat_sizes,
                      w.tastes, w.taste_w, ev["first"], w.counts, ev["session_start"], ev["session_cat"],
                      ev["anchor"], ev["base"])


def generate_chunks(cfg: SynthConfig, max_events: int = 4_000_000) -> tuple[pd.DataFrame, Iterator[pd.DataFrame]]:
    """``(items, interactions in pieces of whole users, each <= max_events or one user)``: memory stays
    O(max_events + users + items) however long the log (tens of millions of events for load tests).
    A log that fits in one piece is event for event the one :func:`generate` returns."""
    rng = np.random.default_rng(cfg.seed)
    w = _world(cfg, rng)
    bounds = np.concatenate([[0], np.cumsum(w.counts)])

    def pieces() -> Iterator[pd.DataFrame]:
        lo = 0
        while lo < cfg.num_users:
            hi = max(lo + 1, int(np.searchsorted(bounds, bounds[lo] + max_events, side="right")) - 1)
            yield _interactions(_events(cfg, w, lo, min(hi, cfg.num_users), rng))
            lo = min(hi, cfg.num_users)

    return _items_table(cfg, w), pieces()


def oracle_ndcg(cfg: SynthConfig, sim: Simulation, k: int = 10, knows_gap: bool = True) -> dict[str, float]:
    """Bayes-optimal NDCG@k on the leave-one-out test target (each user's last event) of a simulated log.

    The oracle knows everything the generator knows *before* the target: the user's tastes and their
    weights, the category of the current session, the walk's anchor and every item's popularity. It
    ranks items by the true probability of the next event, with the user's history masked (the
    target never), exactly as the evaluation does. ``knows_gap=True`` also knows whether the target
    starts a new session (what the time since the last event tells a model); ``knows_gap=False``
    only knows the prior ``1 / mean_session_length`` of that, like a model without timestamps.

    Returns the expected NDCG@k over the generator's randomness at the target (``expected``), the
    NDCG@k of the targets actually drawn (``sampled``; a check of the oracle against the
    generator), the expected NDCG@k split by targets that start a session or not, and the share
    of targets that start one.
    """
    n_items, n_cats = cfg.num_items, cfg.num_categories
    pop = np.zeros((n_cats, n_items))
    pop[sim.item_cat, np.arange(n_items)] = sim.weight
    uniform_cat = sim.weight / n_cats                                  # a random category, then popularity
    items = sim.interactions["item_id"].to_numpy() - 1
    p_new_session = 1.0 / cfg.mean_session_length
    discount = 1.0 / np.log2(np.arange(k) + 2.0)
    jitter = np.random.default_rng(0).random(n_items) * 1e-12       # a fixed order for exact ties
    expected, sampled = [], []
    targets = sim.first + sim.counts - 1
    for u, i in enumerate(targets):
        taste_mix = sim.taste_w[u] @ pop[sim.tastes[u]]
        new = cfg.p_long * taste_mix + (1 - cfg.p_long) * uniform_cat
        cat = sim.session_cat[i - 1]
        walk_from = sim.anchor[i - 1]                                  # a walk at i continues from here
        anchor_item = sim.base[walk_from]
        inner = (1 - cfg.p_follow) * pop[cat]
        if sim.item_cat[anchor_item] == cat:
            c = cat
            step = i - walk_from
            inner[sim.cat_start[c] + (anchor_item - sim.cat_start[c] + step) % sim.cat_sizes[c]] += cfg.p_follow
        else:                                                          # the generator falls back to a draw
            inner += cfg.p_follow * pop[cat]
        within = cfg.p_off_session * taste_mix + (1 - cfg.p_off_session) * inner
        truth = new if sim.session_start[i] else within
        belief = truth if knows_gap else p_new_session * new + (1 - p_new_session) * within
        score = belief + jitter
        seen = np.zeros(n_items, bool)
        seen[items[sim.first[u]:i]] = True
        ranked = np.sort(score[~seen])
        above = len(ranked) - np.searchsorted(ranked, score, side="right")   # unmasked items strictly above
        gain = np.where(above < k, discount[np.minimum(above, k - 1)], 0.0)
        expected.append(float(truth @ gain))
        sampled.append(float(gain[items[i]]))
    expected_arr, starts = np.asarray(expected), sim.session_start[targets]
    return {"expected": float(expected_arr.mean()), "sampled": float(np.mean(sampled)),
            "expected_session_start": float(expected_arr[starts].mean()) if starts.any() else float("nan"),
            "expected_within_session": float(expected_arr[~starts].mean()) if (~starts).any() else float("nan"),
            "session_start_share": float(starts.mean()), "per_user": expected_arr}


def write(cfg: SynthConfig) -> Path:
    """Generate and write ``interactions.<fmt>`` and ``items.<fmt>`` into ``cfg.output``."""
    check(bool(cfg.output), "synth.output: an output folder is required")
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    items, pieces = generate_chunks(cfg)
    if cfg.format == "parquet":
        pq.write_table(pa.Table.from_pandas(items, preserve_index=False), out / "items.parquet")
        with pq.ParquetWriter(out / "interactions.parquet", _SCHEMA) as writer:
            for piece in pieces:
                writer.write_table(pa.Table.from_pandas(piece, schema=_SCHEMA, preserve_index=False),
                                   row_group_size=1 << 20)
    else:
        items.to_csv(out / "items.csv", index=False)
        for n, piece in enumerate(pieces):
            piece.to_csv(out / "interactions.csv", index=False, header=n == 0, mode="w" if n == 0 else "a")
    cfg.save(out / "synth_config.yaml")
    return out
