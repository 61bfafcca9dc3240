"""Live user profiles: the recent items each user engaged with (newest first) and their purchases,
updated by `POST /events` and read by `/recommend` and `/score`.

Durability: with a log directory (`serve.profile_log_dir`), the store appends each accepted event
batch to `<dir>/<store name>.jsonl` and fsyncs it before answering, and a (re)started store
replays that file, so a killed store comes back with the profiles it had acknowledged. The log is
bounded: past `compact_lines` lines (and twice the users) it is rewritten as one snapshot line per
user. The detached actor runs on the head node, restarts by itself (`max_restarts=-1`), and calls
to it are retried (`max_task_retries=-1`): at least once, so a retried `add` may have been applied
already. Applied twice in a row a batch changes nothing (its items move to the front in the same
order again, purchases are a set); only another batch of the same user in between could reorder
that user's recent items.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from ray import serve

log = logging.getLogger(__name__)

# The store runs on the head node (as Serve pins its controller, by the resource Ray gives only
# the head): it restarts where its log file is, and shares the fate of the head alone, not of
# whichever worker node it happened to land on (measured: docs/reliability.md).
HEAD_NODE = "node:__internal_head__"
# The store's name becomes a file name under the log directory.
STORE_NAME = re.compile(r"^[A-Za-z0-9._-]{1,200}$")


class ProfileStore:
    """Recent engaged items (newest first) and purchases, bounded per user.

    A named detached actor rather than deployment state, so profiles outlive a redeploy or a
    restarted replica; with `log_dir`, also the loss of this actor. One actor holds them all:
    enough for one node's traffic; a shop at scale would put a key-value store (Redis, DynamoDB)
    behind the same calls.
    """

    def __init__(self, max_history: int = 50, log_dir: str = "", compact_lines: int = 10_000, name: str = "recsys-profiles") -> None:
        if not STORE_NAME.match(name):
            raise ValueError(f"profile store name {name!r}: use letters, digits, '.', '_' or '-' (it names the log file)")
        if compact_lines < 1:
            raise ValueError(f"profile log compact_lines must be >= 1, got {compact_lines}")
        self.max_history, self.log_dir, self.compact_lines, self.name = max_history, log_dir, compact_lines, name
        self.history: dict[str, collections.deque[str]] = {}
        self.purchased: dict[str, set[str]] = collections.defaultdict(set)
        self.path = Path(log_dir) / f"{name}.jsonl" if log_dir else None
        self.lines = 0
        self._log: Any = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._replay()
            if self.lines > self._bound():
                self._compact()
            else:
                self._log = self.path.open("a", encoding="utf-8")
            log.info("profile store %s: %d users replayed from %s (%d lines)", name, len(self.history), self.path, self.lines)

    def settings(self) -> dict[str, Any]:
        """What this store was started with (Profiles refuses to share a store started otherwise)."""
        return {"max_history": self.max_history, "log_dir": self.log_dir, "compact_lines": self.compact_lines}

    def add(self, user_id: str, events: list[dict[str, Any]]) -> int:
        if self._log is not None:
            # Durable before acknowledged: the caller may forget the events once this returns.
            self._append({"user_id": user_id, "events": events})
        n = self._apply(user_id, events)
        if self._log is not None and self.lines > self._bound():
            self._compact()
        return n

    def get(self, user_id: str) -> dict[str, Any]:
        return {"history": list(self.history.get(user_id, [])), "purchased": sorted(self.purchased.get(user_id, set()))}

    def dump(self) -> dict[str, dict[str, Any]]:
        """Every user's profile (what a snapshot holds)."""
        return {u: self.get(u) for u in self.history}

    def log_lines(self) -> int:
        return self.lines

    # ---- applying and persisting -------------------------------------------------------------

    def _apply(self, user_id: str, events: list[dict[str, Any]]) -> int:
        hist = self.history.setdefault(user_id, collections.deque(maxlen=self.max_history))
        for e in sorted(events, key=lambda e: e.get("timestamp") or 0):
            if e["event_type"] != "view":  # views are impressions, not interest
                if e["item_id"] in hist:
                    hist.remove(e["item_id"])
                hist.appendleft(e["item_id"])
            if e["event_type"] == "purchase":
                self.purchased[user_id].add(e["item_id"])
        return len(hist)

    def _bound(self) -> int:
        # Twice the users as well: a snapshot has one line per user, so compacting a log that is
        # mostly snapshot would rewrite it on every batch.
        return max(self.compact_lines, 2 * len(self.history))

    def _append(self, record: dict[str, Any]) -> None:
        self._log.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._log.flush()
        os.fsync(self._log.fileno())
        self.lines += 1

    def _compact(self) -> None:
        """Rewrite the log as one snapshot line per user: written beside it, fsynced, then renamed
        over it, so a kill at any moment leaves either the old log or the new one whole."""
        assert self.path is not None
        if self._log is not None:
            self._log.close()
        tmp = self.path.with_name(self.path.name + ".compacting")
        with tmp.open("w", encoding="utf-8") as f:
            for user_id, profile in self.dump().items():
                f.write(json.dumps({"user_id": user_id, **profile}, separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())
        before = self.lines
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself
        finally:
            os.close(dir_fd)
        self.lines = len(self.history)
        self._log = self.path.open("a", encoding="utf-8")
        log.info("profile log %s compacted: %d lines -> %d", self.path, before, self.lines)

    def _replay(self) -> None:
        assert self.path is not None
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        *whole, torn = data.split(b"\n")
        for n, raw in enumerate(whole, start=1):
            try:
                self._restore(json.loads(raw))
            except ValueError as e:
                raise ValueError(f"profile log {self.path} line {n} is corrupt ({e}); it holds acknowledged events, so "
                                 "the store will not start without it: repair or move the file") from None
            self.lines += 1
        if torn:
            # The last line, torn by a kill mid-write (each line is one write ending in a newline,
            # fsynced before the answer): never acknowledged, so dropping it loses nothing a
            # client was told was stored.
            log.warning("profile log %s line %d is incomplete (%d bytes): dropped, as it was never acknowledged",
                        self.path, len(whole) + 1, len(torn))
            with self.path.open("r+b") as f:
                f.truncate(len(data) - len(torn))

    def _restore(self, rec: Any) -> None:
        """One log line: an event batch ({user_id, events}) or a snapshot of a user ({user_id,
        history (newest first), purchased})."""
        if not isinstance(rec, dict) or not isinstance(rec.get("user_id"), str):
            raise ValueError("not an object with a string user_id")
        user_id = rec["user_id"]
        if "events" in rec:
            events = rec["events"]
            if not isinstance(events, list) or not all(isinstance(e, dict) and "item_id" in e and "event_type" in e for e in events):
                raise ValueError("events must be a list of {item_id, event_type, ...}")
            self._apply(user_id, events)
        elif isinstance(rec.get("history"), list) and isinstance(rec.get("purchased"), list):
            self.history[user_id] = collections.deque(rec["history"], maxlen=self.max_history)
            self.purchased.pop(user_id, None)
            if rec["purchased"]:
                self.purchased[user_id] = set(rec["purchased"])
        else:
            raise ValueError("neither an event batch (events) nor a snapshot (history, purchased)")


@serve.deployment
class Profiles:
    """The profile API with Serve's queue limits in front of the shared ProfileStore actor."""

    def __init__(self, max_history: int = 50, store_name: str = "recsys-profiles", log_dir: str = "", compact_lines: int = 10_000) -> None:
        import ray

        self.store = (
            ray.remote(ProfileStore)
            .options(name=store_name, namespace="recsys", lifetime="detached", get_if_exists=True, num_cpus=0,
                     max_restarts=-1, max_task_retries=-1, resources={HEAD_NODE: 0.001})
            .remote(max_history, log_dir, compact_lines, store_name)
        )
        # get_if_exists returns a running store as it was started: one started with another log
        # directory would silently not persist where this app was told to.
        want = {"max_history": max_history, "log_dir": log_dir, "compact_lines": compact_lines}
        have = ray.get(self.store.settings.remote(), timeout=120)
        if have != want:
            raise ValueError(f"profile store {store_name!r} is already running with {have}, not {want}: give this app another "
                             "profile_store name, or stop that store first (ray.kill on the actor)")

    async def add(self, user_id: str, events: list[dict[str, Any]]) -> int:
        return await self.store.add.remote(user_id, events)

    async def get(self, user_id: str) -> dict[str, Any]:
        return await self.store.get.remote(user_id)
