"""Duplicate and near-duplicate catalog items, and popularity skew.

The same product in several sizes or colours makes a fake "negative" that is really a positive;
training masks items of one duplicate group from each other's negatives. Near-duplicates are
found with MinHash over word shingles and LSH banding (candidate pairs), confirmed by the
exact Jaccard similarity of word sets stripped of colour/size words, then merged with union-find; this stays near-linear in catalog size.

Words come from `recsys.text_tokens` (the tokeniser BM25 uses too): words of spaced scripts,
character bigrams of Chinese, Japanese, Korean and Thai runs. An item whose text yields no
token at all (empty, only punctuation or symbols) is never grouped: an empty key says nothing.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import regex

from recsys.text_tokens import normalize, segments, tokenize

_PRIME = (1 << 61) - 1


def normalize_text(text: str) -> str:
    """The exact-duplicate key: words and unspaced runs, case-folded, punctuation dropped."""
    return " ".join(seg for seg, _ in segments(text))


# Variant words: the same product in another colour or size must look the same.
_VARIANT = {
    "black", "white", "red", "blue", "green", "yellow", "grey", "gray", "silver", "gold", "pink",
    "purple", "orange", "brown", "beige", "navy", "size", "small", "medium", "large", "xl", "xxl",
    "xs", "s", "m", "pack", "count", "ct", "oz", "ml", "l", "cm", "mm", "in", "inch", "ft",
}


# The same for unspaced scripts, cut out of the run before it is split into bigrams (there
# they are substrings, not tokens). Colour and size words stand alone; units count only after
# a number ("42码", "3件装"), since as characters they also occur inside other words (密码, 服装).
_CJK_COLOURS = (
    # Chinese
    "黑色 白色 灰色 深灰 浅灰 银色 金色 红色 酒红 玫红 蓝色 深蓝 浅蓝 天蓝 藏青色 藏青 绿色 军绿 墨绿 "
    "黄色 粉色 粉红色 紫色 橙色 棕色 咖啡色 卡其色 米色 米白色 米白 香槟色 颜色 "
    # Japanese
    "ブラック ホワイト グレー グレイ シルバー ゴールド レッド ブルー ネイビー グリーン イエロー ピンク "
    "パープル オレンジ ブラウン ベージュ カーキ カラー "
    # Korean
    "블랙 화이트 그레이 실버 골드 레드 블루 네이비 그린 옐로우 핑크 퍼플 오렌지 브라운 베이지 카키 "
    "검정색 검정 흰색 회색 빨간색 빨강 파란색 파랑 초록색 노란색 분홍색 색상"
).split()
_CJK_SIZES = (
    "均码 加大码 加大号 特大号 大号 中号 小号 尺码 尺寸 规格 "
    "サイズ フリーサイズ 사이즈 프리사이즈"
).split()
_CJK_UNITS = (
    "件装 只装 个装 包装 瓶装 盒装 袋装 片装 双装 码 号 件 个 只 双 瓶 盒 袋 片 包 套 张 支 寸 英寸 "
    "厘米 毫米 毫升 升 千克 公斤 克 米 "
    "個入り 個セット 個 枚入り 枚 本セット 本 足 袋 箱 セット "
    "개입 개 매 켤레 장 팩 세트 호"
).split()


def _alternation(words: list[str]) -> str:
    return "|".join(regex.escape(w) for w in sorted(set(words), key=len, reverse=True))


_CJK_VARIANT = regex.compile(
    rf"\d+(?:\.\d+)?\s*(?:{_alternation(_CJK_UNITS)})|{_alternation(_CJK_COLOURS + _CJK_SIZES)}"
)


def _shingles(text: str) -> set[str]:
    """Word set without variant words and bare numbers (sizes, pack counts)."""
    t = normalize(text)
    if not t.isascii():
        t = _CJK_VARIANT.sub(" ", t)
    return {w for w in tokenize(t) if w not in _VARIANT and not w.isdigit()}


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
    Items with an empty key (no word at all) stay singletons.
    """
    n = len(item_ids)
    if len(texts) != n:
        raise ValueError(f"duplicate_groups: {n} item ids but {len(texts)} texts")
    parent = np.arange(n, dtype=np.int64)
    first_by_text: dict[str, int] = {}
    for i, t in enumerate(texts):
        key = normalize_text(t)
        if not key:
            continue
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
