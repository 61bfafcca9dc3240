"""Where a 1-client Serve request's time goes: the query encode timed inside each process, and
the HTTP floor of Ray Serve's proxy on this machine.

    python -m bench.serve_floor [--requests 200] [--replica-cpus 0.5]

One private local Ray cluster, loopback HTTP only, sequential requests (1 client), the bundled
MiniLM on one torch thread everywhere. Prints p50 ms of:

  driver        TextEncoder.encode_queries([q]) in this process: back to back on the main thread,
                in a worker thread, and after 10 ms idle before each call (as a server meets it)
  ray actor     the same, timed inside a plain Ray actor of --replica-cpus
  serve floor   POST / with a JSON body to a Serve deployment that encodes nothing (e2e)
  serve encode  POST / to a deployment that encodes the query: e2e, and the encode timed inside
                the replica

and the ratios: the replica's encode over the driver's (back to back, and after the idle gap),
and the floor's share of the e2e time.
Writes JSON to --out when given.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from typing import Any

QUERIES = ["cordless drill with two batteries", "stainless steel kitchen sink", "led ceiling light"]


def _encoder() -> Any:
    import torch

    from recsys.encoder import TextEncoder, resolve_model_path

    torch.set_num_threads(1)
    enc = TextEncoder(resolve_model_path("bundled"))
    for q in QUERIES * 5:  # warm-up
        enc.encode_queries([q])
    return enc


def probe(n: int) -> dict[str, float]:
    """p50 ms of one query's encode on this process's main thread, in a worker thread, and on the
    main thread after 10 ms idle before each call."""
    enc = _encoder()

    def run(idle_s: float = 0.0) -> list[float]:
        out = []
        for i in range(n):
            time.sleep(idle_s)
            t = time.perf_counter()
            enc.encode_queries([QUERIES[i % 3]])
            out.append((time.perf_counter() - t) * 1e3)
        return out

    main = run()
    got: dict[str, list[float]] = {}
    th = threading.Thread(target=lambda: got.__setitem__("t", run()))
    th.start()
    th.join()
    # A server meets its encoder after an idle gap (the request's round trip), not back to back.
    idle = run(0.01)
    return {"main_p50_ms": round(statistics.median(main), 2), "thread_p50_ms": round(statistics.median(got["t"]), 2),
            "idle10ms_p50_ms": round(statistics.median(idle), 2), "nice": os.nice(0)}


def _post(n: int, port: int) -> tuple[list[float], list[float]]:
    import httpx

    e2e, inside = [], []
    with httpx.Client(timeout=30) as c:
        for i in range(20 + n):
            t = time.perf_counter()
            r = c.post(f"http://127.0.0.1:{port}/", json={"q": QUERIES[i % 3]})
            r.raise_for_status()
            if i >= 20:  # the first 20: warm-up
                e2e.append((time.perf_counter() - t) * 1e3)
                inside.append(r.json()["enc_ms"])
    return e2e, inside


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.serve_floor", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--replica-cpus", type=float, default=0.5)
    p.add_argument("--port", type=int, default=8127)
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    os.environ.pop("RAY_ADDRESS", None)  # a private cluster, never one found on the machine
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import ray
    from ray import serve

    from recsys.runtime import ensure_ray

    @ray.remote
    class Probe:
        def run(self, n: int) -> dict[str, float]:
            return probe(n)

    @serve.deployment(ray_actor_options={"num_cpus": a.replica_cpus})
    class Encode:
        def __init__(self, encode: bool) -> None:
            self.enc = _encoder() if encode else None

        async def __call__(self, request: Any) -> dict[str, float]:
            body = await request.json()
            t = time.perf_counter()
            if self.enc is not None:
                self.enc.encode_queries([body["q"]])
            return {"enc_ms": (time.perf_counter() - t) * 1e3}

    out: dict[str, Any] = {"requests": a.requests, "replica_cpus": a.replica_cpus, "cpus": os.cpu_count()}
    out["driver"] = probe(a.requests)
    ensure_ray(num_cpus=2)
    try:
        actor = Probe.options(num_cpus=a.replica_cpus).remote()
        out["ray_actor"] = ray.get(actor.run.remote(a.requests))
        ray.kill(actor)
        serve.start(http_options={"host": "127.0.0.1", "port": a.port})
        for name, encode in (("serve_floor", False), ("serve_encode", True)):
            serve.run(Encode.bind(encode), name=name, route_prefix="/")
            e2e, inside = _post(a.requests, a.port)
            out[name] = {"e2e_p50_ms": round(statistics.median(e2e), 2), "encode_in_replica_p50_ms": round(statistics.median(inside), 2)}
            serve.delete(name)
    finally:
        serve.shutdown()
        ray.shutdown()
    d, enc = out["driver"]["main_p50_ms"], out["serve_encode"]
    out["replica_encode_over_driver"] = round(enc["encode_in_replica_p50_ms"] / d, 2)
    out["replica_encode_over_driver_idle10ms"] = round(enc["encode_in_replica_p50_ms"] / out["driver"]["idle10ms_p50_ms"], 2)
    out["floor_share_of_e2e"] = round(out["serve_floor"]["e2e_p50_ms"] / enc["e2e_p50_ms"], 2)
    for k in ("driver", "ray_actor", "serve_floor", "serve_encode"):
        print(f"{k:13s} {json.dumps(out[k])}")
    print(f"replica encode / driver encode: {out['replica_encode_over_driver']}x back to back, "
          f"{out['replica_encode_over_driver_idle10ms']}x after 10 ms idle; "
          f"Serve's floor (no encode) is {out['floor_share_of_e2e']:.0%} of a dense request's e2e p50")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
