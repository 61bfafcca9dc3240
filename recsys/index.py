"""Retrieval over catalog embeddings: exact top-K or FAISS behind one interface."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from recsys import storage
from recsys.config import StorageConfig

INDEX_META = "index.json"


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


class Index:
    """Inner-product top-K over L2-normalised item embeddings (= cosine).

    `model_id` names the model whose embeddings these are (recsys.encoder.model_identity); it is
    saved with the index and checked when the index is loaded for serving."""

    def __init__(self, emb: np.ndarray, ids: Sequence[str], kind: str = "auto", exact_max_items: int = 200_000, model_id: str = "") -> None:
        if emb.ndim != 2 or emb.shape[0] != len(ids):
            raise ValueError(f"embeddings {emb.shape} do not match {len(ids)} ids")
        self.emb = np.ascontiguousarray(emb, dtype=np.float32)  # (n_items, dim)
        self.ids = list(ids)
        self.model_id = model_id
        self.kind = ("exact" if len(ids) <= exact_max_items else "faiss") if kind == "auto" else kind
        if self.kind not in ("exact", "faiss"):
            raise ValueError(f"index kind must be auto, exact or faiss, got {kind!r}")
        self._faiss = None
        if self.kind == "faiss":
            import faiss

            dim = self.emb.shape[1]
            # HNSW for large catalogs: sub-linear search with recall close to exact.
            self._faiss = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT) if len(ids) > 50_000 else faiss.IndexFlatIP(dim)
            if hasattr(self._faiss, "hnsw"):
                self._faiss.hnsw.efSearch = 128
            self._faiss.add(self.emb)

    def search(
        self, queries: np.ndarray, k: int, exclude: Sequence[set[str]] | None = None, chunk: int = 1024
    ) -> tuple[np.ndarray, list[list[str]]]:
        """(scores (m, k), ids) best first; `exclude[i]` ids are never returned for query i."""
        q = np.ascontiguousarray(queries, dtype=np.float32)  # (m, dim)
        extra = max((len(e) for e in exclude), default=0) if exclude else 0
        kk = min(k + extra, len(self.ids))
        if self._faiss is not None:
            scores, idx = self._faiss.search(q, kk)
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
            (Path(tmp) / INDEX_META).write_text(json.dumps({"kind": self.kind, "model_id": self.model_id, "ids": self.ids}))
            if extra is not None:
                extra(Path(tmp))
            storage.replace_dir(tmp, uri, cfg, marker=INDEX_META)


def build_index(emb: np.ndarray, ids: Sequence[str], kind: str = "auto", exact_max_items: int = 200_000, model_id: str = "") -> Index:
    return Index(emb, ids, kind, exact_max_items, model_id)


def index_model_id(uri: str, cfg: StorageConfig | None = None) -> str:
    """The model a saved index was built by ("" if it records none), from its small metadata."""
    return str(storage.read_json(storage.join(uri, INDEX_META), cfg).get("model_id") or "")


def load_index(uri: str, cfg: StorageConfig | None = None, model_id: str | None = None) -> Index:
    """Load a saved index; with `model_id`, refuse one built by any other model (IndexModelMismatch)."""
    if model_id is not None:  # before downloading the embeddings
        check_model(index_model_id(uri, cfg), model_id, uri)
    # The arrays are read into memory, so the downloaded copy need not outlive this call.
    with tempfile.TemporaryDirectory(prefix="recsys-index-") as tmp:
        local = storage.download_dir(uri, tmp, cfg)
        meta = json.loads((Path(local) / INDEX_META).read_text())
        emb = np.load(Path(local) / "embeddings.npy")
    index = Index(emb, meta["ids"], meta["kind"], model_id=str(meta.get("model_id") or ""))
    if model_id is not None:
        check_model(index.model_id, model_id, uri)  # the index may have been replaced meanwhile
    return index
