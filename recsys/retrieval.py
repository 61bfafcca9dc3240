"""Ranking the catalog for query vectors, with filters and exclusions: one implementation for the
Serve app's Retriever (serve/app.py) and the batch recommendation job (recsys/recommend.py).

Scores are inner products of the query vectors with the catalog embeddings (L2-normalised:
cosine), computed exactly over the whole catalog; items failing a filter or excluded for that
query never appear; the top-k is ordered by score, descending, then by catalog position, so equal
scores always come out in the same order (also at the cut-off). Filters:

    category    prefix of the item's category path, case-insensitive ("home > kitchen")
    brand       the item's brand, case-insensitive, exact
    min_price   price >= min_price (items without a price fail a price filter)
    max_price   price <= max_price
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

FILTER_KEYS = ("category", "brand", "min_price", "max_price")
# Scores are computed for this many (query, item) pairs at a time: a batch of queries against a
# large catalog stays within ~64 MB of float32.
_CHUNK_ELEMENTS = 1 << 24


@dataclasses.dataclass(frozen=True)
class FilterFields:
    """The item attributes filters read, aligned with the catalog's order.

    Category and brand are also kept as codes into their distinct values, so a filter
    decides once per distinct value (a catalog has far fewer than items) and then indexes the
    (n_items,) codes: no Python loop over the items per request."""

    category: np.ndarray  # (n_items,) object: the category path lower-cased ("" when none)
    brand: np.ndarray  # (n_items,) object: the brand lower-cased ("" when none)
    price: np.ndarray  # (n_items,) float64: NaN when unknown
    # Derived in __post_init__: category == category_values[category_codes], likewise brand.
    category_values: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)  # object
    category_codes: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)  # int32
    brand_values: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)
    brand_codes: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = len(self.price)
        for name in ("category", "brand"):
            col = getattr(self, name)
            if np.shape(col) != (n,):
                raise ValueError(f"FilterFields.{name} has shape {np.shape(col)}, price ({n},): one value per item")
            # Arrow's hash encoding: ~20x faster than np.unique's sort of Python strings at 1M.
            enc = pa.array(col, type=pa.string()).dictionary_encode()
            if enc.null_count:
                raise ValueError(f"FilterFields.{name} has {enc.null_count} None values: an item without one has \"\"")
            # frozen: the derived fields are set once, here
            object.__setattr__(self, f"{name}_values", enc.dictionary.to_numpy(zero_copy_only=False).astype(object))
            object.__setattr__(self, f"{name}_codes", enc.indices.to_numpy(zero_copy_only=False).astype(np.int32))

    @classmethod
    def from_rows(cls, rows: Sequence[Mapping[str, Any]]) -> FilterFields:
        """From item rows (dicts with any of category, brand, price), in catalog order."""
        return cls(
            category=np.array([(r.get("category") or "").lower() for r in rows], dtype=object),
            brand=np.array([(r.get("brand") or "").lower() for r in rows], dtype=object),
            price=np.array([np.nan if r.get("price") is None else float(r["price"]) for r in rows], dtype=np.float64),
        )

    def __len__(self) -> int:
        return len(self.price)


def filter_mask(fields: FilterFields, filters: Mapping[str, Any] | None) -> np.ndarray:
    """(n_items,) bool: the items that pass every filter set in `filters` (None / missing = not set)."""
    f = filters or {}
    unknown = set(f) - set(FILTER_KEYS)
    if unknown:
        raise ValueError(f"unknown filter(s) {sorted(unknown)}; filters are {', '.join(FILTER_KEYS)}")
    keep = np.ones(len(fields), dtype=bool)
    if f.get("category"):
        prefix = str(f["category"]).lower()
        ok = np.fromiter((c.startswith(prefix) for c in fields.category_values), dtype=bool, count=len(fields.category_values))
        keep &= ok[fields.category_codes]
    if f.get("brand"):
        keep &= (fields.brand_values == str(f["brand"]).lower())[fields.brand_codes]
    # NaN compares False: an item without a price never passes a price filter.
    if f.get("min_price") is not None:
        keep &= fields.price >= float(f["min_price"])
    if f.get("max_price") is not None:
        keep &= fields.price <= float(f["max_price"])
    return keep


def top_k(scores: np.ndarray, keep: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """One query's top-k positions among the kept items: score desc, then position."""
    cand = np.flatnonzero(keep)
    if len(cand) == 0 or k <= 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    s = scores[cand]
    kk = min(k, len(cand))
    kth = s[np.argpartition(-s, kk - 1)[:kk]].min()
    # Every candidate scoring at least the k-th: argpartition picks arbitrarily among equal
    # scores at the cut, the position order must decide there too.
    sel = np.flatnonzero(s >= kth)
    order = np.lexsort((cand[sel], -s[sel]))[:kk]
    top = cand[sel][order]
    return top.astype(np.int64), scores[top].astype(np.float32)


def search(
    emb: np.ndarray,
    queries: np.ndarray,
    k: int,
    keep: np.ndarray | None = None,
    exclude: Sequence[Iterable[int]] | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Top-k catalog positions and scores for each query vector, best first.

    emb (n_items, dim) catalog embeddings; queries (m, dim); `keep` (n_items,) bool: the items
    that passed the filters (`filter_mask`), None = all; `exclude[i]`: positions never returned
    for query i (its history, its purchases). Fewer than k come back when fewer items are left.
    """
    q = np.atleast_2d(np.asarray(queries, dtype=np.float32))  # (m, dim)
    if exclude is not None and len(exclude) != len(q):
        raise ValueError(f"exclude has {len(exclude)} entries for {len(q)} queries")
    n = emb.shape[0]
    base = np.ones(n, dtype=bool) if keep is None else keep
    if base.shape != (n,):
        raise ValueError(f"keep mask of shape {base.shape} for {n} items")
    out: list[tuple[np.ndarray, np.ndarray]] = []
    step = max(1, _CHUNK_ELEMENTS // max(1, n))
    for s in range(0, len(q), step):
        scores = q[s : s + step] @ emb.T  # (chunk, n_items)
        for j, row in enumerate(scores):
            ex = list(exclude[s + j]) if exclude is not None else []
            mask = base
            if ex:
                mask = base.copy()
                mask[ex] = False
            out.append(top_k(row, mask, k))
    return out


def align_embeddings(index_ids: Sequence[str], emb: np.ndarray, item_ids: Sequence[str], where: str) -> np.ndarray:
    """A saved index's embeddings in the catalog's order; an index lacking catalog items is refused
    (those items could never be served, and the catalog would silently shrink)."""
    pos = {i: n for n, i in enumerate(index_ids)}
    missing = [i for i in item_ids if i not in pos]
    if missing:
        raise ValueError(
            f"index at {where} lacks {len(missing)} of the catalog's items (e.g. {missing[:5]}): "
            "rebuild it with `python -m jobs.index` for this catalog"
        )
    return emb[[pos[i] for i in item_ids]]
