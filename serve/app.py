"""The online service: one Ray Serve deployment answers each request in one hop.

    Ingress    the model replica: HTTP API (OpenAPI at /docs), validation, auth, admission
               (503 + Retry-After past its limit), the query encoder with @serve.batch dynamic
               batching, and the catalog (serve/catalog.py) it ranks against, all in-process;
               autoscaled. Proxy -> replica -> answer: no deployment-handle hop on the way.
    Retriever  only with `retriever: deployment`: the catalog in a deployment of its own, for
               catalogs too big to copy into every model replica (one extra hop per request).
    Profiles   live per-user history (serve/profiles.py), updated by /events, read by /recommend.

A request reads top to bottom in this file: the route, `_encode` (a batch of queries through the
encoder), `_rank` (the catalog's ranking, local or on the Retriever). Scores are computed exactly
like offline evaluation (recsys.encoder.TextEncoder, recsys.retrieval, recsys.hybrid,
recsys.sequence). A model with a sequence user tower ranks users from the stored catalog
embeddings of their history, with no text encoded. The deploy / swap control plane is
serve/control.py; the request and argument schemas serve/schemas.py.

`app_builder(args)` builds the app from typed arguments (local paths or s3:// URIs), for
`serve run serve/config.yaml`, `serve deploy` and `serve.run(app_builder({...}))` alike.
"""

# No `from __future__ import annotations` here: FastAPI resolves the request models of a
# class-based Serve ingress from real (not string) annotations.

import asyncio
import contextlib
import hmac
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.catalog import Catalog, ModelMismatch, load_catalog, model_id_at, open_encoder
from serve.profiles import Profiles
from serve.reload import Reloader
from serve.schemas import (
    MAX_BODY_BYTES,
    AppArgs,
    EventsRequest,
    RecommendRequest,
    ScoreRequest,
    SearchRequest,
)

log = logging.getLogger(__name__)

RETRY_AFTER_S = "1"
# How long a request may wait for the encoder and a separate Retriever to agree during a swap.
SWAP_WAIT_S = 30.0
# What a new checkpoint or catalog changes. They reach the replicas through user_config and are
# loaded in `reconfigure`, off the event loop, beside the current model (serve/control.py).
SWAPPABLE = ("model_uri", "items_uri", "index_uri")


def _reload_target(user_config: dict[str, Any]) -> tuple[tuple[str, ...], str, dict[str, str]]:
    """A user_config's swappable URIs, the model id it expects there, and both as the target a
    replica's Reloader records."""
    source = tuple(user_config.get(k) or "" for k in SWAPPABLE)
    expected = user_config.get("model_id") or ""
    return source, expected, {**dict(zip(SWAPPABLE, source, strict=True)), "model_id": expected}

api = FastAPI(title="recsys", description="Search, recommendation and scoring from a fine-tuned two-tower model.", max_body_size=MAX_BODY_BYTES)


@api.exception_handler(StarletteHTTPException)
async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    # FastAPI's own refusals (413 body too large, 400 unparseable body, 404, 405) in our shape.
    return JSONResponse(status_code=exc.status_code, content={"error": str(exc.detail)}, headers=getattr(exc, "headers", None))


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
    def __init__(self, profiles: Any, args: dict[str, Any], retriever: Any = None) -> None:
        self.profiles, self.retriever = profiles, retriever
        a = self.args = AppArgs(**args)
        self.search_mode = a.search_mode
        self.batching = a.batching
        self.token = a.auth_token or (os.environ.get(a.auth_token_env, "") if a.auth_token_env else "")
        if a.auth_token_env and not self.token:
            raise ValueError(f"auth_token_env={a.auth_token_env!r} names an unset or empty environment variable")
        # Admission: requests past max_ongoing + max_queued in this replica are refused at once
        # with 503 + Retry-After (Serve's own queue limit answers 503 without one).
        self.limit = a.max_ongoing_requests + a.max_queued_requests if a.max_queued_requests >= 0 else float("inf")
        self.inflight = 0
        self.encoder: Any = None
        self.catalog: Catalog | None = None  # None with a separate Retriever
        self.model_uri = self.model_id = ""
        self.reloader = Reloader()  # a failed swap keeps the current model serving (serve/reload.py)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        if "max_batch_size" in user_config:
            self.encode_batched.set_max_batch_size(int(user_config["max_batch_size"]))
        if "batch_wait_timeout_s" in user_config:
            self.encode_batched.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))
        if "batching" in user_config:
            self.batching = bool(user_config["batching"])
        source, expected, target = _reload_target(user_config)
        if not source[0]:
            return
        await self.reloader.to(target, lambda: self._load(source, expected), serving=self.encoder is not None)

    async def _load(self, source: tuple[str, ...], expected: str) -> None:
        c = self.catalog
        if expected and (source[0], expected) == (self.model_uri, self.model_id) and (
                self.retriever is not None or (c is not None and c.source == source and c.model_id == expected)):
            return  # already served (a rolled-back swap): nothing to read, even with the store down
        # The identity at the URI, not the URI, decides: the same path may hold new weights.
        model_id = await asyncio.to_thread(model_id_at, self.args, source[0], expected)
        t = time.perf_counter()
        encoder, catalog = self.encoder, self.catalog
        # Loaded off the event loop: requests keep being served by the current model meanwhile.
        if (source[0], model_id) != (self.model_uri, self.model_id):
            encoder = await asyncio.to_thread(open_encoder, self.args, source[0])
            if encoder.model_id != model_id:
                raise ValueError(f"the model at {source[0]} changed while loading ({model_id} -> {encoder.model_id}): deploy again")
        if self.retriever is None and (catalog is None or catalog.source != source or catalog.model_id != model_id):
            catalog = await asyncio.to_thread(load_catalog, self.args, *source, model_id, encoder)
        # One step, no await in between: a request sees the old encoder and catalog or the new.
        self.encoder, self.catalog, self.model_uri, self.model_id = encoder, catalog, source[0], model_id
        log.info("serving model %s from %s (loaded in %.1fs)", model_id, source[0], time.perf_counter() - t)

    # ---- the request path -------------------------------------------------------------------

    @contextlib.contextmanager
    def _admit(self, request: Request) -> Iterator[None]:
        if self.token and not hmac.compare_digest(request.headers.get("authorization", "").encode(), f"Bearer {self.token}".encode()):
            raise HTTPProblem(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
        if self.inflight >= self.limit:
            raise HTTPProblem(503, f"overloaded ({self.inflight} requests in this replica), retry later", {"Retry-After": RETRY_AFTER_S})
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def encode_batched(self, texts: list[str]) -> list[tuple[np.ndarray, str]]:
        encoder = self.encoder  # one model for the whole batch, even mid-swap
        # In a thread: the loop keeps admitting (and batching) requests while this batch encodes.
        vectors = await asyncio.to_thread(encoder.encode_queries, texts, batch_size=len(texts))
        return [(v, encoder.model_id) for v in vectors]

    async def _encode(self, text: str) -> tuple[np.ndarray, str]:
        """A query (or rendered user history) vector and the identity of the model that made it."""
        if self.batching:
            return await self.encode_batched(text)
        encoder = self.encoder
        return (await asyncio.to_thread(encoder.encode_queries, [text]))[0], encoder.model_id

    async def _rank(self, method: str, *a: Any) -> Any:
        """A Catalog method (serve/catalog.py): in this replica, or on the Retriever deployment."""
        if self.retriever is None:
            return getattr(self.catalog, method)(*a)
        return await self._call(getattr(self.retriever, method), *a)

    async def _call(self, method: Any, *a: Any) -> Any:
        """A call to another deployment (Profiles, a separate Retriever)."""
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

    async def _retrieve(self, text: str, method: str, *a: Any) -> Any:
        """Encode `text`, then rank with the vector: both by the same model. While a swap is under
        way a mismatch (the catalog switched after the encoding) is retried, re-encoding."""
        deadline = time.monotonic() + SWAP_WAIT_S
        while True:
            q, model_id = await self._encode(text)
            try:
                return await self._rank(method, q, *a, model_id)
            except ModelMismatch:
                if time.monotonic() > deadline:
                    raise HTTPProblem(503, "a new model is rolling out, retry shortly", {"Retry-After": RETRY_AFTER_S}) from None
                await asyncio.sleep(0.05)

    async def _for_user(self, history: list[str], none_known: str, method: str, text_method: str, *a: Any) -> Any:
        """A user's answer from their history item ids (newest first): the catalog alone
        (`method`) when its model has a sequence user tower; else the text path, the encoder's
        vector of the history texts the catalog returned, then `text_method`, all three from one
        model. A mismatch mid-swap starts over, so a swap to or from a model with a sequence
        tower also switches the path."""
        from recsys.encoder import render_user_text

        deadline = time.monotonic() + SWAP_WAIT_S
        while True:
            r = await self._rank(method, history, *a)
            if not r["known"]:
                raise HTTPProblem(404, none_known)
            if "answer" in r:
                return r["answer"]
            q, model_id = await self._encode(render_user_text(None, r["texts"], self.encoder.user_history_items))
            if model_id == r["model_id"]:
                try:
                    return await self._rank(text_method, q, *a, model_id)
                except ModelMismatch:
                    pass
            if time.monotonic() > deadline:
                raise HTTPProblem(503, "a new model is rolling out, retry shortly", {"Retry-After": RETRY_AFTER_S})
            await asyncio.sleep(0.05)

    async def _user_history(self, user_id: str | None, recent: list[str]) -> tuple[list[str], list[str]]:
        """The user's history item ids, newest first (recent ids, then the live profile), and purchases."""
        profile = await self._call(self.profiles.get, user_id) if user_id else {"history": [], "purchased": []}
        history = list(reversed(recent)) + [i for i in profile["history"] if i not in recent]  # newest first
        return history, profile["purchased"]

    async def _check_known(self, ids: list[str]) -> None:
        unknown = await self._rank("unknown", ids) if ids else []
        if unknown:
            raise HTTPProblem(404, f"unknown item ids: {unknown[:20]}")

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self) -> JSONResponse:
        try:
            if self.encoder is None:
                raise RuntimeError("no model loaded yet")
            n = await asyncio.wait_for(self._rank("size"), timeout=5)
        except Exception as e:  # noqa: BLE001 - not ready for any reason is "not ready"
            return JSONResponse(status_code=503, content={"status": "not ready", "error": str(e)[:200]}, headers={"Retry-After": RETRY_AFTER_S})
        return JSONResponse(content={"status": "ready", "items": n, "model": self.model_uri, "model_id": self.model_id})

    @api.post("/search")
    async def search(self, body: SearchRequest, request: Request) -> dict[str, Any]:
        with self._admit(request):
            filters = body.filters.model_dump() if body.filters else None
            text, mode = body.query.strip(), body.mode or self.search_mode
            if mode == "lexical":
                items = await self._rank("search_lexical", text, body.k, filters)
            elif mode == "hybrid":
                items = await self._retrieve(text, "search_hybrid", text, body.k, filters)
            else:
                items = await self._retrieve(text, "search", body.k, filters, None)
            return {"items": items, "mode": mode}

    @api.post("/recommend")
    async def recommend(self, body: RecommendRequest, request: Request) -> dict[str, Any]:
        with self._admit(request):
            await self._check_known(body.recent_item_ids)
            history, purchased = await self._user_history(body.user_id, body.recent_item_ids)
            exclude = None if body.include_purchased else purchased
            filters = body.filters.model_dump() if body.filters else None
            none_known = f"user {body.user_id!r} has no history yet; send /events or recent_item_ids"
            return {"items": await self._for_user(history, none_known, "recommend", "search", body.k, filters, exclude)}

    @api.post("/score")
    async def score(self, body: ScoreRequest, request: Request) -> dict[str, Any]:
        with self._admit(request):
            await self._check_known(body.item_ids + body.recent_item_ids)
            if body.query and body.query.strip():
                return {"scores": await self._retrieve(body.query.strip(), "score", body.item_ids)}
            history, _ = await self._user_history(body.user_id, body.recent_item_ids)
            none_known = f"user {body.user_id!r} has no history yet"
            return {"scores": await self._for_user(history, none_known, "score_user", "score", body.item_ids)}

    @api.post("/events")
    async def events(self, body: EventsRequest, request: Request) -> dict[str, Any]:
        with self._admit(request):
            await self._check_known([e.item_id for e in body.events])
            n = await self._call(self.profiles.add, body.user_id, [e.model_dump() for e in body.events])
            return {"user_id": body.user_id, "history_length": n}

    def info(self) -> dict[str, Any]:
        """What this replica serves (serve/control.py waits on it during deploys and swaps)."""
        enc = self.encoder
        out = {"model_uri": self.model_uri, "model_id": self.model_id, "retriever": "deployment" if self.retriever is not None else "in_replica",
               "dim": enc.dim if enc is not None else 0, "user_history_items": enc.user_history_items if enc is not None else 0,
               "encoder_backend": getattr(enc, "backend", ""), "load_error": self.reloader.error,
               "replica_id": serve.get_replica_context().replica_id.unique_id}
        if self.catalog is not None:
            out.update({k: v for k, v in self.catalog.info().items() if k not in out})
        return out


@serve.deployment
class Retriever:
    """The catalog in a deployment of its own (`retriever: deployment`): the Ingress calls the
    Catalog's methods here by handle."""

    def __init__(self, args: dict[str, Any]) -> None:
        self.args = AppArgs(**args)
        self.catalog: Catalog | None = None
        self.reloader = Reloader()

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        source, expected, target = _reload_target(user_config)
        await self.reloader.to(target, lambda: self._load(source, expected), serving=self.catalog is not None)

    async def _load(self, source: tuple[str, ...], expected: str) -> None:
        c = self.catalog
        if expected and c is not None and c.source == source and c.model_id == expected:
            return  # already served (a rolled-back swap): nothing to read
        model_id = await asyncio.to_thread(model_id_at, self.args, source[0], expected) if source[0] else ""
        if c is None or c.source != source or model_id != c.model_id:
            self.catalog = await asyncio.to_thread(load_catalog, self.args, *source, model_id)

    # The Catalog's methods, called by handle from the Ingress (serve/catalog.py).
    def unknown(self, *a: Any) -> Any:
        return self.catalog.unknown(*a)

    def search(self, *a: Any) -> Any:
        return self.catalog.search(*a)

    def search_hybrid(self, *a: Any) -> Any:
        return self.catalog.search_hybrid(*a)

    def search_lexical(self, *a: Any) -> Any:
        return self.catalog.search_lexical(*a)

    def recommend(self, *a: Any) -> Any:
        return self.catalog.recommend(*a)

    def score_user(self, *a: Any) -> Any:
        return self.catalog.score_user(*a)

    def score(self, *a: Any) -> Any:
        return self.catalog.score(*a)

    def size(self) -> int:
        return self.catalog.size()

    def info(self) -> dict[str, Any]:
        out = self.catalog.info() if self.catalog is not None else {"model_uri": "", "model_id": "", "items_uri": "", "index_uri": ""}
        return {**out, "load_error": self.reloader.error, "replica_id": serve.get_replica_context().replica_id.unique_id}


def user_configs(a: AppArgs, model_id: str = "") -> dict[str, dict[str, Any]]:
    """The deployments' user_config: what a swap changes in place. `model_id` (the identity of
    the model at model_uri when deployed) makes a redeploy of the same path with new weights a
    changed user_config, so Serve reconfigures the replicas, and lets a restarted replica refuse
    weights re-exported there since."""
    raw = a.model_dump()
    uris = {**{k: raw[k] for k in SWAPPABLE}, **({"model_id": model_id} if model_id else {})}
    out = {"Ingress": {"max_batch_size": a.max_batch_size, "batch_wait_timeout_s": a.batch_wait_timeout_s, "batching": a.batching, **uris}}
    if a.retriever == "deployment":
        out["Retriever"] = dict(uris)
    return out


def app_builder(args: dict[str, Any]) -> Any:
    """Build the application from typed args (validated here, so a bad config fails fast)."""
    a = AppArgs(**args)
    static = {**a.model_dump(), **{k: "" for k in SWAPPABLE}}  # identical across checkpoints: no replica restarts
    ucs = user_configs(a)
    profiles = Profiles.options(
        num_replicas=a.profile_replicas, ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=a.max_ongoing_requests, max_queued_requests=a.max_queued_requests,
    ).bind(a.max_history, a.profile_store, os.path.abspath(a.profile_log_dir) if a.profile_log_dir else "", a.profile_log_compact_lines)
    retriever = None
    if a.retriever == "deployment":
        retriever = Retriever.options(
            ray_actor_options={"num_cpus": a.replica_cpus}, user_config=ucs["Retriever"],
            max_ongoing_requests=a.max_ongoing_requests, max_queued_requests=a.max_queued_requests,
        ).bind(static)
    ingress = Ingress.options(
        autoscaling_config={
            "min_replicas": a.min_replicas,
            "max_replicas": a.max_replicas,
            "target_ongoing_requests": max(1, a.max_batch_size),
            "upscale_delay_s": 5,
            "downscale_delay_s": 60,
        },
        user_config=ucs["Ingress"],
        ray_actor_options={"num_cpus": a.replica_cpus, "num_gpus": a.encoder_gpus, "resources": a.encoder_resources},
        # Serve lets through more than the replica admits, so that the replica itself refuses the
        # excess with 503 + Retry-After (its `_admit`); the proxy queues without its own cap.
        max_ongoing_requests=2 * a.max_ongoing_requests + max(0, a.max_queued_requests) + 8,
        max_queued_requests=-1,
    )
    return ingress.bind(profiles, static, retriever)
