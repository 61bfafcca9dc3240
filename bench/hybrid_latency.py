"""Ranking cost per query of hybrid search against dense and BM25 alone, in process, over a
prepared catalog (no encoding: query vectors are random; BM25 reads real test queries).

    python -m bench.hybrid_latency --config jobs/configs/train_homedepot.yaml [--run hd600] [--queries 300]

Needs the run's catalog embeddings (<root>/<run>/embeddings, written by evaluate) and its
prepared examples. Prints p50 / p99 ms of each and hybrid / dense as a ratio.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pyarrow.parquet as pq

from recsys import evaluate as ev
from recsys import hybrid, paths, retrieval, storage
from recsys.config import load_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--run", default="")
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    cfg = load_config(a.config, [*a.overrides, *([f"train.run_name={a.run}"] if a.run else [])])
    items = ev._items(cfg)
    ids = items.column("item_id").to_pylist()
    (part,) = storage.list_files(paths.embeddings(cfg), cfg.storage, ".parquet")
    t = pq.read_table(part)
    order = {i: n for n, i in enumerate(t.column("item_id").to_pylist())}
    emb = np.stack(t.column("embedding").to_numpy(zero_copy_only=False))[[order[i] for i in ids]].astype(np.float32)
    bm25 = ev._bm25_scorer(items, cfg)
    qs = [q["query"] for q in ev.build_queries(ev._read_dir(paths.examples(cfg, "search", "test"), cfg), "search")][: a.queries]
    vecs = np.random.default_rng(0).standard_normal((len(qs), emb.shape[1])).astype(np.float32)
    allowed = np.ones(len(ids), dtype=bool)
    fusion = hybrid.Fusion("convex", 0.55)

    def timed(fn: object) -> tuple[float, float]:
        lat = []
        for i, q in enumerate(qs):
            t0 = time.perf_counter()
            fn(i, q)  # type: ignore[operator]
            lat.append(time.perf_counter() - t0)
        return float(np.percentile(lat, 50) * 1e3), float(np.percentile(lat, 99) * 1e3)

    res = {
        "dense": timed(lambda i, q: retrieval.top_k(emb @ vecs[i], allowed, 10)),
        "lexical": timed(lambda i, q: retrieval.top_k(bm25.scores(q), allowed, 10)),
        "hybrid": timed(lambda i, q: hybrid.fuse(emb @ vecs[i], bm25.scores(q), allowed, 10, fusion)),
    }
    print(f"{len(ids)} items, {len(qs)} queries, top-10, ranking only (no encoding)")
    for name, (p50, p99) in res.items():
        print(f"{name:8s} p50 {p50:7.2f} ms  p99 {p99:7.2f} ms")
    print(f"hybrid / dense p50: {res['hybrid'][0] / res['dense'][0]:.2f}x")


if __name__ == "__main__":
    main()
