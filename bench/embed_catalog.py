"""Catalog embedding at evaluation / index time (`recsys.catalog_index.embed_catalog`): items/s
with `eval.embed_actors` = A against 1 actor, on a real catalog, in one run.

Each Ray Data actor holds 0.5 CPU, and Ray sets OMP_NUM_THREADS from that (1), so one actor
encodes on one core whatever the machine has. The bench embeds the first --items titles of a
catalog with each actor count, arms interleaved --repeats times (so load from other processes
falls on all of them alike), checks that the arms' embeddings agree, and prints items/s per arm
and the ratio to 1 actor.

    python -m bench.embed_catalog [--items-uri runs/homedepot/data/items] [--items 8192] [--actors 1,2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items-uri", default=str(REPO / "runs" / "homedepot" / "data" / "items"))
    p.add_argument("--items", type=int, default=8192, help="the first N items of the catalog (0 = all)")
    p.add_argument("--model", default="bundled")
    p.add_argument("--actors", default="1,2", help="comma-separated eval.embed_actors values; the first is the baseline")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "runs" / "bench" / "embed_catalog.json"))
    args = p.parse_args()

    from recsys.catalog_index import embed_catalog
    from recsys.config import load_config
    from recsys.items import read_items
    from recsys.runtime import ensure_ray

    if not Path(args.items_uri).exists():
        raise SystemExit(f"no catalog at {args.items_uri}: prepare a data set first (see ../shared/data/README.md)")
    items = read_items(args.items_uri)
    if args.items:
        items = items.slice(0, args.items)
    counts = [int(a) for a in args.actors.split(",")]
    base_cfg = load_config(overrides=[f"model.name_or_path={args.model}"])
    ensure_ray(cfg=base_cfg)
    times: dict[int, list[float]] = {a: [] for a in counts}
    embs: dict[int, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="bench-embed-") as tmp:
        for r in range(args.repeats):
            for a in counts:
                cfg = load_config(overrides=[f"model.name_or_path={args.model}", f"eval.embed_actors={a}"])
                t = time.perf_counter()
                emb, _ = embed_catalog(cfg, args.model, items, os.path.join(tmp, f"a{a}-r{r}"))
                times[a].append(time.perf_counter() - t)
                embs[a] = emb
                print(f"repeat {r}: {a} actor(s): {items.num_rows / times[a][-1]:.1f} items/s ({times[a][-1]:.1f} s)", flush=True)
    base = counts[0]
    rows = []
    for a in counts:
        best = min(times[a])
        diff = float(np.abs(embs[a] - embs[base]).max())
        rows.append({"actors": a, "seconds": times[a], "items_per_s_best": items.num_rows / best,
                     "ratio_vs_base": min(times[base]) / best, "max_abs_diff_vs_base": diff})
    print(f"\n{items.num_rows:,} items, model {args.model}, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()})")
    print(f"| eval.embed_actors | items/s (best of repeats) | vs {base} actor(s) | max abs diff |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['actors']} | {row['items_per_s_best']:.1f} | {row['ratio_vs_base']:.2f}x | {row['max_abs_diff_vs_base']:.1e} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"items": items.num_rows, "model": args.model, "cpus": os.cpu_count(), "arms": rows}, indent=1))


if __name__ == "__main__":
    main()
