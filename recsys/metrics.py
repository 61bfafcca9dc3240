"""Ranking metrics over full-catalog rankings (pure numpy): names like `test/ndcg@10`.

Every metric is cut at a K, MRR included: rankings are only ever the top max(K) ids, so an
"uncut" MRR would silently be MRR@max(K) under another name.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

METRICS = ("recall", "ndcg", "hit_rate", "precision", "f1", "mrr")


def metric_names(ks: Sequence[int]) -> list[str]:
    """`<metric>@<k>` for every metric and K, K ascending (the per-query column names)."""
    return [f"{m}@{k}" for k in sorted(set(int(k) for k in ks)) for m in METRICS]


def per_query_metrics(
    ranked_ids: Sequence[Sequence[str]],
    relevant: Sequence[dict[str, float]],
    ks: Sequence[int],
) -> dict[str, np.ndarray]:
    """Each metric of `metric_names(ks)` per query: name -> float64 array aligned with the queries.

    `relevant[i]` maps item id -> gain for query i; items with gain <= 0 are not relevant. A
    query without relevant items carries no signal and gets NaN in every metric (skipped), so
    paired tests can line queries up and averages can leave them out.
    """
    if len(ranked_ids) != len(relevant):
        raise ValueError(f"{len(ranked_ids)} rankings but {len(relevant)} relevance sets")
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    n = len(ranked_ids)
    out = {name: np.full(n, np.nan, dtype=np.float64) for name in metric_names(ks)}
    disc = 1.0 / np.log2(np.arange(2, ks[-1] + 2))  # (kmax,)
    for q, (ranking, rel) in enumerate(zip(ranked_ids, relevant, strict=True)):
        rel = {i: g for i, g in rel.items() if g > 0}
        if not rel:
            continue
        gains = np.array([rel.get(i, 0.0) for i in ranking[: ks[-1]]], dtype=np.float64)
        hits = gains > 0
        first = np.flatnonzero(hits)
        first_rank = int(first[0]) + 1 if len(first) else 0  # 1-based; 0 = no hit at all
        ideal = np.sort(np.array(list(rel.values()), dtype=np.float64))[::-1]
        for k in ks:
            h = int(hits[:k].sum())
            dcg = float((gains[:k] * disc[: len(gains[:k])]).sum())
            idcg = float((ideal[:k] * disc[: len(ideal[:k])]).sum())
            recall = h / len(rel)
            precision = h / k
            out[f"recall@{k}"][q] = recall
            out[f"ndcg@{k}"][q] = dcg / idcg
            out[f"hit_rate@{k}"][q] = float(h > 0)
            out[f"precision@{k}"][q] = precision
            out[f"f1@{k}"][q] = 2 * precision * recall / (precision + recall) if h else 0.0
            out[f"mrr@{k}"][q] = 1.0 / first_rank if 0 < first_rank <= k else 0.0
    return out


def average(per_query: dict[str, np.ndarray], prefix: str) -> dict[str, float]:
    """Means over the scored (non-NaN) queries as `<prefix>/<name>`, plus `<prefix>/queries`."""
    scored = 0
    out: dict[str, float] = {}
    for name, v in per_query.items():
        ok = ~np.isnan(v)
        scored = int(ok.sum())
        out[f"{prefix}/{name}"] = float(v[ok].mean()) if scored else 0.0
    out[f"{prefix}/queries"] = float(scored)
    return out


def ranking_metrics(
    ranked_ids: Sequence[Sequence[str]],
    relevant: Sequence[dict[str, float]],
    ks: Sequence[int],
    prefix: str = "test",
) -> dict[str, float]:
    """Recall, NDCG (graded gain), hit rate, precision, F1 and MRR at each K; averaged over queries.

    Queries without relevant items are skipped (they carry no signal); the count used is
    reported as `<prefix>/queries`. Per-query values: `per_query_metrics`.
    """
    return average(per_query_metrics(ranked_ids, relevant, ks), prefix)
