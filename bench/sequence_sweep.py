"""Sequence-tower settings sweep on prepared next-item data (plain torch, one process).

Chooses `sequence.*` defaults on the VALIDATION split over frozen catalog embeddings, and prints
the test split for the chosen one next to the pooled-history baseline, as ratios, in one run.
Run the prepare job first (e.g. jobs/configs/train_amazon.yaml), then:

    python -m bench.sequence_sweep --data runs/amazon/data --emb path/to/emb.npy \
        --ids --set dim=300 ...

`--emb` is a .npy of the catalog's text embeddings row-aligned with the items table, or a run's
`embeddings/` parquet folder. Each `--grid key=v1,v2` adds a sweep axis. `--ensemble K` trains
each combination with seeds 0..K-1 and also ranks by the mean of the first k towers' scores
(their L2-normalised vectors concatenated, / sqrt(k)), for k = 1..K.
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from recsys.config import SequenceConfig
from recsys.metrics import average, per_query_metrics
from recsys.retrieval import search
from recsys.sequence import SequenceCatalog
from recsys.train_sequence import SequenceExamples, fit


def _table(folder: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(f) for f in sorted(glob.glob(f"{folder}/*.parquet"))])


def _emb(path: str, item_ids: list[str]) -> np.ndarray:
    if path.endswith(".npy"):
        return np.load(path)
    t = _table(path)
    pos = {i: k for k, i in enumerate(t.column("item_id").to_pylist())}
    e = np.asarray(t.column("embedding").to_pylist(), dtype=np.float32)
    return e[[pos[i] for i in item_ids]]


def _metrics(ex: SequenceExamples, split: str, items: np.ndarray, users: np.ndarray, item_ids: list[str]) -> dict[str, float]:
    """Full-ranking metrics of users (m, d) against catalog vectors (n, d), top 50."""
    ranked = [[item_ids[j] for j in top] for top, _ in search(items, users, 50)]
    m = average(per_query_metrics(ranked, ex.relevant(item_ids), [10, 50]), split)
    return {k: round(v, 4) for k, v in m.items() if not k.endswith("queries")}


def _parse(v: str) -> Any:
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--emb", required=True)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--grid", action="append", default=[])
    ap.add_argument("--ids", action="store_true", help="model.item_id_embeddings=true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ensemble", type=int, default=1, help="seeds per combination, also ranked as an ensemble")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    items = _table(f"{args.data}/items")
    item_ids = items.column("item_id").to_pylist()
    emb = _emb(args.emb, item_ids)
    dup = np.asarray(items.column("dup_group").to_pylist(), dtype=np.int64)
    base = {k: _parse(v) for k, v in (s.split("=", 1) for s in args.set)}
    axes = [(k, [_parse(x) for x in v.split(",")]) for k, v in (g.split("=", 1) for g in args.grid)]
    max_len = int(base.get("max_len", 50))  # one width for every combination: --set it, not --grid it
    ex = {s: SequenceExamples.from_table(_table(f"{args.data}/examples/next_item/{s}"), item_ids, max_len) for s in ("train", "valid", "test")}
    if args.ensemble > 1 and ("seed" in base or any(k == "seed" for k, _ in axes)):
        ap.error("--ensemble sets the seeds itself (0..K-1): drop seed from --set / --grid")
    results = []
    for combo in itertools.product(*[vals for _, vals in axes]) if axes else [()]:
        over = dict(base, **{k: v for (k, _), v in zip(axes, combo, strict=True)})
        members: dict[str, list[np.ndarray]] = {"items": [], "valid": [], "test": []}
        for member in range(args.ensemble):
            scfg = SequenceConfig(**({**over, "seed": member} if args.ensemble > 1 else over))
            t = time.perf_counter()
            model, hist = fit(scfg, ex["train"], emb, item_ids, dup, valid=ex["valid"], seed=scfg.seed, item_id_embeddings=args.ids)
            row: dict[str, Any] = {"settings": scfg.model_dump(include=set(over) | {"seed"}), "train_s": round(time.perf_counter() - t, 1),
                                   "epochs": hist["epochs"], "best_epoch": hist["best_epoch"], "params": hist["params"]}
            catalog = SequenceCatalog(model, emb, item_ids)
            members["items"].append(catalog.vectors)
            for split in ("valid", "test"):
                users = catalog.users(ex[split].histories())
                members[split].append(users)
                row.update(_metrics(ex[split], split, catalog.vectors, users, item_ids))
                if member:
                    ens = _metrics(ex[split], split, np.concatenate(members["items"], 1), np.concatenate(members[split], 1), item_ids)
                    row.update({f"ensemble{member + 1} {k}": v for k, v in ens.items()})
            results.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
