"""`make demo`: the whole flow on the embedded default, on this machine.

Starts a real S3-compatible server on loopback (rclone, stopped by its PID at the end), generates
the sample shop into it, validates it and builds training examples, fine-tunes the bundled
MiniLM with 2 Ray Train workers and DeepSpeed, evaluates against the baselines, writes batch
recommendations for every user (jobs.recommend: the index, then Ray Data batch inference), then
starts the Ray Serve app, sends a few searches and recommendations over HTTP, prints them and
shuts down. The store's objects stay under --s3-dir, so `python -m jobs.recommend --config
jobs/configs/demo.yaml` (or `--stages recommend` here) runs again on them later.

    python -m jobs.demo --config jobs/configs/demo.yaml [section.key=value ...] [--stages ...]
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from jobs import _cli
from recsys.config import Config
from recsys.storage import LocalS3Server

log = logging.getLogger("jobs.demo")

STAGES = ("prepare", "train", "evaluate", "recommend", "serve")
DEFAULT_S3_DIR = "runs/demo-s3"


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


@contextlib.contextmanager
def demo_store(cfg: Config, s3_dir: Path) -> Iterator[LocalS3Server]:
    """The demo's object store: a private S3 server (rclone) over `s3_dir`, whose objects are
    plain files that outlive it; `cfg.storage` and this process's environment (which the Ray
    workers started afterwards inherit) point at it. Stopped by its own PID on exit."""
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
        yield server


def stored_demo(cfg: Config, s3_dir: str | Path = DEFAULT_S3_DIR) -> Path | None:
    """The folder holding this config's bucket from an earlier demo run, when the config names an
    s3:// root with no endpoint anywhere (nothing else could serve it): jobs run after the demo
    then start the demo's server over it again. None otherwise."""
    root = cfg.storage.root
    if not root.startswith("s3://") or cfg.storage.s3_endpoint or os.environ.get("AWS_ENDPOINT_URL"):
        return None
    bucket = root.removeprefix("s3://").split("/", 1)[0]
    folder = Path(s3_dir).absolute()
    return folder if (folder / bucket).is_dir() else None


def local_copy(uri: str, s3_dir: Path | None) -> str:
    """Where an s3:// object of the demo's store lies on disk (the server serves plain files)."""
    if s3_dir is None or not uri.startswith("s3://"):
        return uri
    return str(Path(s3_dir) / uri.removeprefix("s3://"))


def print_recommendations(result: dict[str, Any], rows: list[dict[str, Any]], s3_dir: Path | None = None) -> None:
    """A batch job's summary and its first rows, and how to read the rest (`s3_dir`: the demo's
    store, whose files are read directly)."""
    print(json.dumps({k: v for k, v in result.items() if k != "status"}, indent=2, default=str))
    for r in rows:
        who = f"user {r['user_id']}" if r["user_id"] else "request"
        what = f" query {r['query']!r}" if r["query"] else ""
        if r["error"]:
            print(f"  {who}{what}: {r['error']} ({r['error_detail']})")
        else:
            top = ", ".join(f"{i} ({s:.3f})" for i, s in zip(r["item_ids"][:5], r["scores"][:5], strict=True))
            print(f"  {who}{what}: {top}{' ...' if len(r['item_ids']) > 5 else ''}")
    print(f"read them all: pandas.read_parquet({local_copy(result['output'], s3_dir)!r}) (README: 'Batch recommendations')")


def run_demo(cfg: Config, stages: Sequence[str], s3_dir: Path) -> dict[str, Any]:
    """Run the chosen stages against a private S3 server rooted at `s3_dir`."""
    results: dict[str, Any] = {}
    with demo_store(cfg, s3_dir):
        if "prepare" in stages:
            _banner("1/5 data: generate the sample shop, validate (quarantine), build examples")
            from recsys.data import prepare

            t = time.perf_counter()
            results["prepare"] = prepare.run(cfg)
            _print_prepare(results["prepare"])
            print(f"[prepare done in {time.perf_counter() - t:.1f}s]")

        if "train" in stages:
            _banner(
                f"2/5 fine-tune {cfg.model.name_or_path} with {cfg.train.num_workers} Ray Train "
                f"workers + DeepSpeed ZeRO-{cfg.train.zero_stage} ({cfg.train.precision})"
            )
            from recsys import train

            t = time.perf_counter()
            results["train"] = train.run(cfg)
            print(json.dumps(results["train"], indent=2, default=str))
            print(f"model exported to {results['train'].get('export')}")
            print(f"[train done in {time.perf_counter() - t:.1f}s]")

        if "evaluate" in stages:
            _banner("3/5 evaluate on the held-out split: fine-tuned vs zero-shot, BM25, popularity")
            from recsys import evaluate

            t = time.perf_counter()
            results["evaluate"] = evaluate.run(cfg)
            # Compact: headline metrics per task, best in bold; the full table is in report.md.
            print(results["evaluate"]["summary"])
            print(f"[evaluate done in {time.perf_counter() - t:.1f}s]")

        if "recommend" in stages:
            _banner("4/5 batch recommendations: top-10 for every user (Ray Data actor pool), as parquet")
            from recsys import recommend

            t = time.perf_counter()
            results["recommend"] = recommend.run(cfg)
            print_recommendations(results["recommend"], recommend.head(results["recommend"]["output"], cfg), s3_dir)
            print(f"[recommend done in {time.perf_counter() - t:.1f}s]")

        if "serve" in stages:
            _banner("5/5 serve: Ray Serve app over HTTP, a few searches and recommendations")
            from serve.demo import serve_demo

            t = time.perf_counter()
            results["serve"] = serve_demo(cfg)
            print(f"[serve done in {time.perf_counter() - t:.1f}s]")
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = _cli.parser(__doc__, default_config="jobs/configs/demo.yaml")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"subset of {STAGES}")
    parser.add_argument("--s3-dir", default=DEFAULT_S3_DIR, help="where the local S3 server keeps objects")
    args = parser.parse_args(_cli.argv_list(argv))
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = set(stages) - set(STAGES)
    if unknown:
        parser.error(f"unknown stage(s) {sorted(unknown)}; choose from {STAGES}")
    cfg = _cli.load(parser, args)
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
