"""Duplicate and near-duplicate catalog items, and popularity skew.

The same product in several sizes or colours makes a fake "negative" that is really a positive;
training masks items of one duplicate group from each other's negatives. Near-duplicates are
found with MinHash over word shingles and LSH banding (candidate pairs), confirmed by the
exact Jaccard similarity of word sets stripped of colour/size words, then merged with union-find; this stays near-linear in catalog size.
"""

from __future__ import annotations

import re
import zlib
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

_WORD = re.compile(r"[a-z0-9]+")
_PRIME = (1 << 61) - 1


def normalize_text(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


# Variant words: the same product in another colour or size must look the same.
_VARIANT = {
    "black", "white", "red", "blue", "green", "yellow", "grey", "gray", "silver", "gold", "pink",
    "purple", "orange", "brown", "beige", "navy", "size", "small", "medium", "large", "xl", "xxl",
    "xs", "s", "m", "pack", "count", "ct", "oz", "ml", "l", "cm", "mm", "in", "inch", "ft",
}


def _shingles(text: str) -> set[str]:
    """Word set without variant words and bare numbers (sizes, pack counts)."""
    return {w for w in normalize_text(text).split() if w not in _VARIANT and not w.isdigit()}


def _find(parent: np.ndarray, i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = int(parent[i])
    return i


def _union(parent: np.ndarray, a: int, b: int) -> None:
    ra, rb = _find(parent, a), _find(parent, b)
    if ra != rb:
        parent[max(ra, rb)] = min(ra, rb)


def duplicate_groups(
    item_ids: Sequence[str],
    texts: Sequence[str],
    threshold: float = 0.8,
    num_perm: int = 64,
    bands: int = 16,
    seed: int = 0,
) -> np.ndarray:
    """int64 group id per item: the smallest index in its group (singletons: their own index).

    Exact duplicates (after lower-casing and punctuation removal) always group; other pairs
    group when the Jaccard similarity of their variant-stripped word sets is >= `threshold`.
    """
    n = len(item_ids)
    if len(texts) != n:
        raise ValueError(f"duplicate_groups: {n} item ids but {len(texts)} texts")
    parent = np.arange(n, dtype=np.int64)
    first_by_text: dict[str, int] = {}
    for i, t in enumerate(texts):
        key = normalize_text(t)
        if key in first_by_text:
            _union(parent, first_by_text[key], i)
        else:
            first_by_text[key] = i
    if threshold < 1.0 and n > 1:
        rng = np.random.default_rng(seed)
        a = rng.integers(1, _PRIME, num_perm, dtype=np.uint64)
        b = rng.integers(0, _PRIME, num_perm, dtype=np.uint64)
        shingle_sets = [_shingles(t) for t in texts]
        rows = num_perm // bands
        buckets: dict[tuple[int, bytes], list[int]] = defaultdict(list)
        for i, sh in enumerate(shingle_sets):
            if not sh:
                continue
            h = np.array([zlib.crc32(s.encode()) for s in sh], dtype=np.uint64)
            sig = ((np.outer(h, a) + b) % np.uint64(_PRIME)).min(axis=0)  # (num_perm,)
            for band in range(bands):
                buckets[(band, sig[band * rows : (band + 1) * rows].tobytes())].append(i)
        checked: set[tuple[int, int]] = set()
        for members in buckets.values():
            if len(members) < 2:
                continue
            for x in range(len(members)):
                for y in range(x + 1, len(members)):
                    i, j = members[x], members[y]
                    if (i, j) in checked:
                        continue
                    checked.add((i, j))
                    si, sj = shingle_sets[i], shingle_sets[j]
                    if len(si & sj) / len(si | sj) >= threshold:
                        _union(parent, i, j)
    return np.array([_find(parent, i) for i in range(n)], dtype=np.int64)


def group_stats(groups: np.ndarray) -> dict[str, int]:
    _, sizes = np.unique(groups, return_counts=True)
    multi = sizes[sizes > 1]
    return {
        "items": len(groups),
        "groups_with_duplicates": len(multi),
        "items_in_duplicate_groups": int(multi.sum()) if len(multi) else 0,
        "largest_group": int(sizes.max()) if len(sizes) else 0,
    }


def popularity_skew(counts: np.ndarray) -> dict[str, float]:
    """How concentrated engagement is: Gini, share of the top 1% / 10% of items, max/median."""
    c = np.sort(np.asarray(counts, dtype=np.float64))[::-1]
    total = c.sum()
    if len(c) == 0 or total == 0:
        return {"gini": 0.0, "top1pct_share": 0.0, "top10pct_share": 0.0, "max_over_median": 0.0, "items_with_engagement": 0.0}
    asc = c[::-1]
    n = len(asc)
    gini = float((2 * np.arange(1, n + 1) - n - 1) @ asc / (n * total))
    top = lambda f: float(c[: max(1, int(np.ceil(n * f)))].sum() / total)  # noqa: E731
    median = float(np.median(c))
    return {
        "gini": round(gini, 4),
        "top1pct_share": round(top(0.01), 4),
        "top10pct_share": round(top(0.10), 4),
        "max_over_median": round(float(c[0]) / median, 2) if median > 0 else float("inf"),
        "items_with_engagement": float((c > 0).sum()),
    }
