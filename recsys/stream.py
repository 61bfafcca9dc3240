"""The batches one training rank reads, epoch after epoch, and where it stands for a resume.

A rank reads its Ray Train dataset shard (`get_dataset_shard`) in seeded local-shuffle batches.
What it has consumed is kept as one content hash per row, per epoch, and saved into every
checkpoint (one file per rank). A resumed attempt loads every rank's file and walks its new
shard past the rows consumed in the open epoch (a multiset: equal rows are interchangeable),
re-batching the rest. That holds whatever the worker count or batch size of the checkpointed
attempt was: each rank's shard depends on the worker count, so counting consumed batches (what
this replaced) skipped the right number of rows but not the consumed ones. With the same worker
count and batch size, the consumed rows are whole leading batches of the same seeded stream, so
the resumed attempt reads exactly what an uninterrupted run reads from there on."""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

STATE_GLOB = "recsys_stream.rank*.npz"


def _value(v: Any) -> bytes:
    """One cell as bytes, whole (no repr truncation of long arrays, no object pointers)."""
    if isinstance(v, np.ndarray):
        if v.dtype == object:
            return b"[" + b"\x02".join(_value(x) for x in v) + b"]"
        return str(v.dtype).encode() + b"\x01" + np.ascontiguousarray(v).tobytes()
    if isinstance(v, str):
        return v.encode("utf-8", "surrogatepass")
    if isinstance(v, bytes):
        return v
    if isinstance(v, (list, tuple)):
        return b"[" + b"\x02".join(_value(x) for x in v) + b"]"
    return repr(v).encode()


def _cells(col: np.ndarray) -> list[bytes]:
    """One column's values as bytes, row by row."""
    if col.dtype != object:
        flat = np.ascontiguousarray(col).reshape(len(col), -1)
        return [flat[i].tobytes() for i in range(len(col))]
    return [_value(v) for v in col]


def row_hashes(batch: dict[str, np.ndarray]) -> np.ndarray:
    """A 64-bit content hash per row of a column batch.  # (rows,) uint64"""
    names = sorted(batch)
    cols = [_cells(np.asarray(batch[n])) for n in names]
    rows = len(cols[0]) if cols else 0
    out = np.empty(rows, dtype=np.uint64)
    for i in range(rows):
        h = hashlib.blake2b(digest_size=8)
        for c in cols:
            h.update(len(c[i]).to_bytes(8, "little"))
            h.update(c[i])
        out[i] = int.from_bytes(h.digest(), "little")
    return out


def load_consumed(d: str | Path) -> tuple[int, dict[int, Counter[int]]]:
    """Every rank's consumed-row hashes in checkpoint folder `d`, summed into one multiset per
    epoch still open, and the epoch to resume in (the lowest any rank was in). (0, {}): a
    checkpoint written before these were saved."""
    files = sorted(Path(d).glob(STATE_GLOB))
    if not files:
        log.warning("the checkpoint in %s records no consumed rows (written before they were saved): the data stream "
                    "restarts at its head", d)
        return 0, {}
    out: dict[int, Counter[int]] = {}
    current = []
    for f in files:
        with np.load(f) as z:
            current.append(int(z["current"][0]))
            for key in z.files:
                if key.startswith("epoch"):
                    out.setdefault(int(key.removeprefix("epoch")), Counter()).update(z[key].tolist())
    start = min(current)
    # An epoch every rank had left is complete: its rows need not be read again.
    return start, {e: c for e, c in out.items() if e >= start}


_HASH = "\x00row_hash"


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


class Stream:
    """(epoch, batch) for ever from `shard`, after walking past the rows in `consumed` (from
    `load_consumed` of the checkpoint; every rank gets the same) and recording what it yields.
    A rank's `save` writes what it consumed in the epochs still open; `owner` (one rank, rank 0)
    also carries the consumed rows it was handed, so the ranks' files sum to the run's."""

    def __init__(self, shard: Any, batch_size: int, seed: int, rank: int, too_small: str,
                 resume: tuple[int, dict[int, Counter[int]]] = (0, {}), owner: bool = False) -> None:
        self.shard, self.batch_size, self.seed, self.rank, self.too_small = shard, batch_size, seed, rank, too_small
        self.epoch, consumed = resume
        self.skip = {e: Counter(c) for e, c in consumed.items()}
        self.carried = {e: np.fromiter(c.elements(), dtype=np.uint64) for e, c in consumed.items()} if owner else {}
        self.mine: dict[int, list[np.ndarray]] = {}
        self.skipped_rows = 0

    def _walk_past(self, batch: dict[str, np.ndarray], skip: Counter[int], keys: np.ndarray) -> dict[str, np.ndarray]:
        """`batch` without the rows `skip` still holds (each taken off the multiset once)."""
        hashes = batch[_HASH]
        keep = np.ones(len(hashes), dtype=bool)
        for i in np.flatnonzero(np.isin(hashes, keys)):
            h = int(hashes[i])
            if skip.get(h):
                keep[i] = False
                skip[h] -= 1
        self.skipped_rows += int((~keep).sum())
        return batch if keep.all() else {k: v[keep] for k, v in batch.items()}

    def __iter__(self) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        t0 = time.perf_counter()
        while True:
            got = False
            skip = self.skip.pop(self.epoch, Counter())
            keys = np.fromiter(skip, dtype=np.uint64, count=len(skip))
            left = skip.total()
            pending: list[dict[str, np.ndarray]] = []
            n_pending = 0
            for batch in self.shard.iter_batches(
                batch_size=self.batch_size, batch_format="numpy", drop_last=True,
                local_shuffle_buffer_size=max(4 * self.batch_size, 256), local_shuffle_seed=self.seed + self.epoch,
            ):
                got = True
                batch = {**batch, _HASH: row_hashes(batch)}
                if left:
                    before = self.skipped_rows
                    batch = self._walk_past(batch, skip, keys)
                    left -= self.skipped_rows - before
                    if not left and self.rank == 0:
                        log.info("resume: walked past the %d consumed rows of epoch %d in %.1fs", self.skipped_rows,
                                 self.epoch, time.perf_counter() - t0)
                n = len(batch[_HASH])
                if not n:
                    continue
                pending.append(batch)
                n_pending += n
                while n_pending >= self.batch_size:
                    whole = _concat(pending)
                    out = {k: v[:self.batch_size] for k, v in whole.items()}
                    pending = [{k: v[self.batch_size:] for k, v in whole.items()}] if n_pending > self.batch_size else []
                    n_pending -= self.batch_size
                    self.mine.setdefault(self.epoch, []).append(out.pop(_HASH))
                    yield self.epoch, out
            if not got:
                raise ValueError(self.too_small)
            # Rows short of a whole batch after a resume's skip are not trained on this epoch
            # (as drop_last leaves a shard's remainder).
            self.epoch += 1
            # Another rank may still be in the previous epoch (a resume leaves the ranks unequal
            # remainders): its rows are kept until this rank moves past the next one.
            self.mine = {e: v for e, v in self.mine.items() if e >= self.epoch - 1}
            self.carried = {e: v for e, v in self.carried.items() if e >= self.epoch - 1}

    def save(self, d: str | Path) -> None:
        """This rank's consumed-row hashes (and the carried ones) into checkpoint folder `d`."""
        arrays: dict[str, np.ndarray] = {"current": np.array([self.epoch], dtype=np.int64)}
        for e in sorted(set(self.mine) | set(self.carried)):
            parts = self.mine.get(e, []) + ([self.carried[e]] if e in self.carried else [])
            arrays[f"epoch{e}"] = np.concatenate(parts) if parts else np.empty(0, dtype=np.uint64)
        np.savez(Path(d, f"recsys_stream.rank{self.rank}.npz"), **arrays)
