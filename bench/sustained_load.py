"""Sustained load: the Serve app at its measured capacity for minutes, watched window by window.

    python -m bench.sustained_load [--duration-s 600] [--window-s 30] [--replicas 2] [--clients 0]
        [--capacity-steps 1,2,4,8] [--step-s 10] [--model PATH] [--out FILE.json]
        (starts its own Ray cluster and Serve app on loopback, a tiny random model by default)

First the capacity: closed-loop clients (bench.replica_loss.Traffic, one request in flight each)
at each of `--capacity-steps` for `--step-s` seconds; the capacity is the first client count
past which req/s grows by less than 10% (or the last step). `--clients N` skips the search.
Then that many clients send /search, /events (their own user) and /recommend (the same user,
whose live profile the events build) in turn for `--duration-s`, with no client retries, so
every failure is counted. Every `--window-s` it records the requests, the errors by kind (HTTP
status or exception class), p50 / p99 latency, the 1-minute load average and the RSS of every
Serve process of the app (each Ingress and Profiles replica, the profile store actor, the proxy
and the controller; PIDs from Ray's state API, RSS from psutil). The summary gives the error
rate, p99 of the first vs the last window, and each process's RSS slope in MiB/min (least
squares over the samples from the end of the first window on: the first window is warm-up).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from bench.replica_loss import Attempt, Traffic, bench_args, start_serve
from bench.serve_load import _summary

PATHS = ("/search", "/events", "/recommend")
GROWTH = 0.10  # capacity: more clients must add more than this share of req/s


def window_stats(attempts: list[Attempt], wall_s: float) -> dict[str, Any]:
    """Requests, errors by kind and latency (of the answered ones) of one stretch of traffic."""
    ok = [x.t1 - x.t0 for x in attempts if x.outcome == "ok"]
    errors = dict(collections.Counter(x.outcome for x in attempts if x.outcome != "ok"))
    lat = _summary(ok, wall_s) if ok else {"p50_ms": None, "p99_ms": None}
    by_path = {}
    for p in sorted({x.path for x in attempts}):
        mine = [x for x in attempts if x.path == p]
        p_ok = [x.t1 - x.t0 for x in mine if x.outcome == "ok"]
        by_path[p] = {"requests": len(mine), "errors": len(mine) - len(p_ok),
                      "p99_ms": _summary(p_ok, wall_s)["p99_ms"] if p_ok else None}
    return {"requests": len(attempts), "errors": errors, "req_per_s": round(len(attempts) / wall_s, 1) if wall_s > 0 else 0.0,
            "p50_ms": lat["p50_ms"], "p99_ms": lat["p99_ms"], "by_path": by_path}


def serve_processes(app: str, store: str) -> dict[str, int]:
    """label -> PID of the app's live Serve processes: its replicas ("Ingress:<id>",
    "Profiles:<id>"), the profile store actor ("store"), Serve's proxy(ies) and controller."""
    import ray
    from ray.util.state import list_actors

    out: dict[str, int] = {}
    # By this cluster's address: without one the State API may take a stale one another
    # `ray start` on the machine left in /tmp/ray/ray_current_cluster.
    gcs = ray.get_runtime_context().gcs_address
    for a in list_actors(address=gcs, filters=[("state", "=", "ALIVE")], limit=10_000, raise_on_missing_output=False):
        cls, name, pid = a.class_name or "", a.name or "", a.pid
        if not pid:
            continue
        if cls.startswith(f"ServeReplica:{app}:"):
            # SERVE_REPLICA::<app>#<deployment>#<replica id>
            _, deployment, replica = name.rsplit("#", 2)
            out[f"{deployment}:{replica}"] = pid
        elif cls == "ProfileStore" and name == store:
            out["store"] = pid
        elif cls == "ProxyActor":
            out["proxy" if "proxy" not in out else f"proxy:{name[-6:]}"] = pid
        elif cls == "ServeController":
            out["controller"] = pid
    return out


def rss_mib(pids: dict[str, int]) -> dict[str, float]:
    """RSS in MiB of each process still there."""
    import psutil

    out = {}
    for label, pid in pids.items():
        try:
            out[label] = round(psutil.Process(pid).memory_info().rss / 2**20, 1)
        except psutil.Error:  # gone since it was listed
            continue
    return out


def slope_mib_per_min(t_s: list[float], mib: list[float]) -> float | None:
    """Least-squares slope of RSS over time (MiB/min); None with fewer than 2 samples."""
    import numpy as np

    if len(mib) < 2 or len(set(t_s)) < 2:
        return None
    return round(float(np.polyfit(np.array(t_s) / 60.0, np.array(mib), 1)[0]), 3)


def run_clients(url: str, ids: list[str], clients: int, seconds: float, seed: int = 0) -> tuple[Traffic, float]:
    """`clients` closed-loop clients for `seconds` (profiles seeded first); the traffic and its wall time."""
    traffic = Traffic(url, clients, ids, paths=PATHS, retries=0, seed=seed)
    traffic.seed_profiles()
    t0 = time.monotonic()
    traffic.start()
    try:
        time.sleep(seconds)
    finally:
        traffic.stop()
    return traffic, time.monotonic() - t0


def measure_capacity(url: str, ids: list[str], steps: tuple[int, ...] = (1, 2, 4, 8), step_s: float = 10.0,
                     warmup_s: float = 3.0) -> dict[str, Any]:
    """Closed-loop req/s at each client count (after `warmup_s` unmeasured at one client); the
    capacity is the first count whose next step adds less than GROWTH of req/s, else the last."""
    if warmup_s > 0:
        run_clients(url, ids, 1, warmup_s)
    rows = []
    for n in steps:
        traffic, wall = run_clients(url, ids, n, step_s, seed=n)
        s = window_stats(traffic.attempts, wall)
        rows.append({"clients": n, "req_per_s": s["req_per_s"], "p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"], "errors": s["errors"]})
        print(f"capacity: {n:2d} clients {s['req_per_s']:7.1f} req/s p50 {s['p50_ms']} ms p99 {s['p99_ms']} ms errors {s['errors']}",
              flush=True)
    chosen = rows[-1]["clients"]
    for cur, nxt in zip(rows, rows[1:], strict=False):
        if nxt["req_per_s"] < (1 + GROWTH) * cur["req_per_s"]:
            chosen = cur["clients"]
            break
    return {"steps": rows, "step_s": step_s, "growth_threshold": GROWTH, "clients": chosen}


def sustained_load(url: str, app: str, store: str, ids: list[str], clients: int, duration_s: float = 600.0,
                   window_s: float = 30.0) -> dict[str, Any]:
    """`clients` closed-loop clients (no retries) for `duration_s`, recorded every `window_s`:
    the windows, and a summary with the error rate, p99 first vs last and RSS slopes."""
    n_windows = max(1, round(duration_s / window_s))
    traffic = Traffic(url, clients, ids, paths=PATHS, retries=0, seed=7)
    traffic.seed_profiles()
    load_start = os.getloadavg()
    pids = serve_processes(app, store)
    rss0 = rss_mib(pids)
    windows: list[dict[str, Any]] = []
    t0 = time.monotonic()
    traffic.start()
    seen = 0
    try:
        for w in range(n_windows):
            time.sleep(max(0.0, t0 + (w + 1) * window_s - time.monotonic()))
            t_end = time.monotonic()
            with traffic._lock:
                batch = traffic.attempts[seen:]
            seen += len(batch)
            t_start = t0 + w * window_s
            now = serve_processes(app, store)
            windows.append({"window": w + 1, "t_end_s": round(t_end - t0, 1), **window_stats(batch, t_end - t_start),
                            "load_avg_1m": round(os.getloadavg()[0], 2), "rss_mib": rss_mib(now), "pids": now})
            x = windows[-1]
            print(f"window {w + 1:3d} t={x['t_end_s']:6.1f}s {x['requests']:6d} req {x['req_per_s']:6.1f}/s errors {x['errors'] or 0} "
                  f"p50 {x['p50_ms']} p99 {x['p99_ms']} ms load {x['load_avg_1m']}", flush=True)
    finally:
        traffic.stop()
    load_end = os.getloadavg()
    # Everything answered after the last window closed (requests in flight at the stop) is left out.
    labels = sorted({k for w in windows for k in w["rss_mib"]} | set(rss0))
    rss: dict[str, dict[str, Any]] = {}
    for k in labels:
        samples = [(w["t_end_s"], w["rss_mib"][k]) for w in windows if k in w["rss_mib"]]
        pid_seen = sorted({w["pids"][k] for w in windows if k in w["pids"]} | ({pids[k]} if k in pids else set()))
        rss[k] = {"start_mib": rss0.get(k), "after_warmup_mib": samples[0][1] if samples else None,
                  "end_mib": samples[-1][1] if samples else None,
                  "slope_mib_per_min": slope_mib_per_min([t for t, _ in samples], [m for _, m in samples]),
                  "samples": len(samples), "pids": pid_seen}
    requests = sum(w["requests"] for w in windows)
    errors: collections.Counter[str] = collections.Counter()
    for w in windows:
        errors.update(w["errors"])
    p99 = [w["p99_ms"] for w in windows if w["p99_ms"] is not None]
    summary = {
        "clients": clients, "duration_s": round(windows[-1]["t_end_s"], 1), "window_s": window_s, "windows": len(windows),
        "requests": requests, "req_per_s": round(requests / windows[-1]["t_end_s"], 1), "errors": dict(errors),
        "error_rate": round(sum(errors.values()) / requests, 6) if requests else math.nan,
        "p99_ms_first_window": windows[0]["p99_ms"], "p99_ms_last_window": windows[-1]["p99_ms"],
        "p99_ms_max_window": max(p99, default=None), "p99_ms_min_window": min(p99, default=None),
        "rss": rss, "replaced_or_restarted": [k for k, v in rss.items() if len(v["pids"]) > 1 or v["samples"] < len(windows)],
        "load_avg_start": [round(x, 2) for x in load_start], "load_avg_end": [round(x, 2) for x in load_end],
        "load_avg_1m_mean": round(sum(w["load_avg_1m"] for w in windows) / len(windows), 2),
    }
    return {"summary": summary, "windows": windows}


def print_report(report: dict[str, Any]) -> None:
    s, windows = report["summary"], report["windows"]
    labels = list(s["rss"])
    print(f"\n{s['clients']} closed-loop clients, /search /events /recommend in turn, no retries; RSS in MiB")
    print(f"{'win':>3s} {'t_end':>6s} {'req':>6s} {'req/s':>6s} {'err':>4s} {'p50ms':>7s} {'p99ms':>7s} {'load':>5s} " + " ".join(f"{k[:14]:>14s}" for k in labels))
    for w in windows:
        rss = " ".join(f"{w['rss_mib'].get(k, float('nan')):14.1f}" for k in labels)
        print(f"{w['window']:3d} {w['t_end_s']:6.0f} {w['requests']:6d} {w['req_per_s']:6.1f} {sum(w['errors'].values()):4d} "
              f"{w['p50_ms'] or 0:7.1f} {w['p99_ms'] or 0:7.1f} {w['load_avg_1m']:5.2f} {rss}")
    print(f"\nrequests {s['requests']} ({s['req_per_s']} req/s), errors {s['errors'] or 0}, error rate {s['error_rate']:.4%}")
    print(f"p99 first window {s['p99_ms_first_window']} ms, last {s['p99_ms_last_window']} ms "
          f"(range {s['p99_ms_min_window']}-{s['p99_ms_max_window']} ms)")
    for k, v in s["rss"].items():
        print(f"RSS {k:24s} {v['after_warmup_mib']} -> {v['end_mib']} MiB, slope {v['slope_mib_per_min']} MiB/min (pids {v['pids']})")
    if s["replaced_or_restarted"]:
        print(f"replaced or restarted during the run: {s['replaced_or_restarted']}")
    print(f"load average at start {s['load_avg_start']}, at end {s['load_avg_end']}, mean 1-min over windows {s['load_avg_1m_mean']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration-s", type=float, default=600.0)
    p.add_argument("--window-s", type=float, default=30.0)
    p.add_argument("--replicas", type=int, default=2, help="Ingress replicas (fixed: min = max)")
    p.add_argument("--clients", type=int, default=0, help="closed-loop clients; 0: measure the capacity first")
    p.add_argument("--capacity-steps", default="1,2,4,8", help="client counts of the capacity search, comma list")
    p.add_argument("--step-s", type=float, default=10.0, help="seconds per capacity step")
    p.add_argument("--model", default="", help="exported model dir; default a tiny random BERT")
    p.add_argument("--out", default="runs/bench/sustained_load.json")
    a = p.parse_args()

    from ray import serve

    from serve.app import app_builder

    base, ids = bench_args(a.model, prefix="sustained-load-")
    port = start_serve()
    app, store = "sl", "bench-sustained"
    url = f"http://127.0.0.1:{port}/{app}"
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    try:
        serve.run(app_builder({**base, "min_replicas": a.replicas, "max_replicas": a.replicas, "profile_store": store}), name=app,
                  route_prefix=f"/{app}")
        capacity = (measure_capacity(url, ids, tuple(int(x) for x in a.capacity_steps.split(",")), a.step_s) if a.clients <= 0
                    else {"clients": a.clients, "steps": []})
        print(f"driving {capacity['clients']} clients for {a.duration_s:.0f} s, windows of {a.window_s:.0f} s", flush=True)
        report = sustained_load(url, app, store, ids, capacity["clients"], a.duration_s, a.window_s)
    finally:
        serve.shutdown()
    report = {"started": started, "cpus": os.cpu_count(), "ingress_replicas": a.replicas, "model": a.model or "tiny random BERT",
              "items": len(ids), "capacity": capacity, **report}
    print_report(report)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
