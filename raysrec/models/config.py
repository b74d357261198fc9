"""The model's typed config (``train.model``): no PyTorch, so the CLI and the other stages' configs load without it."""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

from raysrec.config import Config, check, option


@dataclasses.dataclass
class ModelConfig(Config):
    """Architecture; ``num_items`` comes from the prepared data (items are 1..num_items, 0 = padding)."""

    name: Literal["sasrec", "longshort"] = option("sasrec", 'architecture')
    num_items: int = 0
    hidden_dim: int = option(64, 'embedding and hidden size')
    num_layers: int = option(2, 'transformer blocks')
    num_heads: int = option(2, 'attention heads')
    dropout: float = option(0.2, 'dropout rate')
    emb_dropout: Optional[float] = None
    max_length: int = option(50, "the model's window: newest items it reads")
    norm_first: bool = True
    ffn_mult: int = 1
    activation: Literal["gelu", "relu"] = "gelu"
    # long/short-term model
    short_window: int = 8
    short_layers: int = 1
    time_buckets: int = 32
    use_time_gap: bool = True              # switched off for data without real timestamps (manifest)
    # share of training rows whose time gaps are hidden (bucket 0, "unknown"), so that row is trained and a
    # request without timestamps is scored with a learned embedding, not an initial one
    gap_dropout: float = 0.1
    # language-model item text: frozen vectors (``raysrec embed-items``) through a learned projection,
    # added to the ID embedding on the input and the output side
    use_text: bool = option(False, 'fuse the item text vectors of `raysrec embed-items` into the item representation')
    text_dim: int = 0                      # set from the data, like num_items
    # with text: the share of items whose ID embedding is dropped at each training step (the same items
    # on the input and the output side), so the text path alone must rank well (DropoutNet, Volkovs et
    # al., NeurIPS 2017): what lets items never seen in training compete with the ones that were
    id_dropout: float = option(0.0, 'with use_text: share of item ID embeddings dropped per step, so text alone ranks well (cold items)')
    # behaviour types (view, cart, buy, ...): an embedding of each input event's type joins its position embedding
    use_types: bool = option(False, "read each event's type (prepare --type-col): an embedding per type joins the "
                                    "position embedding (off by default: no gain measured on Taobao, README)")
    type_names: list[str] = dataclasses.field(default_factory=list)   # set from the data: type index 1..T
    # item attributes (prepare --item-features): each attribute's tokens of an item are embedded, mean-pooled and
    # layer-normed on their own, and summed into the item representation, on the input and the output side
    use_item_features: Optional[bool] = option(None, "fuse the item attributes of prepare --item-features into the "
                                                     "item representation (sum fusion); unset: on when the prepared "
                                                     "data has them (README: 1.14x-1.20x test NDCG@10 on Sports)")
    features_on_output: bool = option(True, "with use_item_features: the output side (the table targets are scored "
                                            "against) carries the attributes too; off: attributes on the input "
                                            "side only, items scored by their ID (and text) rows")
    feature_vocab: dict[str, list[str]] = dataclasses.field(default_factory=dict)   # set from the data
    feature_width: dict[str, int] = dataclasses.field(default_factory=dict)         # most tokens of one item
    # user attributes (prepare --user-features): embedded, mean-pooled and layer-normed per attribute like item
    # attributes, summed into one context vector that joins every position of the user's sequence
    use_user_features: bool = option(False, "read the user attributes of prepare --user-features: a context "
                                            "embedding added at every position (requests send raw values)")
    user_feature_vocab: dict[str, list[str]] = dataclasses.field(default_factory=dict)   # set from the data
    user_feature_kind: dict[str, str] = dataclasses.field(default_factory=dict)          # category/multi/path/numeric
    user_feature_width: dict[str, int] = dataclasses.field(default_factory=dict)         # most tokens of one user

    def validate(self) -> None:
        check(self.hidden_dim > 0 and self.hidden_dim % self.num_heads == 0,
              f"model.hidden_dim ({self.hidden_dim}) must be a positive multiple of model.num_heads ({self.num_heads})")
        check(self.num_layers >= 1 and self.short_layers >= 1, "model layers must be >= 1")
        check(0.0 <= self.dropout < 1.0, "model.dropout must be in [0, 1)")
        check(self.max_length >= 2, "model.max_length must be >= 2")
        check(1 <= self.short_window <= self.max_length, "model.short_window must be in [1, max_length]")
        check(0.0 <= self.id_dropout < 1.0, "model.id_dropout must be in [0, 1)")
        check(0.0 <= self.gap_dropout < 1.0, "model.gap_dropout must be in [0, 1)")
        check(self.features_on_output or self.use_item_features is not False,
              "model.features_on_output off (attributes on the input side only) needs model.use_item_features")
        check(self.id_dropout == 0.0 or self.use_text, "model.id_dropout needs model.use_text (the text path "
              "is what represents an item whose ID embedding is dropped)")
