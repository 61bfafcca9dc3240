"""Hostile HTTP against the running app: malformed, oversized and odd requests, counted by answer.

    python -m bench.hostile_http [--requests 10000] [--seed 0]   (starts its own Serve app on a
        tiny random model over loopback, sends the requests, prints the table, shuts down)

Every request comes from `hostile_requests(n, seed)`: wrong types, missing and extra fields,
huge and deeply nested bodies, 10^5 item ids, k = -1 / 0 / 10^9, NaN and infinities, invalid
JSON and UTF-8, wrong content types and methods, missing or wrong tokens, and valid but odd
inputs (unicode, control characters, right-to-left marks). A malformed request must get a 4xx
whose body names what is wrong (`problems` with the field for a 422, `error` otherwise, plain text
for the 413 of the body size limit, sent before the app); an odd
but valid one a 200; nothing may get a 5xx, and the replicas must not restart.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import random
import tempfile
from pathlib import Path
from typing import Any

MAX_BODY_BYTES = 1 << 20  # serve/schemas.py, kept equal by the test


@dataclasses.dataclass(frozen=True)
class Hostile:
    kind: str  # what is wrong with it, for the report
    method: str
    path: str
    body: bytes | None
    headers: dict[str, str]
    valid: bool  # an odd but valid request: 200 expected (404 when its ids are unknown)


def _j(obj: Any) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()


def hostile_requests(n: int, seed: int = 0, item_ids: tuple[str, ...] = ("P1", "P2", "P3")) -> list[Hostile]:
    rng = random.Random(seed)
    jh = {"content-type": "application/json"}
    odd = ["\u0000 drill", "\u202e\u202dtent", "😀🔥 lamp", "a\tb\nc\rd", "\x7f\x1b[31mred", "ﾄﾞﾘﾙ", "电钻 无绳", "🏳️‍🌈" * 50, " \u00a0 shoe", "'; DROP TABLE items; --"]
    bad_k = [-1, 0, 10**9, 1.5, "ten", None, True, [], {}, 2**70]
    bad_str = [123, 4.5, True, None, [], {}, ["q"], {"q": 1}]
    nan_like = [b"NaN", b"Infinity", b"-Infinity", b"1e999"]

    def one() -> Hostile:
        c = rng.randrange(22)
        if c == 0:  # wrong type for the query
            return Hostile("search.query wrong type", "POST", "/search", _j({"query": rng.choice(bad_str)}), jh, False)
        if c == 1:
            return Hostile("search.k out of range / wrong type", "POST", "/search", _j({"query": "drill", "k": rng.choice(bad_k)}), jh, False)
        if c == 2:
            return Hostile("missing field", "POST", rng.choice(["/search", "/events", "/score", "/recommend"]), b"{}", jh, False)
        if c == 3:
            return Hostile("extra field", "POST", "/search", _j({"query": "drill", rng.choice(["filter", "K", "mode2", "__proto__"]): 1}), jh, False)
        if c == 4:
            return Hostile("huge query string", "POST", "/search", _j({"query": "x" * rng.choice([1001, 50_000, 900_000])}), jh, False)
        if c == 5:
            depth = rng.choice([1000, 100_000, 400_000])
            return Hostile("deeply nested body", "POST", "/search", b"[" * depth + b"]" * depth, jh, False)
        if c == 6:
            return Hostile("10^5 item ids", "POST", "/score", _j({"query": "drill", "item_ids": ["P1"] * 100_000}), jh, False)
        if c == 7:
            return Hostile("body over the size limit", "POST", "/search", _j({"query": "drill", "pad": "y" * (MAX_BODY_BYTES + 10)}), jh, False)
        if c == 8:
            raw = b'{"query": "drill", "k": ' + rng.choice(nan_like) + b"}"
            return Hostile("NaN / infinity", "POST", "/search", raw, jh, False)
        if c == 9:
            raw = b'{"query": "drill", "filters": {"max_price": ' + rng.choice(nan_like) + b"}}"
            return Hostile("NaN / infinity in a filter", "POST", "/search", raw, jh, False)
        if c == 10:
            raw = rng.choice([b'{"query": "dri', b'{"query": "drill",}', b"{'query': 'drill'}", b"\xff\xfe\x00{", b'{"query": "\xc3\x28"}', b"null", b"[]", b'"drill"', b"   "])
            return Hostile("invalid JSON / UTF-8", "POST", "/search", raw, jh, False)
        if c == 11:
            ct = rng.choice(["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/xml", ""])
            return Hostile("wrong content type", "POST", "/search", rng.choice([_j({"query": "drill"}), b"query=drill"]), {"content-type": ct} if ct else {}, False)
        if c == 12:
            return Hostile("wrong method", rng.choice(["GET", "PUT", "DELETE", "PATCH"]), rng.choice(["/search", "/events"]), None, {}, False)
        if c == 13:
            return Hostile("unknown path", rng.choice(["GET", "POST"]), rng.choice(["/admin", "/search/../../etc/passwd", "/%00", "/docs/x"]), None, {}, False)
        if c == 14:
            ev = rng.choice([{"item_id": "P1", "event_type": "like"}, {"item_id": "", "event_type": "click"}, {"item_id": "P1"},
                             {"item_id": "P1", "event_type": "click", "timestamp": "yesterday"}, {"item_id": 5, "event_type": "click"}])
            return Hostile("bad event", "POST", "/events", _j({"user_id": "u1", "events": [ev]}), jh, False)
        if c == 15:
            return Hostile("bad filters", "POST", "/search", _j({"query": "drill", "filters": rng.choice(["cheap", [1], {"min_price": -5}, {"brand": "b" * 201}, {"colour": "red"}])}), jh, False)
        if c == 16:
            return Hostile("bad mode", "POST", "/search", _j({"query": "drill", "mode": rng.choice(["semantic", "", 1, "DENSE"])}), jh, False)
        if c == 17:
            return Hostile("recommend with nobody", "POST", "/recommend", _j(rng.choice([{"k": 3}, {"user_id": "", "recent_item_ids": []}, {"user_id": "u" * 201}])), jh, False)
        if c == 18:
            return Hostile("unknown item ids", "POST", rng.choice(["/score", "/recommend"]),
                           _j({"query": "drill", "item_ids": ["nope-1"]} if rng.random() < 0.5 else {"recent_item_ids": ["nope-2"]}), jh, False)
        if c == 19:
            return Hostile("too many events", "POST", "/events", _j({"user_id": "u1", "events": [{"item_id": "P1", "event_type": "click"}] * 1001}), jh, False)
        # Odd but valid: they must be answered normally.
        if c == 20:
            return Hostile("odd but valid query", "POST", "/search", _j({"query": rng.choice(odd), "k": rng.choice([1, 10, 1000])}), jh, True)
        return Hostile("odd but valid ids", "POST", "/score", _j({"query": rng.choice(odd), "item_ids": list(item_ids)}), jh, True)

    return [one() for _ in range(n)]


def judge(h: Hostile, status: int, text: str) -> str | None:
    """Why this answer is wrong, or None when it is right."""
    if status >= 500:
        return f"{status} (server error)"
    if h.valid:
        return None if status == 200 else f"{status} for a valid request: {text[:200]}"
    if not 400 <= status < 500:
        return f"{status} for a malformed request"
    try:
        body = json.loads(text)
    except ValueError:
        # Starlette's body limit answers 413 in plain text ("Content Too Large") before the app.
        return None if status == 413 and text.strip() else f"{status} without a JSON message: {text[:100]}"
    if status == 422:
        problems = body.get("problems") or []
        return None if problems and all(":" in p for p in problems) else f"422 without the field named: {text[:200]}"
    return None if (body.get("error") or body.get("detail")) else f"{status} without a message: {text[:200]}"


async def send_all(url: str, requests: list[Hostile], concurrency: int = 8, prefix: str = "", token: str = "") -> dict[str, Any]:
    """Send every request; {"status": Counter, "by_kind": {kind: Counter}, "wrong": [(kind, why)]}."""
    import httpx

    status: collections.Counter[int] = collections.Counter()
    by_kind: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)
    wrong: list[tuple[str, str]] = []
    queue = iter(requests)
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        async def worker() -> None:
            for h in queue:
                headers = {**h.headers, **({"authorization": f"Bearer {token}"} if token else {})}
                r = await c.request(h.method, prefix + h.path, content=h.body, headers=headers)
                status[r.status_code] += 1
                by_kind[h.kind][r.status_code] += 1
                why = judge(h, r.status_code, r.text)
                if why:
                    wrong.append((h.kind, why))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"status": status, "by_kind": by_kind, "wrong": wrong}


def auth_requests(n: int, seed: int = 0) -> list[tuple[dict[str, Any], bool]]:
    """Authorization headers for a token-protected app: (headers, is_the_right_token)."""
    rng = random.Random(seed)
    bad = [{}, {"authorization": "Bearer"}, {"authorization": "Bearer wrong"}, {"authorization": "Basic czNjcmV0"},
           {"authorization": "bearer s3cret"}, {"authorization": "Bearer  s3cret"}, {"authorization": "Bearer " + "s" * 10_000},
           {"authorization": "Bearer s3cre"}, {"authorization": "Bearer s3cret\u00e9".encode()}]
    return [(rng.choice(bad), False) if rng.random() < 0.8 else ({"authorization": "Bearer s3cret"}, True) for _ in range(n)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    import time

    import pyarrow.parquet as pq
    from ray import serve
    from ray.serve.context import _get_global_client

    from bench.serve_load import _items
    from recsys.encoder import make_tiny_bert
    from recsys.runtime import ensure_ray
    from recsys.storage import free_port
    from serve.app import app_builder

    tmp = Path(tempfile.mkdtemp(prefix="hostile-"))
    model = make_tiny_bert(tmp / "model")
    items = _items(200)
    (tmp / "items").mkdir()
    pq.write_table(items, tmp / "items" / "part-00000.parquet")
    ensure_ray(num_cpus=4)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(app_builder({"model_uri": model, "items_uri": str(tmp / "items"), "max_replicas": 1, "replica_cpus": 0.5}), name="h", route_prefix="/")
        replicas = lambda: {n: {r["replica_id"] for r in d["replicas"]} for n, d in _get_global_client().get_serve_details()["applications"]["h"]["deployments"].items()}  # noqa: E731
        before = replicas()
        ids = tuple(items.column("item_id").to_pylist()[:3])
        t = time.perf_counter()
        out = asyncio.run(send_all(f"http://127.0.0.1:{port}", hostile_requests(a.requests, a.seed, ids)))
        wall = time.perf_counter() - t
        restarted = replicas() != before
    finally:
        serve.shutdown()
    print(f"{a.requests} hostile requests in {wall:.0f}s; answers by status: {dict(sorted(out['status'].items()))}")
    print(f"{'kind':34s} answers")
    for kind, c in sorted(out["by_kind"].items()):
        print(f"{kind:34s} {dict(sorted(c.items()))}")
    fivexx = sum(v for k, v in out["status"].items() if k >= 500)
    print(f"\n5xx: {fivexx}; wrong answers: {len(out['wrong'])}; replicas restarted: {restarted}")
    for kind, why in out["wrong"][:20]:
        print(f"  {kind}: {why}")


if __name__ == "__main__":
    main()
