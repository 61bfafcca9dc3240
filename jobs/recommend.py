"""Batch recommendations and search: top-k for every user or every request row, as parquet.

Ray Data batch inference (an actor pool of encoders) over every user of the shop's prepared data,
or over a file of requests; written to <root>/<run>/recommendations/ with the identity of the
model that ranked them.

    python -m jobs.recommend --config jobs/configs/demo.yaml          # after `make demo`
    python -m jobs.recommend --config jobs/configs/train_local.yaml recommend.input_uri=requests.jsonl recommend.k=20
    ray job submit --working-dir . -- python -m jobs.recommend --config jobs/configs/train_cluster.yaml

Requests, output columns and filters: recsys/recommend.py and the recommend section of
recsys/config.py. The model, catalog and index are the ones the Serve app would serve; the run's
index is built first when missing or stale (recommend.build_index).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from jobs import _cli


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = _cli.parser(__doc__)
    p.add_argument(
        "--s3-dir", default="auto", metavar="DIR",
        help="serve an s3:// storage.root from DIR with a private S3 server while the job runs, as the "
             "demo does; 'auto' (default): the demo's runs/demo-s3 when the root has no endpoint and "
             "DIR holds its bucket; 'none': never",
    )
    args = p.parse_args(_cli.argv_list(argv))
    cfg = _cli.load(p, args)
    from jobs.demo import DEFAULT_S3_DIR, demo_store, print_recommendations, stored_demo
    from recsys import recommend

    if args.s3_dir == "none":
        store = None
    else:
        store = stored_demo(cfg, DEFAULT_S3_DIR if args.s3_dir == "auto" else args.s3_dir)
        if store is None and args.s3_dir != "auto":
            p.error(f"--s3-dir {args.s3_dir}: no bucket of storage.root={cfg.storage.root} in it "
                    "(or the root is not s3://, or an S3 endpoint is set)")
    if store:
        print(f"storage.root {cfg.storage.root} names no S3 endpoint and {store} holds its bucket (the demo's "
              "store): serving it with a private S3 server while the job runs (--s3-dir none: never)", flush=True)
    with demo_store(cfg, store) if store else contextlib.nullcontext():
        result = recommend.run(cfg)
        print_recommendations(result, recommend.head(result["output"], cfg), store)
    return result


if __name__ == "__main__":
    main()
