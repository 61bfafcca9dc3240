"""`make demo`: the whole flow on the embedded default, on this machine.

Starts a real S3-compatible server on loopback (rclone, stopped by its PID at the end), generates
the sample shop into it, validates it and builds training examples, fine-tunes the bundled
MiniLM with 2 Ray Train workers and DeepSpeed, evaluates against the baselines, then starts the
Ray Serve app, sends a few searches and recommendations over HTTP, prints them and shuts down.

    python -m jobs.demo --config jobs/configs/demo.yaml [section.key=value ...] [--stages ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from recsys.config import Config, load_config, to_yaml
from recsys.storage import LocalS3Server

log = logging.getLogger("jobs.demo")

STAGES = ("prepare", "train", "evaluate", "serve")


def _banner(text: str) -> None:
    print(f"\n{'=' * 78}\n{text}\n{'=' * 78}", flush=True)


def _print_prepare(summary: dict[str, Any]) -> None:
    counts = summary.get("counts", summary)
    print(json.dumps(counts, indent=2, default=str)[:4000])
    skew = summary.get("popularity_skew")
    if skew:
        print("popularity skew:", json.dumps(skew, default=str))
    dups = summary.get("duplicates")
    if dups:
        print("duplicate groups:", json.dumps(dups, default=str))


def run_demo(cfg: Config, stages: Sequence[str], s3_dir: Path) -> dict[str, Any]:
    """Run the chosen stages against a private S3 server rooted at `s3_dir`."""
    results: dict[str, Any] = {}
    bucket = cfg.storage.root.removeprefix("s3://").split("/", 1)[0]
    with LocalS3Server(root=s3_dir) as server:
        server.make_bucket(bucket)
        # Ray workers inherit these through recsys.runtime (runtime_env env_vars).
        os.environ.update(server.env())
        cfg.storage.s3_endpoint = server.endpoint
        cfg.storage.s3_access_key = server.access_key
        cfg.storage.s3_secret_key = server.secret_key
        print(f"S3 server (pid {server.proc.pid if server.proc else '?'}) at {server.endpoint}, "
              f"objects under {s3_dir}", flush=True)

        if "prepare" in stages:
            _banner("1/4 data: generate the sample shop, validate (quarantine), build examples")
            from recsys.data import prepare

            t = time.perf_counter()
            results["prepare"] = prepare.run(cfg)
            _print_prepare(results["prepare"])
            print(f"[prepare done in {time.perf_counter() - t:.1f}s]")

        if "train" in stages:
            _banner(
                f"2/4 fine-tune {cfg.model.name_or_path} with {cfg.train.num_workers} Ray Train "
                f"workers + DeepSpeed ZeRO-{cfg.train.zero_stage} ({cfg.train.precision})"
            )
            from recsys import train

            t = time.perf_counter()
            results["train"] = train.run(cfg)
            print(json.dumps(results["train"], indent=2, default=str))
            print(f"model exported to {results['train'].get('export')}")
            print(f"[train done in {time.perf_counter() - t:.1f}s]")

        if "evaluate" in stages:
            _banner("3/4 evaluate on the held-out split: fine-tuned vs zero-shot, BM25, popularity")
            from recsys import evaluate

            t = time.perf_counter()
            results["evaluate"] = evaluate.run(cfg)
            table = results["evaluate"].get("markdown") if isinstance(results["evaluate"], dict) else None
            if table:
                print(table)
            else:
                print(json.dumps(results["evaluate"], indent=2, default=str)[:4000])
            print(f"[evaluate done in {time.perf_counter() - t:.1f}s]")

        if "serve" in stages:
            _banner("4/4 serve: Ray Serve app over HTTP, a few searches and recommendations")
            from serve.demo import serve_demo

            t = time.perf_counter()
            results["serve"] = serve_demo(cfg)
            print(f"[serve done in {time.perf_counter() - t:.1f}s]")
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="jobs/configs/demo.yaml")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"subset of {STAGES}")
    parser.add_argument("--s3-dir", default="runs/demo-s3", help="where the local S3 server keeps objects")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.overrides)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = set(stages) - set(STAGES)
    if unknown:
        parser.error(f"unknown stage(s) {sorted(unknown)}; choose from {STAGES}")
    log.info("resolved config:\n%s", to_yaml(cfg))
    t = time.perf_counter()
    try:
        run_demo(cfg, stages, Path(args.s3_dir).absolute())
    finally:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        except ImportError:
            pass
    _banner(f"demo finished in {time.perf_counter() - t:.0f}s")


if __name__ == "__main__":
    main()
