"""Approximate top-k over the item table, for catalogues where exact scoring of every item per request
costs too much: a FAISS HNSW graph on inner product (optional extra ``raysrec[ann]``: ``faiss-cpu``).

The index is built when a replica loads the model (no training pass; items are graph nodes), and its
recall@10 against exact top-k is measured right then on probe queries (the model's user vectors for
one-item histories), so ``GET /model`` says what the approximation costs. Excluded items (the history,
``exclude``) are handled by over-fetching: the search asks for ``k`` plus the number of excluded items,
and a row that still comes back short is answered exactly.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from raysrec.errors import ConfigError


def _faiss():
    try:
        import faiss  # noqa: PLC0415
    except ImportError:
        raise ConfigError("serve.retrieval hnsw needs FAISS: pip install 'raysrec[ann]' (faiss-cpu; "
                          "faiss-gpu-cu12 on GPU nodes)") from None
    return faiss


def ann_available() -> bool:
    """Whether FAISS is installed (``retrieval: auto`` stays exact without it)."""
    import importlib.util  # noqa: PLC0415

    return importlib.util.find_spec("faiss") is not None


@dataclasses.dataclass
class HnswIndex:
    """Inner-product HNSW over items 1..N (FAISS ids are ``item - 1``)."""

    index: Any
    ef_search: int
    build_seconds: float

    @classmethod
    def build(cls, item_vectors: np.ndarray, m: int = 32, ef_construction: int = 64, ef_search: int = 512,
              threads: int = 0) -> HnswIndex:
        """``item_vectors``: (N + 1, d) float32, row 0 the padding item (left out)."""
        faiss = _faiss()
        if threads:
            faiss.omp_set_num_threads(threads)
        started = time.perf_counter()
        vectors = np.ascontiguousarray(item_vectors[1:], dtype=np.float32)
        index = faiss.IndexHNSWFlat(vectors.shape[1], m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.add(vectors)
        index.hnsw.efSearch = ef_search
        return cls(index, ef_search, time.perf_counter() - started)

    def search(self, queries: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores and item indices (1..N; 0 where the graph returned fewer than ``fetch``), (B, fetch) each."""
        self.index.hnsw.efSearch = max(self.ef_search, fetch)
        scores, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), fetch)
        return scores, ids + 1          # FAISS's -1 (nothing found) becomes 0, the padding index


def recall_at_k(exact: np.ndarray, approx: np.ndarray) -> float:
    """Mean share of each row's exact top-k found in its approximate top-k (both (B, k) item indices)."""
    hits = [len(set(e.tolist()) & set(a.tolist())) for e, a in zip(exact, approx)]
    return float(np.sum(hits) / max(exact.size, 1))
