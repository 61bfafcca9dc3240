"""The online service: Ray Serve deployments behind a FastAPI ingress.

    Encoder    the fine-tuned query tower; autoscaled; @serve.batch dynamic batching whose size
               and wait are tuned at run time through user_config
    Retriever  catalog embeddings + item metadata; exact top-K with filters and exclusions; the
               sequence user tower, when the model has one (recsys.sequence), with its item
               vectors computed once per catalog load
    Profiles   live per-user history, updated by /events, read by /recommend
    Ingress    HTTP API (OpenAPI at /docs), validation, auth, backpressure -> 503 + Retry-After

`app_builder(args)` builds it from typed arguments (local paths or s3:// URIs), for
`serve run serve/config.yaml`, `serve deploy` and `serve.run(app_builder({...}))` alike.
Scores are computed exactly like offline evaluation: recsys.encoder.TextEncoder for both sides
and recsys.encoder.render_user_text for users (history newest first). A model exported with a
sequence user tower (recsys_model.json `user_tower: sequence`) ranks users (/recommend, /score
without a query) by that tower over the stored catalog embeddings of their history, in the
Retriever alone: no text is encoded for them. Search and query scoring keep the text towers.
"""

# No `from __future__ import annotations` here: FastAPI resolves the request models of a
# class-based Serve ingress from real (not string) annotations.

import asyncio
import collections
import dataclasses
import logging
import os
import time
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, model_validator
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError

from recsys.config import ServeArgs

log = logging.getLogger(__name__)

MAX_K = 1000
MAX_QUERY_CHARS = 1000
MAX_ITEM_IDS = 1000
RETRY_AFTER_S = "1"
# How long a request may wait for old and new replicas to agree during a model swap.
SWAP_WAIT_S = 30.0


class AppArgs(ServeArgs):
    """The app's typed arguments: the config's serve-section fields (recsys.config.ServeArgs:
    URIs, auth, batching, replicas and their resources; unknown keys rejected) plus what only
    the app takes."""

    batching: bool = True
    max_history: int = Field(50, ge=1)
    # Name of the detached actor holding live profiles; apps sharing it share users' profiles.
    profile_store: str = Field("recsys-profiles", min_length=1, max_length=200)
    s3_endpoint: str = ""
    s3_access_key: str = ""
    s3_secret_key: str = ""


def _storage_cfg(args: AppArgs) -> Any:
    from recsys.config import StorageConfig

    return StorageConfig(s3_endpoint=args.s3_endpoint, s3_access_key=args.s3_access_key, s3_secret_key=args.s3_secret_key)


def _open_encoder(args: AppArgs, model_uri: str) -> Any:
    from recsys.encoder import open_encoder

    # A remote model's downloaded copy is deleted once loaded: swaps do not fill the disk.
    return open_encoder(model_uri, _storage_cfg(args))


# What a new checkpoint or catalog changes. They reach the replicas through user_config and are
# loaded in `reconfigure`, off the event loop, beside the current model. Serve gives an app a new
# code version (and replaces every replica, stop-then-start with one replica) whenever it is
# deployed through `serve.run` or with changed args; only a declarative deploy whose args are
# unchanged updates user_config in place. `app_config` / `deploy` / `swap` use that path.
SWAPPABLE = ("model_uri", "items_uri", "index_uri")


class ModelMismatch(RuntimeError):
    """A query vector from one model met catalog embeddings from another: while a swap is under
    way (the Encoder and the Retriever switch separately), the ingress retries. Models are told
    apart by identity (a hash of the weights, recsys.encoder.model_identity), never by path: a
    retrained model exported to the same path is another model."""


def _model_id_at(a: "AppArgs", uri: str, expected: str) -> str:
    """The identity of the model now at `uri` (an export's small recsys_model.json is read);
    refuses one other than `expected` (the user_config's model_id, when set): a replica starting
    or restarting after the export at that path was replaced must not serve it beside
    deployments still holding the deployed one."""
    from recsys.encoder import model_id_at

    found = model_id_at(uri, _storage_cfg(a))
    if expected and found != expected:
        raise ValueError(
            f"the model at {uri} is {found}, but this deployment was deployed with model {expected}: "
            "it was re-exported since; deploy again (python -m jobs.deploy / serve.app.swap) to serve it"
        )
    return found


@serve.deployment
class Encoder:
    def __init__(self, args: dict[str, Any]) -> None:
        self.args = AppArgs(**args)
        self.batching = self.args.batching
        self.encoder: Any = None
        self.model_uri = ""
        self.model_id = ""

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        if "max_batch_size" in user_config:
            self.encode_batched.set_max_batch_size(int(user_config["max_batch_size"]))
        if "batch_wait_timeout_s" in user_config:
            self.encode_batched.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))
        if "batching" in user_config:
            self.batching = bool(user_config["batching"])
        uri = user_config.get("model_uri") or ""
        if not uri:
            return
        # The identity at the URI, not the URI, decides: the same path may hold new weights.
        model_id = await asyncio.to_thread(_model_id_at, self.args, uri, user_config.get("model_id") or "")
        if (uri, model_id) != (self.model_uri, self.model_id):
            t = time.perf_counter()
            # Loaded off the event loop: requests keep being served by the current model meanwhile.
            encoder = await asyncio.to_thread(_open_encoder, self.args, uri)
            if encoder.model_id != model_id:
                raise ValueError(f"the model at {uri} changed while loading ({model_id} -> {encoder.model_id}): deploy again")
            self.encoder, self.model_uri, self.model_id = encoder, uri, encoder.model_id
            log.info("encoder now serves model %s from %s (loaded in %.1fs)", model_id, uri, time.perf_counter() - t)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def encode_batched(self, texts: list[str]) -> list[tuple[np.ndarray, str]]:
        encoder = self.encoder  # one model for the whole batch, even mid-swap
        return [(v, encoder.model_id) for v in encoder.encode_queries(texts, batch_size=len(texts))]

    async def encode_query(self, text: str) -> tuple[np.ndarray, str]:
        """The query vector and the identity of the model that made it (the Retriever checks it
        against its catalog's)."""
        if self.batching:
            return await self.encode_batched(text)
        encoder = self.encoder
        return encoder.encode_queries([text])[0], encoder.model_id

    async def encode_user(self, history_texts: list[str]) -> tuple[np.ndarray, str]:
        """A user from their history item texts (newest first), rendered as this model expects."""
        from recsys.encoder import render_user_text

        return await self.encode_query(render_user_text(None, history_texts, self.encoder.user_history_items))

    def info(self) -> dict[str, Any]:
        return {"model_uri": self.model_uri, "model_id": self.model_id, "user_history_items": self.encoder.user_history_items, "dim": self.encoder.dim}


@dataclasses.dataclass
class Catalog:
    """Everything the Retriever serves from, swapped as one object."""

    model_uri: str
    model_id: str  # the identity of the model that made `emb`
    ids: list[str]
    index: dict[str, int]
    meta: list[dict[str, Any]]
    texts: list[str]
    fields: Any  # recsys.retrieval.FilterFields: what the filters read
    emb: np.ndarray  # (n_items, dim), L2-normalised, from model_id
    # recsys.sequence.SequenceCatalog over `emb` when model_id has a sequence user tower, else None.
    sequence: Any = None
    lexical: Any = None  # recsys.bm25.BM25Index over `texts`: lexical and hybrid search
    fusion: Any = None  # recsys.hybrid.Fusion: how hybrid search fuses the two


def load_catalog(a: AppArgs, model_uri: str, items_uri: str, index_uri: str, model_id: str = "") -> Catalog:
    """Items and their embeddings: from the saved index when given (refused unless the model at
    `model_uri`, of identity `model_id`, made it), else embedded here."""
    import pyarrow.parquet as pq

    from recsys import hybrid, storage
    from recsys.bm25 import BM25Index
    from recsys.retrieval import FilterFields, align_embeddings
    from recsys.sequence import SequenceCatalog, open_sequence_tower

    fs, path = storage.filesystem(items_uri, _storage_cfg(a))
    table = pq.read_table(path, filesystem=fs)
    ids: list[str] = table.column("item_id").to_pylist()
    meta = table.select([c for c in ("item_id", "title", "brand", "category", "price") if c in table.column_names]).to_pylist()
    texts: list[str] = table.column("text").to_pylist()
    t = time.perf_counter()
    if index_uri:
        from recsys.index import load_index

        model_id = model_id or _model_id_at(a, model_uri, "")
        idx = load_index(index_uri, _storage_cfg(a), model_id=model_id)
        emb = align_embeddings(idx.ids, idx.emb, ids, index_uri)
        log.info("loaded the index for %d items in %.1fs", len(ids), time.perf_counter() - t)
        lexical = hybrid.load_lexical(index_uri, _storage_cfg(a))
    else:
        encoder = _open_encoder(a, model_uri)
        if model_id and encoder.model_id != model_id:
            raise ValueError(f"the model at {model_uri} changed while loading ({model_id} -> {encoder.model_id}): deploy again")
        model_id = encoder.model_id
        emb = encoder.encode_items(texts)
        log.info("embedded %d items with model %s in %.1fs", len(ids), model_id, time.perf_counter() - t)
        lexical = None
    if lexical is not None:
        bm25, fusion = lexical[0], lexical[1]
        if bm25.item_ids is not None and bm25.item_ids != ids:
            raise ValueError(f"the BM25 index at {index_uri} covers other items than {items_uri}: rebuild it with `python -m jobs.index`")
    else:
        # No BM25 saved with an index (none given, or one built before hybrid search): built here
        # from the same texts, fused by the parameter-free RRF (nothing chose a weight).
        bm25, fusion = BM25Index.build(texts, ids), hybrid.Fusion()
        log.info("built BM25 over %d items at start-up; hybrid search fuses by %s", len(ids), fusion.describe())
    # Loaded with the catalog and swapped with it as one object: a user vector always meets item
    # vectors of its own model. Refused if the export changed from `model_id` meanwhile.
    tower = open_sequence_tower(model_uri, _storage_cfg(a), model_id)
    return Catalog(
        model_uri=model_uri,
        model_id=model_id,
        ids=ids,
        index={i: n for n, i in enumerate(ids)},
        meta=meta,
        texts=texts,
        fields=FilterFields.from_rows(meta),
        emb=emb,
        sequence=SequenceCatalog(tower, emb, ids) if tower is not None else None,
        lexical=bm25,
        fusion=fusion,
    )


@serve.deployment
class Retriever:
    def __init__(self, args: dict[str, Any]) -> None:
        self.args = AppArgs(**args)
        self.catalog: Catalog | None = None
        self.source: tuple[str, str, str] | None = None

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        source = (user_config.get("model_uri") or "", user_config.get("items_uri") or "", user_config.get("index_uri") or "")
        # The identity at the model URI, not the URI, decides (the same path may hold new weights).
        model_id = await asyncio.to_thread(_model_id_at, self.args, source[0], user_config.get("model_id") or "") if source[0] else ""
        if self.catalog is None or source != self.source or model_id != self.catalog.model_id:
            catalog = await asyncio.to_thread(load_catalog, self.args, *source, model_id)
            self.catalog, self.source = catalog, source

    def unknown(self, item_ids: list[str]) -> list[str]:
        c = self.catalog
        return [i for i in item_ids if i not in c.index]

    def search(
        self, q: np.ndarray, k: int, filters: dict[str, Any] | None, exclude: list[str] | None, model_id: str
    ) -> list[dict[str, Any]]:
        from recsys import retrieval

        c = self._catalog_of(model_id)
        # The same ranking as the batch job (recsys.recommend): one implementation of both.
        excluded = [c.index[i] for i in exclude or [] if i in c.index]
        top, scores = retrieval.search(c.emb, q[None], k, retrieval.filter_mask(c.fields, filters), [excluded])[0]
        return [{**c.meta[i], "score": float(s)} for i, s in zip(top, scores, strict=True)]

    def search_hybrid(self, q: np.ndarray, text: str, k: int, filters: dict[str, Any] | None, model_id: str) -> list[dict[str, Any]]:
        """Dense and BM25 scores fused (recsys.hybrid, as the `hybrid` evaluation system); `score`
        is the fused score, `dense_score` and `lexical_score` the two it came from."""
        from recsys import hybrid, retrieval

        c = self._catalog_of(model_id)
        dense = c.emb @ q  # (n_items,)
        lexical = c.lexical.scores(text)  # (n_items,)
        top, scores = hybrid.fuse(dense, lexical, retrieval.filter_mask(c.fields, filters), k, c.fusion)
        return [{**c.meta[i], "score": float(s), "dense_score": float(dense[i]), "lexical_score": float(lexical[i])}
                for i, s in zip(top, scores, strict=True)]

    def search_lexical(self, text: str, k: int, filters: dict[str, Any] | None) -> list[dict[str, Any]]:
        """BM25 alone: only items sharing a token with the query come back."""
        from recsys import retrieval

        c = self.catalog
        lexical = c.lexical.scores(text)  # (n_items,)
        keep = retrieval.filter_mask(c.fields, filters) & (lexical > 0)
        top, scores = retrieval.top_k(lexical, keep, k)
        return [{**c.meta[i], "score": float(s)} for i, s in zip(top, scores, strict=True)]

    def recommend(self, history: list[str], k: int, filters: dict[str, Any] | None, exclude: list[str] | None) -> dict[str, Any]:
        """A user's top-k from their history item ids (newest first), by the sequence tower when
        the catalog's model has one: {"model_id", "known", "answer"} with `answer` shaped as
        `search`'s. Otherwise (the text path) {"model_id", "known", "texts"}: the history item
        texts for the Encoder, whose vector then goes to `search`. `known` = 0: no history item
        is in the catalog, nothing else is set."""
        from recsys import retrieval

        def answer(c: Catalog, rows: list[int]) -> list[dict[str, Any]]:
            # The same ranking as the batch job's (recsys.sequence.SequenceCatalog.rank).
            excluded = [c.index[i] for i in exclude or [] if i in c.index]
            top, scores = c.sequence.rank([rows], k, retrieval.filter_mask(c.fields, filters), [excluded])[0]
            return [{**c.meta[i], "score": float(s)} for i, s in zip(top, scores, strict=True)]

        return self._for_user(history, answer)

    def score_user(self, history: list[str], item_ids: list[str]) -> dict[str, Any]:
        """A user's scores for `item_ids`, as `recommend` answers (the text path: `score`)."""
        return self._for_user(history, lambda c, rows: [float(s) for s in c.sequence.score(rows, [c.index[i] for i in item_ids])])

    def _for_user(self, history: list[str], answer: Any) -> dict[str, Any]:
        c = self.catalog  # one catalog for the whole answer, even mid-swap
        known = [i for i in history if i in c.index]
        out: dict[str, Any] = {"model_id": c.model_id, "known": len(known)}
        if not known:
            return out
        if c.sequence is None:
            return {**out, "texts": [c.texts[c.index[i]] for i in known]}
        return {**out, "answer": answer(c, [c.index[i] for i in known])}

    def score(self, q: np.ndarray, item_ids: list[str], model_id: str) -> list[float]:
        c = self._catalog_of(model_id)
        rows = [c.index[i] for i in item_ids]
        return [float(s) for s in c.emb[rows] @ q]

    def _catalog_of(self, model_id: str) -> Catalog:
        c = self.catalog
        if model_id != c.model_id:
            raise ModelMismatch(f"query vector from model {model_id}, catalog embedded by model {c.model_id}")
        return c

    def size(self) -> int:
        return len(self.catalog.ids)

    def info(self) -> dict[str, Any]:
        model_uri, items_uri, index_uri = self.source or ("", "", "")
        model_id = self.catalog.model_id if self.catalog else ""
        tower = ("sequence" if self.catalog.sequence is not None else "text") if self.catalog else ""
        return {"model_uri": model_uri, "model_id": model_id, "items_uri": items_uri, "index_uri": index_uri, "user_tower": tower}


class ProfileStore:
    """Live user profiles: recent engaged items (newest first) and purchases, bounded per user.

    A named detached actor rather than deployment state, so profiles outlive a redeploy or a
    restarted replica. One actor holds them all: enough for one node's
    traffic; a shop at scale would put a key-value store (Redis, DynamoDB) behind the same calls.
    """

    def __init__(self, max_history: int = 50) -> None:
        self.max_history = max_history
        self.history: dict[str, collections.deque[str]] = {}
        self.purchased: dict[str, set[str]] = collections.defaultdict(set)

    def add(self, user_id: str, events: list[dict[str, Any]]) -> int:
        hist = self.history.setdefault(user_id, collections.deque(maxlen=self.max_history))
        for e in sorted(events, key=lambda e: e.get("timestamp") or 0):
            if e["event_type"] != "view":  # views are impressions, not interest
                if e["item_id"] in hist:
                    hist.remove(e["item_id"])
                hist.appendleft(e["item_id"])
            if e["event_type"] == "purchase":
                self.purchased[user_id].add(e["item_id"])
        return len(hist)

    def get(self, user_id: str) -> dict[str, Any]:
        return {"history": list(self.history.get(user_id, [])), "purchased": sorted(self.purchased.get(user_id, set()))}


@serve.deployment
class Profiles:
    """The profile API with Serve's queue limits in front of the shared ProfileStore actor."""

    def __init__(self, max_history: int = 50, store_name: str = "recsys-profiles") -> None:
        import ray

        self.store = (
            ray.remote(ProfileStore)
            .options(name=store_name, namespace="recsys", lifetime="detached", get_if_exists=True, num_cpus=0)
            .remote(max_history)
        )

    async def add(self, user_id: str, events: list[dict[str, Any]]) -> int:
        return await self.store.add.remote(user_id, events)

    async def get(self, user_id: str) -> dict[str, Any]:
        return await self.store.get.remote(user_id)


class Filters(BaseModel):
    category: str | None = Field(None, max_length=500, description="prefix of the category path")
    brand: str | None = Field(None, max_length=200)
    min_price: float | None = Field(None, ge=0)
    max_price: float | None = Field(None, ge=0)


class SearchRequest(BaseModel):
    query: str = Field(min_length=1, max_length=MAX_QUERY_CHARS)
    k: int = Field(10, ge=1, le=MAX_K)
    filters: Filters | None = None
    # dense (the towers), lexical (BM25) or hybrid (both fused); None = the app's `search_mode`.
    mode: Literal["dense", "lexical", "hybrid"] | None = None

    @model_validator(mode="after")
    def _not_blank(self) -> "SearchRequest":
        if not self.query.strip():
            raise ValueError("query is empty")
        return self


class Event(BaseModel):
    item_id: str = Field(min_length=1, max_length=200)
    event_type: Literal["view", "click", "add_to_cart", "purchase"]
    timestamp: float | None = None


class RecommendRequest(BaseModel):
    user_id: str | None = Field(None, max_length=200)
    recent_item_ids: list[str] = Field(default_factory=list, max_length=MAX_ITEM_IDS, description="oldest first")
    k: int = Field(10, ge=1, le=MAX_K)
    include_purchased: bool = False
    filters: Filters | None = None

    @model_validator(mode="after")
    def _someone(self) -> "RecommendRequest":
        if not self.user_id and not self.recent_item_ids:
            raise ValueError("give user_id and/or recent_item_ids")
        return self


class ScoreRequest(BaseModel):
    query: str | None = Field(None, max_length=MAX_QUERY_CHARS)
    user_id: str | None = Field(None, max_length=200)
    recent_item_ids: list[str] = Field(default_factory=list, max_length=MAX_ITEM_IDS)
    item_ids: list[str] = Field(min_length=1, max_length=MAX_ITEM_IDS)

    @model_validator(mode="after")
    def _something(self) -> "ScoreRequest":
        if not (self.query and self.query.strip()) and not self.user_id and not self.recent_item_ids:
            raise ValueError("give a query, a user_id or recent_item_ids")
        return self


class EventsRequest(BaseModel):
    user_id: str = Field(min_length=1, max_length=200)
    events: list[Event] = Field(min_length=1, max_length=MAX_ITEM_IDS)


api = FastAPI(title="recsys", description="Search, recommendation and scoring from a fine-tuned two-tower model.")


@api.exception_handler(RequestValidationError)
async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    problems = [f"{'.'.join(str(p) for p in e.get('loc', []))}: {e.get('msg')}" for e in exc.errors()]
    return JSONResponse(status_code=422, content={"error": "invalid request", "problems": problems})


class HTTPProblem(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self.status, self.message, self.headers = status, message, headers or {}


@api.exception_handler(HTTPProblem)
async def _problem(_: Request, exc: HTTPProblem) -> JSONResponse:
    return JSONResponse(status_code=exc.status, content={"error": exc.message}, headers=exc.headers)


@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(self, encoder: Any, retriever: Any, profiles: Any, args: dict[str, Any]) -> None:
        self.encoder, self.retriever, self.profiles = encoder, retriever, profiles
        a = AppArgs(**args)
        self.search_mode = a.search_mode
        self.token = a.auth_token or (os.environ.get(a.auth_token_env, "") if a.auth_token_env else "")
        if a.auth_token_env and not self.token:
            raise ValueError(f"auth_token_env={a.auth_token_env!r} names an unset or empty environment variable")

    async def _call(self, method: Any, *a: Any) -> Any:
        lost = 0
        while True:
            try:
                return await method.remote(*a)
            except BackPressureError as e:
                raise HTTPProblem(503, f"overloaded, retry later ({e})", {"Retry-After": RETRY_AFTER_S}) from None
            except RayActorError as e:
                # A replica that died or was stopped mid-call (a rollout, a lost node): the
                # handle routes the retry to a live one. Our calls are reads or idempotent
                # profile updates, so trying again is safe.
                lost += 1
                log.warning("replica lost mid-call (attempt %d): %s", lost, e)
                if lost >= 3:
                    raise HTTPProblem(503, "replicas were lost, retry shortly", {"Retry-After": RETRY_AFTER_S}) from None
                await asyncio.sleep(0.2)

    async def _retrieve(self, encode: Any, what: Any, method: Any, *a: Any) -> Any:
        """Encode `what` (a query, or a user's history texts), then call a Retriever method with
        the vector: both from the same model.

        During a checkpoint swap the Encoder and the Retriever switch models separately; a
        mismatch is retried (re-encoding: the encoder may be the stale side) instead of failing."""
        deadline = time.monotonic() + SWAP_WAIT_S
        while True:
            q, model_id = await self._call(encode, what)
            try:
                return await self._call(method, q, *a, model_id)
            except ModelMismatch:
                if time.monotonic() > deadline:
                    raise HTTPProblem(503, "a new model is rolling out, retry shortly", {"Retry-After": RETRY_AFTER_S}) from None
                await asyncio.sleep(0.1)

    async def _for_user(self, history: list[str], none_known: str, method: Any, text_method: Any, *a: Any) -> Any:
        """A user's answer from their history item ids (newest first): from the Retriever alone
        (`method`) when its model has a sequence user tower; else the text path, the Encoder's
        vector of the history texts the Retriever returned, then `text_method`, all three from one
        model. During a swap the sides switch models separately: a mismatch starts over from the
        Retriever, so a swap to or from a model with a sequence tower also switches the path."""
        deadline = time.monotonic() + SWAP_WAIT_S
        while True:
            r = await self._call(method, history, *a)
            if not r["known"]:
                raise HTTPProblem(404, none_known)
            if "answer" in r:
                return r["answer"]
            q, model_id = await self._call(self.encoder.encode_user, r["texts"])
            if model_id == r["model_id"]:
                try:
                    return await self._call(text_method, q, *a, model_id)
                except ModelMismatch:
                    pass
            if time.monotonic() > deadline:
                raise HTTPProblem(503, "a new model is rolling out, retry shortly", {"Retry-After": RETRY_AFTER_S})
            await asyncio.sleep(0.1)

    def _auth(self, request: Request) -> None:
        if self.token and request.headers.get("authorization") != f"Bearer {self.token}":
            raise HTTPProblem(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})

    async def _user_history(self, user_id: str | None, recent: list[str]) -> tuple[list[str], list[str]]:
        """The user's history item ids, newest first (recent ids, then the live profile), and purchases."""
        profile = await self._call(self.profiles.get, user_id) if user_id else {"history": [], "purchased": []}
        history = list(reversed(recent)) + [i for i in profile["history"] if i not in recent]  # newest first
        return history, profile["purchased"]

    async def _check_known(self, ids: list[str]) -> None:
        if not ids:  # nothing to check: no call
            return
        unknown = await self._call(self.retriever.unknown, ids)
        if unknown:
            raise HTTPProblem(404, f"unknown item ids: {unknown[:20]}")

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self) -> JSONResponse:
        try:
            n = await asyncio.wait_for(self.retriever.size.remote(), timeout=5)
            info = await asyncio.wait_for(self.encoder.info.remote(), timeout=5)
        except Exception as e:  # noqa: BLE001 - not ready for any reason is "not ready"
            return JSONResponse(status_code=503, content={"status": "not ready", "error": str(e)[:200]}, headers={"Retry-After": RETRY_AFTER_S})
        return JSONResponse(content={"status": "ready", "items": n, "model": info["model_uri"], "model_id": info["model_id"]})

    @api.post("/search")
    async def search(self, body: SearchRequest, request: Request) -> dict[str, Any]:
        self._auth(request)
        filters = body.filters.model_dump() if body.filters else None
        text, mode = body.query.strip(), body.mode or self.search_mode
        if mode == "lexical":
            items = await self._call(self.retriever.search_lexical, text, body.k, filters)
        elif mode == "hybrid":
            items = await self._retrieve(self.encoder.encode_query, text, self.retriever.search_hybrid, text, body.k, filters)
        else:
            items = await self._retrieve(self.encoder.encode_query, text, self.retriever.search, body.k, filters, None)
        return {"items": items, "mode": mode}

    @api.post("/recommend")
    async def recommend(self, body: RecommendRequest, request: Request) -> dict[str, Any]:
        self._auth(request)
        await self._check_known(body.recent_item_ids)
        history, purchased = await self._user_history(body.user_id, body.recent_item_ids)
        exclude = None if body.include_purchased else purchased
        filters = body.filters.model_dump() if body.filters else None
        none_known = f"user {body.user_id!r} has no history yet; send /events or recent_item_ids"
        return {"items": await self._for_user(history, none_known, self.retriever.recommend, self.retriever.search, body.k, filters, exclude)}

    @api.post("/score")
    async def score(self, body: ScoreRequest, request: Request) -> dict[str, Any]:
        self._auth(request)
        await self._check_known(body.item_ids + body.recent_item_ids)
        if body.query and body.query.strip():
            return {"scores": await self._retrieve(self.encoder.encode_query, body.query.strip(), self.retriever.score, body.item_ids)}
        history, _ = await self._user_history(body.user_id, body.recent_item_ids)
        none_known = f"user {body.user_id!r} has no history yet"
        return {"scores": await self._for_user(history, none_known, self.retriever.score_user, self.retriever.score, body.item_ids)}

    @api.post("/events")
    async def events(self, body: EventsRequest, request: Request) -> dict[str, Any]:
        self._auth(request)
        await self._check_known([e.item_id for e in body.events])
        n = await self._call(self.profiles.add, body.user_id, [e.model_dump() for e in body.events])
        return {"user_id": body.user_id, "history_length": n}


def _user_configs(a: AppArgs, model_id: str = "") -> dict[str, dict[str, Any]]:
    """The model deployments' user_config. `model_id` (the identity of the model at model_uri
    when deployed) makes a redeploy of the same path with new weights a changed user_config, so
    Serve reconfigures the replicas, and lets a restarted replica refuse weights re-exported
    there since."""
    raw = a.model_dump()
    ident = {"model_id": model_id} if model_id else {}
    return {
        "Encoder": {
            "max_batch_size": a.max_batch_size, "batch_wait_timeout_s": a.batch_wait_timeout_s, "batching": a.batching,
            "model_uri": a.model_uri, **ident,
        },
        "Retriever": {**{k: raw[k] for k in SWAPPABLE}, **ident},
    }


def app_builder(args: dict[str, Any]) -> Any:
    """Build the application from typed args (validated here, so a bad config fails fast)."""
    a = AppArgs(**args)
    raw = a.model_dump()
    static = {**raw, **{k: "" for k in SWAPPABLE}}  # identical across checkpoints: no replica restarts
    user_configs = _user_configs(a)
    limits = {"max_ongoing_requests": a.max_ongoing_requests, "max_queued_requests": a.max_queued_requests}
    encoder = Encoder.options(
        autoscaling_config={
            "min_replicas": a.min_replicas,
            "max_replicas": a.max_replicas,
            "target_ongoing_requests": max(1, a.max_batch_size),
            "upscale_delay_s": 5,
            "downscale_delay_s": 60,
        },
        user_config=user_configs["Encoder"],
        ray_actor_options={"num_cpus": a.replica_cpus, "num_gpus": a.encoder_gpus, "resources": a.encoder_resources},
        **limits,
    ).bind(static)
    retriever = Retriever.options(ray_actor_options={"num_cpus": a.replica_cpus}, user_config=user_configs["Retriever"], **limits).bind(static)
    profiles = Profiles.options(ray_actor_options={"num_cpus": 0.1}, **limits).bind(a.max_history, a.profile_store)
    # The ingress only awaits the others and they fail fast when full, so it admits more requests
    # than they do and queues without its own cap: overload then always surfaces as a
    # BackPressureError from a model deployment, answered with 503 + Retry-After (the proxy's own
    # 503 for a full ingress queue carries no Retry-After).
    ingress_limits = {"max_ongoing_requests": 4 * a.max_ongoing_requests, "max_queued_requests": -1}
    return Ingress.options(ray_actor_options={"num_cpus": 0.1}, **ingress_limits).bind(encoder, retriever, profiles, static)


def app_args(cfg: Any) -> dict[str, Any]:
    """AppArgs for a run's artefacts from a recsys Config (its `serve` section fills the rest)."""
    from recsys import paths, storage
    from recsys.encoder import model_id_at
    from recsys.index import INDEX_META, check_model, index_model_id

    s = cfg.serve
    model_uri = s.model_uri or paths.export_dir(cfg)
    model_id = model_id_at(model_uri, cfg.storage)
    index = s.index_uri
    if index:
        check_model(index_model_id(index, cfg.storage), model_id, index)
    elif storage.exists(storage.join(paths.index_dir(cfg), INDEX_META), cfg.storage):
        # The run's index is used only if this model built it: a stale one (an earlier training
        # at the same path, or another model) is an error, not a silently wrong catalog.
        index = paths.index_dir(cfg)
        check_model(index_model_id(index, cfg.storage), model_id, index)
    else:
        log.info("no index at %s: the Retriever embeds the catalog with model %s at start-up", paths.index_dir(cfg), model_id)
    args = {
        "model_uri": model_uri,
        "items_uri": s.items_uri or paths.items(cfg),
        "index_uri": index,
        "auth_token": s.auth_token,
        "auth_token_env": s.auth_token_env,
        "max_batch_size": s.max_batch_size,
        "batch_wait_timeout_s": s.batch_wait_timeout_s,
        "max_ongoing_requests": s.max_ongoing_requests,
        "max_queued_requests": s.max_queued_requests,
        "min_replicas": s.min_replicas,
        "max_replicas": s.max_replicas,
        "replica_cpus": s.replica_cpus,
        "encoder_gpus": s.encoder_gpus,
        "encoder_resources": s.encoder_resources,
        "search_mode": s.search_mode,
        # Keys stay empty unless the config names them: replicas then read the environment.
        "s3_endpoint": cfg.storage.s3_endpoint,
        "s3_access_key": cfg.storage.s3_access_key,
        "s3_secret_key": cfg.storage.s3_secret_key,
    }
    AppArgs(**args)  # fail here, in the job, on a bad value rather than in a replica
    return args


def app_config(args: dict[str, Any], name: str = "recsys", route_prefix: str = "/", model_id: str = "") -> dict[str, Any]:
    """The app as a declarative Serve application config (the schema `serve deploy` takes).

    The swappable URIs ride only in the model deployments' user_config and the args hold the
    rest, so the app's code version (a hash of import path, runtime env and args) is the same for
    every checkpoint: deploying this again with another model is an in-place reconfigure of the
    running replicas, which keep serving the old model until the new one has loaded. `model_id`
    (the identity of the model at model_uri; `deploy_args` fills it) goes into both user_configs:
    without it, a model retrained to the same path is not seen as a change."""
    a = AppArgs(**args)
    if not a.model_uri or not a.items_uri:
        raise ValueError("app_config needs model_uri and items_uri")
    static = {**a.model_dump(), **{k: "" for k in SWAPPABLE}}
    out: dict[str, Any] = {
        "name": name,
        "route_prefix": route_prefix,
        "import_path": "serve.app:app_builder",
        "args": static,
        "deployments": [{"name": n, "user_config": uc} for n, uc in _user_configs(a, model_id).items()],
    }
    import ray

    # A submitted job's working dir / env must reach the replicas the controller builds.
    current = dict(ray.get_runtime_context().runtime_env or {}) if ray.is_initialized() else {}
    env = {k: v for k, v in current.items() if k in ("working_dir", "py_modules", "env_vars", "pip")}
    if env:
        out["runtime_env"] = env
    return out


def check_app_config(app: dict[str, Any]) -> dict[str, str]:
    """Validate a declarative app config (serve/config.yaml, the RayService, `app_config`'s
    output) and return the model and catalog it serves. The URIs may sit in args (a change is a
    full redeploy) or in the Encoder's and Retriever's user_config (a change is an in-place swap);
    in the latter form both must name the same model, or no query would ever match the catalog."""
    a = AppArgs(**app.get("args", {}))
    ucs = {d["name"]: d.get("user_config") for d in app.get("deployments", []) if d.get("user_config") is not None}
    enc, ret = ucs.get("Encoder"), ucs.get("Retriever")
    if (enc is None) != (ret is None):
        raise ValueError("set the URIs in both the Encoder's and the Retriever's user_config, or in neither")
    if enc is None:
        out = {"model_uri": a.model_uri, "items_uri": a.items_uri, "index_uri": a.index_uri}
    else:
        if a.model_uri or a.items_uri or a.index_uri:
            raise ValueError("URIs in user_config: leave them out of args (a change there restarts every replica)")
        if enc.get("model_uri") != ret.get("model_uri"):
            raise ValueError(f"Encoder user_config model_uri {enc.get('model_uri')!r} != Retriever's {ret.get('model_uri')!r}")
        if enc.get("model_id") != ret.get("model_id"):
            raise ValueError(f"Encoder user_config model_id {enc.get('model_id')!r} != Retriever's {ret.get('model_id')!r}")
        for key in ("max_batch_size", "batch_wait_timeout_s", "batching"):
            if key not in enc:
                raise ValueError(f"the Encoder's user_config replaces the one built from args: it needs {key!r}")
        out = {k: ret.get(k) or "" for k in SWAPPABLE}
    if not out["model_uri"] or not out["items_uri"]:
        raise ValueError(f"app {app.get('name')!r} names no model_uri or items_uri")
    return out


def _apply(app: dict[str, Any]) -> None:
    """Apply one app's declarative config, keeping the other declaratively deployed apps (a
    declarative apply replaces the whole set)."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    client = _get_global_client()
    current = client.get_serve_details().get("applications", {})
    others = [d["deployed_app_config"] for n, d in current.items() if n != app["name"] and d.get("deployed_app_config")]
    client.deploy_apps(ServeDeploySchema(applications=[*others, app]))


def _wait_serving(name: str, model_id: str, model_uri: str, items_uri: str, timeout_s: float) -> None:
    """Until the app is RUNNING and both its Encoder and its Retriever serve model `model_id`
    (the identity: the same URI may have held another model a moment ago) from `model_uri`, over
    the catalog at `items_uri`."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            st = serve.status().applications.get(name)
            if st is not None and str(st.status).endswith("RUNNING"):
                enc = serve.get_deployment_handle("Encoder", name).info.remote().result(timeout_s=10)
                ret = serve.get_deployment_handle("Retriever", name).info.remote().result(timeout_s=10)
                last = (enc["model_id"], ret["model_id"], enc["model_uri"], ret["model_uri"], ret["items_uri"])
                if last == (model_id, model_id, model_uri, model_uri, items_uri):
                    return
            else:
                last = f"{st.status}: {getattr(st, 'message', '')[:300]}" if st is not None else "absent"
        except Exception as e:  # noqa: BLE001 - replicas starting up: keep waiting until the deadline
            last = repr(e)[:200]
        time.sleep(0.5)
    raise TimeoutError(f"app {name!r} did not come to serve model {model_id} ({model_uri}) within {timeout_s:.0f}s (last seen: {last})")


def _check_deployable(args: dict[str, Any]) -> str:
    """The identity of the model at args' model_uri, after refusing an index another model built
    (before anything is deployed: in a replica the same refusal would only show as a timeout)."""
    from recsys.encoder import model_id_at
    from recsys.index import check_model, index_model_id

    cfg = _storage_cfg(AppArgs(**args))
    model_id = model_id_at(args["model_uri"], cfg)
    if args.get("index_uri"):
        check_model(index_model_id(args["index_uri"], cfg), model_id, args["index_uri"])
    return model_id


def deploy_args(args: dict[str, Any], name: str = "recsys", route_prefix: str = "/", timeout_s: float = 600.0) -> None:
    """Deploy (or swap in place: same args but the URIs or the model at them) the app
    declaratively; returns once it serves the model now at `args`' model_uri, by identity.
    Serve must be started (`serve.start`)."""
    model_id = _check_deployable(args)
    _apply(app_config(args, name, route_prefix, model_id=model_id))
    _wait_serving(name, model_id, args["model_uri"], args["items_uri"], timeout_s)


def swap(name: str, model_uri: str, index_uri: str = "", items_uri: str = "", timeout_s: float = 600.0) -> None:
    """Point a running, declaratively deployed app at another model (and index / catalog):
    an in-place reconfigure, with no replica restart; requests keep being answered, each wholly
    by the old or wholly by the new model. Returns once the new model serves."""
    from ray.serve.context import _get_global_client

    current = _get_global_client().get_serve_details().get("applications", {}).get(name) or {}
    app = current.get("deployed_app_config")
    if not app:
        raise ValueError(f"app {name!r} is not deployed declaratively (serve.app.deploy / serve deploy); a serve.run app is replaced, not swapped")
    ucs = {d["name"]: dict(d.get("user_config") or {}) for d in app.get("deployments", [])}
    retr = ucs.get("Retriever", {})
    new = {"model_uri": model_uri, "items_uri": items_uri or retr.get("items_uri") or app["args"].get("items_uri", ""), "index_uri": index_uri}
    # The deployed app's args carry its object-store settings; the identity (and the index
    # check) is taken from the model at model_uri now, so a re-export to the same path swaps.
    model_id = _check_deployable({**app["args"], **new})
    new["model_id"] = model_id
    ucs["Encoder"] = {**ucs.get("Encoder", {}), "model_uri": model_uri, "model_id": model_id}
    ucs["Retriever"] = new
    deployments = {d["name"]: d for d in app.get("deployments", [])}
    for n, uc in ucs.items():
        deployments[n] = {**deployments.get(n, {"name": n}), "user_config": uc}
    _apply({**app, "deployments": list(deployments.values())})
    _wait_serving(name, model_id, model_uri, new["items_uri"], timeout_s)


def deploy(cfg: Any) -> dict[str, Any]:
    """Deploy the app for this run's model and index declaratively; returns once it serves.
    Deploying again after training a new checkpoint swaps the model in place."""
    from recsys.runtime import ensure_ray

    ensure_ray(cfg=cfg)
    s = cfg.serve
    args = app_args(cfg)
    t = time.perf_counter()
    serve.start(http_options={"host": s.host, "port": s.port})
    deploy_args(args, name=s.app_name, route_prefix=s.route_prefix)
    url = f"http://{s.host}:{s.port}{s.route_prefix.rstrip('/')}"
    log.info("app %r ready at %s in %.1fs", s.app_name, url, time.perf_counter() - t)
    shown = {k: ("***" if ("secret" in k or k == "auth_token") and v else v) for k, v in args.items()}
    return {"app": s.app_name, "url": url, "ready_s": round(time.perf_counter() - t, 1), "args": shown}
