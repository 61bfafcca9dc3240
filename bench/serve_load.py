"""Serving overhead and batching: the same model called in-process vs through Ray Serve over HTTP.

Four systems, each at 1 and 16 concurrent clients, on loopback only, bounded in requests and
time: (a) an in-process call (encode the query + top-k over the catalog embeddings, exactly the
work of POST /search), (b) a plain FastAPI + uvicorn process serving the same model and catalog
(what a user would write by hand: one sync endpoint, one worker), (c) the Serve app without
dynamic batching, (d) the Serve app with `@serve.batch`. Prints p50 / p99 latency and
requests/s of each, and the ratios the serving issue sets as goals: Serve's added p50 over
in-process at 1 client, and batching's throughput gain at 16 clients. `--ingress haproxy,proxy`
runs (c) and (d) again behind Serve's Python proxy, on a Ray cluster of its own, and prints the
two ingresses side by side (the first is the one the ratios are of).

    python -m bench.serve_load [--model bundled|tiny-random|PATH] [--items 2000] [--requests 300]
        [--batch-sizes 8,16,32] [--waits-ms 1,5]   (a sweep of @serve.batch settings at 16 clients)
        [--ingress haproxy,proxy]

Both sides run the model on one thread: Ray gives a replica OMP_NUM_THREADS=1 for its CPU share,
and the in-process side is set to match, so the comparison is of the serving path, not of threads.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

WORDS = {
    "brand": ["Stridex", "Brewmont", "Caffelo", "Pawsome", "Sitwell", "Greenflow", "Trailhaven", "Lumina", "Northpeak", "Cozyloft"],
    "adj": ["lightweight", "cushioned", "programmable", "ergonomic", "expandable", "ultralight", "stainless", "waterproof", "compact", "cordless"],
    "noun": ["running shoe", "french press", "espresso machine", "dog bed", "office chair", "garden hose", "backpacking tent", "desk lamp", "rain jacket", "vacuum cleaner"],
    "cat": ["Sports > Running", "Home > Kitchen > Coffee", "Pets > Dogs", "Office > Furniture", "Garden > Watering", "Outdoors > Camping", "Home > Lighting", "Apparel > Outerwear", "Home > Cleaning"],
}
QUERIES = [
    "trail running shoes", "espresso machine under 300", "memory foam dog bed", "ergonomic chair for back pain",
    "50 ft garden hose", "ultralight tent for two", "waterproof rain jacket", "cordless vacuum for pet hair",
    "stainless french press", "led desk lamp", "cushioned shoes for long runs", "compact coffee maker",
]


def _items(n: int, seed: int = 0) -> Any:
    import pyarrow as pa

    from recsys.schemas import ITEMS_SCHEMA

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        b, a, k, c = (rng.choice(WORDS[w]) for w in ("brand", "adj", "noun", "cat"))
        title = f"{b} {a.title()} {k.title()} {rng.randint(1, 99)}"
        rows.append({"item_id": f"I{i:05d}", "title": title, "brand": b, "category": c, "price": float(rng.randint(5, 400)),
                     "text": f"{title}. Category: {c}. Brand: {b}", "dup_group": i, "popularity": rng.randint(0, 50)})
    return pa.Table.from_pylist(rows, schema=ITEMS_SCHEMA)


def _summary(lat_s: list[float], wall_s: float) -> dict[str, float]:
    ms = sorted(x * 1000 for x in lat_s)
    return {
        "requests": len(ms),
        "p50_ms": round(statistics.median(ms), 2),
        "p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 2),
        "req_per_s": round(len(ms) / wall_s, 1),
    }


def bench_in_process(model: str, items: Any, clients: int, n: int, budget_s: float) -> dict[str, float]:
    import torch

    from recsys.encoder import TextEncoder

    torch.set_num_threads(1)
    enc = TextEncoder(model)
    emb = enc.encode_items(items.column("text").to_pylist())  # (n_items, dim)
    ids = items.column("item_id").to_pylist()

    def search(query: str) -> list[str]:
        q = enc.encode_queries([query])[0]
        scores = emb @ q
        top = np.argpartition(-scores, 10)[:10]
        return [ids[i] for i in top[np.argsort(-scores[top])]]

    for q in QUERIES:  # warm-up
        search(q)
    lat: list[float] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + budget_s
    counter = iter(range(n))

    def client() -> None:
        for i in counter:
            if time.perf_counter() > deadline:
                return
            t = time.perf_counter()
            search(QUERIES[i % len(QUERIES)])
            with lock:
                lat.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(client) for _ in range(clients)]:
            f.result()
    return _summary(lat, time.perf_counter() - t0)


async def http_load(url: str, path: str, bodies: list[dict[str, Any]], clients: int, n: int, budget_s: float,
                    warmup: int) -> dict[str, float]:
    """Closed-loop load: `clients` concurrent clients POST `bodies` (round robin) to `path` until
    `n` requests or `budget_s` are done, after `warmup` unmeasured requests; latency summary and
    the count of non-200 answers."""
    import httpx

    lat: list[float] = []
    errors = 0
    counter = iter(range(n))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
        for b in bodies[:warmup]:
            (await c.post(path, json=b)).raise_for_status()
        deadline = time.perf_counter() + budget_s

        async def client() -> None:
            nonlocal errors
            for i in counter:
                if time.perf_counter() > deadline:
                    return
                t = time.perf_counter()
                r = await c.post(path, json=bodies[i % len(bodies)])
                if r.status_code != 200:
                    errors += 1
                    continue
                lat.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        out = _summary(lat, time.perf_counter() - t0)
    out["errors"] = errors
    return out


class PlainSearch(BaseModel):
    """The baseline's request body (module level: FastAPI resolves annotations by name)."""

    query: str
    k: int = 10
    mode: str = "dense"


def plain_server(model: str, items_dir: str, port: int) -> None:
    """The baseline a user would write by hand: FastAPI + uvicorn, one process, one sync
    endpoint (FastAPI runs it in its thread pool), the same encoder and exact top-k."""
    import pyarrow.parquet as pq
    import torch
    import uvicorn
    from fastapi import FastAPI

    from recsys.encoder import TextEncoder

    torch.set_num_threads(1)
    enc = TextEncoder(model)
    items = pq.read_table(items_dir)
    ids = items.column("item_id").to_pylist()
    emb = enc.encode_items(items.column("text").to_pylist())
    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/search")
    def search(body: PlainSearch) -> dict[str, Any]:
        q = enc.encode_queries([body.query])[0]
        scores = emb @ q
        top = np.argpartition(-scores, body.k)[: body.k]
        top = top[np.argsort(-scores[top])]
        return {"items": [{"item_id": ids[i], "score": float(scores[i])} for i in top]}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def bench_plain(model: str, items_dir: str, clients: list[int], n: dict[int, int], budget_s: float) -> dict[int, dict[str, float]]:
    import httpx

    from recsys.storage import free_port

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "bench.serve_load", "--plain-server", str(port), "--model", model, "--items-dir", items_dir], env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the plain FastAPI server did not start (rc {proc.poll()})")
            time.sleep(0.3)
        bodies = [{"query": q, "k": 10} for q in QUERIES]
        return {c: asyncio.run(http_load(f"http://127.0.0.1:{port}", "/search", bodies, c, n[c], budget_s, len(bodies))) for c in clients}
    finally:
        proc.terminate()  # our own process, by its PID
        proc.wait(timeout=30)


def bench_serve(model: str, items_dir: str, batching: bool, clients: list[int], n: dict[int, int], budget_s: float,
                mode: str = "dense", max_batch_size: int = 16, wait_s: float = 0.005) -> dict[int, dict[str, float]]:
    from ray import serve

    from recsys.storage import free_port
    from serve.app import app_builder

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {
        "model_uri": model, "items_uri": items_dir, "batching": batching, "max_batch_size": max_batch_size,
        "batch_wait_timeout_s": wait_s, "min_replicas": 1, "max_replicas": 1, "replica_cpus": 0.5,
        "max_ongoing_requests": 64, "max_queued_requests": 256,
    }
    try:
        serve.run(app_builder(args), name="bench", route_prefix="/")
        # Every query once unmeasured first (and the first batch of the encoder).
        bodies = [{"query": q, "k": 10, "mode": mode} for q in QUERIES]
        return {c: asyncio.run(http_load(f"http://127.0.0.1:{port}", "/search", bodies, c, n[c], budget_s, len(bodies))) for c in clients}
    finally:
        serve.shutdown()


# What each ingress sets in the cluster's environment before Ray starts (Serve reads these in its
# controller, proxies and replicas). "haproxy" is this project's default (recsys.runtime's
# local_serve_env, which also gives the cluster its drain period and HAProxy's own ports).
INGRESS_ENV = {"haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1"}, "proxy": {"RAY_SERVE_ENABLE_HA_PROXY": "0"}}


def _use_ingress(name: str) -> None:
    """A fresh local Ray cluster whose Serve uses the ingress `name`."""
    import ray

    from recsys.runtime import ensure_ray

    if ray.is_initialized():
        ray.shutdown()
    os.environ.update(INGRESS_ENV[name])
    ensure_ray(num_cpus=4)
    print(f"ingress={name}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="bundled", help="bundled (MiniLM), tiny-random, or a model path")
    p.add_argument("--items", type=int, default=2000)
    p.add_argument("--requests", type=int, default=300, help="requests per system at 1 client (x2 at 16)")
    p.add_argument("--budget-s", type=float, default=60.0, help="time cap per measurement")
    p.add_argument("--out", default="runs/bench/serve_load.json")
    # dense: the same work as the in-process baseline; hybrid / lexical: what those modes cost.
    p.add_argument("--mode", default="dense", choices=["dense", "lexical", "hybrid"], help="POST /search mode of the Serve runs")
    p.add_argument("--batch-sizes", default="", help="comma list: also sweep @serve.batch max_batch_size at 16 clients")
    p.add_argument("--waits-ms", default="2,5,10", help="comma list of batch_wait_timeout_s (ms) for the sweep")
    p.add_argument("--ingress", default="haproxy", help="comma list of Serve ingresses to run, each on its own Ray "
                   "cluster: haproxy (HAProxy in front of replicas that speak HTTP themselves) and/or proxy (Serve's "
                   "Python proxy actor); the first one's rows give the ratios, the others are printed beside them")
    p.add_argument("--plain-server", type=int, default=0, help=argparse.SUPPRESS)  # internal: run the baseline server
    p.add_argument("--items-dir", default="", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.plain_server:
        plain_server(a.model, a.items_dir, a.plain_server)
        return

    import pyarrow.parquet as pq

    from recsys.encoder import resolve_model_path
    from recsys.runtime import haproxy_installed

    model = resolve_model_path(a.model)
    items = _items(a.items)
    items_dir = Path(tempfile.mkdtemp(prefix="bench-items-"))
    pq.write_table(items, items_dir / "part-00000.parquet")
    clients = [1, 16]
    n = {1: a.requests, 16: 2 * a.requests}
    ingresses = list(dict.fromkeys(x for x in a.ingress.split(",") if x))
    bad = [x for x in ingresses if x not in INGRESS_ENV]
    if bad or not ingresses:
        p.error(f"--ingress: {bad or a.ingress!r} not in {sorted(INGRESS_ENV)}")
    if "haproxy" in ingresses and not haproxy_installed():
        p.error("--ingress haproxy: no HAProxy binary here (ray[serve] bundles one on Linux; elsewhere put haproxy on PATH)")
    _use_ingress(ingresses[0])
    results: dict[str, dict[int, dict[str, float]]] = {"in_process": {}}
    for c in clients:
        results["in_process"][c] = bench_in_process(model, items, c, n[c], a.budget_s)
        print(f"in-process  clients={c:2d} {results['in_process'][c]}", flush=True)
    results["fastapi_uvicorn"] = bench_plain(model, str(items_dir), clients, n, a.budget_s)
    for c in clients:
        print(f"fastapi+uvicorn   clients={c:2d} {results['fastapi_uvicorn'][c]}", flush=True)
    # The other ingresses first, so that the first one's cluster stays up for the sweep below.
    for ingress in [*ingresses[1:], ingresses[0]]:
        if len(ingresses) > 1:
            _use_ingress(ingress)
        suffix = "" if ingress == ingresses[0] else f"_{ingress}"
        for name, batching in (("serve_no_batching", False), ("serve_batching", True)):
            results[name + suffix] = bench_serve(model, str(items_dir), batching, clients, n, a.budget_s, a.mode)
            for c in clients:
                print(f"{name + suffix:25s} clients={c:2d} {results[name + suffix][c]}", flush=True)

    print(f"\nmodel={a.model} items={a.items} (loopback HTTP, POST /search k=10 mode={a.mode}; in-process is dense)")
    print(f"{'system':25s} {'clients':>7s} {'p50 ms':>8s} {'p99 ms':>8s} {'req/s':>8s}")
    for name, per in results.items():
        if name == "batch_sweep_16_clients":
            continue
        for c, r in per.items():
            print(f"{name:25s} {c:7d} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} {r['req_per_s']:8.1f}")
    sweep: dict[str, dict[str, float]] = {}
    for size in [int(x) for x in a.batch_sizes.split(",") if x]:
        for wait in [float(x) for x in a.waits_ms.split(",") if x]:
            r = bench_serve(model, str(items_dir), True, [16], n, a.budget_s, a.mode, size, wait / 1000)[16]
            sweep[f"max_batch_size={size} wait={wait:g}ms"] = r
            print(f"sweep max_batch_size={size:3d} wait={wait:g}ms clients=16 {r}", flush=True)
    if sweep:
        results["batch_sweep_16_clients"] = sweep  # type: ignore[assignment]
    added = results["serve_no_batching"][1]["p50_ms"] - results["in_process"][1]["p50_ms"]
    added_b = results["serve_batching"][1]["p50_ms"] - results["in_process"][1]["p50_ms"]
    gain = results["serve_batching"][16]["req_per_s"] / results["serve_no_batching"][16]["req_per_s"]
    vs_inproc = results["serve_batching"][16]["req_per_s"] / results["in_process"][16]["req_per_s"]
    plain_added = results["fastapi_uvicorn"][1]["p50_ms"] - results["in_process"][1]["p50_ms"]
    print(f"\nServe added p50 at 1 client: {added:+.2f} ms without batching, {added_b:+.2f} ms with (goal <= 5 ms); "
          f"plain FastAPI + uvicorn adds {plain_added:+.2f} ms")
    print(f"batching throughput gain at 16 clients: {gain:.2f}x over Serve without batching (goal >= 2x); "
          f"{vs_inproc:.2f}x of in-process threads")
    others: dict[str, dict[str, float]] = {}
    for ingress in ingresses[1:]:
        o_added = results[f"serve_no_batching_{ingress}"][1]["p50_ms"] - results["in_process"][1]["p50_ms"]
        o_rps = results[f"serve_batching_{ingress}"][16]["req_per_s"]
        others[ingress] = {"added_p50_ms": round(o_added, 2), "batching_req_per_s_16": o_rps}
        print(f"ingress {ingresses[0]} vs {ingress}: added p50 {added:+.2f} vs {o_added:+.2f} ms at 1 client; "
              f"with batching at 16 clients {results['serve_batching'][16]['req_per_s']:.1f} vs {o_rps:.1f} req/s "
              f"({results['serve_batching'][16]['req_per_s'] / o_rps:.2f}x)")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"model": a.model, "items": a.items, "ingress": ingresses[0], "other_ingresses": others, "results": results,
               "serve_added_p50_ms": {"no_batching": round(added, 2), "batching": round(added_b, 2)},
               "fastapi_uvicorn_added_p50_ms": round(plain_added, 2),
               "batching_gain_16": round(gain, 2), "batching_vs_in_process_16": round(vs_inproc, 2)}
    out.write_text(json.dumps(summary, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
