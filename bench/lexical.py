"""BM25 analysers on a prepared search split: the configured analyser (`bm25:`) against the old
one (words as written, at least two characters, k1=1.5), with each of its levers turned off in
turn, paired over the queries.

    python -m bench.lexical --config jobs/configs/train_homedepot.yaml [--split valid] [--out F.json] [key=value ...]

Reads the run's prepared items and search examples (`python -m jobs.pipeline --stages prepare`
writes them). Full ranking over the catalog, as the `bm25` evaluation system ranks. Prints each
analyser's NDCG@10 / R@10 / NDCG@50 / R@50 / MRR@10, its ratio to the old analyser, and a paired
bootstrap and t-test over the queries. Choose settings on `valid`; `test` is for the report.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

from recsys import evaluate as ev
from recsys import paths
from recsys.bm25 import LEGACY_ANALYSER, BM25Index
from recsys.config import BM25Config, load_config
from recsys.metrics import per_query_metrics
from recsys.significance import paired_comparison

METRICS = ("ndcg@10", "recall@10", "ndcg@50", "recall@50", "mrr@10")


def arms(ours: BM25Config) -> dict[str, BM25Config]:
    """The old analyser, ours, and ours with one lever set back to the old analyser's value."""
    out = {"old": LEGACY_ANALYSER, "ours": ours}
    for key in ("stemmer", "min_word_len", "char_ngrams", "word_weight", "k1", "b"):
        old = getattr(LEGACY_ANALYSER, key)
        if getattr(ours, key) != old:
            out[f"ours, {key}={old}"] = ours.model_copy(update={key: old})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--split", default="valid", choices=("train", "valid", "test"))
    p.add_argument("--out", default="")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    cfg = load_config(a.config, a.overrides)
    items = ev._items(cfg)
    text_of = dict(zip(items.column("item_id").to_pylist(), items.column("text").to_pylist(), strict=True))
    ex = ev._read_dir(paths.examples(cfg, "search", a.split), cfg)
    if ex is None or ex.num_rows == 0:
        raise SystemExit(f"no search examples for split {a.split!r} under {cfg.storage.root}: run the prepare stage first")
    queries = [q for q in ev.build_queries(ex, "search") if q["relevant"]]
    texts = ev._query_texts(queries, text_of, cfg.model.user_history_items)
    relevant = [q["relevant"] for q in queries]
    print(f"{len(queries)} {a.split} search queries with a relevant item, {items.num_rows} items")

    results: dict[str, Any] = {}
    per_query: dict[str, dict[str, np.ndarray]] = {}
    for name, analyser in arms(cfg.bm25).items():
        t = time.perf_counter()
        index = BM25Index.build(items.column("text").to_pylist(), items.column("item_id").to_pylist(), analyser)
        build_s = time.perf_counter() - t
        t = time.perf_counter()
        ranked = ev._rank_bm25(items, index, texts, 50, None)
        query_ms = 1000 * (time.perf_counter() - t) / len(queries)
        per_query[name] = per_query_metrics(ranked, relevant, [10, 50])
        means = {m: float(np.nanmean(per_query[name][m])) for m in METRICS}
        results[name] = {"analyser": analyser.model_dump(), "build_s": round(build_s, 2), "query_ms": round(query_ms, 2),
                         "metrics": means}
        if name != "old":
            results[name]["vs_old"] = {m: paired_comparison(per_query[name][m], per_query["old"][m]) for m in METRICS}
        cells = " ".join(f"{m} {v:.4f}" for m, v in means.items())
        print(f"{name:28s} {cells}  (build {build_s:.1f} s, {query_ms:.2f} ms/query)", flush=True)

    print("\nvs the old analyser (paired over queries; bootstrap 10,000 resamples):")
    for name, r in results.items():
        if name == "old":
            continue
        c = r["vs_old"]["ndcg@10"]
        print(f"{name:28s} NDCG@10 {c['ratio']:.3f}x ({c['diff']:+.4f}, 95% CI [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}], "
              f"p {c['p_bootstrap']:.4f}) {c['verdict']}")
    if "ours" in results and len(results) > 2:
        print("\neach lever, ours against ours with it set back (NDCG@10):")
        for name in results:
            if name.startswith("ours, "):
                c = paired_comparison(per_query["ours"]["ndcg@10"], per_query[name]["ndcg@10"])
                results[name]["ours_vs_this"] = c
                print(f"{name:28s} ours - this {c['diff']:+.4f} (95% CI [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}], "
                      f"p {c['p_bootstrap']:.4f}) {c['verdict']}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"config": a.config, "overrides": a.overrides, "split": a.split, "queries": len(queries),
                       "items": items.num_rows, "arms": results}, f, indent=1)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
