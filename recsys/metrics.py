"""Ranking metrics over full-catalog rankings (pure numpy): names like `test/ndcg@10`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def ranking_metrics(
    ranked_ids: Sequence[Sequence[str]],
    relevant: Sequence[dict[str, float]],
    ks: Sequence[int],
    prefix: str = "test",
) -> dict[str, float]:
    """Recall, NDCG (graded gain), hit rate, precision, F1 at each K, and MRR; averaged over queries.

    `relevant[i]` maps item id -> gain (> 0) for query i. Queries without relevant items are
    skipped (they carry no signal); the count used is reported as `<prefix>/queries`.
    """
    if len(ranked_ids) != len(relevant):
        raise ValueError(f"{len(ranked_ids)} rankings but {len(relevant)} relevance sets")
    ks = sorted(set(int(k) for k in ks))
    sums: dict[str, float] = {f"{m}@{k}": 0.0 for k in ks for m in ("recall", "ndcg", "hit_rate", "precision", "f1")}
    sums["mrr"] = 0.0
    n = 0
    for ranking, rel in zip(ranked_ids, relevant, strict=True):
        rel = {i: g for i, g in rel.items() if g > 0}
        if not rel:
            continue
        n += 1
        gains = np.array([rel.get(i, 0.0) for i in ranking], dtype=np.float64)
        hits = gains > 0
        first = np.flatnonzero(hits)
        sums["mrr"] += 1.0 / (first[0] + 1) if len(first) else 0.0
        ideal = np.sort(np.array(list(rel.values()), dtype=np.float64))[::-1]
        for k in ks:
            h = int(hits[:k].sum())
            disc = 1.0 / np.log2(np.arange(2, k + 2))
            dcg = float((gains[:k] * disc[: len(gains[:k])]).sum())
            idcg = float((ideal[:k] * disc[: len(ideal[:k])]).sum())
            recall = h / len(rel)
            precision = h / k
            sums[f"recall@{k}"] += recall
            sums[f"ndcg@{k}"] += dcg / idcg if idcg > 0 else 0.0
            sums[f"hit_rate@{k}"] += float(h > 0)
            sums[f"precision@{k}"] += precision
            sums[f"f1@{k}"] += 2 * precision * recall / (precision + recall) if h else 0.0
    out = {f"{prefix}/{name}": (v / n if n else 0.0) for name, v in sums.items()}
    out[f"{prefix}/queries"] = float(n)
    return out
