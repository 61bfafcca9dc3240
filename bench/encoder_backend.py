"""Encoder backends (recsys.encoder ENCODER_BACKENDS: torch, onnx, onnx-int8) on real fine-tuned
exports: speed on this CPU and what each does to retrieval quality.

For each data set (an export and the prepared data of its run, read through the export's
config.yaml as recsys.evaluate reads them) and each backend:

    latency      POST /search-like query encoding at batch 1: p50 / p99 / mean ms over
                 --latency-queries test queries, backends interleaved query by query (so load
                 from other processes on a shared machine falls on all of them alike)
    throughput   queries/s at batch 32 over --throughput-queries test queries, interleaved by
                 chunks of 4 batches
    catalog      items/s embedding the whole catalog (eval.embed_batch_size)
    quality      NDCG@10 and recall@10 over the test split's task (train.task: search queries;
                 next_item users, the history text rendered as recsys.evaluate does), full
                 ranking by the exact index, with
                   (a) queries by the backend against the torch-built catalog embeddings: what
                       serving does (the index is built by jobs.index with torch), and
                   (b) both sides by the backend (an index rebuilt with it),
                 each paired over queries with torch on both sides (recsys.significance: bootstrap
                 CI of the difference, t-test), plus the cosine of the backend's vectors to
                 torch's and the overlap of the top-10s.

Prints ratios vs torch and writes the report to --out. Timings share the CPUs with whatever else
runs: read them as ratios of interleaved runs, not as absolutes. The ONNX files go to
RECSYS_CACHE (recsys.encoder.onnx_cache_dir), leaving the exports as they are.

    python -m bench.encoder_backend [--datasets homedepot,amazon] [--out docs/results/encoder-backend.txt]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATASETS = {
    "homedepot": REPO / "runs" / "ab-homedepot" / "hd600" / "export",
    "amazon": REPO / "runs" / "ab-amazon" / "batchfix-B" / "export",
}
# A backend may become the default only if it moves NDCG@10 by less than this on every data set.
MAX_REL_CHANGE = 0.005
ST_FILES = ("modules.json", "config.json", "sentence_bert_config.json")


@dataclass
class Run:
    """One data set's measurements for one backend."""

    backend: str
    load_s: float
    latency_ms: list[float]
    throughput_s: float  # seconds spent on the throughput texts
    throughput_n: int
    catalog_s: float
    n_items: int


def _check_export(export: Path) -> None:
    if not (export / "recsys_model.json").exists():
        raise FileNotFoundError(f"{export}: no recsys_model.json, not an exported model (run the train job, or pass --<dataset>-export)")
    missing = [f for f in ST_FILES if not (export / f).exists()]
    if missing:
        raise FileNotFoundError(f"{export}: not a sentence-transformers folder, missing {', '.join(missing)}")


def _timed(f: Any) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def _pct(x: float) -> str:
    return f"{x:+.2%}"


def bench_dataset(name: str, export: Path, backends: list[str], args: argparse.Namespace, out: list[str]) -> dict[str, Any]:
    from recsys import paths, significance
    from recsys.config import load_config
    from recsys.encoder import TextEncoder, onnx_cache_dir, onnx_key
    from recsys.evaluate import _query_texts, _read_dir, build_queries
    from recsys.index import build_index
    from recsys.items import read_items
    from recsys.metrics import per_query_metrics

    _check_export(export)
    cfg = load_config(export / "config.yaml")
    kind = cfg.train.task if cfg.train.task != "both" else "search"
    items = read_items(paths.items(cfg), cfg.storage)
    ex = _read_dir(paths.examples(cfg, kind, cfg.eval.split), cfg)
    if ex is None or ex.num_rows == 0:
        raise FileNotFoundError(f"{name}: no items at {paths.items(cfg)} or no {kind}/{cfg.eval.split} examples: run the prepare job")
    queries = build_queries(ex, kind)
    if args.max_queries:
        queries = queries[: args.max_queries]
    ids = items.column("item_id").to_pylist()
    item_texts = items.column("text").to_pylist()
    text_of = dict(zip(ids, item_texts, strict=True))
    exclude = [set(q["history"]) for q in queries] if cfg.eval.exclude_history else None
    relevant = [q["relevant"] for q in queries]
    bs = cfg.eval.embed_batch_size
    onnx_dir = onnx_cache_dir(onnx_key(str(export)))

    encoders: dict[str, Any] = {}
    runs: dict[str, Run] = {}
    for b in backends:
        # The export's recsys_model.json sets pooling, prefixes and limits, as in evaluation.
        where = onnx_dir if b != "torch" else None
        # The first ONNX load exports (and quantises) into the cache; the load timed is a second
        # one, from the files (and a warm page cache), as a replica restart would see it.
        TextEncoder(str(export), backend=b, onnx_dir=where)
        t = time.perf_counter()
        encoders[b] = TextEncoder(str(export), backend=b, onnx_dir=where)
        runs[b] = Run(b, time.perf_counter() - t, [], 0.0, 0, 0.0, len(ids))
    ref = encoders["torch"]
    texts = _query_texts(queries, text_of, ref.user_history_items)
    distinct = list(dict.fromkeys(texts))
    lat_texts = distinct[: args.latency_queries]
    tp_texts = (distinct * (1 + args.throughput_queries // max(1, len(distinct))))[: args.throughput_queries]
    print(f"[{name}] {len(queries)} {kind} queries, {len(ids)} items; latency over {len(lat_texts)}, throughput over {len(tp_texts)}", file=sys.stderr)

    for enc in encoders.values():  # warm-up: first calls allocate
        enc.encode_queries(lat_texts[:10], batch_size=1)
        enc.encode_queries(tp_texts[:64], batch_size=32)
    for n, text in enumerate(lat_texts):
        order = backends[n % len(backends):] + backends[: n % len(backends)]
        for b in order:
            runs[b].latency_ms.append(1e3 * _timed(lambda e=encoders[b], t=text: e.encode_queries([t], batch_size=1)))
    chunk = 32 * 4
    for n, s in enumerate(range(0, len(tp_texts), chunk)):
        part = tp_texts[s : s + chunk]
        order = backends[n % len(backends):] + backends[: n % len(backends)]
        for b in order:
            runs[b].throughput_s += _timed(lambda e=encoders[b], p=part: e.encode_queries(p, batch_size=32))
            runs[b].throughput_n += len(part)

    cat: dict[str, np.ndarray] = {}
    qv: dict[str, np.ndarray] = {}
    for b, enc in encoders.items():
        print(f"[{name}] {b}: embedding {len(ids)} items and {len(texts)} queries", file=sys.stderr)
        t = time.perf_counter()
        cat[b] = enc.encode_items(item_texts, batch_size=bs)
        runs[b].catalog_s = time.perf_counter() - t
        qv[b] = enc.encode_queries(texts, batch_size=bs)

    kmax = 10
    torch_index = build_index(cat["torch"], ids, cfg.eval.index, cfg.eval.exact_max_items)

    def rank(q: np.ndarray, index: Any) -> list[list[str]]:
        out: list[list[str]] = []
        for s in range(0, len(q), 2048):
            out += index.search(q[s : s + 2048], kmax, exclude[s : s + 2048] if exclude else None)[1]
        return out

    ranked = {("torch", "a"): rank(qv["torch"], torch_index)}
    for b in backends[1:]:
        ranked[(b, "a")] = rank(qv[b], torch_index)
        ranked[(b, "b")] = rank(qv[b], build_index(cat[b], ids, cfg.eval.index, cfg.eval.exact_max_items))
    metrics = {k: per_query_metrics(r, relevant, [kmax]) for k, r in ranked.items()}
    base = metrics[("torch", "a")]

    t_lat = np.array(runs["torch"].latency_ms)
    t_tp = runs["torch"].throughput_n / runs["torch"].throughput_s
    t_cat = runs["torch"].n_items / runs["torch"].catalog_s
    out.append(f"## {name}: {export} ({kind}, {cfg.eval.split} split: {len(queries)} queries, {len(ids)} items; "
               f"max_query_tokens={ref.max_query_tokens}, max_item_tokens={ref.max_item_tokens})")
    out.append("")
    out.append("speed (ratio = torch time / backend time; > 1 is faster)")
    out.append(f"{'backend':<10} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} {'p50 x':>6} {'p99 x':>6} {'q/s@32':>8} {'x':>6} {'items/s':>8} {'x':>6} {'load s':>7}")
    summary: dict[str, Any] = {"dataset": name, "export": str(export), "queries": len(queries), "items": len(ids), "backends": {}}
    for b in backends:
        r = runs[b]
        lat = np.array(r.latency_ms)
        tp = r.throughput_n / r.throughput_s
        cps = r.n_items / r.catalog_s
        p50, p99 = np.percentile(lat, 50), np.percentile(lat, 99)
        out.append(f"{b:<10} {p50:8.2f} {p99:8.2f} {lat.mean():8.2f} {np.percentile(t_lat, 50) / p50:6.2f} {np.percentile(t_lat, 99) / p99:6.2f} "
                   f"{tp:8.1f} {tp / t_tp:6.2f} {cps:8.1f} {cps / t_cat:6.2f} {r.load_s:7.2f}")
        summary["backends"][b] = {"p50_ms": p50, "p99_ms": p99, "mean_ms": float(lat.mean()), "qps_batch32": tp, "items_per_s": cps, "load_s": r.load_s}
    out.append("")
    out.append("vectors vs torch: cosine of query / catalog vectors (mean, min); top-10 overlap with torch's rankings (mean share)")
    for b in backends[1:]:
        cq, ci = (qv[b] * qv["torch"]).sum(1), (cat[b] * cat["torch"]).sum(1)
        overlap = {m: float(np.mean([len(set(x) & set(y)) / kmax for x, y in zip(ranked[(b, m)], ranked[("torch", "a")], strict=True)])) for m in ("a", "b")}
        out.append(f"{b:<10} queries {cq.mean():.6f} / {cq.min():.6f}, items {ci.mean():.6f} / {ci.min():.6f}; "
                   f"top-10 overlap (a) {overlap['a']:.3f}, (b) {overlap['b']:.3f}")
        summary["backends"][b].update({"cos_queries_mean": float(cq.mean()), "cos_queries_min": float(cq.min()),
                                       "cos_items_mean": float(ci.mean()), "cos_items_min": float(ci.min()), "top10_overlap": overlap})
    out.append("")
    out.append("quality vs torch on both sides, paired over queries; (a) backend queries vs the torch catalog (serving), (b) backend on both sides")
    for metric in ("ndcg@10", "recall@10"):
        out.append(f"  {metric}: torch {np.nanmean(base[metric]):.4f}")
        for b in backends[1:]:
            for m in ("a", "b"):
                c = significance.paired_comparison(metrics[(b, m)][metric], base[metric])
                out.append(f"  {b:<10} ({m}) {significance.describe(c)}")
                summary["backends"][b][f"{metric}_{m}"] = {"value": c["mean_system"], "torch": c["mean_baseline"], "rel_change": c["rel_change"],
                                                           "ci": [c["ci_low"], c["ci_high"]], "p_bootstrap": c["p_bootstrap"], "p_ttest": c["p_ttest"],
                                                           "verdict": c["verdict"]}
    out.append("")
    return summary


def main(argv: list[str] | None = None) -> None:
    import torch

    from recsys.encoder import ENCODER_BACKENDS, int8_reduce_range

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", default="homedepot,amazon", help=f"comma-separated, of {', '.join(DATASETS)}")
    ap.add_argument("--homedepot-export", type=Path, default=DATASETS["homedepot"])
    ap.add_argument("--amazon-export", type=Path, default=DATASETS["amazon"])
    ap.add_argument("--backends", default=",".join(ENCODER_BACKENDS), help="comma-separated; torch is always measured (the baseline)")
    ap.add_argument("--latency-queries", type=int, default=300)
    ap.add_argument("--throughput-queries", type=int, default=1024)
    ap.add_argument("--max-queries", type=int, default=0, help="quality over the first N test queries (0 = all)")
    ap.add_argument("--threads", type=int, default=0, help="torch (and so onnxruntime) threads; 0 = torch's default")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "encoder-backend.txt")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    backends = ["torch"] + [b for b in args.backends.split(",") if b and b != "torch"]
    for b in backends:
        if b not in ENCODER_BACKENDS:
            ap.error(f"--backends: {b!r} is not one of {', '.join(ENCODER_BACKENDS)}")
    exports = {"homedepot": args.homedepot_export, "amazon": args.amazon_export}
    names = [d for d in args.datasets.split(",") if d]
    for d in names:
        if d not in exports:
            ap.error(f"--datasets: {d!r} is not one of {', '.join(exports)}")

    import onnxruntime

    t0 = time.perf_counter()
    out = [
        "# Encoder backends: torch vs onnxruntime fp32 vs onnxruntime dynamic int8 (python -m bench.encoder_backend)",
        f"# {time.strftime('%Y-%m-%d %H:%M')}; {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; int8 reduce_range={int8_reduce_range()}",
        "# The CPUs are shared with other processes: timings are noisy; backends are interleaved so the ratios hold better than the absolutes.",
        "",
    ]
    summaries = [bench_dataset(d, exports[d], backends, args, out) for d in names]
    out.append(f"default rule: a backend may be the default only if NDCG@10 moves by < {MAX_REL_CHANGE:.1%} on every data set")
    for b in backends[1:]:
        for m in ("a", "b"):
            changes = [s["backends"][b][f"ndcg@10_{m}"]["rel_change"] for s in summaries]
            ok = all(c is not None and abs(c) < MAX_REL_CHANGE for c in changes)
            each = ", ".join(f"{s['dataset']} {_pct(c)}" for s, c in zip(summaries, changes, strict=True))
            out.append(f"  {b:<10} ({m}) NDCG@10 change {each}: {'qualifies' if ok else 'does not qualify'}")
    out.append(f"# wall {time.perf_counter() - t0:.0f} s")
    text = "\n".join(out) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(summaries, indent=2, default=float) + "\n")
    print(f"written to {args.out} (+ .json)", file=sys.stderr)


if __name__ == "__main__":
    main()
