"""Training examples -> tensors for the text towers: one record's way from an examples row
(kind, user or query, history, item, weight) to token ids and the loss's inputs.

`features` joins each row with the item table (text, key, duplicate group, sampling
probability), renders the query or user text, tokenises, and adds hard negatives when
configured; `to_tensors` pads a batch. It runs in the train worker (`collate`) or ahead of it in
a Ray Data actor pool (`Featurize`, train.tokenize_in=pipeline); the two give the same tensors.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from recsys.config import Config, ModelConfig, config_from_dict
from recsys.encoder import HISTORY_SEP, user_text_parts
from recsys.items import ItemTable
from recsys.losses import item_key
from recsys.negatives import HardNegatives

log = logging.getLogger(__name__)


def item_token_ids(texts: Sequence[str], tokenizer: Any, mcfg: ModelConfig) -> list[list[int]]:
    """Item texts as the item tower reads them: `item_prefix + text`, to `max_item_tokens`."""
    return tokenizer([mcfg.item_prefix + t for t in texts], truncation=True, max_length=mcfg.max_item_tokens)["input_ids"]


# What one kept entry costs besides its ids and key: the numpy array object and the dict slot;
# and a str key's object header (its text is counted on top).
_ENTRY_BYTES = 160
_STR_BYTES = 49


class _Kept:
    """Token-id arrays by key, kept while they fit `max_bytes` (ids, keys and per-entry
    overhead counted); an entry past the budget is not kept, so it is tokenised again when asked."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.used = max_bytes, 0
        self.ids: dict[Any, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def get(self, keys: Sequence[Any], tokenise: Callable[[list[Any]], Sequence[Any]]) -> list[np.ndarray]:
        """The ids of each key, in order (repeats allowed): the keys not kept are tokenised in
        one call, `tokenise(keys)`, then kept while they fit.  # len(keys) x (tokens,) int32"""
        kept = self.ids
        new = list(dict.fromkeys(k for k in keys if k not in kept))
        fresh = {k: np.asarray(ids, dtype=np.int32) for k, ids in zip(new, tokenise(new) if new else [], strict=True)}
        for k, ids in fresh.items():
            key_bytes = _STR_BYTES + len(k.encode("utf-8", "surrogatepass")) if isinstance(k, str) else 8
            cost = ids.nbytes + key_bytes + _ENTRY_BYTES
            if self.used + cost <= self.max_bytes:
                kept[k] = ids
                self.used += cost
        return [kept[k] if k in kept else fresh[k] for k in keys]


class ItemTokens:
    """The catalog's item token ids (`item_token_ids`) by item row, each row tokenised the first
    time it is asked for and kept, up to `max_bytes` in all. A shop's logs repeat their popular
    items, and each example's positive (and hard negatives) were tokenised again every time."""

    def __init__(self, texts: Sequence[str], tokenizer: Any, mcfg: ModelConfig, max_bytes: int = 256 << 20) -> None:
        self.texts, self.tokenizer, self.mcfg = texts, tokenizer, mcfg
        self.pad_id = int(tokenizer.pad_token_id or 0)
        self.padding_side = tokenizer.padding_side
        self.kept = _Kept(max_bytes)

    def __len__(self) -> int:
        return len(self.texts)

    def ids_for(self, rows: Sequence[int] | np.ndarray) -> list[np.ndarray]:
        """Token ids of each row of `rows`, in order (repeats allowed).  # len(rows) x (tokens,) int32"""
        return self.kept.get([int(r) for r in rows],
                             lambda new: item_token_ids([self.texts[r] for r in new], self.tokenizer, self.mcfg))

    def batch(self, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(len(rows), longest) token ids and attention mask, padded on the tokenizer's side (as
        training's `to_tensors` pads; left for last-token pooling)."""
        return pad_tokens(self.ids_for(rows), self.pad_id, self.padding_side)


# Pre-tokenizers that split on whitespace (and, for BERT's, punctuation) before the model sees
# a word, and normalizers that work character by character: with both, a part that ends at
# HISTORY_SEP (whitespace on each side) tokenises the same alone as inside the whole text.
_WORD_SPLITTING = {"BertPreTokenizer", "Whitespace", "WhitespaceSplit"}
_CHAR_LOCAL = {"NoneType", "BertNormalizer", "Lowercase", "NFC", "NFD", "NFKC", "NFKD", "StripAccents", "Strip"}


def _composable(tokenizer: Any) -> bool:
    """Whether query ids may be composed from their parts' ids (see QueryTokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "truncation_side", "right") != "right":
        return False
    norm = backend.normalizer
    names = [type(n).__name__ for n in norm] if type(norm).__name__ == "Sequence" else [type(norm).__name__]
    return type(backend.pre_tokenizer).__name__ in _WORD_SPLITTING and set(names) <= _CHAR_LOCAL


class QueryTokens:
    """Query-tower token ids of rendered user texts (`query_prefix` + the parts of
    `recsys.encoder.user_text_parts` joined by HISTORY_SEP, truncated to `max_query_tokens`).

    Where the tokenizer splits words before modelling them and normalises character by
    character (BERT's WordPiece and the like), and truncates on the right, the ids are composed
    from each part's ids, tokenised once and kept (`max_bytes` in all): a history is mostly
    items other histories hold too, and whole histories were ~90% of the Featurize pool's CPU
    (py-spy on bench.train_ingest's data). The first `check_rows` rows are also tokenised whole
    and compared; one difference, or another kind of tokenizer, and every text is tokenised
    whole."""

    def __init__(self, tokenizer: Any, mcfg: ModelConfig, max_bytes: int = 256 << 20, check_rows: int = 512,
                 compose: bool = True) -> None:
        self.tokenizer, self.mcfg, self.check_left = tokenizer, mcfg, check_rows
        self.kept = _Kept(max_bytes)
        self.compose = compose and _composable(tokenizer)
        if self.compose:
            self.sep = self._plain([HISTORY_SEP])[0]
            # Where the tokenizer's special tokens go around a text's ids ([CLS] ... [SEP]).
            whole, plain = tokenizer(["a"])["input_ids"][0], self._plain(["a"])[0].tolist()
            at = next((i for i in range(len(whole)) if whole[i:i + len(plain)] == plain), None)
            self.head, self.tail = (whole[:at], whole[at + len(plain):]) if at is not None else ([], [])
            # Room for no text at all: the tokenizer's own truncation would do something else.
            self.room = mcfg.max_query_tokens - len(self.head) - len(self.tail)
            self.compose = at is not None and self.room > 0

    def _text(self, parts: list[str]) -> str:
        return self.mcfg.query_prefix + HISTORY_SEP.join(parts)

    def _plain(self, texts: list[str]) -> list[np.ndarray]:
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        return [np.asarray(i, dtype=np.int32) for i in ids]

    def _whole(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, truncation=True, max_length=self.mcfg.max_query_tokens)["input_ids"] if texts else []

    def ids_for(self, parts: list[list[str]]) -> list[Any]:
        """Token ids of each row's rendered text, from its parts.  # len(parts) x (tokens,)"""
        if not self.compose:
            return self._whole([self._text(p) for p in parts])
        # The prefix joins the first part: it need not end where a word does.
        prefix = self.mcfg.query_prefix
        pieces = [[prefix + p[0], *p[1:]] if p else [prefix] for p in parts]
        ids = iter(self.kept.get([x for row in pieces for x in row], self._plain))
        out = []
        for row in pieces:
            body = [next(ids) for _ in row]
            joined = np.concatenate([a for x in body[:-1] for a in (x, self.sep)] + body[-1:])
            out.append(np.concatenate([self.head, joined[: self.room], self.tail]).astype(np.int32))
        n = min(self.check_left, len(parts))
        if n > 0 and not self._check(parts[:n], out[:n]):
            return self._whole([self._text(p) for p in parts])
        return out

    def _check(self, parts: list[list[str]], got: list[np.ndarray]) -> bool:
        """Whether the composed ids of `parts` equal tokenising their texts whole; on the first
        difference, composing stops for good."""
        self.check_left -= len(parts)
        for i, (want, have) in enumerate(zip(self._whole([self._text(p) for p in parts]), got, strict=True)):
            if list(want) != have.tolist():
                # Ids and sizes only: the text is a user's.
                log.warning("query token ids composed from cached parts differ from tokenising the text whole (checked "
                            "row %d: %d ids, first %s, against %d, first %s): tokenising every query whole from now on",
                            i, len(want), list(want)[:8], len(have), have.tolist()[:8])
                self.compose, self.check_left = False, 0
                return False
        return True


class BatchTokens:
    """The token-id caches one featurising process keeps across its batches: items' (for the
    item tower) and user texts' parts (for the query tower)."""

    def __init__(self, items: ItemTable, tokenizer: Any, mcfg: ModelConfig, compose_queries: bool = True) -> None:
        self.items = ItemTokens(items.texts, tokenizer, mcfg)
        self.queries = QueryTokens(tokenizer, mcfg, compose=compose_queries)


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
    tokens: BatchTokens | None = None,
) -> dict[str, Any]:
    """Examples -> unpadded token ids and loss inputs (runs in the train worker or in Ray Data).

    Token ids stay ragged (one int32 array, or list, per row): padding to the batch's longest row happens in
    `to_tensors`, after Ray Data may have re-batched rows from different blocks. `tokens`: the
    caller's token-id caches, kept across batches (None: tokenise this batch's texts whole)."""
    m = cfg.model
    # Without the caller's caches nothing is reused: every query is tokenised whole, unchecked.
    tokens = tokens if tokens is not None else BatchTokens(items, tokenizer, m, compose_queries=False)
    pos = items.rows(list(batch["item_id"]), "training example")
    # Rows of one user (next-item) or one query (search) share a group: their positives are
    # accidental hits for each other, never negatives.
    groups = np.array([_group_key(batch, i) for i in range(len(pos))], dtype=np.int64)
    queries, hist_keys, hist_rows = [], [], []
    for query, history in zip(batch["query"], batch["history"], strict=True):
        hist = [h for h in (list(history) if history is not None else []) if h in items.index]
        rows = [items.index[h] for h in hist]
        queries.append(user_text_parts(query, [items.texts[r] for r in rows], m.user_history_items))
        hist_keys.append(items.keys[rows] if rows else np.zeros(0, dtype=np.int64))
        hist_rows.append(np.asarray(rows, dtype=np.int64))
    q = tokens.queries.ids_for(queries)

    d = tokens.items.ids_for(pos)
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
        h = tokens.items.ids_for(hard.reshape(-1))  # positives and hard negatives read alike
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


def _layout(rows: Any, side: str) -> tuple[np.ndarray, np.ndarray]:
    """Ragged rows -> (their values end to end, where each value goes in the padded matrix:
    a (len(rows), longest) mask, True at the filled cells, set as `side` pads)."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    lens = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    width = max(1, int(lens.max(initial=0)))
    cols = np.arange(width)
    filled = cols < lens[:, None] if side == "right" else cols >= (width - lens)[:, None]
    if not lens.sum():
        return np.zeros(0, dtype=np.int64), filled
    # Ray Data hands over numpy arrays, the tokenizer lists: each joined at C speed.
    if all(isinstance(r, np.ndarray) for r in rows):
        flat = np.concatenate([r.reshape(-1) for r in rows]).astype(np.int64, copy=False)
    else:
        flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(lens.sum()))
    return flat, filled


def _fill(rows: Any, fill: int, side: str) -> tuple[np.ndarray, np.ndarray]:
    """(len(rows), longest) int64 matrix of `rows` padded with `fill` on `side`, and its mask."""
    flat, filled = _layout(rows, side)
    out = np.full(filled.shape, fill, dtype=np.int64)
    out[filled] = flat  # row-major: each row's values in order, on its side
    return out, filled


def pad_tokens(rows: Any, pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged token ids -> (ids, attention mask), both (len(rows), longest), padded on `side`
    (the tokenizer's `padding_side`: left for last-token pooling, see recsys.encoder.prepare_tokenizer)."""
    ids, filled = _fill(rows, pad_id, side)
    return torch.as_tensor(ids), torch.as_tensor(filled.astype(np.int64))


def _pad(rows: Any, fill: int, side: str = "right") -> torch.Tensor:
    return torch.as_tensor(_fill(rows, fill, side)[0])


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
    tokens: BatchTokens | None = None,
) -> dict[str, torch.Tensor]:
    """A numpy batch of examples -> tensors (tokenising in the train worker)."""
    f = features(batch, items, tokenizer, cfg, negatives, tokens)
    return to_tensors(f, tokenizer.pad_token_id or 0, tokenizer.padding_side)


class Featurize:
    """Ray Data actor for train.tokenize_in=pipeline: tokenise ahead of the train workers."""

    def __init__(self, cfg_dict: dict[str, Any]) -> None:
        from recsys.model import load_tokenizer

        self.cfg = config_from_dict(cfg_dict)
        self.items = ItemTable.load(self.cfg)
        self.negatives = hard_negatives_for(self.items, self.cfg)
        self.tokenizer = load_tokenizer(self.cfg.model)
        self.tokens = BatchTokens(self.items, self.tokenizer, self.cfg.model)

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        import pyarrow as pa

        f = features(batch, self.items, self.tokenizer, self.cfg, self.negatives, self.tokens)
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
