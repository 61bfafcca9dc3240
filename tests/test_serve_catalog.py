"""The replica's catalog (serve/catalog.py) without Ray: its rankings through the catalog index
equal the offline ones (recsys.retrieval, recsys.hybrid) when the index is exact, and with an IVF
index (large catalogs) they stay within the filters and close to exact."""

from __future__ import annotations

import numpy as np
import pytest

from recsys import hybrid, retrieval
from recsys.bm25 import BM25Index
from recsys.index import IVF_MIN_ITEMS, build_index
from serve.catalog import Catalog, ModelMismatch

WORDS = ["drill", "cordless", "hammer", "paint", "brush", "ladder", "faucet", "valve", "pipe", "lamp", "bulb", "saw"]
CATS = ["Tools > Power", "Tools > Hand", "Paint > Brushes", "Plumbing > Valves", "Lighting > Bulbs"]


def _catalog(n: int, dim: int, kind: str, seed: int = 0) -> Catalog:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(64, dim))
    emb = centres[rng.integers(0, 64, n)] + 0.35 * rng.normal(size=(n, dim))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    ids = [f"I{i}" for i in range(n)]
    texts = [" ".join(rng.choice(WORDS, 3)) + f" model {i % 997}" for i in range(n)]
    meta = [{"item_id": ids[i], "title": texts[i], "brand": f"b{i % 7}", "category": CATS[i % len(CATS)], "price": float(i % 300)}
            for i in range(n)]
    return Catalog(
        model_uri="m", model_id="mid", ids=ids, index={i: n for n, i in enumerate(ids)}, meta=meta, texts=texts,
        fields=retrieval.FilterFields.from_rows(meta), emb=emb, ann=build_index(emb, ids, kind, model_id="mid"),
        lexical=BM25Index.build(texts, ids), fusion=hybrid.Fusion(method="convex", weight=0.6, candidates=50),
    )


def _query(c: Catalog, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q = c.emb[rng.integers(len(c.ids))] + 0.2 * rng.normal(size=c.emb.shape[1])
    return (q / np.linalg.norm(q)).astype(np.float32)


FILTERS = [None, {"category": "tools"}, {"brand": "B3", "max_price": 150.0}, {"category": "Plumbing > Valves", "min_price": 10.0}]


@pytest.mark.parametrize("filters", FILTERS)
def test_exact_catalog_ranks_as_the_offline_functions(filters) -> None:
    c = _catalog(3000, 16, "exact")
    keep = retrieval.filter_mask(c.fields, filters)
    for s in range(5):
        q = _query(c, s)
        exclude = [c.ids[j] for j in np.argsort(-(c.emb @ q))[:3]]  # the best three are excluded
        got = c.search(q, 10, filters, exclude, "mid")
        top, scores = retrieval.search(c.emb, q[None], 10, keep, [[c.index[i] for i in exclude]])[0]
        assert [r["item_id"] for r in got] == [c.ids[i] for i in top]
        np.testing.assert_allclose([r["score"] for r in got], scores, rtol=1e-6)
        text = "cordless drill model 12"
        h = c.search_hybrid(q, text, 10, filters, "mid")
        lexical = c.lexical.scores(text)
        htop, hscores = hybrid.fuse(c.emb @ q, lexical, keep, 10, c.fusion)
        assert [r["item_id"] for r in h] == [c.ids[i] for i in htop]
        np.testing.assert_allclose([r["score"] for r in h], hscores, rtol=1e-6)
        np.testing.assert_allclose([r["dense_score"] for r in h], (c.emb @ q)[htop], rtol=1e-5)
    with pytest.raises(ModelMismatch):
        c.search(_query(c, 0), 5, None, None, "another-model")


def test_ivf_catalog_stays_in_the_filters_and_near_exact() -> None:
    c = _catalog(IVF_MIN_ITEMS + 10_000, 16, "faiss")
    assert c.ann.nlist > 0, "a catalog this large gets an IVF index"
    c.ann.filter_exact_max_kept = 100  # so that filtered searches go through IVF too
    for filters in FILTERS:
        keep = retrieval.filter_mask(c.fields, filters)
        hits = total = 0
        for s in range(10):
            q = _query(c, 100 + s)
            got = [c.index[r["item_id"]] for r in c.search(q, 20, filters, None, "mid")]
            assert len(got) == 20 and keep[got].all()
            exact = retrieval.top_k(c.emb @ q, keep, 20)[0]
            hits += len(set(got) & set(exact.tolist()))
            total += 20
            h = c.search_hybrid(q, "paint brush", 10, filters, "mid")
            assert len(h) == 10 and keep[[c.index[r["item_id"]] for r in h]].all()
        assert hits / total >= 0.9, (filters, hits / total)
