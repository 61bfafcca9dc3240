"""Ingest throughput: our Ray Data pipeline vs plain pyarrow, on the same sharded logs in S3.

Generates N rows of event parquet in K shards, uploads them to a private S3-compatible server
(rclone, stopped by its PID at the end), then reads them back
  (a) through the ingest pipeline: recsys.data.io.read_events + validation (Ray Data, streaming)
  (b) with plain pyarrow.dataset from the same server, with and without the same validation
and prints rows/s of each and the ratios.

    python -m bench.ingest [--rows 2000000] [--shards 8]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from recsys import storage
from recsys.schemas import EVENT_TYPES
from recsys.storage import LocalS3Server


def make_shard(rows: int, n_items: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    users = rng.integers(0, max(1, rows // 20), rows)
    t0 = int(dt.datetime(2026, 6, 1, tzinfo=dt.timezone.utc).timestamp() * 1000)
    has_query = rng.random(rows) < 0.5
    queries = np.array(["running shoe", "espresso machine", "dog bed", "office chair", "garden hose"], dtype=object)
    return pa.table(
        {
            "user_id": pa.array(np.char.add("U", users.astype(str)).astype(object)),
            "session_id": pa.array(np.char.add("S", (users * 7 + rng.integers(0, 5, rows)).astype(str)).astype(object)),
            "timestamp": pa.array(t0 + rng.integers(0, 60 * 86400 * 1000, rows), pa.timestamp("ms", tz="UTC")),
            "event_type": pa.array(np.array(EVENT_TYPES, dtype=object)[rng.integers(0, 4, rows)]),
            "query": pa.array(np.where(has_query, queries[rng.integers(0, 5, rows)], None)),
            "item_id": pa.array(np.char.add("P", rng.integers(0, n_items, rows).astype(str)).astype(object)),
        }
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--items", type=int, default=50_000)
    args = p.parse_args()
    from recsys.data.io import read_events
    from recsys.data.validate import validate_event_batch, validate_events
    from recsys.runtime import ensure_ray

    with tempfile.TemporaryDirectory() as tmp, LocalS3Server(root=Path(tmp) / "s3") as server:
        server.make_bucket("bench")
        os.environ.update(server.env())
        cfg = server.storage_config("s3://bench")
        per = args.rows // args.shards
        t = time.perf_counter()
        for s in range(args.shards):
            fs, path = storage.filesystem(f"s3://bench/events/part-{s:05d}.parquet", cfg)
            pq.write_table(make_shard(per, args.items, s), path, filesystem=fs)
        size = sum(f.stat().st_size for f in (Path(tmp) / "s3" / "bench" / "events").glob("*.parquet"))
        rows = per * args.shards
        print(f"{rows:,} rows in {args.shards} shards, {size / 2**20:.0f} MiB, written in {time.perf_counter() - t:.1f}s")
        known = pa.array([f"P{i}" for i in range(args.items)], pa.string())
        fs, path = storage.filesystem("s3://bench/events", cfg)

        def plain(validate: bool) -> float:
            t = time.perf_counter()
            n = 0
            for batch in pads.dataset(path, filesystem=fs, format="parquet").to_batches():
                table = pa.Table.from_batches([batch])
                if validate:
                    raw = table.append_column("_source", pa.array([""] * len(table))).append_column("_type_error", pa.nulls(len(table), pa.string()))
                    n += validate_event_batch(raw, known)[0].num_rows
                else:
                    n += len(table)
            assert n == rows, (n, rows)
            return time.perf_counter() - t

        t_plain = plain(False)
        t_plain_val = plain(True)
        ensure_ray()
        t = time.perf_counter()
        n = read_events("s3://bench/events", cfg).count()
        t_read = time.perf_counter() - t
        assert n == rows
        t = time.perf_counter()
        clean, bad = validate_events(read_events("s3://bench/events", cfg), known)
        n_ours = clean.count() + bad.count()
        t_ours = time.perf_counter() - t
        assert n_ours == rows
        import ray

        ray.shutdown()

    def line(name: str, secs: float) -> None:
        print(f"{name:55s} {secs:7.2f}s {rows / secs / 1e6:7.2f} M rows/s")

    print(f"\nRAY_DATA_PARQUET_FOOTER_NUM_ACTORS={os.environ.get('RAY_DATA_PARQUET_FOOTER_NUM_ACTORS')}, cores={os.cpu_count()}")
    line("plain pyarrow.dataset read (S3)", t_plain)
    line("plain pyarrow read + our validation, one process", t_plain_val)
    line("ours: Ray Data read_events (S3)", t_read)
    line("ours: Ray Data read_events + validate_events", t_ours)
    print(f"ratio ours/plain (read only):       {t_plain / t_read:.2f}x rows/s")
    print(f"ratio ours/plain (read + validate): {t_plain_val / t_ours:.2f}x rows/s   (goal >= 0.8x)")


if __name__ == "__main__":
    main()
