from __future__ import annotations

import math
import random

import numpy as np
import pytest

from recsys.index import build_index, load_index
from recsys.metrics import per_query_metrics, ranking_metrics


def test_hand_computed() -> None:
    ranked = [["a", "b", "c", "d"], ["x", "y", "z", "w"]]
    relevant = [{"b": 1.0}, {"x": 2.0, "w": 1.0}]
    m = ranking_metrics(ranked, relevant, [1, 3], prefix="t")
    assert m["t/recall@1"] == pytest.approx((0 + 0.5) / 2)
    assert m["t/recall@3"] == pytest.approx((1 + 0.5) / 2)
    # Rankings are cut at the largest K, so MRR is reported at each K: the first hit of query 1
    # is at rank 2, outside the top 1.
    assert m["t/mrr@1"] == pytest.approx((0 + 1) / 2)
    assert m["t/mrr@3"] == pytest.approx((1 / 2 + 1) / 2)
    assert "t/mrr" not in m
    # query 1: dcg@3 = 1/log2(3); idcg = 1. query 2: dcg@3 = 2; idcg = 2 + 1/log2(3)
    nd = (1 / math.log2(3) + 2 / (2 + 1 / math.log2(3))) / 2
    assert m["t/ndcg@3"] == pytest.approx(nd)
    assert m["t/precision@3"] == pytest.approx((1 / 3 + 1 / 3) / 2)
    assert m["t/hit_rate@1"] == pytest.approx(0.5)
    assert m["t/f1@3"] == pytest.approx((2 * (1 / 3) * 1 / (1 / 3 + 1) + 2 * (1 / 3) * 0.5 / (1 / 3 + 0.5)) / 2)
    assert m["t/queries"] == 2


def test_mrr_counts_only_hits_within_k() -> None:
    """A first hit at rank 5 scores 1/5 at K >= 5 and 0 below; an un-cut MRR would say 0.2 always."""
    m = ranking_metrics([["a", "b", "c", "d", "e"]], [{"e": 1.0}], [1, 3, 5], prefix="t")
    assert (m["t/mrr@1"], m["t/mrr@3"], m["t/mrr@5"]) == (0.0, 0.0, pytest.approx(0.2))


def test_per_query_values_are_aligned_and_mark_skipped_queries() -> None:
    ranked = [["a", "b", "c"], ["x", "y", "z"], ["p", "q", "r"]]
    relevant = [{"b": 1.0}, {}, {"p": 2.0, "zz": 0.0}]  # query 1 has nothing relevant: skipped
    per = per_query_metrics(ranked, relevant, [1, 3])
    assert set(per) == {f"{m}@{k}" for k in (1, 3) for m in ("recall", "ndcg", "hit_rate", "precision", "f1", "mrr")}
    assert all(v.shape == (3,) and v.dtype == np.float64 for v in per.values())
    np.testing.assert_allclose(per["mrr@3"], [0.5, np.nan, 1.0])
    np.testing.assert_allclose(per["hit_rate@1"], [0.0, np.nan, 1.0])
    np.testing.assert_allclose(per["precision@3"], [1 / 3, np.nan, 1 / 3])
    # The averages are the means over the scored queries of exactly these values.
    m = ranking_metrics(ranked, relevant, [1, 3], prefix="t")
    for name, v in per.items():
        assert m[f"t/{name}"] == pytest.approx(float(np.nanmean(v)))
    assert m["t/queries"] == 2
    with pytest.raises(ValueError, match="2 rankings but 3 relevance sets"):
        per_query_metrics(ranked[:2], relevant, [1])


def _reference(ranked, relevant, k):
    """Independent slow reference: explicit loops, no numpy."""
    rec = nd = 0.0
    for r, rel in zip(ranked, relevant, strict=True):
        hits = 0
        dcg = 0.0
        for pos in range(min(k, len(r))):
            g = rel.get(r[pos], 0.0)
            if g > 0:
                hits += 1
            dcg += g / math.log2(pos + 2)
        ideal = sorted(rel.values(), reverse=True)
        idcg = sum(g / math.log2(p + 2) for p, g in enumerate(ideal[:k]))
        rec += hits / len(rel)
        nd += dcg / idcg
    return rec / len(ranked), nd / len(ranked)


def test_against_brute_force_on_random_data() -> None:
    rnd = random.Random(0)
    items = [f"i{j}" for j in range(50)]
    ranked, relevant = [], []
    for _ in range(200):
        ranked.append(rnd.sample(items, 50))
        relevant.append({i: float(rnd.randint(1, 3)) for i in rnd.sample(items, rnd.randint(1, 5))})
    m = ranking_metrics(ranked, relevant, [5, 20])
    for k in (5, 20):
        rec, nd = _reference(ranked, relevant, k)
        assert m[f"test/recall@{k}"] == pytest.approx(rec)
        assert m[f"test/ndcg@{k}"] == pytest.approx(nd)


def test_small_faiss_is_flat_exclusion_and_save(s3_server) -> None:
    """Under the HNSW line FAISS is the exact flat index (HNSW itself: tests/test_index.py)."""
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(2000, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ids = [f"i{j}" for j in range(2000)]
    q = emb[:50] + 0.1 * rng.normal(size=(50, 16)).astype(np.float32)
    exact = build_index(emb, ids, "exact").search(q, 10)[1]
    assert build_index(emb, ids, "faiss").search(q, 10)[1] == exact
    ex = build_index(emb, ids, "exact").search(q[:1], 5, exclude=[{exact[0][0]}])[1][0]
    assert exact[0][0] not in ex and ex == exact[0][1:6]
    cfg = s3_server.storage_config("s3://test/index")
    build_index(emb, ids, "exact").save("s3://test/index/i1", cfg)
    loaded = load_index("s3://test/index/i1", cfg)
    assert loaded.search(q, 10)[1] == exact
