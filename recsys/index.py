"""Retrieval over catalog embeddings: exact top-K or FAISS behind one interface.

Exact (numpy, `recsys.retrieval.top_k`) up to `exact_max_items`; above it ("auto") FAISS:
IVF-Flat with inner product (the vectors are L2-normalised: cosine) from `IVF_MIN_ITEMS` items,
a flat FAISS index below that (too few items to train the coarse quantizer well). IVF-Flat
rather than HNSW: at 1M x 384 it builds in ~30 s on two cores, where HNSW32 took 49 s for 200k
(minutes at 1M) and reached recall@100 0.94 at efSearch 256; it keeps the exact inner products as
scores, and filters well (an IVF scan skips the filtered-out items of each probed list; an HNSW
walk loses its way when most nodes are filtered out). Figures: docs/results/ann-latency.txt
(bench/ann_latency.py).

The built FAISS index is saved beside the embeddings (`faiss.index`), so a replica loading the
folder reads it instead of training again; a folder saved before that (no `faiss.index`) still
loads: its FAISS index is built then.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from recsys import storage
from recsys.config import EvalConfig, StorageConfig
from recsys.retrieval import top_k

log = logging.getLogger(__name__)

INDEX_META = "index.json"
FAISS_FILE = "faiss.index"
# Below this many items a FAISS index is flat (exact): IVF's k-means wants ~40+ points per list.
IVF_MIN_ITEMS = 50_000
# The index knobs' defaults (set in EvalConfig: ivf_nprobe, filter_exact_max_kept), from
# bench/ann_latency.py at 1M x 384 (docs/results/ann-latency.txt): 24 probes of 2,000 lists give
# recall@100 0.993 at p50 ~2 ms, p99 2.7-6.3 ms on two cores shared with other jobs (16: 0.978,
# 32: 0.998 at +0.5 ms).
# Scoring a kept subset exactly costs ~0.25 ms per 1,000 kept items at dim 384 (gathering their
# rows), the filtered IVF search ~2.5-4 ms: exact up to ~10,000 kept.
DEFAULT_NPROBE: int = EvalConfig.model_fields["ivf_nprobe"].default
DEFAULT_FILTER_EXACT_MAX_KEPT: int = EvalConfig.model_fields["filter_exact_max_kept"].default
# A filter keeping a fraction f of the items (independently of the vectors) leaves the kept top-k
# among the unfiltered top-k/f, so the probes grow as 1/f; half of nprobe/f already reaches
# recall@100 ~0.98 at 1-10% kept, at half the time of nprobe/f (~0.99).
_FILTER_PROBE_SCALE = 0.5
# k-means of the coarse quantizer: a sample of this many points per list, this many iterations
# (faiss' defaults, 256 and 25, take minutes at 1M items for no measurable recall).
_TRAIN_POINTS_PER_LIST = 64
_TRAIN_ITERATIONS = 10


class IndexModelMismatch(ValueError):
    """Catalog embeddings (an index) made by one model, about to be served with another."""


def check_model(index_model_id: str, model_id: str, where: str) -> None:
    """Refuse an index whose embeddings another model made (or that records no model at all):
    its scores against this model's query vectors would be meaningless, yet look fine."""
    if index_model_id != model_id:
        made_by = f"model {index_model_id}" if index_model_id else "a model it does not record (saved before indexes recorded one)"
        raise IndexModelMismatch(
            f"the index at {where} was built by {made_by}, but the model being served is {model_id}: "
            "rebuild the index with this model (python -m jobs.index)"
        )


def auto_nlist(n_items: int) -> int:
    """IVF lists for a catalog of n_items: ~2 sqrt(n) (2,000 at 1M: ~500 items a list)."""
    return max(1, min(round(2 * math.sqrt(n_items)), n_items // 39))


class Index:
    """Inner-product top-K over L2-normalised item embeddings (= cosine).

    `model_id` names the model whose embeddings these are (recsys.encoder.model_identity); it is
    saved with the index and checked when the index is loaded for serving. FAISS kind: `nlist`
    IVF lists (0 = auto_nlist), `nprobe` lists probed per query (settable later: `index.nprobe`),
    `filter_exact_max_kept`: a filtered `search_one` keeping at most this many items scores them
    exactly instead. `faiss_index`: an index built earlier over these embeddings (load_index)."""

    def __init__(
        self,
        emb: np.ndarray,
        ids: Sequence[str],
        kind: str = "auto",
        exact_max_items: int = 200_000,
        model_id: str = "",
        *,
        nlist: int = 0,
        nprobe: int = DEFAULT_NPROBE,
        filter_exact_max_kept: int = DEFAULT_FILTER_EXACT_MAX_KEPT,
        faiss_index: Any = None,
    ) -> None:
        if emb.ndim != 2 or emb.shape[0] != len(ids):
            raise ValueError(f"embeddings {emb.shape} do not match {len(ids)} ids")
        if nprobe < 1 or nlist < 0 or filter_exact_max_kept < 0:
            raise ValueError(f"index knobs out of range: nlist={nlist} (>= 0), nprobe={nprobe} (>= 1), filter_exact_max_kept={filter_exact_max_kept} (>= 0)")
        self.emb = np.ascontiguousarray(emb, dtype=np.float32)  # (n_items, dim)
        self.ids = list(ids)
        self.model_id = model_id
        self.kind = ("exact" if len(ids) <= exact_max_items else "faiss") if kind == "auto" else kind
        if self.kind not in ("exact", "faiss"):
            raise ValueError(f"index kind must be auto, exact or faiss, got {kind!r}")
        self.nprobe = nprobe
        self.filter_exact_max_kept = filter_exact_max_kept
        self._all = np.ones(len(self.ids), dtype=bool)
        self._faiss: Any = None
        if self.kind == "faiss":
            self._faiss = self._build_faiss(nlist) if faiss_index is None else self._check_faiss(faiss_index)

    @property
    def nlist(self) -> int:
        """IVF lists of the FAISS index (0 when there is none, or it is flat)."""
        return int(getattr(self._faiss, "nlist", 0))

    def _build_faiss(self, nlist: int) -> Any:
        import faiss

        n, dim = self.emb.shape
        t = time.perf_counter()
        if n < IVF_MIN_ITEMS:
            index = faiss.IndexFlatIP(dim)
        else:
            index = faiss.index_factory(dim, f"IVF{nlist or auto_nlist(n)},Flat", faiss.METRIC_INNER_PRODUCT)
            index.cp.max_points_per_centroid = _TRAIN_POINTS_PER_LIST
            index.cp.niter = _TRAIN_ITERATIONS
            index.cp.spherical = True  # centroids on the unit sphere, like the items: cosine cells
            index.train(self.emb)
        index.add(self.emb)
        log.info("built a FAISS %s over %d items in %.1fs", type(index).__name__, n, time.perf_counter() - t)
        return index

    def _check_faiss(self, index: Any) -> Any:
        import faiss

        n, dim = self.emb.shape
        if index.ntotal != n or index.d != dim or index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError(
                f"the FAISS index holds {index.ntotal} vectors of dim {index.d} (metric {index.metric_type}), "
                f"the embeddings are {n} x {dim} with inner product ({faiss.METRIC_INNER_PRODUCT})"
            )
        return index

    def _params(self, nprobe: int, bits: np.ndarray | None) -> Any:
        """FAISS search parameters: the probes (IVF), and the kept items as a bitmap selector."""
        import faiss

        sel = None if bits is None else faiss.IDSelectorBitmap(len(self.ids), faiss.swig_ptr(bits))
        if self.nlist:
            return faiss.SearchParametersIVF(nprobe=min(nprobe, self.nlist), sel=sel)
        return faiss.SearchParameters(sel=sel)

    def search_one(self, q: np.ndarray, k: int, keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One query's top-k: (positions into `ids` int64, scores float32), best first.

        `keep` (n_items,) bool, in index order: the items that may come back (None = all). Exact
        kind: `retrieval.top_k(emb @ q, keep, k)`. FAISS kind: a filter keeping at most
        `filter_exact_max_kept` items scores those exactly (top_k over the kept subset); otherwise
        IVF probes the nprobe * _FILTER_PROBE_SCALE / (kept fraction) nearest lists (at least
        nprobe) with the kept items as a bitmap selector, probing 4x more until min(k, kept)
        items came back (all lists at worst). A filtered-out item never comes back; equal scores
        come back by position."""
        q = np.ascontiguousarray(q, dtype=np.float32)
        n, dim = self.emb.shape
        if q.shape != (dim,):
            raise ValueError(f"search_one takes one query vector of shape ({dim},), got {q.shape}")
        if keep is not None and (keep.shape != (n,) or keep.dtype != np.bool_):
            raise ValueError(f"keep must be a bool mask of shape ({n},), got {keep.dtype} {keep.shape}")
        if self._faiss is None:
            return top_k(self.emb @ q, self._all if keep is None else keep, k)
        kept = n if keep is None else int(np.count_nonzero(keep))
        want = min(k, kept)
        if want <= 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        if keep is not None and kept <= self.filter_exact_max_kept:
            cand = np.flatnonzero(keep)
            top, scores = top_k(self.emb[cand] @ q, np.ones(len(cand), dtype=bool), want)
            return cand[top], scores
        bits = None if keep is None else np.packbits(keep, bitorder="little")
        nprobe = max(self.nprobe, math.ceil(self.nprobe * _FILTER_PROBE_SCALE * n / kept))
        while True:
            scores, idx = self._faiss.search(q[None], want, params=self._params(nprobe, bits))
            found = idx[0] >= 0
            if found.sum() >= want or nprobe >= self.nlist:  # all lists probed: the kept set is exhausted
                break
            nprobe *= 4
        top, sc = idx[0][found], scores[0][found]
        order = np.lexsort((top, -sc))  # equal scores by position, as top_k orders them
        return top[order].astype(np.int64), sc[order].astype(np.float32)

    def search(
        self, queries: np.ndarray, k: int, exclude: Sequence[set[str]] | None = None, chunk: int = 1024
    ) -> tuple[np.ndarray, list[list[str]]]:
        """(scores (m, k), ids) best first; `exclude[i]` ids are never returned for query i."""
        q = np.ascontiguousarray(queries, dtype=np.float32)  # (m, dim)
        extra = max((len(e) for e in exclude), default=0) if exclude else 0
        kk = min(k + extra, len(self.ids))
        if self._faiss is not None:
            scores, idx = self._faiss.search(q, kk, params=self._params(self.nprobe, None))
        else:
            scores = np.empty((len(q), kk), dtype=np.float32)
            idx = np.empty((len(q), kk), dtype=np.int64)
            for s in range(0, len(q), chunk):
                sim = q[s : s + chunk] @ self.emb.T  # (chunk, n_items)
                part = np.argpartition(-sim, kk - 1, axis=1)[:, :kk]
                ps = np.take_along_axis(sim, part, axis=1)
                order = np.argsort(-ps, axis=1, kind="stable")
                idx[s : s + chunk] = np.take_along_axis(part, order, axis=1)
                scores[s : s + chunk] = np.take_along_axis(ps, order, axis=1)
        out_ids: list[list[str]] = []
        out_scores = np.full((len(q), min(k, len(self.ids))), -np.inf, dtype=np.float32)
        for i in range(len(q)):
            ex = exclude[i] if exclude else set()
            row = [(self.ids[j], float(sc)) for j, sc in zip(idx[i], scores[i], strict=True) if j >= 0 and self.ids[j] not in ex][:k]
            out_ids.append([r[0] for r in row])
            out_scores[i, : len(row)] = [r[1] for r in row]
        return out_scores, out_ids

    def save(self, uri: str, cfg: StorageConfig | None = None, extra: Callable[[Path], None] | None = None) -> None:
        """Replace whatever is at `uri` (an earlier index's files do not survive). `extra(folder)`
        writes what is published with the index (the BM25 index and fusion: recsys.hybrid)."""
        with tempfile.TemporaryDirectory() as tmp:
            np.save(Path(tmp) / "embeddings.npy", self.emb)
            meta: dict[str, Any] = {"kind": self.kind, "model_id": self.model_id, "ids": self.ids,
                                    "nprobe": self.nprobe, "filter_exact_max_kept": self.filter_exact_max_kept}
            if self._faiss is not None:
                import faiss

                faiss.write_index(self._faiss, str(Path(tmp) / FAISS_FILE))
                meta.update(faiss=FAISS_FILE, nlist=self.nlist)
            (Path(tmp) / INDEX_META).write_text(json.dumps(meta))
            if extra is not None:
                extra(Path(tmp))
            storage.replace_dir(tmp, uri, cfg, marker=INDEX_META)


def build_index(
    emb: np.ndarray,
    ids: Sequence[str],
    kind: str = "auto",
    exact_max_items: int = 200_000,
    model_id: str = "",
    *,
    nlist: int = 0,
    nprobe: int = DEFAULT_NPROBE,
    filter_exact_max_kept: int = DEFAULT_FILTER_EXACT_MAX_KEPT,
) -> Index:
    return Index(emb, ids, kind, exact_max_items, model_id, nlist=nlist, nprobe=nprobe, filter_exact_max_kept=filter_exact_max_kept)


def index_model_id(uri: str, cfg: StorageConfig | None = None) -> str:
    """The model a saved index was built by ("" if it records none), from its small metadata."""
    return str(storage.read_json(storage.join(uri, INDEX_META), cfg).get("model_id") or "")


def load_index(
    uri: str,
    cfg: StorageConfig | None = None,
    model_id: str | None = None,
    *,
    nprobe: int | None = None,
    filter_exact_max_kept: int | None = None,
) -> Index:
    """Load a saved index; with `model_id`, refuse one built by any other model (IndexModelMismatch).

    The FAISS index saved with it is read, not built again (an index saved before FAISS indexes
    were saved is built here). `nprobe` / `filter_exact_max_kept`: instead of those it was saved with."""
    if model_id is not None:  # before downloading the embeddings
        check_model(index_model_id(uri, cfg), model_id, uri)
    # The arrays are read into memory, so the downloaded copy need not outlive this call.
    with tempfile.TemporaryDirectory(prefix="recsys-index-") as tmp:
        local = storage.download_dir(uri, tmp, cfg)
        meta = json.loads((Path(local) / INDEX_META).read_text())
        emb = np.load(Path(local) / "embeddings.npy")
        faiss_index = None
        if meta["kind"] == "faiss":
            if meta.get("faiss"):
                import faiss

                path = Path(local) / meta["faiss"]
                if not path.exists():
                    raise FileNotFoundError(f"the index at {uri} names its FAISS index {meta['faiss']}, which is missing: rebuild it (python -m jobs.index)")
                faiss_index = faiss.read_index(str(path))
            else:
                log.info("the index at %s has no saved FAISS index (saved before they were): building it", uri)
    knobs = {"nlist": int(meta.get("nlist") or 0),
             "nprobe": int(nprobe if nprobe is not None else meta.get("nprobe", DEFAULT_NPROBE)),
             "filter_exact_max_kept": int(filter_exact_max_kept if filter_exact_max_kept is not None
                                          else meta.get("filter_exact_max_kept", DEFAULT_FILTER_EXACT_MAX_KEPT))}
    try:
        index = Index(emb, meta["ids"], meta["kind"], model_id=str(meta.get("model_id") or ""), faiss_index=faiss_index, **knobs)
    except ValueError as e:
        raise ValueError(f"the index at {uri}: {e}") from e
    if model_id is not None:
        check_model(index.model_id, model_id, uri)  # the index may have been replaced meanwhile
    return index
