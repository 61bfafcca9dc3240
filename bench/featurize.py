"""Featurising training batches (`recsys.features.collate`): CPU per example with the token-id
caches a training process keeps (`BatchTokens`) against tokenising every text whole, on a
prepared shop's own training examples, in one run, with the tensors checked equal.

The caches keep each item's token ids and each part of a user text (the query, each history
item's text) once they have been tokenised, and compose a query's ids from its parts where
the tokenizer splits words before modelling them (WordPiece). How much that saves depends on how
often a shop's examples repeat items and queries, so this bench reads a real prepared root
(`make demo`'s or a benchmark's `runs/<name>`), in the order training would (its examples'
files, one pass). The two arms take turns on each batch (alternating which goes first), so load from other processes falls on
both alike; each arm keeps its caches across the pass. CPU is this process's CPU time
(`time.process_time`), the tokenizer on one thread (TOKENIZERS_PARALLELISM=false, as training).

    python -m bench.featurize --root runs/homedepot [--batches 400] [--batch 256]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=str(REPO / "runs" / "homedepot"), help="a prepared storage.root")
    p.add_argument("--batches", type=int, default=400, help="batches per arm (0 = one whole pass)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--model", default="bundled")
    p.add_argument("--max-query-tokens", type=int, default=256)
    p.add_argument("--max-item-tokens", type=int, default=128)
    p.add_argument("--out", default="", help="a JSON file for the result (default: runs/bench/featurize-<root name>.json)")
    args = p.parse_args()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"

    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from recsys import paths
    from recsys.config import load_config
    from recsys.features import BatchTokens, collate
    from recsys.items import ItemTable
    from recsys.model import load_tokenizer

    root = Path(args.root).absolute()
    cfg = load_config(None, [f"storage.root={root}", f"model.name_or_path={args.model}", "train.task=both",
                             f"model.max_query_tokens={args.max_query_tokens}", f"model.max_item_tokens={args.max_item_tokens}"])
    items = ItemTable.load(cfg)
    tokenizer = load_tokenizer(cfg.model)
    files = sorted(f for kind in ("search", "next_item") for f in Path(paths.examples(cfg, kind, "train")).glob("*.parquet"))
    if not files:
        raise SystemExit(f"no training examples under {root}: run prepare for it first")
    cols = ["kind", "user_id", "query", "history", "item_id", "weight"]
    table = pa.concat_tables([pq.read_table(f, columns=cols) for f in files], promote_options="permissive")
    # One pass in a seeded random order, as training's shuffle reads it.
    table = table.take(np.random.default_rng(0).permutation(len(table)))
    n_batches = len(table) // args.batch if not args.batches else min(args.batches, len(table) // args.batch)
    caches = BatchTokens(items, tokenizer, cfg.model)
    cpu = {"whole": 0.0, "cached": 0.0}
    for b in range(n_batches):
        part = table.slice(b * args.batch, args.batch)
        batch = {c: part.column(c).to_numpy(zero_copy_only=False) for c in cols}
        out = {}
        for arm in (("whole", "cached") if b % 2 == 0 else ("cached", "whole")):  # neither always goes first
            t0 = time.process_time()
            # "whole": no caches, every text tokenised whole (what collate did before them).
            out[arm] = collate(batch, items, tokenizer, cfg, tokens=caches if arm == "cached" else None)
            cpu[arm] += time.process_time() - t0
        want, got = out["whole"], out["cached"]
        for k in want:
            if not torch.equal(want[k], got[k]):
                raise SystemExit(f"batch {b}: {k} differs between the cached and the whole tokenisation")
    rows = n_batches * args.batch
    result = {
        "root": str(root), "model": args.model, "rows": rows, "batches": n_batches, "batch": args.batch,
        "examples": len(table), "items": len(items),
        "whole_cpu_ms_per_example": 1000 * cpu["whole"] / rows, "cached_cpu_ms_per_example": 1000 * cpu["cached"] / rows,
        "speedup": cpu["whole"] / max(cpu["cached"], 1e-9), "composed_queries": caches.queries.compose,
        "cached_item_rows": len(caches.items.kept), "cached_text_parts": len(caches.queries.kept),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_avg_1m": os.getloadavg()[0],
    }
    out = Path(args.out or REPO / "runs" / "bench" / f"featurize-{root.name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"{root.name}: {rows:,} examples ({n_batches} batches of {args.batch}) of {len(table):,}, {len(items):,} items")
    print(f"  tokenise whole   {result['whole_cpu_ms_per_example']:.3f} CPU ms / example")
    print(f"  token-id caches  {result['cached_cpu_ms_per_example']:.3f} CPU ms / example "
          f"(queries composed: {caches.queries.compose})")
    print(f"  ratio: the caches use {1 / result['speedup']:.2f}x the CPU ({result['speedup']:.2f}x less); tensors equal in every batch")
    print(f"  -> {out}")


if __name__ == "__main__":
    main()
