"""Training examples -> tensors for the text towers: one record's way from an examples row
(kind, user or query, history, item, weight) to token ids and the loss's inputs.

`features` joins each row with the item table (text, key, duplicate group, sampling
probability), renders the query or user text, tokenises, and adds hard negatives when
configured; `to_tensors` pads a batch. It runs in the train worker (`collate`) or ahead of it in
a Ray Data actor pool (`Featurize`, train.tokenize_in=pipeline); the two give the same tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from recsys.config import Config, ModelConfig, config_from_dict
from recsys.encoder import render_user_text
from recsys.items import ItemTable
from recsys.losses import item_key
from recsys.negatives import HardNegatives


def item_token_ids(texts: Sequence[str], tokenizer: Any, mcfg: ModelConfig) -> list[list[int]]:
    """Item texts as the item tower reads them: `item_prefix + text`, to `max_item_tokens`."""
    return tokenizer([mcfg.item_prefix + t for t in texts], truncation=True, max_length=mcfg.max_item_tokens)["input_ids"]


def hard_negatives_for(items: ItemTable, cfg: Config) -> HardNegatives | None:
    """The miner train.hard_negatives needs (None when it is 0)."""
    t = cfg.train
    return HardNegatives(items, t.hard_negative_pool, t.seed, cfg.bm25) if t.hard_negatives > 0 else None


def _group_key(batch: dict[str, Any], i: int) -> int:
    """The row's user (next-item) or normalised query (search). A row with neither gets a key of
    its own item, which masks nothing beyond what the same-item mask already does."""
    def col(name: str) -> Any:
        return batch[name][i] if name in batch else None

    kind, user, query = col("kind"), col("user_id"), col("query")
    if kind == "search" and query:
        return item_key("q:" + " ".join(str(query).lower().split()))
    if kind == "next_item" and user:
        return item_key(f"u:{user}")
    return item_key(f"i:{col('item_id')}")


def features(
    batch: dict[str, Any], items: ItemTable, tokenizer: Any, cfg: Config, negatives: HardNegatives | None = None,
) -> dict[str, Any]:
    """Examples -> unpadded token ids and loss inputs (runs in the train worker or in Ray Data).

    Token ids stay ragged (one list per row): padding to the batch's longest row happens in
    `to_tensors`, after Ray Data may have re-batched rows from different blocks."""
    m = cfg.model
    pos = items.rows(list(batch["item_id"]), "training example")
    # Rows of one user (next-item) or one query (search) share a group: their positives are
    # accidental hits for each other, never negatives.
    groups = np.array([_group_key(batch, i) for i in range(len(pos))], dtype=np.int64)
    queries, hist_keys, hist_rows = [], [], []
    for query, history in zip(batch["query"], batch["history"], strict=True):
        hist = [h for h in (list(history) if history is not None else []) if h in items.index]
        rows = [items.index[h] for h in hist]
        queries.append(m.query_prefix + render_user_text(query, [items.texts[r] for r in rows], m.user_history_items))
        hist_keys.append(items.keys[rows] if rows else np.zeros(0, dtype=np.int64))
        hist_rows.append(np.asarray(rows, dtype=np.int64))
    q = tokenizer(queries, truncation=True, max_length=m.max_query_tokens)["input_ids"]

    def item_tokens(rows: Any) -> list[list[int]]:  # positives and hard negatives read alike
        return item_token_ids([items.texts[r] for r in rows], tokenizer, m)

    d = item_tokens(pos)
    extra: dict[str, Any] = {}
    n_hard = cfg.train.hard_negatives
    if n_hard > 0:
        if negatives is None:
            raise ValueError(f"train.hard_negatives={n_hard} needs a HardNegatives miner (hard_negatives_for)")
        # Drawn from the batch's own content, so a resumed run mines what the uninterrupted one did.
        rng = np.random.default_rng([cfg.train.seed, int(items.keys[pos].sum() & 0x7FFFFFFF)])
        # The batch's other positives of a row's user / query are accidental hits too.
        same = [np.concatenate([hist_rows[i], pos[(groups == groups[i]) & (np.arange(len(pos)) != i)]])
                for i in range(len(pos))]
        hard = negatives.rows(pos, same, n_hard, rng)  # (batch, n)
        h = item_tokens(hard.reshape(-1))
        extra["h_ids"] = [h[i * n_hard:(i + 1) * n_hard] for i in range(len(pos))]  # per row: n token lists
        extra["h_logq"] = items.logq[hard]  # (batch, n)
        # The loss masks them against the positives of the actual (global) training batch too.
        extra["h_keys"], extra["h_dups"] = items.keys[hard], items.dups[hard]  # (batch, n) each
    return extra | {
        "q_ids": q,
        "d_ids": d,
        "weights": np.asarray(batch["weight"], dtype=np.float32),
        "item_keys": items.keys[pos],
        "dup_keys": items.dups[pos],
        "history_keys": hist_keys,
        "group_keys": groups,
        "logq": items.logq[pos],
    }


def _pad(rows: Any, fill: int, side: str = "right") -> torch.Tensor:
    width = max(1, max((len(r) for r in rows), default=0))
    out = np.full((len(rows), width), fill, dtype=np.int64)
    for i, r in enumerate(rows):
        if len(r):
            if side == "left":
                out[i, width - len(r):] = r
            else:
                out[i, : len(r)] = r
    return torch.as_tensor(out)


def pad_tokens(rows: Any, pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged token ids -> (ids, attention mask), both (len(rows), longest), padded on `side`
    (the tokenizer's `padding_side`: left for last-token pooling, see recsys.encoder.prepare_tokenizer)."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    return _pad(rows, pad_id, side), _pad([np.ones(len(r), dtype=np.int64) for r in rows], 0, side)


def to_tensors(f: dict[str, Any], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Features (ragged token ids) -> padded tensors and masks for the towers and the loss."""
    q_ids, q_mask = pad_tokens(f["q_ids"], pad_id, padding_side)
    d_ids, d_mask = pad_tokens(f["d_ids"], pad_id, padding_side)
    out = {
        "q_ids": q_ids,
        "q_mask": q_mask,
        "d_ids": d_ids,
        "d_mask": d_mask,
        "weights": torch.tensor(np.asarray(f["weights"], dtype=np.float32)),
        "item_keys": torch.tensor(np.asarray(f["item_keys"], dtype=np.int64)),
        "dup_keys": torch.tensor(np.asarray(f["dup_keys"], dtype=np.int64)),
        "history_keys": _pad(f["history_keys"], -1),
        "group_keys": torch.tensor(np.asarray(f["group_keys"], dtype=np.int64)),
        "logq": torch.tensor(np.asarray(f["logq"], dtype=np.float32)),
    }
    if "h_ids" in f:
        flat = [t for row in f["h_ids"] for t in row]  # batch * n token lists, row-major
        out["h_ids"], out["h_mask"] = pad_tokens(flat, pad_id, padding_side)
        out["h_logq"] = torch.tensor(np.stack([np.asarray(r, dtype=np.float32) for r in f["h_logq"]]))  # (batch, n)
        for k in ("h_keys", "h_dups"):
            out[k] = torch.tensor(np.stack([np.asarray(r, dtype=np.int64) for r in f[k]]))  # (batch, n)
    return out


def collate(
    batch: dict[str, np.ndarray], items: ItemTable, tokenizer: Any, cfg: Config, negatives: HardNegatives | None = None,
) -> dict[str, torch.Tensor]:
    """A numpy batch of examples -> tensors (tokenising in the train worker)."""
    return to_tensors(features(batch, items, tokenizer, cfg, negatives), tokenizer.pad_token_id or 0, tokenizer.padding_side)


class Featurize:
    """Ray Data actor for train.tokenize_in=pipeline: tokenise ahead of the train workers."""

    def __init__(self, cfg_dict: dict[str, Any]) -> None:
        from recsys.model import load_tokenizer

        self.cfg = config_from_dict(cfg_dict)
        self.items = ItemTable.load(self.cfg)
        self.negatives = hard_negatives_for(self.items, self.cfg)
        self.tokenizer = load_tokenizer(self.cfg.model)

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        import pyarrow as pa

        f = features(batch, self.items, self.tokenizer, self.cfg, self.negatives)
        ints = pa.list_(pa.int32())
        hard = {
            "h_ids": pa.array(f["h_ids"], pa.list_(ints)),
            "h_logq": pa.array(f["h_logq"].tolist(), pa.list_(pa.float32())),
            "h_keys": pa.array(f["h_keys"].tolist(), pa.list_(pa.int64())),
            "h_dups": pa.array(f["h_dups"].tolist(), pa.list_(pa.int64())),
        } if "h_ids" in f else {}
        return pa.table(hard | {
            "q_ids": pa.array(f["q_ids"], ints),
            "d_ids": pa.array(f["d_ids"], ints),
            "weights": pa.array(f["weights"]),
            "item_keys": pa.array(f["item_keys"]),
            "dup_keys": pa.array(f["dup_keys"]),
            "history_keys": pa.array([h.tolist() for h in f["history_keys"]], pa.list_(pa.int64())),
            "group_keys": pa.array(f["group_keys"]),
            "logq": pa.array(f["logq"]),
        })
