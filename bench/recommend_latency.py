"""/recommend latency: the sequence user tower vs the text user tower, same model, same catalog.

Two exports of the same text towers, one with a (randomly initialised, default-sized: the
`sequence` config section's defaults) sequence user tower attached, each with its index, served
side by side by Ray Serve on loopback and loaded one after the other with the same requests:
POST /recommend with `recent_item_ids` (a history of --history catalog items), k=10, at 1 and 16
concurrent clients. Both run in the one Ingress replica (serve/app.py): the text path renders the
history texts and encodes them through the query tower, then ranks; the sequence path runs the
tower over the stored catalog embeddings of the history, then ranks. Prints p50 / p99 / requests/s of
each and the ratios, and checks both answer every request.

    python -m bench.recommend_latency [--model bundled|tiny-random|PATH] [--items 2000] [--history 10] [--requests 300]

Weights do not change latency, so an untrained tower measures the served path as a trained one would.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.serve_load import _items, http_load


def _exports(model: str, items: Any, root: Path) -> dict[str, dict[str, str]]:
    """{"text": {...}, "sequence": {...}}: export dir and index dir of each."""
    import shutil

    import torch

    from recsys.config import ModelConfig, SequenceConfig
    from recsys.encoder import TextEncoder
    from recsys.index import build_index
    from recsys.model import build_two_tower, export_model, load_tokenizer
    from recsys.sequence import SequenceTower, attach_sequence_tower
    from recsys.train_sequence import tower_settings

    mcfg = ModelConfig(name_or_path=model)
    torch.manual_seed(0)
    export_model(build_two_tower(mcfg).eval(), load_tokenizer(mcfg), mcfg, {}, root / "text")
    shutil.copytree(root / "text", root / "sequence")
    ids, texts = items.column("item_id").to_pylist(), items.column("text").to_pylist()
    enc = TextEncoder(str(root / "text"))
    tower = SequenceTower(tower_settings(SequenceConfig(), item_ids=True), enc.dim, len(ids))
    attach_sequence_tower(root / "sequence", tower, {i: n + 1 for n, i in enumerate(ids)})
    t = time.perf_counter()
    emb = enc.encode_items(texts)
    print(f"embedded {len(ids)} items in {time.perf_counter() - t:.1f}s", flush=True)
    out = {}
    for name in ("text", "sequence"):
        model_id = TextEncoder(str(root / name)).model_id
        build_index(emb, ids, model_id=model_id).save(str(root / f"{name}-index"))
        out[name] = {"model_uri": str(root / name), "index_uri": str(root / f"{name}-index")}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="bundled", help="bundled (MiniLM), tiny-random, or a model path")
    p.add_argument("--items", type=int, default=2000)
    p.add_argument("--history", type=int, default=10, help="items per request's history (the text tower reads at most user_history_items)")
    p.add_argument("--requests", type=int, default=300, help="requests per system at 1 client (x2 at 16)")
    p.add_argument("--budget-s", type=float, default=60.0, help="time cap per measurement")
    p.add_argument("--out", default="runs/bench/recommend_latency.json")
    a = p.parse_args()

    import pyarrow.parquet as pq
    from ray import serve

    from recsys.encoder import resolve_model_path
    from recsys.runtime import ensure_ray
    from recsys.storage import free_port
    from serve.app import app_builder

    items = _items(a.items)
    root = Path(tempfile.mkdtemp(prefix="bench-recommend-latency-"))
    (root / "items").mkdir()
    pq.write_table(items, root / "items" / "part-00000.parquet")
    exports = _exports(resolve_model_path(a.model), items, root)
    ids = items.column("item_id").to_pylist()
    rng = random.Random(0)
    bodies = [{"recent_item_ids": rng.sample(ids, a.history), "k": 10} for _ in range(200)]
    clients, n = [1, 16], {1: a.requests, 16: 2 * a.requests}

    ensure_ray(num_cpus=4)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    results: dict[str, dict[int, dict[str, float]]] = {}
    try:
        for name, e in exports.items():
            args = {**e, "items_uri": str(root / "items"), "max_batch_size": 16, "batch_wait_timeout_s": 0.005,
                    "min_replicas": 1, "max_replicas": 1, "replica_cpus": 0.5, "max_ongoing_requests": 64, "max_queued_requests": 256}
            serve.run(app_builder(args), name=name, route_prefix=f"/{name}")
            tower = serve.get_deployment_handle("Ingress", name).info.remote().result(timeout_s=60)["user_tower"]
            if tower != name:
                raise RuntimeError(f"app {name!r} ranks users by the {tower} tower")
        for name in exports:  # one at a time: the other app idles
            results[name] = {c: asyncio.run(http_load(f"http://127.0.0.1:{port}/{name}", "/recommend", bodies, c, n[c], a.budget_s, 20)) for c in clients}
            for c in clients:
                print(f"{name:9s} clients={c:2d} {results[name][c]}", flush=True)
    finally:
        serve.shutdown()

    print(f"\nmodel={a.model} items={a.items} history={a.history} (loopback HTTP, POST /recommend k=10)")
    print(f"{'user tower':10s} {'clients':>7s} {'p50 ms':>8s} {'p99 ms':>8s} {'req/s':>8s} {'errors':>6s}")
    for name, per in results.items():
        for c, r in per.items():
            print(f"{name:10s} {c:7d} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} {r['req_per_s']:8.1f} {r['errors']:6d}")
    ratios = {
        "p50_1": results["sequence"][1]["p50_ms"] / results["text"][1]["p50_ms"],
        "p99_1": results["sequence"][1]["p99_ms"] / results["text"][1]["p99_ms"],
        "req_per_s_16": results["sequence"][16]["req_per_s"] / results["text"][16]["req_per_s"],
    }
    print(f"\nsequence / text: p50 at 1 client {ratios['p50_1']:.2f}x, p99 at 1 client {ratios['p99_1']:.2f}x, "
          f"throughput at 16 clients {ratios['req_per_s_16']:.2f}x")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": a.model, "items": a.items, "history": a.history, "results": results,
                               "ratios": {k: round(v, 3) for k, v in ratios.items()}}, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
