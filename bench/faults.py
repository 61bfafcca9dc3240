"""Faults for tests and benches: the real S3 server (rclone) stopped and restarted on its own
port, triggered from outside by what the server shows (its request log, the files an upload
creates), never by a hook in the code under test."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recsys.storage import LocalS3Server


@dataclass
class Outage:
    """What a fault thread did: when the server went down and came back, and what it saw then."""

    seen: dict[str, int] = field(default_factory=dict)
    down_at: float = 0.0
    up_at: float = 0.0
    error: BaseException | None = None


def restart(server: LocalS3Server, down_s: float, hard: bool = False) -> tuple[float, float]:
    """Stop the server by its PID (`hard`: SIGKILL, so requests in flight break at once), keep it
    down `down_s` seconds, start it on the same port."""
    port = server.port
    if hard and server.proc is not None:
        server.proc.kill()
        server.proc.wait()
    server.stop()
    down_at = time.monotonic()
    time.sleep(down_s)
    server.port = port
    server.start()
    return down_at, time.monotonic()


def logging_requests(server: LocalS3Server) -> int:
    """Restart the server with its request log on; returns the log's offset from which on
    `gets` counts."""
    server.log_requests = True
    restart(server, down_s=0.0)
    return server.log_path.stat().st_size


def gets(server: LocalS3Server, bucket: str, key_prefix: str, offset: int) -> int:
    """GET requests the server logged since `offset` for objects under `bucket/key_prefix`."""
    with server.log_path.open("rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    return text.count(f"GET OBJECT Bucket: {bucket} Object: {key_prefix}")


def when(condition: Callable[[], dict[str, int] | None], fault: Callable[[], tuple[float, float]], done: threading.Event,
         poll_s: float = 0.01) -> tuple[threading.Thread, Outage]:
    """A thread that polls `condition` until it returns what it saw, then runs `fault`."""
    out = Outage()

    def watch() -> None:
        try:
            while not done.is_set():
                seen = condition()
                if seen is not None:
                    out.seen = seen
                    out.down_at, out.up_at = fault()
                    return
                time.sleep(poll_s)
        except BaseException as e:  # surfaced by the test, not lost in the thread
            out.error = e

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t, out


@contextmanager
def fault_when(condition: Callable[[], dict[str, int] | None], fault: Callable[[], tuple[float, float]],
               poll_s: float = 0.01, join_s: float = 60.0) -> Iterator[Outage]:
    """`when` around a block: the fault thread watches while the block runs, and is stopped
    (and waited for) when it ends."""
    done = threading.Event()
    watcher, out = when(condition, fault, done, poll_s)
    try:
        yield out
    finally:
        done.set()
        watcher.join(timeout=join_s)


def frozen(server: LocalS3Server, then: Callable[[], None], hold_s: float = 1.0) -> tuple[float, float]:
    """SIGSTOP the server (requests in flight hang half done), run `then`, hold, SIGCONT."""
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)
    down_at = time.monotonic()
    try:
        then()
        time.sleep(hold_s)
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    return down_at, time.monotonic()


def kill_train_worker(address: str) -> int:
    """SIGKILL one live Ray Train worker process of the cluster at `address` (as an OOM kill or
    a lost node would), from outside; returns its PID, 0 when none was alive."""
    from ray.util.state import list_actors

    workers = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    if not workers:
        return 0
    pid = int(workers[0].pid)
    os.kill(pid, signal.SIGKILL)
    return pid


def complete_rows(path: Path) -> list[dict[str, Any]]:
    """A run's JSON-lines metrics file read from disk while it is being written: the complete
    rows (rank 0 rewrites the file every step, so a torn line is skipped; [] while absent)."""
    try:
        text = path.read_text()
    except OSError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def run_dir(server: LocalS3Server, cfg: Any) -> Path:
    """A training run's folder as the S3 server's own files hold it (read without S3, so it works
    while the server is down or frozen)."""
    return Path(server.root) / cfg.storage.root.removeprefix("s3://") / cfg.train.run_name
