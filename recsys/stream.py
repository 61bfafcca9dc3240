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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from ray.data.collate_fn import NumpyBatchCollateFn

log = logging.getLogger(__name__)

STATE_GLOB = "recsys_stream.rank*.npz"


# Bumped when `row_hashes` changes what it computes: a checkpoint's consumed rows hashed
# otherwise cannot be matched, and its resume restarts the stream at its head (with a warning).
HASH_VERSION = 2

_M1, _M2, _GOLD = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, element-wise, in place on a fresh copy of `x` (uint64 arithmetic
    wraps, as it should here)."""
    x = np.array(x, dtype=np.uint64)
    t = np.empty_like(x)
    for shift, mult in ((30, _M1), (27, _M2)):
        np.right_shift(x, np.uint64(shift), out=t)
        np.bitwise_xor(x, t, out=x)
        np.multiply(x, mult, out=x)
    np.right_shift(x, np.uint64(31), out=t)
    return np.bitwise_xor(x, t, out=x)


def _value(v: Any) -> bytes:
    """One cell as bytes, whole (no repr truncation of long arrays, no object pointers)."""
    if isinstance(v, np.ndarray):
        if v.dtype.kind in "US":  # fixed-width strings: their width is the batch's longest, not theirs
            return _value(v.tolist())
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


def _words(a: np.ndarray) -> np.ndarray:
    """A numeric array's values as uint64 words, one per value, exact (bit patterns, so -0.0
    and 0.0 or two NaNs with different payloads stay apart).  # (a.size,) uint64"""
    a = np.ascontiguousarray(a).reshape(-1)
    if a.dtype.kind == "b":
        return a.astype(np.uint64)
    if a.dtype.itemsize in (1, 2, 4, 8) and a.dtype.kind in "iufMm":
        return a.view(f"u{a.dtype.itemsize}").astype(np.uint64)
    # Anything wider (complex, long double, structured): 8-byte chunks of each value.
    width = -(-a.dtype.itemsize // 8) * 8
    raw = np.zeros((a.size, width), dtype=np.uint8)
    raw[:, : a.dtype.itemsize] = a.view(np.uint8).reshape(a.size, a.dtype.itemsize)
    return raw.view(np.uint64).reshape(-1)


def _seed(*parts: str) -> np.uint64:
    return np.uint64(int.from_bytes(hashlib.blake2b("\x00".join(parts).encode(), digest_size=8).digest(), "little"))


def _digest(data: Any, key: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, key=key).digest(), "little")


def _column_hashes(name: str, col: np.ndarray) -> np.ndarray:
    """One column's per-row hashes, keyed by its name and dtype. A cell's hash depends on that
    cell alone, never on the rest of its batch (a resume re-batches rows).  # (rows,) uint64"""
    if col.dtype.kind in "US":  # fixed-width strings: hashed as the strings, not the batch's padded width
        col = col.astype(object)
    if col.dtype != object:  # fixed-width cells: vectorised
        seed = _seed(name, str(col.dtype))
        flat = _words(col).reshape(len(col), -1)  # (rows, words per cell)
        terms = _mix(flat ^ _mix(np.arange(flat.shape[1], dtype=np.uint64) * _GOLD))  # (rows, words per cell)
        return _mix(terms.sum(axis=1, dtype=np.uint64) + seed)
    keys: dict[Any, bytes] = {}

    def cell(v: Any) -> int:
        # Numeric arrays (token ids, history keys) hash straight from their buffer, keyed by dtype
        # and shape; anything else (strings, lists of them, None) from its whole bytes.
        if isinstance(v, np.ndarray) and v.dtype.kind in "biufcmM":
            k = (v.dtype, v.shape[1:])
            if k not in keys:
                keys[k] = _seed(name, "array", str(v.dtype), str(v.shape[1:])).tobytes()
            return _digest(np.ascontiguousarray(v), keys[k])  # a strided view hashes as its copy
        if "cell" not in keys:
            keys["cell"] = _seed(name, "cell").tobytes()
        return _digest(_value(v), keys["cell"])

    return np.fromiter((cell(v) for v in col), dtype=np.uint64, count=len(col))


def row_hashes(batch: dict[str, np.ndarray]) -> np.ndarray:
    """A 64-bit content hash per row of a column batch (equal rows, equal hashes, however the
    batch was built), vectorised over rows for numeric and token-id columns.  # (rows,) uint64"""
    names = sorted(batch)
    if not names:
        return np.empty(0, dtype=np.uint64)
    out = np.zeros(len(batch[names[0]]), dtype=np.uint64)
    for i, n in enumerate(names):
        # Rotating by the column's place keeps two columns' hashes from cancelling out.
        h = _column_hashes(n, np.asarray(batch[n]))
        out = _mix(out * _GOLD + h + np.uint64(i))
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
    stale = []
    for f in files:
        with np.load(f) as z:
            current.append(int(z["current"][0]))
            version = int(z["hash_version"][0]) if "hash_version" in z.files else 1  # 1: saved before versions
            if version != HASH_VERSION:
                stale.append(f"{f.name}: version {version}")
            for key in z.files:
                if key.startswith("epoch"):
                    out.setdefault(int(key.removeprefix("epoch")), Counter()).update(z[key].tolist())
    start = min(current)
    if stale:
        log.warning("the checkpoint in %s hashed its consumed rows another way (%s; this code hashes as version %d): epoch %d "
                    "restarts at its head", d, ", ".join(stale), HASH_VERSION, start)
        return start, {}
    # An epoch every rank had left is complete: its rows need not be read again.
    return start, {e: c for e, c in out.items() if e >= start}


_HASH = "\x00row_hash"


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


class _HashAndPrepare(NumpyBatchCollateFn):
    """Runs in Ray Data's format threads (`iter_torch_batches`' collate_fn), ahead of the
    trainer's thread: each batch's row hashes and `prepare` of the batch. The stream uses that
    only for a batch it yields whole; one a resume's walk-past shortens is re-batched and
    prepared by the caller. `prepare` must therefore be thread-safe: numpy and torch work, not a
    tokenizer the trainer's thread also calls."""

    def __init__(self, prepare: Callable[[dict[str, np.ndarray]], Any] | None) -> None:
        self.prepare = prepare

    def __call__(self, batch: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], Any]:
        prepared = None if self.prepare is None else self.prepare(batch)
        return {**batch, _HASH: row_hashes(batch)}, prepared


class Stream:
    """(epoch, batch) for ever from `shard`, after walking past the rows in `consumed` (from
    `load_consumed` of the checkpoint; every rank gets the same) and recording what it yields.
    A rank's `save` writes what it consumed in the epochs still open; `owner` (one rank, rank 0)
    also carries the consumed rows it was handed, so the ranks' files sum to the run's.

    With `prepare` (a thread-safe function of a numpy batch, e.g. padding into tensors), the
    stream yields (epoch, prepare(batch)), computed in Ray's fetch threads while the trainer
    steps; the row hashes are computed there too."""

    def __init__(self, shard: Any, batch_size: int, seed: int, rank: int, too_small: str,
                 resume: tuple[int, dict[int, Counter[int]]] = (0, {}), owner: bool = False, prefetch_batches: int = 1,
                 prepare: Callable[[dict[str, np.ndarray]], Any] | None = None) -> None:
        self.shard, self.batch_size, self.seed, self.rank, self.too_small = shard, batch_size, seed, rank, too_small
        self.prefetch_batches, self.prepare = prefetch_batches, prepare
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

    def _out(self, batch: dict[str, np.ndarray], prepared: Any) -> tuple[int, Any]:
        self.mine.setdefault(self.epoch, []).append(batch.pop(_HASH))
        if self.prepare is None:
            return self.epoch, batch
        return self.epoch, self.prepare(batch) if prepared is None else prepared

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        t0 = time.perf_counter()
        while True:
            got = False
            skip = self.skip.pop(self.epoch, Counter())
            keys = np.fromiter(skip, dtype=np.uint64, count=len(skip))
            left = skip.total()
            pending: list[dict[str, np.ndarray]] = []
            n_pending = 0
            for batch, prepared in self.shard.iter_torch_batches(
                batch_size=self.batch_size, collate_fn=_HashAndPrepare(self.prepare), device="cpu",
                drop_last=True, local_shuffle_buffer_size=max(4 * self.batch_size, 256),
                local_shuffle_seed=self.seed + self.epoch, prefetch_batches=self.prefetch_batches,
            ):
                got = True
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
                if not pending and n == self.batch_size:
                    # Ray's whole batch as it came (drop_last; a walk-past that drops a row
                    # shortens it): what the fetch thread prepared.
                    yield self._out(batch, prepared)
                    continue
                pending.append(batch)
                n_pending += n
                while n_pending >= self.batch_size:
                    whole = _concat(pending)
                    out = {k: v[:self.batch_size] for k, v in whole.items()}
                    pending = [{k: v[self.batch_size:] for k, v in whole.items()}] if n_pending > self.batch_size else []
                    n_pending -= self.batch_size
                    yield self._out(out, None)
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
        arrays: dict[str, np.ndarray] = {"current": np.array([self.epoch], dtype=np.int64),
                                         "hash_version": np.array([HASH_VERSION], dtype=np.int64)}
        for e in sorted(set(self.mine) | set(self.carried)):
            parts = self.mine.get(e, []) + ([self.carried[e]] if e in self.carried else [])
            arrays[f"epoch{e}"] = np.concatenate(parts) if parts else np.empty(0, dtype=np.uint64)
        np.savez(Path(d, f"recsys_stream.rank{self.rank}.npz"), **arrays)
