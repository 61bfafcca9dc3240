"""Replica and profile-store loss under load: what clients see when an actor dies mid-traffic.

    python -m bench.replica_loss [--clients 4] [--before-s 3] [--after-s 8] [--model PATH]
        (starts its own Ray cluster and Serve app on loopback, a tiny random model by default)

Three scenarios, each with closed-loop clients (one request in flight each) sending /search and
/recommend (a user with a live profile) and, in the store scenario, /events too:

    two replicas   an Ingress app with 2 replicas; one replica actor is killed (ray.kill, no
                   restart: Serve's controller must replace it)
    one replica    the same with 1 replica
    store          the profile store actor is killed with restart allowed (as a crash would),
                   while clients post events and read profiles back

Each prints the requests sent, the failed first attempts by kind (HTTP status or exception: what a
client without retries sees), the requests still failed after up to `retries` client retries
(idempotent calls: searches, reads, and profile updates, which the store applies idempotently),
the recovery time (kill -> the deployment's replicas RUNNING again, or the store answering again)
and the longest gap between two successful answers. The store scenario also checks that every
acknowledged event is in the profiles afterwards.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

QUERIES = ["trail running shoes", "espresso machine", "memory foam dog bed", "ergonomic chair", "garden hose", "ultralight tent"]


@dataclasses.dataclass
class Attempt:
    t0: float
    t1: float
    path: str
    outcome: str  # "ok", an HTTP status ("500"), or an exception class name
    attempt: int  # 0 = the request's first try
    final: bool  # the last attempt of its request


def replicas(app: str, deployment: str = "Ingress") -> list[dict[str, Any]]:
    from ray.serve.context import _get_global_client

    d = _get_global_client().get_serve_details()["applications"][app]["deployments"][deployment]
    return list(d["replicas"])


def running(app: str, deployment: str = "Ingress") -> set[str]:
    return {r["replica_id"] for r in replicas(app, deployment) if str(r["state"]).endswith("RUNNING")}


def kill_replica(app: str, deployment: str = "Ingress") -> str:
    """Kill one RUNNING replica actor of the deployment, as a crash would (Serve does not restart
    the actor; its controller starts a replacement). Returns the killed replica's id."""
    import ray

    r = next(r for r in replicas(app, deployment) if str(r["state"]).endswith("RUNNING"))
    ray.kill(ray.get_actor(r["actor_name"], namespace="serve"), no_restart=True)
    return r["replica_id"]


def kill_store(store: str) -> None:
    """Kill the profile store actor with restart allowed (max_restarts=-1 brings it back)."""
    import ray

    ray.kill(ray.get_actor(store, namespace="recsys"), no_restart=False)


def store_profiles(store: str) -> dict[str, Any]:
    import ray

    return ray.get(ray.get_actor(store, namespace="recsys").dump.remote(), timeout=60)


class Traffic:
    """Closed-loop clients: each sends one request at a time, retrying a failed one (5xx or a
    connection error) up to `retries` times after `backoff_s`. Client n posts events only for
    user `load-n`, so the profile it should end with is known (`acked`)."""

    def __init__(self, base_url: str, clients: int, item_ids: list[str], paths: tuple[str, ...] = ("/search", "/recommend"),
                 retries: int = 2, backoff_s: float = 0.1, seed: int = 0) -> None:
        self.base_url, self.clients, self.item_ids, self.paths = base_url, clients, item_ids, paths
        self.retries, self.backoff_s, self.seed = retries, backoff_s, seed
        self.attempts: list[Attempt] = []
        self.acked: dict[str, list[list[dict[str, Any]]]] = collections.defaultdict(list)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def seed_profiles(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=60) as c:
            for n in range(self.clients):
                events = [{"item_id": self.item_ids[n % len(self.item_ids)], "event_type": "click", "timestamp": 0.0}]
                r = c.post("/events", json={"user_id": f"load-{n}", "events": events})
                r.raise_for_status()
                self.acked[f"load-{n}"].append(events)

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._client, args=(n,), daemon=True) for n in range(self.clients)]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)

    def _body(self, path: str, n: int, rng: random.Random, seq: int) -> dict[str, Any]:
        if path == "/search":
            return {"query": rng.choice(QUERIES), "k": 5}
        if path == "/recommend":
            return {"user_id": f"load-{n}", "k": 5}
        return {"user_id": f"load-{n}", "events": [{"item_id": rng.choice(self.item_ids), "event_type": rng.choice(["click", "purchase"]),
                                                    "timestamp": float(seq)}]}

    def _client(self, n: int) -> None:
        rng = random.Random(self.seed * 1000 + n)
        seq = 0
        with httpx.Client(base_url=self.base_url, timeout=60) as c:
            while not self._stop.is_set():
                seq += 1
                path = self.paths[seq % len(self.paths)]
                body = self._body(path, n, rng, seq)
                for attempt in range(self.retries + 1):
                    t0 = time.monotonic()
                    try:
                        r = c.post(path, json=body)
                        outcome = "ok" if r.status_code == 200 else str(r.status_code)
                    except httpx.HTTPError as e:
                        outcome = type(e).__name__
                    retry = outcome != "ok" and (outcome[0] == "5" or not outcome[0].isdigit()) and attempt < self.retries
                    with self._lock:
                        self.attempts.append(Attempt(t0, time.monotonic(), path, outcome, attempt, not retry))
                        if outcome == "ok" and path == "/events":
                            self.acked[body["user_id"]].append(body["events"])
                    if not retry:
                        break
                    time.sleep(self.backoff_s)


def summarise(traffic: Traffic, t_kill: float, recovered_at: float) -> dict[str, Any]:
    a = sorted(traffic.attempts, key=lambda x: x.t1)
    ok_times = [x.t1 for x in a if x.outcome == "ok"]
    gaps = [b - c for c, b in zip(ok_times, ok_times[1:], strict=False) if b >= t_kill - 1]
    around = [x for x in a if x.t0 <= recovered_at and x.t1 >= t_kill]
    return {
        "requests": sum(1 for x in a if x.final),
        "attempts": len(a),
        # What a client without retries sees: failed first attempts, by kind.
        "errors": dict(collections.Counter(x.outcome for x in a if x.outcome != "ok" and x.attempt == 0)),
        "failed_retries": sum(1 for x in a if x.outcome != "ok" and x.attempt > 0),
        "failed_after_retries": dict(collections.Counter(x.outcome for x in a if x.final and x.outcome != "ok")),
        "recovery_s": round(recovered_at - t_kill, 2),
        "max_gap_between_answers_s": round(max(gaps, default=0.0), 2),
        "max_latency_during_recovery_s": {p: round(max((x.t1 - x.t0 for x in around if x.path == p), default=0.0), 2)
                                          for p in traffic.paths},
        "errors_at_s_after_kill": [round(x.t1 - t_kill, 2) for x in a if x.outcome != "ok"][:20],
    }


def wait_replicas(app: str, want: int, gone: set[str], timeout_s: float = 180.0) -> float:
    """Until `want` replicas other than the `gone` ones are RUNNING; returns when (monotonic)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        live = running(app) - gone
        if len(live) >= want:
            return time.monotonic()
        time.sleep(0.1)
    raise TimeoutError(f"app {app!r} did not get back to {want} running replicas within {timeout_s:.0f}s: {replicas(app)}")


def wait_store(store: str, timeout_s: float = 120.0) -> float:
    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(ray.get_actor(store, namespace="recsys").get.remote("load-0"), timeout=5)
            return time.monotonic()
        except Exception:  # noqa: BLE001 - restarting: keep asking until the deadline
            time.sleep(0.05)
    raise TimeoutError(f"profile store {store!r} did not answer within {timeout_s:.0f}s of being killed")


def under_traffic(traffic: Traffic, before_s: float, after_s: float, fault: Callable[[], float]) -> tuple[float, float]:
    """Seed profiles, run `traffic`, and after `before_s` call `fault` (which does the damage
    and returns when the system recovered); `after_s` more of traffic, then stop. Returns
    (when the fault started, when it recovered), monotonic."""
    traffic.seed_profiles()
    traffic.start()
    try:
        time.sleep(before_s)
        t_fault = time.monotonic()
        recovered = fault()
        time.sleep(after_s)
    finally:
        traffic.stop()
    return t_fault, recovered


def replica_loss(base_url: str, app: str, item_ids: list[str], want_replicas: int, clients: int = 4, before_s: float = 3.0,
                 after_s: float = 8.0, retries: int = 2) -> dict[str, Any]:
    """Kill one Ingress replica of `app` (served at `base_url`) under closed-loop traffic."""
    traffic = Traffic(base_url, clients, item_ids, retries=retries)
    killed: list[str] = []

    def fault() -> float:
        killed.append(kill_replica(app))
        return wait_replicas(app, want_replicas, set(killed))

    t_kill, recovered = under_traffic(traffic, before_s, after_s, fault)
    return {"scenario": f"{want_replicas} replica(s), one killed", "killed": killed[0], **summarise(traffic, t_kill, recovered)}


def store_loss(base_url: str, store: str, item_ids: list[str], clients: int = 4, before_s: float = 3.0, after_s: float = 5.0,
               retries: int = 2) -> dict[str, Any]:
    """Kill the profile store actor under traffic that also posts events; afterwards, every
    acknowledged event must be in the (replayed) profiles."""
    from serve.profiles import ProfileStore

    traffic = Traffic(base_url, clients, item_ids, paths=("/search", "/events", "/recommend"), retries=retries)

    def fault() -> float:
        kill_store(store)
        return wait_store(store)

    t_kill, recovered = under_traffic(traffic, before_s, after_s, fault)
    got = store_profiles(store)
    lost = []
    for user, batches in traffic.acked.items():
        want = ProfileStore(max_history=50)
        for events in batches:
            want.add(user, events)
        if got.get(user) != want.get(user):
            lost.append(user)
    return {"scenario": "profile store killed", **summarise(traffic, t_kill, recovered), "users_checked": len(traffic.acked),
            "users_missing_acknowledged_events": lost}


def start_node(num_cpus: int = 2) -> subprocess.Popen:
    """A second Ray node (its own raylet) on this machine, joined to the connected cluster; in a
    session of its own, so `kill_node` can take down it and its workers, and nothing else."""
    import ray

    before = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    ray_cli = str(Path(sys.executable).with_name("ray"))
    log = open(tempfile.mkstemp(prefix="ray-node2-", suffix=".log")[1], "w")  # noqa: SIM115 - lives as long as the node
    proc = subprocess.Popen([ray_cli, "start", "--address", ray.get_runtime_context().gcs_address, "--num-cpus", str(num_cpus), "--block"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if {n["NodeID"] for n in ray.nodes() if n["Alive"]} - before:
            return proc
        if proc.poll() is not None:
            raise RuntimeError(f"ray start --address exited with {proc.returncode}: see {log.name}")
        time.sleep(0.5)
    kill_node(proc)
    raise TimeoutError(f"the second node did not join within 120s: see {log.name}")


def kill_node(proc: subprocess.Popen) -> None:
    """SIGKILL the node's whole session (raylet, object store, its workers): a lost machine."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def node_loss(base_url: str, app: str, item_ids: list[str], node: subprocess.Popen, want_replicas: int = 2, clients: int = 4,
              before_s: float = 3.0, after_s: float = 8.0, retries: int = 2) -> dict[str, Any]:
    """Kill the second node (with whatever of `app` Serve spread onto it) under traffic."""
    import ray

    head = ray.get_runtime_context().get_node_id()
    on_node = [r["replica_id"] for r in replicas(app) if r.get("node_id") and r["node_id"] != head]
    profiles_on_node = [r["replica_id"] for r in replicas(app, "Profiles") if r.get("node_id") and r["node_id"] != head]
    store = ray.get_actor(f"bench-{app}", namespace="recsys")
    store_node = ray.get(store.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()), timeout=60)
    traffic = Traffic(base_url, clients, item_ids, retries=retries)

    def fault() -> float:
        kill_node(node)
        return wait_replicas(app, want_replicas, set(on_node), timeout_s=300)

    t_kill, recovered = under_traffic(traffic, before_s, after_s, fault)
    return {"scenario": "second node killed", "ingress_replicas_on_it": on_node, "profiles_replicas_on_it": profiles_on_node,
            "store_on_it": store_node != head, **summarise(traffic, t_kill, recovered)}


def bench_args(model: str = "", n_items: int = 200, prefix: str = "replica-loss-") -> tuple[dict[str, Any], list[str]]:
    """A temporary directory with the model (a tiny random BERT unless `model`), `n_items` items
    as parquet and room for the profile log: the app args the benches share (0.2 CPU a replica),
    and the item ids."""
    import pyarrow.parquet as pq

    from bench.serve_load import _items
    from recsys.encoder import make_tiny_bert

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    model = model or make_tiny_bert(tmp / "model")
    items = _items(n_items)
    (tmp / "items").mkdir()
    pq.write_table(items, tmp / "items" / "part-00000.parquet")
    base = {"model_uri": model, "items_uri": str(tmp / "items"), "replica_cpus": 0.2, "profile_log_dir": str(tmp / "profiles")}
    return base, items.column("item_id").to_pylist()


def start_serve() -> int:
    """A private local Ray cluster (4 logical CPUs) and Serve on a free loopback port; the port."""
    from ray import serve

    from recsys.runtime import ensure_ray
    from recsys.storage import free_port

    ensure_ray(num_cpus=4)
    port = free_port()
    # One proxy, on the head, which the clients call: a second node's proxy could not bind the
    # same port on this machine (on a real cluster each node has its own behind a load balancer).
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    return port


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--before-s", type=float, default=3.0)
    p.add_argument("--after-s", type=float, default=8.0)
    p.add_argument("--retries", type=int, default=2)
    p.add_argument("--model", default="", help="exported model dir; default a tiny random BERT")
    p.add_argument("--scenarios", default="two,one,store", help="comma list of two, one, store, node (a second local Ray node, "
                   "started with ray start --address, killed under load; once per --profile-replicas value)")
    p.add_argument("--profile-replicas", default="1,2", help="Profiles replicas for the node scenario, comma list")
    a = p.parse_args()
    scenarios = set(a.scenarios.split(","))

    from ray import serve

    from serve.app import app_builder

    base, ids = bench_args(a.model)
    port = start_serve()
    out = []
    try:
        for n in (2, 1):
            app = f"r{n}"
            if ("two" if n == 2 else "one") in scenarios:
                serve.run(app_builder({**base, "min_replicas": n, "max_replicas": n, "profile_store": f"bench-{app}"}), name=app, route_prefix=f"/{app}")
                out.append(replica_loss(f"http://127.0.0.1:{port}/{app}", app, ids, n, a.clients, a.before_s, a.after_s, a.retries))
                serve.delete(app)
        if "store" in scenarios:
            serve.run(app_builder({**base, "min_replicas": 2, "max_replicas": 2, "profile_store": "bench-store"}), name="st", route_prefix="/st")
            out.append(store_loss(f"http://127.0.0.1:{port}/st", "bench-store", ids, a.clients, a.before_s, a.after_s, a.retries))
            serve.delete("st")
        for k in (int(x) for x in a.profile_replicas.split(",")) if "node" in scenarios else ():
            node = start_node()
            try:
                app = f"nd{k}"
                serve.run(app_builder({**base, "min_replicas": 2, "max_replicas": 2, "profile_replicas": k, "profile_store": f"bench-{app}"}),
                          name=app, route_prefix=f"/{app}")
                r = node_loss(f"http://127.0.0.1:{port}/{app}", app, ids, node, 2, a.clients, a.before_s, a.after_s, a.retries)
                out.append({**r, "scenario": f"{r['scenario']} ({k} Profiles replica(s))"})
                serve.delete(app)
            finally:
                kill_node(node)
    finally:
        serve.shutdown()
    print(f"{a.clients} closed-loop clients, up to {a.retries} client retries (backoff 0.1 s), {a.before_s:.0f} s before the kill, "
          f"{a.after_s:.0f} s after recovery")
    for r in out:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
