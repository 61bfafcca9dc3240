"""The catalog index: exact and FAISS (IVF-Flat) search, one query with a filter mask
(`Index.search_one`, what a serving replica calls), and the saved FAISS index being read back
instead of built again. No Ray: numpy and FAISS only."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest

from recsys import index as index_mod
from recsys.index import FAISS_FILE, INDEX_META, Index, build_index, load_index
from recsys.retrieval import FilterFields, filter_mask, top_k


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clustered(rng: np.random.Generator, n: int, dim: int, clusters: int = 300) -> np.ndarray:
    """Unit vectors around random centres: neighbourhoods like an embedding model's, which an
    IVF index is built for (uniform random vectors have none)."""
    centres = _unit(rng.normal(size=(clusters, dim)))
    return _unit(centres[rng.integers(clusters, size=n)] + 0.5 * _unit(rng.normal(size=(n, dim))))


@pytest.fixture(scope="module")
def catalog() -> tuple[np.ndarray, list[str], np.ndarray]:
    """60k items: above IVF_MIN_ITEMS, so the FAISS kind is an IVF index, not a flat one."""
    rng = np.random.default_rng(0)
    emb = _clustered(rng, 60_000, 32)
    queries = _unit(emb[rng.integers(len(emb), size=100)] + 0.3 * _unit(rng.normal(size=(100, 32))))
    return emb, [f"i{j}" for j in range(len(emb))], queries


@pytest.fixture(scope="module")
def ivf(catalog: tuple[np.ndarray, list[str], np.ndarray]) -> Index:
    emb, ids, _ = catalog
    return build_index(emb, ids, "faiss")


def test_search_one_exact_is_top_k() -> None:
    """The exact kind's search_one is exactly retrieval.top_k over all scores: same positions,
    same scores, the same order among equal scores (duplicated vectors tie), also when the
    filter keeps fewer items than k, none, or all."""
    rng = np.random.default_rng(3)
    emb = _unit(rng.normal(size=(3000, 16)))
    emb[1000:1300] = emb[:300]  # exact ties: every duplicate scores what its original scores
    index = build_index(emb, [f"i{j}" for j in range(len(emb))], "exact")
    assert index.kind == "exact" and index._faiss is None
    masks = [None, rng.random(len(emb)) < 0.5, rng.random(len(emb)) < 0.002, np.zeros(len(emb), dtype=bool)]
    for q in [emb[5], emb[1200], _unit(rng.normal(size=(1, 16)))[0]]:
        for keep in masks:
            for k in (0, 1, 10, 400):
                got_pos, got_scores = index.search_one(q, k, keep)
                want_pos, want_scores = top_k(emb @ q, np.ones(len(emb), dtype=bool) if keep is None else keep, k)
                assert got_pos.dtype == np.int64 and got_scores.dtype == np.float32
                np.testing.assert_array_equal(got_pos, want_pos)
                np.testing.assert_array_equal(got_scores, want_scores)
    # Ties really occur at the cut: item 5 and its duplicate 1005 ... come out by position.
    pos, _ = index.search_one(emb[5], 2)
    assert list(pos) == [5, 1005]


def test_search_one_refuses_bad_input(ivf: Index) -> None:
    dim = ivf.emb.shape[1]
    with pytest.raises(ValueError, match="one query vector"):
        ivf.search_one(np.zeros((2, dim), dtype=np.float32), 5)
    with pytest.raises(ValueError, match="bool mask"):
        ivf.search_one(np.zeros(dim, dtype=np.float32), 5, np.ones(len(ivf.ids), dtype=np.int8))
    with pytest.raises(ValueError, match="bool mask"):
        ivf.search_one(np.zeros(dim, dtype=np.float32), 5, np.ones(7, dtype=bool))


def test_ivf_recall_against_exact(catalog: tuple[np.ndarray, list[str], np.ndarray], ivf: Index) -> None:
    """Unfiltered: the IVF index (not a flat one) with the default probes finds nearly all of the
    exact top-k, with scores that are the true inner products, best first."""
    emb, ids, queries = catalog
    assert isinstance(ivf._faiss, faiss.IndexIVFFlat) and ivf.nlist > 100
    exact = build_index(emb, ids, "exact")
    recalls = []
    for q in queries:
        pos, scores = ivf.search_one(q, 50)
        assert len(pos) == 50 and np.all(np.diff(scores) <= 0)
        np.testing.assert_allclose(scores, emb[pos] @ q, atol=1e-5)
        recalls.append(len(np.intersect1d(pos, exact.search_one(q, 50)[0])) / 50)
    assert np.mean(recalls) >= 0.95, f"IVF recall@50 {np.mean(recalls):.3f} against exact search"
    # The batch search (evaluate, jobs) goes through the same index and probes.
    _, want = exact.search(queries, 10)
    _, got = ivf.search(queries, 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(want, got, strict=True)]) >= 0.95


@pytest.mark.parametrize(
    ("fraction", "exact_max_kept"),
    [(0.3, 10_000), (0.05, 10_000), (0.05, 0), (0.002, 0), (60 / 60_000, 0), (3 / 60_000, 0)],
    ids=["ivf-30%", "exact-subset-5%", "ivf-5%", "ivf-0.2%", "ivf-60-kept", "ivf-3-kept"],
)
def test_filtered_search_one(
    catalog: tuple[np.ndarray, list[str], np.ndarray], ivf: Index, fraction: float, exact_max_kept: int
) -> None:
    """A filter: no filtered-out item ever comes back, min(k, kept) items do (also when the probed
    lists hold fewer kept items than k: it probes more), and they are nearly the exact top-k
    among the kept (exactly them on the exact-subset path)."""
    emb, _, queries = catalog
    rng = np.random.default_rng(int(fraction * 1e6) + exact_max_kept)
    keep = np.zeros(len(emb), dtype=bool)
    keep[rng.choice(len(emb), size=max(1, round(fraction * len(emb))), replace=False)] = True
    kept = int(keep.sum())
    ivf.filter_exact_max_kept = exact_max_kept
    try:
        recalls = []
        for q in queries[:40]:
            pos, scores = ivf.search_one(q, 100, keep)
            assert keep[pos].all(), "a filtered-out item came back"
            assert len(pos) == min(100, kept) and len(set(pos.tolist())) == len(pos)
            assert np.all(np.diff(scores) <= 0)
            np.testing.assert_allclose(scores, emb[pos] @ q, atol=1e-5)
            want, _ = top_k(emb @ q, keep, 100)
            if kept <= exact_max_kept:
                np.testing.assert_array_equal(pos, want)
            recalls.append(len(np.intersect1d(pos, want)) / len(want))
        assert np.mean(recalls) >= 0.9, f"filtered recall@100 {np.mean(recalls):.3f} ({kept} kept)"
    finally:
        ivf.filter_exact_max_kept = index_mod.DEFAULT_FILTER_EXACT_MAX_KEPT


def test_filtered_search_one_probes_further_for_far_kept_items(
    catalog: tuple[np.ndarray, list[str], np.ndarray], ivf: Index, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filter keeping only the items least like the query (a category far from it): the lists
    first probed hold none of them, yet k come back, all kept, the exact top-k among the kept."""
    emb, _, queries = catalog
    monkeypatch.setattr(ivf, "filter_exact_max_kept", 0)
    q = queries[0]
    keep = np.zeros(len(emb), dtype=bool)
    keep[np.argsort(emb @ q)[:3000]] = True  # 5%: the first probes are ~12/0.05 = 240 of ~490 lists
    assert ivf.nprobe * index_mod._FILTER_PROBE_SCALE * len(emb) / keep.sum() < ivf.nlist
    pos, _ = ivf.search_one(q, 100, keep)
    assert len(pos) == 100 and keep[pos].all()
    assert len(np.intersect1d(pos, top_k(emb @ q, keep, 100)[0])) >= 95


def test_save_then_load_reads_the_faiss_index(
    tmp_path: Path, catalog: tuple[np.ndarray, list[str], np.ndarray], ivf: Index, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The saved folder holds the built FAISS index; loading reads it (building is made to fail
    here) and answers exactly as the index that was saved; load_index can change the probes."""
    emb, ids, queries = catalog
    ivf.save(str(tmp_path / "index"))
    assert (tmp_path / "index" / FAISS_FILE).exists()
    assert (tmp_path / "index" / "embeddings.npy").exists()  # hybrid search and /score read it

    def no_build(self: Index, nlist: int) -> None:
        raise AssertionError("load_index built the FAISS index instead of reading it")

    monkeypatch.setattr(Index, "_build_faiss", no_build)
    loaded = load_index(str(tmp_path / "index"))
    assert loaded.kind == "faiss" and loaded.nlist == ivf.nlist and loaded.nprobe == ivf.nprobe
    assert isinstance(loaded._faiss, faiss.IndexIVFFlat)
    np.testing.assert_array_equal(loaded.emb, emb)
    keep = np.random.default_rng(5).random(len(emb)) < 0.3
    for q in queries[:20]:
        for mask in (None, keep):
            for a, b in zip(loaded.search_one(q, 20, mask), ivf.search_one(q, 20, mask), strict=True):
                np.testing.assert_array_equal(a, b)
    assert load_index(str(tmp_path / "index"), nprobe=3).nprobe == 3


def test_old_folder_without_faiss_file_still_loads(
    tmp_path: Path, catalog: tuple[np.ndarray, list[str], np.ndarray], ivf: Index, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder saved before FAISS indexes were saved (embeddings.npy and the old index.json of
    kind faiss, no faiss.index) loads: the FAISS index is built then, and answers like the other."""
    emb, ids, queries = catalog
    folder = tmp_path / "old"
    ivf.save(str(folder))
    (folder / FAISS_FILE).unlink()
    (folder / INDEX_META).write_text(json.dumps({"kind": "faiss", "model_id": "m1", "ids": ids}))  # the old format
    built: list[int] = []
    real_build = Index._build_faiss

    def counting_build(self: Index, nlist: int) -> object:
        built.append(nlist)
        return real_build(self, nlist)

    monkeypatch.setattr(Index, "_build_faiss", counting_build)
    loaded = load_index(str(folder), model_id="m1")
    assert built == [0] and loaded.kind == "faiss" and isinstance(loaded._faiss, faiss.IndexIVFFlat)
    overlap = [len(np.intersect1d(loaded.search_one(q, 20)[0], ivf.search_one(q, 20)[0])) / 20 for q in queries[:20]]
    assert np.mean(overlap) >= 0.95


def test_saved_faiss_index_of_other_embeddings_is_refused(tmp_path: Path) -> None:
    """A faiss.index that does not hold the folder's embeddings (files mixed up) is an error, not
    silently served."""
    rng = np.random.default_rng(4)
    emb = _unit(rng.normal(size=(2000, 8)))
    ids = [f"i{j}" for j in range(len(emb))]
    build_index(emb, ids, "faiss").save(str(tmp_path / "a"))
    build_index(emb[:1500], ids[:1500], "faiss").save(str(tmp_path / "b"))
    (tmp_path / "b" / FAISS_FILE).replace(tmp_path / "a" / FAISS_FILE)
    with pytest.raises(ValueError, match=r"index at .*/a: the FAISS index holds 1500 vectors"):
        load_index(str(tmp_path / "a"))


def test_faiss_kind_honours_exclusions() -> None:
    rng = np.random.default_rng(1)
    n = 50_001
    emb = _unit(rng.normal(size=(n, 8)))
    ids = [f"i{j}" for j in range(n)]
    q = emb[:3]
    index = build_index(emb, ids, "faiss")
    assert isinstance(index._faiss, faiss.IndexIVFFlat)
    _, first = index.search(q, 5)
    assert [r[0] for r in first] == ids[:3]  # each item is its own nearest neighbour
    _, without = index.search(q, 5, exclude=[{ids[0]}, set(), {ids[2], first[2][1]}])
    assert ids[0] not in without[0] and len(without[0]) == 5
    assert without[1][0] == ids[1]
    assert ids[2] not in without[2] and first[2][1] not in without[2]


def _old_filter_mask(fields: FilterFields, f: dict) -> np.ndarray:
    """filter_mask before it was vectorised (a Python pass over every item): the reference."""
    keep = np.ones(len(fields), dtype=bool)
    if f.get("category"):
        prefix = str(f["category"]).lower()
        keep &= np.fromiter((c.startswith(prefix) for c in fields.category), dtype=bool, count=len(fields))
    if f.get("brand"):
        keep &= fields.brand == str(f["brand"]).lower()
    if f.get("min_price") is not None:
        keep &= fields.price >= float(f["min_price"])
    if f.get("max_price") is not None:
        keep &= fields.price <= float(f["max_price"])
    return keep


def test_filter_mask_matches_the_item_by_item_semantics() -> None:
    """On random catalogs (mixed case, missing values, prefixes that end mid-word, categories that
    are prefixes of others), the coded filter_mask equals the item-by-item one."""
    rng = np.random.default_rng(7)
    words = ["Home", "home", "Kitchen", "kit", "Garden", "Tools", "Électro", "ß", ""]
    for _ in range(30):
        n = int(rng.integers(0, 400))
        rows = []
        for _ in range(n):
            depth = int(rng.integers(0, 4))
            cat = " > ".join(str(rng.choice(words)) for _ in range(depth)) if rng.random() > 0.1 else None
            rows.append({"category": cat, "brand": str(rng.choice(["Acme", "ACME", "acme co", "Bolt", ""])) if rng.random() > 0.2 else None,
                         "price": float(rng.uniform(0, 100)) if rng.random() > 0.15 else None})
        fields = FilterFields.from_rows(rows)
        assert len(fields) == n
        for _ in range(20):
            f: dict = {}
            if rng.random() < 0.7:
                f["category"] = str(rng.choice(["home", "HOME > k", "home > kitchen", "ki", "garden > tools", "élec", "ss", "", "h"]))
            if rng.random() < 0.5:
                f["brand"] = str(rng.choice(["acme", "Acme", "acme co", "bolt", "none", ""]))
            if rng.random() < 0.3:
                f["min_price"] = float(rng.uniform(0, 60))
            if rng.random() < 0.3:
                f["max_price"] = float(rng.uniform(40, 100))
            np.testing.assert_array_equal(filter_mask(fields, f), _old_filter_mask(fields, f), err_msg=str(f))


def test_filter_fields_refuse_misaligned_columns() -> None:
    with pytest.raises(ValueError, match="FilterFields.brand has shape"):
        FilterFields(category=np.array(["a", "b"], dtype=object), brand=np.array(["x"], dtype=object), price=np.zeros(2))
