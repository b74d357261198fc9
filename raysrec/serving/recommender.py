"""Online retrieval from a checkpoint: pure PyTorch, no Ray, no HTTP.

:class:`Recommender` maps the dataset's original item ids to model indices, encodes a batch of
histories in one forward pass and returns the top-k items (or scores for given candidates).
The Serve deployment (:mod:`raysrec.serving.app`) batches requests and calls it.

What is guaranteed about served vs evaluated rankings (``tests/serving/test_parity.py`` checks it
for both models, with and without timestamps): for the same history, the same checkpoint and the
same ``now`` (the target's time in evaluation), the model input is laid out as in training
(left-padded, newest ``max_length`` items, a time gap per position), the user vector and the item
table are the ones :func:`raysrec.evaluation.evaluate` uses, and ``exclude_seen`` masks what the
full-ranking protocol masks. So the top-k items are the ones evaluation ranks highest, in the same
order, up to float ties. Not guaranteed: a history with ids the model does not know (they are
skipped here, while evaluation never sees one), and a long/short request without timestamps (its
gaps are "unknown", a row trained by ``gap_dropout``, while evaluation always has the real gaps).

Behaviour shared by every entry point:

* history ids the model does not know are skipped and reported back (``unknown_items``);
* the history is cut to the model's ``max_length`` most recent items;
* an empty (or all-unknown) history falls back to the most popular items of the training data;
* ``exclude_seen`` removes the (known) history items; ``exclude`` removes given ids.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

import numpy as np
import torch

from raysrec import artifact
from raysrec.config import redact
from raysrec.errors import CheckpointError
from raysrec.models.inputs import Events, model_input, to_tensors, user_tokens
from raysrec.models.sequential import SequentialRecommender
from raysrec.serving.ann import HnswIndex, ann_available, recall_at_k

ItemId = int | str
# HNSW searches k plus at most this many more per row, for the row's excluded items (its history, ``exclude``)
ANN_MAX_OVERFETCH = 512


@dataclasses.dataclass
class Query:
    """One request, already validated: original ids, oldest first."""

    history: Sequence[ItemId]
    k: int = 10
    exclude_seen: bool = True
    exclude: Sequence[ItemId] = ()
    timestamps: Optional[Sequence[float]] = None   # seconds, one per history item (long/short model)
    # time of the recommendation; default: the newest history timestamp (a request for a past history must not
    # meet gaps from its last event to today's clock, which training never saw)
    now: Optional[float] = None
    candidates: Optional[Sequence[ItemId]] = None   # set for /score
    types: Optional[Sequence[str]] = None           # event type of each history item (view, buy, ...)
    user_features: Optional[dict[str, Any]] = None  # the user's raw attributes ({"age": 24, "gender": "M"})
    # the same, already encoded (per user attribute, its tokens): batch recommend over a prepared folder
    user_tokens: Optional[Sequence[Sequence[int]]] = None


@dataclasses.dataclass
class Answer:
    items: list[dict[str, Any]]
    unknown_items: list[ItemId]
    scores: Optional[list[Optional[float]]] = None
    fallback: Optional[str] = None


class Recommender:
    """A loaded checkpoint with its item index, ready to answer batches of queries."""

    def __init__(self, model: SequentialRecommender, item_ids: np.ndarray, titles: Optional[list[Optional[str]]],
                 counts: np.ndarray, metadata: dict[str, Any], device: str = "cpu", chunk_items: int = 262144,
                 retrieval: str = "exact", ann_min_items: int = 1_000_000, ann_ef_search: int = 512,
                 threads: int = 0) -> None:
        self.model = model.to(device).eval()
        self.chunk_items = chunk_items                            # exact top-k scores this many items at a time
        self.device = torch.device(device)
        self.max_length = model.cfg.max_length
        self.item_ids = item_ids                                  # index i-1 -> original id of item i
        self.titles = titles
        self.index = {v: i + 1 for i, v in enumerate(item_ids.tolist())}
        self.counts = counts
        self.ids_are_ints = item_ids.dtype.kind in "iu"
        order = np.argsort(-counts, kind="stable")
        self.popular = (order + 1).astype(np.int64)               # item indices, most popular first
        self.metadata = metadata
        # event type name -> the model's type index; a name it does not know is 0 ("unknown"), like a missing type
        self.type_index = {name: i + 1 for i, name in enumerate(model.cfg.type_names)}
        self._download: Optional[tempfile.TemporaryDirectory] = None
        with torch.inference_mode():
            self.item_vectors = model.item_rows().detach().to(device).float().clone()   # (N+1, d)
        self.ann = None
        if retrieval == "hnsw" or (retrieval == "auto" and self.num_items >= ann_min_items and ann_available()):
            self.ann = HnswIndex.build(self.item_vectors.cpu().numpy(), ef_search=ann_ef_search, threads=threads)
            self.metadata["retrieval"] = {"method": "hnsw", "build_seconds": round(self.ann.build_seconds, 2),
                                          "ef_search": self.ann.ef_search, **self._ann_recall()}
        else:
            self.metadata["retrieval"] = {"method": "exact"}

    @torch.inference_mode()
    def _ann_recall(self, n: int = 512, k: int = 10) -> dict[str, Any]:
        """Recall@k of the ANN index against exact top-k, on the user vectors of ``n`` one-item histories
        (items drawn at random, half from the most popular thousand): what ``/model`` reports."""
        rng = np.random.default_rng(0)
        picks = np.concatenate([rng.choice(self.popular[:1000], n // 2),
                                rng.integers(1, self.num_items + 1, n - n // 2)])
        batch = self._batch([[int(i)] for i in picks], [None] * n, [0.0] * n)
        hidden = self.model(batch).user.float()
        exact = torch.topk(hidden @ self.item_vectors[1:].T, min(k, self.num_items)).indices.cpu().numpy() + 1
        _, approx = self.ann.search(hidden.cpu().numpy(), min(k, self.num_items))
        return {f"recall@{k}": round(recall_at_k(exact, approx), 4), "probe_queries": n}

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", retrieval: str = "exact", ann_min_items: int = 1_000_000,
             ann_ef_search: int = 512, threads: int = 0) -> Recommender:
        """A model folder (or tune output, or checkpoint folder) at a local path or a URI (``s3://bucket/run/best``:
        downloaded once into a temporary folder this object owns, every file's sha256 checked)."""
        download = tempfile.TemporaryDirectory(prefix="raysrec-model-") if "://" in str(path) else None
        if download:
            located, source = artifact.fetch(path, download.name)
            name = Path(urlparse(source).path)
        else:
            located = artifact.resolve(path)
            name = located.root
        folder = located.checkpoint
        model, cfg, state = artifact.load_checkpoint(folder, map_location=device)
        items = artifact.item_table(folder)
        n = model.cfg.num_items
        if len(items) != n or items["item_index"].iloc[0] != 1 or items["item_index"].iloc[-1] != n:
            raise CheckpointError(f"{folder / artifact.ITEMS_FILE}: {len(items)} items, the model has {n}")
        titles = items["title"].tolist() if "title" in items and items["title"].notna().any() else None
        metrics = located.metrics() or {}
        metadata = {
            "model": cfg.model.name, "checkpoint": str(folder),
            "version": version_of(state, name),
            "source": redact(str(path)),
            "num_items": n, "max_length": model.cfg.max_length, "epoch": state.get("epoch"),
            "valid_ndcg@10": state.get("best"), "config": cfg.to_dict(),
            "metrics": {k: metrics[k] for k in ("valid", "test") if k in metrics},
        }
        rec = cls(model, items["item_id"].to_numpy(), titles, items["count"].to_numpy(), metadata, device,
                  retrieval=retrieval, ann_min_items=ann_min_items, ann_ef_search=ann_ef_search, threads=threads)
        rec._download = download          # the downloaded copy lives as long as the recommender
        return rec

    def probe(self) -> Answer:
        """One forward pass on the most popular item as history: what readiness and health checks run."""
        answer = self.run([Query(history=[self.original_id(int(self.popular[0]))], k=1, exclude_seen=False)])[0]
        if answer.fallback is not None or not answer.items:
            raise RuntimeError(f"the model did not answer the probe ({answer})")
        return answer

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def lookup(self, ids: Sequence[ItemId]) -> tuple[list[int], list[int], list[ItemId]]:
        """Original ids -> (indices of the known ones, their positions, the unknown ids)."""
        known, positions, unknown = [], [], []
        for pos, value in enumerate(ids):
            index = self.index.get(value)
            if index is None and not self.ids_are_ints and isinstance(value, int):
                index = self.index.get(str(value))
            elif index is None and self.ids_are_ints and isinstance(value, str) and value.isdigit():
                index = self.index.get(int(value))        # "42" names item 42 of an integer catalogue
            if index is None:
                unknown.append(value)
            else:
                known.append(index)
                positions.append(pos)
        return known, positions, unknown

    def original_id(self, index: int) -> ItemId:
        value = self.item_ids[index - 1]
        return int(value) if self.ids_are_ints else str(value)

    def user_features_problem(self, given: Optional[dict[str, Any]]) -> Optional[str]:
        """Why a request's ``user_features`` cannot be read (an attribute this model has no table for), or None."""
        unknown = sorted(set(given or {}) - set(self.model.cfg.user_feature_vocab))
        if not unknown:
            return None
        reads = ", ".join(self.model.cfg.user_feature_vocab) or "none"
        return f"body.user_features.{unknown[0]}: this model reads no such user attribute (it reads: {reads})"

    def _user_tokens(self, queries: Sequence[Query]) -> list[np.ndarray]:
        """Per user attribute of the model, the (B, M) tokens of the queries (none for a model without them)."""
        cfg = self.model.cfg
        if not cfg.user_feature_vocab:
            return []
        out = user_tokens([q.user_features for q in queries], cfg.user_feature_vocab, cfg.user_feature_kind,
                          cfg.user_feature_width)
        for r, q in enumerate(queries):
            for table, given in zip(out, q.user_tokens or ()):
                table[r] = 0
                table[r, :min(len(given), table.shape[1])] = list(given)[:table.shape[1]]
        return out

    def _batch(self, histories: list[list[int]], times: list[Optional[list[float]]], nows: list[float],
               types: Optional[list[Optional[list[int]]]] = None, users: Sequence[np.ndarray] = ()
               ) -> dict[str, torch.Tensor]:
        """The model input for the newest position of each history: :func:`model_input`, as in training."""
        events, end = Events.from_histories(histories, times, types if self.type_index else None)
        lengths = np.array([len(h) for h in histories], np.int64)
        return to_tensors(model_input(events, end, lengths, np.asarray(nows, np.float64), users=users), self.device)

    @torch.inference_mode()
    def run(self, queries: Sequence[Query]) -> list[Answer]:
        """Answer a batch of queries with one forward pass."""
        histories, seen, times, types, nows, unknowns = [], [], [], [], [], []
        for q in queries:
            known, positions, unknown = self.lookup(q.history)
            seen.append(known)
            t = None
            if q.timestamps is not None:
                t = [float(q.timestamps[p]) for p in positions][-self.max_length:]
            histories.append(known[-self.max_length:])
            times.append(t)
            types.append([self.type_index.get(str(q.types[p]), 0) for p in positions][-self.max_length:]
                         if q.types is not None else None)
            nows.append(float(q.now) if q.now is not None else max(t) if t else 0.0)
            unknowns.append(unknown)
        answers: list[Optional[Answer]] = [None] * len(queries)
        active = [r for r, h in enumerate(histories) if h]
        hidden = None
        if active:
            batch = self._batch([histories[r] for r in active], [times[r] for r in active], [nows[r] for r in active],
                                [types[r] for r in active], self._user_tokens([queries[r] for r in active]))
            hidden = self.model(batch).user.float()                         # (B', d)
        row_of = {r: i for i, r in enumerate(active)}
        ranked = [r for r in active if queries[r].candidates is None]
        tops = self._top_k_batch(hidden[[row_of[r] for r in ranked]], [queries[r] for r in ranked],
                                 [seen[r] for r in ranked]) if ranked else []
        for r, (values, indices) in zip(ranked, tops):
            answers[r] = Answer([self._item(i, s) for s, i in zip(values, indices)], unknowns[r])
        for r, q in enumerate(queries):
            if answers[r] is not None:
                continue
            h = hidden[row_of[r]] if r in row_of else None
            if q.candidates is not None:
                answers[r] = self._score(q, h, unknowns[r])
            else:
                answers[r] = self._popular(q, unknowns[r])
        return answers  # type: ignore[return-value]

    def _blocked(self, q: Query, seen: list[int]) -> set[int]:
        blocked = set(self.lookup(q.exclude)[0])
        if q.exclude_seen:
            blocked.update(seen)   # the whole known history, not only the newest max_length
        return blocked

    def _top_k_batch(self, hidden: torch.Tensor, queries: list[Query], seen: list[list[int]]
                     ) -> list[tuple[list[float], list[int]]]:
        """Top-k for the whole batch, exact or from the ANN index (over-fetching past the excluded items)."""
        blocked = [self._blocked(q, s) for q, s in zip(queries, seen)]
        ks = [max(0, min(q.k, self.num_items - len(b))) for q, b in zip(queries, blocked)]
        if self.ann is None:
            return self._exact_top_k(hidden, blocked, ks)
        # Over-fetch past each row's excluded items, but at most ANN_MAX_OVERFETCH of them: one user with 10k events
        # made every row of the micro-batch search 10k wide. A row that comes back short is answered exactly.
        fetch = min(self.num_items, max(k + min(len(b), ANN_MAX_OVERFETCH) for k, b in zip(ks, blocked)))
        scores, indices = self.ann.search(hidden.cpu().numpy(), fetch)
        out: list[Optional[tuple[list[float], list[int]]]] = []
        short = []
        for r, (k, b) in enumerate(zip(ks, blocked)):
            keep = [(float(v), int(i)) for v, i in zip(scores[r], indices[r]) if i > 0 and int(i) not in b][:k]
            if len(keep) < k:
                short.append(r)          # the graph search came back short: answer this row exactly
                out.append(None)
            else:
                out.append(([v for v, _ in keep], [i for _, i in keep]))
        if short:
            exact = self._exact_top_k(hidden[short], [blocked[r] for r in short], [ks[r] for r in short])
            for r, answer in zip(short, exact):
                out[r] = answer
        return out  # type: ignore[return-value]

    def _exact_top_k(self, hidden: torch.Tensor, blocked: list[set[int]], ks: list[int]
                     ) -> list[tuple[list[float], list[int]]]:
        """Exact top-k: one matmul and one top-k per chunk of ``chunk_items`` items (one chunk up to that
        catalogue size), then a top-k of the chunks' winners; memory O(B x chunk)."""
        rows, cols = [], []
        for r, b in enumerate(blocked):
            rows += [r] * len(b)
            cols += b
        rows_t = torch.tensor(rows, dtype=torch.long, device=hidden.device)
        cols_t = torch.tensor(cols, dtype=torch.long, device=hidden.device)
        k_max = max(ks)
        best_values, best_indices = [], []
        for start in range(0, self.item_vectors.shape[0], self.chunk_items):
            scores = hidden @ self.item_vectors[start:start + self.chunk_items].T     # (B, c)
            if start == 0:
                scores[:, 0] = float("-inf")
            inside = (cols_t >= start) & (cols_t < start + scores.shape[1])
            scores[rows_t[inside], cols_t[inside] - start] = float("-inf")
            top = torch.topk(scores, min(k_max, scores.shape[1]))
            best_values.append(top.values)
            best_indices.append(top.indices + start)
        values, indices = torch.cat(best_values, 1), torch.cat(best_indices, 1)
        if len(best_values) > 1:
            top = torch.topk(values, k_max)
            values, indices = top.values, indices.gather(1, top.indices)
        values, indices = values.tolist(), indices.tolist()
        return [(values[r][:k], indices[r][:k]) for r, k in enumerate(ks)]

    def _popular(self, q: Query, unknown: list[ItemId]) -> Answer:
        """No known history: the most popular items of the training data."""
        blocked = self._blocked(q, [])
        k = max(0, min(q.k, self.num_items - len(blocked)))
        picks = [int(i) for i in self.popular[:k + len(blocked)] if int(i) not in blocked][:k]
        return Answer([self._item(i, None) for i in picks], unknown, fallback="popularity")

    def _score(self, q: Query, h: Optional[torch.Tensor], unknown: list[ItemId]) -> Answer:
        known, positions, _ = self.lookup(q.candidates or [])
        scores: list[Optional[float]] = [None] * len(q.candidates or [])
        if known:
            if h is None:
                values = [float(np.log1p(self.counts[i - 1])) for i in known]
            else:
                values = (self.item_vectors[torch.tensor(known, device=self.item_vectors.device)] @ h).tolist()
            for p, v in zip(positions, values):
                scores[p] = float(v)
        return Answer([], unknown, scores=scores, fallback="popularity" if h is None else None)

    def _item(self, index: int, score: Optional[float]) -> dict[str, Any]:
        out: dict[str, Any] = {"item_id": self.original_id(index), "score": score}
        if self.titles is not None:
            out["title"] = self.titles[index - 1]
        return out


def version_of(state: dict[str, Any], root: Path) -> str:
    """A short, stable model version: the model folder's name and the first 12 hex digits of the weights'
    sha256 (``best@3f2a...``)."""
    name = root.name
    digest = state.get("files", {}).get(artifact.MODEL_FILE, "")
    return f"{name}@{digest[:12]}" if digest else name
