"""ANN index latency and recall against exact search, one query at a time, in process.

    python -m bench.ann_latency --items 1000000 --dim 384 [--queries 1000] [--k 100] [--nprobe N]
    python -m bench.ann_latency --embeddings RUN/index/embeddings.npy   # real vectors instead

Builds the catalog index (recsys.index.Index, kind faiss: IVF-Flat) over synthetic embeddings and
times `Index.search_one` per query, unfiltered and with filters keeping ~10% and ~0.5% of the
items, against exact brute-force numpy (`retrieval.top_k(emb @ q, keep, k)`, the exact kind's
search_one). Prints build time, index memory, p50 / p99 latency, recall@k against exact, and
exact / ANN as a ratio; also writes it to docs/results/ann-latency.txt (--out).

Synthetic embeddings (uniformly random vectors have no neighbourhoods, which no real embedding
model produces, and make any ANN look bad): L2-normalised, drawn as
  - 64 topic directions t (unit Gaussian) and one shared direction m (embeddings are anisotropic:
    all of them lean one way, median cosine of two unrelated items ~0.02 here);
  - 4,096 cluster centres c = unit(unit(t + 1.0 u) + 0.3 m), t a random topic, u a random unit
    vector; cluster sizes lognormal(0, 1) (some large clusters, a long tail of small ones);
  - items x = unit(c + 1.5 u): cosine ~0.55 to their centre, ~0.3 to another item of the cluster;
  - queries q = unit(x + 0.5 u) around random items x (a query lands near what it is about):
    cosine ~0.9 to that item, its 100th neighbour ~0.30, its 1000th ~0.23.
Filters are random masks (each item kept with probability p, independently of the vectors): the
hard case for an ANN, whose kept neighbours are sparse; a category filter keeps related items,
whose neighbourhoods stay dense.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time
from pathlib import Path

import numpy as np

from recsys.index import Index

OUT = Path(__file__).resolve().parents[1] / "docs" / "results" / "ann-latency.txt"


def _unit(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def synthetic(n: int, dim: int, n_clusters: int = 4096, n_topics: int = 64, seed: int = 0) -> np.ndarray:
    """(n, dim) float32 unit rows: the generator of the module docstring."""
    rng = np.random.default_rng(seed)
    topics = _unit(rng.standard_normal((n_topics, dim), dtype=np.float32))
    shared = _unit(rng.standard_normal((1, dim), dtype=np.float32))
    u = _unit(rng.standard_normal((n_clusters, dim), dtype=np.float32))
    centres = _unit(_unit(topics[rng.integers(n_topics, size=n_clusters)] + 1.0 * u) + 0.3 * shared)
    w = rng.lognormal(0.0, 1.0, size=n_clusters)
    cluster = rng.choice(n_clusters, size=n, p=w / w.sum())
    out = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, 100_000):  # in blocks: the float32 noise of 1M x 384 at once is 1.5 GB more
        e = min(n, s + 100_000)
        out[s:e] = _unit(centres[cluster[s:e]] + 1.5 * _unit(rng.standard_normal((e - s, dim), dtype=np.float32)))
    return out


def queries_near(emb: np.ndarray, m: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    near = emb[rng.integers(len(emb), size=m)]
    return _unit(near + 0.5 * _unit(rng.standard_normal(near.shape, dtype=np.float32)))


def _ms(lat: list[float]) -> tuple[float, float]:
    return float(np.percentile(lat, 50) * 1e3), float(np.percentile(lat, 99) * 1e3)


def timed(index: Index, qs: np.ndarray, k: int, keep: np.ndarray | None = None) -> tuple[list[np.ndarray], list[float]]:
    """Each query's top-k positions through `index.search_one`, and its latency in seconds."""
    tops, lat = [], []
    for q in qs:
        t0 = time.perf_counter()
        top, _ = index.search_one(q, k, keep)
        lat.append(time.perf_counter() - t0)
        tops.append(top)
    return tops, lat


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--embeddings", default="", help="an (n, dim) .npy of real item embeddings (a saved index's embeddings.npy) instead of synthetic ones")
    p.add_argument("--nprobe", type=int, default=0, help="0 = the index's default")
    p.add_argument("--sweep", default="8,16,24,32,48", help="nprobe values for the unfiltered sweep (first 300 queries); empty = none")
    p.add_argument("--out", default=str(OUT))
    a = p.parse_args()
    lines: list[str] = []

    def say(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    t = time.perf_counter()
    if a.embeddings:
        emb = _unit(np.load(a.embeddings).astype(np.float32))
        a.items, a.dim = emb.shape
    else:
        emb = synthetic(a.items, a.dim)
    qs = queries_near(emb, a.queries)
    ids = [str(i) for i in range(a.items)]
    gen_s = time.perf_counter() - t
    t = time.perf_counter()
    ann = Index(emb, ids, "faiss", **({"nprobe": a.nprobe} if a.nprobe else {}))
    build_s = time.perf_counter() - t
    exact = Index(emb, ids, "exact")
    n = a.items
    mem = ann._faiss.ntotal * (a.dim * 4 + 8) + ann.nlist * a.dim * 4  # IVF-Flat: vectors + ids + centroids
    data = a.embeddings or "synthetic clustered embeddings, bench/ann_latency.py"
    say(f"ANN latency: {n} items x {a.dim} ({data}), "
        f"{a.queries} single queries, top-{a.k}, in process")
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    say(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average {load} before the queries "
        f"(above the core count = other jobs compete: timings noisy); FAISS single-query search is one thread, numpy's matvec "
        f"uses the BLAS threads")
    say(f"index: {type(ann._faiss).__name__} nlist={ann.nlist} nprobe={ann.nprobe} "
        f"filter_exact_max_kept={ann.filter_exact_max_kept}")
    say(f"data {gen_s:.1f}s; build (train + add) {build_s:.1f}s; index memory {mem / 2**30:.2f} GiB "
        f"(+ the embeddings kept for exact scoring {emb.nbytes / 2**30:.2f} GiB)")

    rng = np.random.default_rng(2)
    ten, half = rng.random(n) < 0.10, rng.random(n) < 0.005
    # (name, mask, filter_exact_max_kept): the last row forces the IVF path where the default
    # scores the kept subset exactly, to show where the two cross.
    cases = [("unfiltered", None, ann.filter_exact_max_kept), ("filter ~10%", ten, ann.filter_exact_max_kept),
             ("filter ~0.5%", half, ann.filter_exact_max_kept), ("~0.5%, IVF", half, 0)]
    default_max_kept = ann.filter_exact_max_kept
    say()
    say(f"{'case':14s} {'kept':>8s} {'ANN p50':>8s} {'ANN p99':>8s} {'recall@' + str(a.k):>10s} "
        f"{'exact p50':>9s} {'exact p99':>9s} {'exact/ANN p50':>13s}  path")
    for name, keep, max_kept in cases:
        ann.filter_exact_max_kept = max_kept
        kept = n if keep is None else int(keep.sum())
        mask = np.ones(n, dtype=bool) if keep is None else keep
        truth, lat_exact = timed(exact, qs, a.k, keep)
        got, lat = timed(ann, qs, a.k, keep)
        want = min(a.k, kept)
        bad = sum(int((~mask[g]).sum()) for g in got)
        short = sum(len(g) < want for g in got)
        if bad or short:
            raise AssertionError(f"{name}: {bad} filtered-out items returned, {short} queries got fewer than {want}")
        recall = float(np.mean([len(np.intersect1d(g, w)) / want for g, w in zip(got, truth, strict=True)]))
        (p50, p99), (e50, e99) = _ms(lat), _ms(lat_exact)
        path = "IVF" if keep is None or kept > ann.filter_exact_max_kept else "exact over the kept"
        say(f"{name:14s} {kept:8d} {p50:6.2f}ms {p99:6.2f}ms {recall:10.4f} {e50:7.2f}ms {e99:7.2f}ms {e50 / p50:12.1f}x  {path}")
    ann.filter_exact_max_kept = default_max_kept

    if a.sweep and ann.nlist:
        say()
        say(f"nprobe sweep, unfiltered, first {min(300, a.queries)} queries:")
        default = ann.nprobe
        sub = qs[:300]
        truth = [exact.search_one(q, a.k)[0] for q in sub]
        for nprobe in [int(v) for v in a.sweep.split(",")]:
            ann.nprobe = nprobe
            got, lat = timed(ann, sub, a.k)
            rec = [len(np.intersect1d(top, w)) / a.k for top, w in zip(got, truth, strict=True)]
            p50, p99 = _ms(lat)
            say(f"  nprobe {nprobe:3d}: recall@{a.k} {np.mean(rec):.4f}  p50 {p50:.2f}ms  p99 {p99:.2f}ms")
        ann.nprobe = default
    say()
    say(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB; "
        f"load average at the end {' / '.join(f'{v:.1f}' for v in os.getloadavg())} (1 / 5 / 15 min, 2 cores)")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text("\n".join(lines) + "\n")
        print(f"written to {a.out}")


if __name__ == "__main__":
    main()
