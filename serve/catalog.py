"""What a replica serves from: the catalog (item rows, their embeddings, BM25 and the hybrid
fusion, the sequence user tower), loaded as one object and ranked here, plus the query encoder's
loading. Every ranking is the offline one (recsys.retrieval, recsys.hybrid, recsys.sequence), so
served scores equal the evaluation's and the batch job's."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import numpy as np

from serve.schemas import AppArgs

log = logging.getLogger(__name__)


class ModelMismatch(RuntimeError):
    """A query vector from one model met catalog embeddings from another: while a swap is under
    way (the encoder and a separate Retriever switch separately), the ingress retries. Models are
    told apart by identity (a hash of the weights, recsys.encoder.model_identity), never by path:
    a retrained model exported to the same path is another model."""


def storage_cfg(a: AppArgs) -> Any:
    from recsys.config import StorageConfig

    # Keys empty: recsys.storage reads them from the replica's environment.
    return StorageConfig(s3_endpoint=a.s3_endpoint, s3_max_attempts=a.s3_max_attempts)


def open_encoder(a: AppArgs, model_uri: str) -> Any:
    from recsys.encoder import open_encoder as _open

    # A remote model's downloaded copy is deleted once loaded: swaps do not fill the disk. The
    # backend (torch, onnx, onnx-int8) runs the same weights; the identity stays theirs.
    return _open(model_uri, storage_cfg(a), backend=a.encoder_backend)


def model_id_at(a: AppArgs, uri: str, expected: str) -> str:
    """The identity of the model now at `uri` (an export's small recsys_model.json is read);
    refuses one other than `expected` (the user_config's model_id, when set): a replica starting
    or restarting after the export at that path was replaced must not serve it beside
    deployments still holding the deployed one."""
    from recsys.encoder import model_id_at as _model_id_at

    found = _model_id_at(uri, storage_cfg(a))
    if expected and found != expected:
        raise ValueError(
            f"the model at {uri} is {found}, but this deployment was deployed with model {expected}: "
            "it was re-exported since; deploy again (python -m jobs.deploy / serve.control.swap) to serve it"
        )
    return found


@dataclasses.dataclass
class Catalog:
    """Everything ranking reads, swapped as one object: a request that took it ranks wholly
    against one catalog and one model, even while a swap loads the next."""

    model_uri: str
    model_id: str  # the identity of the model that made `emb`
    ids: list[str]
    index: dict[str, int]
    meta: list[dict[str, Any]]
    texts: list[str]
    fields: Any  # recsys.retrieval.FilterFields: what the filters read
    emb: np.ndarray  # (n_items, dim), L2-normalised, from model_id
    ann: Any  # recsys.index.Index over `emb`, in catalog order: exact, or IVF for large catalogs
    # recsys.sequence.SequenceCatalog over `emb` when model_id has a sequence user tower, else None.
    sequence: Any = None
    lexical: Any = None  # recsys.bm25.BM25Index over `texts`: lexical and hybrid search
    fusion: Any = None  # recsys.hybrid.Fusion: how hybrid search fuses the two
    source: tuple[str, str, str] = ("", "", "")  # (model_uri, items_uri, index_uri) it was loaded from

    def unknown(self, item_ids: list[str]) -> list[str]:
        return [i for i in item_ids if i not in self.index]

    def of_model(self, model_id: str) -> Catalog:
        if model_id != self.model_id:
            raise ModelMismatch(f"query vector from model {model_id}, catalog embedded by model {self.model_id}")
        return self

    def _rows(self, top: np.ndarray, scores: np.ndarray) -> list[dict[str, Any]]:
        return [{**self.meta[i], "score": float(s)} for i, s in zip(top, scores, strict=True)]

    def _keep(self, filters: dict[str, Any] | None, exclude: list[str] | None = None) -> np.ndarray | None:
        """(n_items,) bool: passes the filters and is not excluded; None = every item."""
        from recsys import retrieval

        excluded = [self.index[i] for i in exclude or [] if i in self.index]
        if not excluded and not any(v is not None and v != "" for v in (filters or {}).values()):
            return None
        keep = retrieval.filter_mask(self.fields, filters)
        keep[excluded] = False
        return keep

    def search(self, q: np.ndarray, k: int, filters: dict[str, Any] | None, exclude: list[str] | None, model_id: str) -> list[dict[str, Any]]:
        """The top-k items for a query (or text-path user) vector `q` (dim,) of model `model_id`:
        through the catalog index, so exact below its threshold (then the batch job's ranking,
        recsys.retrieval.top_k) and IVF above it."""
        self.of_model(model_id)
        return self._rows(*self.ann.search_one(q, k, self._keep(filters, exclude)))

    def search_hybrid(self, q: np.ndarray, text: str, k: int, filters: dict[str, Any] | None, model_id: str) -> list[dict[str, Any]]:
        """Dense and BM25 scores fused (recsys.hybrid, as the `hybrid` evaluation system); `score`
        is the fused score, `dense_score` and `lexical_score` the two it came from."""
        from recsys import hybrid

        self.of_model(model_id)
        keep = self._keep(filters)
        allowed = np.ones(len(self.ids), dtype=bool) if keep is None else keep
        n = hybrid.depth(self.fusion, k)
        d_top, _ = self.ann.search_one(q, n, keep)  # the dense list from the index, as /search dense
        lexical = self.lexical.scores(text)  # (n_items,)
        cands = hybrid.candidates_from_top(d_top, lambda rows: self.emb[rows] @ q, lexical, allowed, n)
        top, scores = hybrid.top_k(cands, self.fusion, k)
        dense = self.emb[top] @ q  # (k,)
        return [{**self.meta[i], "score": float(s), "dense_score": float(d), "lexical_score": float(lexical[i])}
                for i, s, d in zip(top, scores, dense, strict=True)]

    def search_lexical(self, text: str, k: int, filters: dict[str, Any] | None) -> list[dict[str, Any]]:
        """BM25 alone: only items sharing a token with the query come back."""
        from recsys import retrieval

        lexical = self.lexical.scores(text)  # (n_items,)
        keep = retrieval.filter_mask(self.fields, filters) & (lexical > 0)
        return self._rows(*retrieval.top_k(lexical, keep, k))

    def recommend(self, history: list[str], k: int, filters: dict[str, Any] | None, exclude: list[str] | None) -> dict[str, Any]:
        """A user's top-k from their history item ids (newest first), by the sequence tower when
        the catalog's model has one: {"model_id", "known", "answer"} with `answer` shaped as
        `search`'s. Otherwise (the text path) {"model_id", "known", "texts"}: the history item
        texts for the encoder, whose vector then goes to `search`. `known` = 0: no history item
        is in the catalog, nothing else is set."""
        from recsys import retrieval

        def answer(rows: list[int]) -> list[dict[str, Any]]:
            # The same ranking as the batch job's (recsys.sequence.SequenceCatalog.rank).
            excluded = [self.index[i] for i in exclude or [] if i in self.index]
            return self._rows(*self.sequence.rank([rows], k, retrieval.filter_mask(self.fields, filters), [excluded])[0])

        return self._for_user(history, answer)

    def score_user(self, history: list[str], item_ids: list[str]) -> dict[str, Any]:
        """A user's scores for `item_ids`, as `recommend` answers (the text path: `score`)."""
        return self._for_user(history, lambda rows: [float(s) for s in self.sequence.score(rows, [self.index[i] for i in item_ids])])

    def _for_user(self, history: list[str], answer: Any) -> dict[str, Any]:
        known = [i for i in history if i in self.index]
        out: dict[str, Any] = {"model_id": self.model_id, "known": len(known)}
        if not known:
            return out
        if self.sequence is None:
            return {**out, "texts": [self.texts[self.index[i]] for i in known]}
        return {**out, "answer": answer([self.index[i] for i in known])}

    def score(self, q: np.ndarray, item_ids: list[str], model_id: str) -> list[float]:
        self.of_model(model_id)
        return [float(s) for s in self.emb[[self.index[i] for i in item_ids]] @ q]

    def size(self) -> int:
        return len(self.ids)

    def info(self) -> dict[str, Any]:
        model_uri, items_uri, index_uri = self.source
        return {
            "model_uri": model_uri, "model_id": self.model_id, "items_uri": items_uri, "index_uri": index_uri,
            "user_tower": "sequence" if self.sequence is not None else "text", "items": len(self.ids),
        }


def load_catalog(a: AppArgs, model_uri: str, items_uri: str, index_uri: str, model_id: str = "", encoder: Any = None) -> Catalog:
    """Items and their embeddings: from the saved index when given (refused unless the model at
    `model_uri`, of identity `model_id`, made it), else embedded here (by `encoder` when the
    caller has that model loaded already)."""
    from recsys import hybrid
    from recsys.bm25 import BM25Index
    from recsys.index import build_index, load_index
    from recsys.items import read_items
    from recsys.retrieval import FilterFields, align_embeddings
    from recsys.sequence import SequenceCatalog, open_sequence_tower

    table = read_items(items_uri, storage_cfg(a))
    ids: list[str] = table.column("item_id").to_pylist()
    meta = table.select([c for c in ("item_id", "title", "brand", "category", "price") if c in table.column_names]).to_pylist()
    texts: list[str] = table.column("text").to_pylist()
    t = time.perf_counter()
    if index_uri:
        model_id = model_id or model_id_at(a, model_uri, "")
        ann = load_index(index_uri, storage_cfg(a), model_id=model_id)
        saved_ids = ann.ids
        if ann.ids != ids:
            # Built over another item table (more items, or another order): the catalog's rows
            # are what is served, so an index over exactly them is built here (once per load).
            log.warning("the index at %s covers %d items in another order or set than the %d of %s: indexing the catalog's here",
                        index_uri, len(ann.ids), len(ids), items_uri)
            ann = build_index(align_embeddings(ann.ids, ann.emb, ids, index_uri), ids, ann.kind, model_id=model_id,
                              nprobe=ann.nprobe, filter_exact_max_kept=ann.filter_exact_max_kept)
        emb = ann.emb
        log.info("loaded the %s index for %d items in %.1fs", ann.kind, len(ids), time.perf_counter() - t)
        lexical = hybrid.load_lexical(index_uri, storage_cfg(a))
    else:
        encoder = encoder if encoder is not None and encoder.model_id == model_id else open_encoder(a, model_uri)
        if model_id and encoder.model_id != model_id:
            raise ValueError(f"the model at {model_uri} changed while loading ({model_id} -> {encoder.model_id}): deploy again")
        model_id = encoder.model_id
        emb = encoder.encode_items(texts)
        ann = build_index(emb, ids, model_id=model_id)
        log.info("embedded %d items with model %s in %.1fs", len(ids), model_id, time.perf_counter() - t)
        lexical = None
    if lexical is not None:
        bm25, fusion = lexical[0], lexical[1]
        if bm25.item_ids is not None and bm25.item_ids != ids:
            if bm25.item_ids != saved_ids:
                raise ValueError(f"the BM25 index at {index_uri} covers other items than its dense index: rebuild it with `python -m jobs.index`")
            # Saved over the same other item table as the dense index: rebuilt over the catalog's
            # texts like the dense index above, with the saved fusion.
            bm25 = BM25Index.build(texts, ids, bm25.analyser)
    else:
        # No BM25 saved with an index (none given, or one built before hybrid search): built here
        # from the same texts with the default analyser, fused by the parameter-free RRF (nothing
        # chose a weight).
        bm25, fusion = BM25Index.build(texts, ids), hybrid.Fusion()
        log.info("built BM25 over %d items at start-up; hybrid search fuses by %s", len(ids), fusion.describe())
    # Loaded with the catalog and swapped with it as one object: a user vector always meets item
    # vectors of its own model. Refused if the export changed from `model_id` meanwhile.
    tower = open_sequence_tower(model_uri, storage_cfg(a), model_id)
    return Catalog(
        model_uri=model_uri,
        model_id=model_id,
        ids=ids,
        index={i: n for n, i in enumerate(ids)},
        meta=meta,
        texts=texts,
        fields=FilterFields.from_rows(meta),
        emb=emb,
        ann=ann,
        sequence=SequenceCatalog(tower, emb, ids) if tower is not None else None,
        lexical=bm25,
        fusion=fusion,
        source=(model_uri, items_uri, index_uri),
    )
