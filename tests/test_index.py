"""The approximate (HNSW) index against exact search, on a catalog big enough to build it."""

from __future__ import annotations

import numpy as np

from recsys.index import build_index


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_hnsw_recall_against_exact_search() -> None:
    """60k items: above the 50k line where the FAISS index switches from flat (exact) to HNSW.

    Random 32-d unit vectors are a hard case for graph search (no cluster structure), so the
    recall bound here is a floor, not what real embeddings get.
    """
    import faiss

    rng = np.random.default_rng(0)
    n = 60_000
    emb = _unit(rng, n, 32)
    ids = [f"i{j}" for j in range(n)]
    queries = _unit(rng, 300, 32)
    approx = build_index(emb, ids, "faiss")
    # Prove the approximate path was taken: the old 2,000-item test always got the exact flat index.
    assert approx.kind == "faiss"
    assert isinstance(approx._faiss, faiss.IndexHNSWFlat)
    exact = build_index(emb, ids, "exact")
    assert exact._faiss is None
    _, want = exact.search(queries, 10)
    scores, got = approx.search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(want, got, strict=True)])
    assert recall >= 0.9, f"HNSW recall@10 {recall:.3f} against exact search"
    assert all(len(r) == 10 for r in got)
    # Scores come back best first and equal the true inner products of the returned ids.
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
    pos = {i: k for k, i in enumerate(ids)}
    true = np.array([[emb[pos[i]] @ q for i in row] for row, q in zip(got, queries, strict=True)])
    np.testing.assert_allclose(scores, true, atol=1e-5)


def test_hnsw_honours_exclusions() -> None:
    rng = np.random.default_rng(1)
    n = 50_001
    emb = _unit(rng, n, 8)
    ids = [f"i{j}" for j in range(n)]
    q = emb[:3]
    index = build_index(emb, ids, "faiss")
    _, first = index.search(q, 5)
    assert [r[0] for r in first] == ids[:3]  # each item is its own nearest neighbour
    _, without = index.search(q, 5, exclude=[{ids[0]}, set(), {ids[2], first[2][1]}])
    assert ids[0] not in without[0] and len(without[0]) == 5
    assert without[1][0] == ids[1]
    assert ids[2] not in without[2] and first[2][1] not in without[2]
