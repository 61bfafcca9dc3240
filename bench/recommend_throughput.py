"""Batch recommendation throughput: the Ray Data job (jobs.recommend) vs a plain single-process loop
over the same model and index, and the job's scaling with actors.

A synthetic catalog and a parquet file of requests (histories of 1-10 catalog items, a fifth of
them searches) are written to a temp dir, the catalog is embedded once and saved as the index. Then:

    loop      one process reads the file with pyarrow and, batch by batch, renders the user text,
              encodes it (TextEncoder) and takes the top-k (recsys.retrieval.search): the same work
              as the job, without Ray. With 1 torch thread (what one actor gets) and with all cores.
    job       recsys.recommend.run with 1 and 2 actors (--cpus logical CPUs each), end to end: read, actor start (model + index load), ranking, parquet write, the
              rows in = rows out check. Ray is started before the clock.

Prints rows/s of each, the job's fixed cost (a 1-row run), the ratios job / loop and 2 actors /
1 actor, and whether the job's top-k equals the loop's.

    python -m bench.recommend_throughput [--model bundled|tiny-random|PATH] [--items 2000] [--rows 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


def _requests(n: int, ids: list[str], seed: int = 0) -> pa.Table:
    from bench.serve_load import QUERIES

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        hist = rng.sample(ids, rng.randint(1, 10))
        query = rng.choice(QUERIES) if i % 5 == 0 else None
        rows.append({"request_id": str(i), "history": hist, "query": query})
    return pa.Table.from_pylist(rows, schema=pa.schema([("request_id", pa.string()), ("history", pa.list_(pa.string())), ("query", pa.string())]))


def loop(model: str, items: pa.Table, index_dir: str, requests: Path, k: int, batch: int, threads: int) -> tuple[float, dict[str, list[str]]]:
    """The plain single-process loop over the requests file: (wall seconds, request_id -> top-k ids)."""
    import torch

    from recsys.encoder import TextEncoder, render_user_text
    from recsys.index import load_index
    from recsys.retrieval import align_embeddings, search

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    enc = TextEncoder(model)
    index = load_index(index_dir, model_id=enc.model_id)
    ids = items.column("item_id").to_pylist()
    texts = items.column("text").to_pylist()
    pos = {i: n for n, i in enumerate(ids)}
    emb = align_embeddings(index.ids, index.emb, ids, index_dir)
    out: dict[str, list[str]] = {}
    for b in pq.ParquetFile(requests).iter_batches(batch_size=batch):
        rows = b.to_pylist()
        user_texts, excluded = [], []
        for r in rows:
            hist = list(reversed(r["history"] or []))  # newest first
            user_texts.append(render_user_text(r["query"], [texts[pos[h]] for h in hist if h in pos], enc.user_history_items))
            excluded.append([pos[h] for h in hist if h in pos])
        q = enc.encode_queries(user_texts, batch_size=64)
        for r, (top, _) in zip(rows, search(emb, q, k, None, excluded), strict=True):
            out[r["request_id"]] = [ids[i] for i in top]
    return time.perf_counter() - t0, out


def job(base: dict[str, Any], root: Path, input_uri: str, actors: int, cpus: float, name: str) -> tuple[float, dict[str, Any], dict[str, list[str]]]:
    from recsys import recommend
    from recsys.config import load_config

    out_dir = root / f"out-{name}"
    cfg = load_config(None, [f"{k}={v}" for k, v in {**base, "recommend.input_uri": input_uri, "recommend.output_uri": str(out_dir),
                                                    "recommend.actors": actors, "recommend.cpus_per_actor": cpus}.items()])
    t0 = time.perf_counter()
    summary = recommend.run(cfg)
    wall = time.perf_counter() - t0
    got = {r["request_id"]: r["item_ids"] for r in pq.read_table(out_dir).select(["request_id", "item_ids"]).to_pylist()}
    return wall, summary, got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="bundled", help="bundled (MiniLM), tiny-random, or a model path")
    ap.add_argument("--items", type=int, default=2000)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--cpus", type=float, default=0.5, help="logical CPUs per actor")
    ap.add_argument("--out", default="", help="also write the figures as JSON here")
    args = ap.parse_args()

    from bench.serve_load import _items
    from recsys.encoder import TextEncoder, resolve_model_path
    from recsys.index import build_index
    from recsys.runtime import ensure_ray

    model = resolve_model_path(args.model)
    tmp = Path(tempfile.mkdtemp(prefix="recsys-bench-recommend-"))
    items = _items(args.items)
    (tmp / "items").mkdir()
    pq.write_table(items, tmp / "items" / "part-00000.parquet")
    enc = TextEncoder(model)
    t = time.perf_counter()
    build_index(enc.encode_items(items.column("text").to_pylist()), items.column("item_id").to_pylist(), model_id=enc.model_id).save(str(tmp / "index"))
    print(f"catalog of {args.items} items embedded in {time.perf_counter() - t:.1f}s; model {args.model} ({enc.model_id})", flush=True)
    del enc
    requests = _requests(args.rows, items.column("item_id").to_pylist())
    req_path = tmp / "requests.parquet"
    pq.write_table(requests, req_path)
    pq.write_table(requests.slice(0, 1), tmp / "one.parquet")

    results: dict[str, Any] = {"rows": args.rows, "items": args.items, "model": args.model, "k": args.k, "cpu_count": os.cpu_count(),
                               "load_avg_before": [round(x, 1) for x in os.getloadavg()]}
    for threads in (1, os.cpu_count() or 1):
        wall, want = loop(model, items, str(tmp / "index"), req_path, args.k, args.batch_size, threads)
        results[f"loop_{threads}thread"] = {"wall_s": round(wall, 2), "rows_per_s": round(args.rows / wall, 1)}
        print(f"loop, {threads} thread(s): {args.rows} rows in {wall:.1f}s = {args.rows / wall:.1f} rows/s", flush=True)

    ensure_ray(include_dashboard=False)
    base = {"storage.root": str(tmp / "root"), "serve.model_uri": model, "serve.items_uri": str(tmp / "items"),
            "serve.index_uri": str(tmp / "index"), "recommend.k": args.k, "recommend.batch_size": args.batch_size,
            "recommend.exclude_history": "true"}
    wall1, _, _ = job(base, tmp, str(tmp / "one.parquet"), 1, args.cpus, "fixed")
    results["job_fixed_cost_s"] = round(wall1, 2)
    print(f"job fixed cost (1 row, 1 actor): {wall1:.1f}s", flush=True)
    same = True
    for actors in (1, 2):
        wall, summary, got = job(base, tmp, str(req_path), actors, args.cpus, f"a{actors}")
        same &= got == want
        results[f"job_{actors}actor"] = {"wall_s": round(wall, 2), "rows_per_s": round(args.rows / wall, 1),
                                          "rows_per_s_after_fixed_cost": round(args.rows / max(1e-9, wall - wall1), 1),
                                          "summary_rows_out": summary["rows_out"]}
        print(f"job, {actors} actor(s): {args.rows} rows in {wall:.1f}s = {args.rows / wall:.1f} rows/s "
              f"({args.rows / max(1e-9, wall - wall1):.1f} rows/s after the fixed cost)", flush=True)
    results["identical_top_k"] = same
    results["load_avg_after"] = [round(x, 1) for x in os.getloadavg()]
    loop1, loopn = results["loop_1thread"]["rows_per_s"], results[f"loop_{os.cpu_count() or 1}thread"]["rows_per_s"]
    j1, j2 = results["job_1actor"]["rows_per_s"], results["job_2actor"]["rows_per_s"]
    results["ratios"] = {"job_1actor_vs_loop_1thread": round(j1 / loop1, 2), "job_2actor_vs_loop_all_cores": round(j2 / loopn, 2),
                         "job_2actor_vs_1actor": round(j2 / j1, 2)}
    print("\nours vs baseline (rows/s ratio):")
    for k, v in results["ratios"].items():
        print(f"  {k}: {v}x")
    print(f"job top-k identical to the loop's: {same}; load average before/after: {results['load_avg_before']} / {results['load_avg_after']}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
