"""Issue 18: a resumed training stream walks past exactly the rows the checkpointed workers
consumed, whatever the worker count (recsys.stream), read through Ray Data's streaming split as
Ray Train splits a trainer's dataset (equal shards, order-preserving execution)."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from recsys.stream import Stream, load_consumed, row_hashes

BATCH = 8
ROWS = 640  # 40 batches per rank with 2 workers


@pytest.fixture(scope="module")
def dataset(ray_cluster):
    import ray.data

    from recsys.train import _ingest_options

    ray.data.DataContext.get_current().execution_options = _ingest_options()
    # Two equal rows (ids 0 and 1 share a text): consumed one of them, the other is still due.
    rows = [{"text": f"row {max(i, 1)}", "history": list(range(max(i, 1) % 5)), "w": float(max(i, 1))} for i in range(ROWS)]
    return ray.data.from_items(rows, override_num_blocks=8).random_shuffle(seed=3)


def _key(batch: dict[str, np.ndarray], i: int) -> str:
    return batch["text"][i]


def _read(dataset, world: int, resume=(0, {}), batches: int | None = None, until_epoch: int | None = None,
          tmp=None) -> list[list[list[str]]]:
    """Each of `world` ranks reads `batches` batches (or until its stream enters `until_epoch`),
    concurrently as Ray Train's workers do; with `tmp`, each then saves its state there.
    Returns, per rank, the batches' row keys."""
    shards = dataset.streaming_split(world, equal=True)
    out: list[list[list[str]]] = [[] for _ in range(world)]
    streams = [Stream(shards[r], BATCH, seed=0, rank=r, too_small="too small", resume=resume, owner=r == 0) for r in range(world)]
    errors: list[BaseException] = []

    def run(r: int) -> None:
        try:
            for epoch, b in streams[r]:
                if until_epoch is not None and epoch >= until_epoch:
                    break
                out[r].append([_key(b, i) for i in range(len(b["text"]))])
                if batches is not None and len(out[r]) == batches:
                    break
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    if tmp is not None:
        for s in streams:
            s.save(tmp)
    return out


def _rows(parts: list[list[list[str]]]) -> Counter[str]:
    return Counter(k for rank in parts for batch in rank for k in batch)


ALL = Counter(f"row {max(i, 1)}" for i in range(ROWS))


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2), (2, 3)])
def test_a_resume_with_another_worker_count_reads_each_row_of_the_epoch_once(dataset, tmp_path, before, after) -> None:
    """Checkpointed after 6 steps of `before` workers, resumed with `after`: the rest of the epoch
    is every row not consumed, none twice. (The skip it replaced walked past 6 x before batches of
    the new shards: 353 of 640 demo examples read twice, 455 never.)"""
    consumed = _read(dataset, before, batches=6, tmp=tmp_path)
    resume = load_consumed(tmp_path)
    assert resume[0] == 0 and sum(resume[1][0].values()) == 6 * BATCH * before
    rest = _read(dataset, after, resume=resume, until_epoch=1)
    seen = _rows(consumed) + _rows(rest)
    assert not seen - ALL, f"read twice: {seen - ALL}"
    # Each new rank's last rows short of a batch are left for the next epoch (as drop_last does),
    # and equal shards of 640 rows leave 640 % after out.
    assert sum((ALL - seen).values()) < after * BATCH + ROWS % after
    assert all(len(b) == BATCH for rank in rest for b in rank)


def test_a_resume_with_the_same_worker_count_reads_what_an_uninterrupted_run_reads(dataset, tmp_path) -> None:
    whole = _read(dataset, 2, batches=20)
    _read(dataset, 2, batches=6, tmp=tmp_path)
    rest = _read(dataset, 2, resume=load_consumed(tmp_path), batches=14)
    assert [r[6:] for r in whole] == rest


def test_a_resume_after_an_epoch_boundary_starts_in_the_open_epoch(dataset, tmp_path) -> None:
    """2 workers read 1 1/4 epochs; 1 worker resumes in epoch 1 past the 2 x 10 batches consumed
    in it, and epoch 0 is not read again."""
    parts = _read(dataset, 2, batches=50, tmp=tmp_path)
    epoch, consumed = load_consumed(tmp_path)
    assert epoch == 1 and set(consumed) == {1} and sum(consumed[1].values()) == 2 * 10 * BATCH
    in_epoch1 = _rows([[b for b in rank[40:]] for rank in parts])
    rest = _read(dataset, 1, resume=(epoch, consumed), until_epoch=2)
    seen = in_epoch1 + _rows(rest)
    assert not seen - ALL, f"read twice: {seen - ALL}"
    assert sum((ALL - seen).values()) < BATCH


def test_two_resumes_with_other_worker_counts_keep_the_epoch_whole(dataset, tmp_path) -> None:
    """2 workers, then 1, then 3, in one epoch: the ranks' files sum to what the run consumed."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    first = _read(dataset, 2, batches=5, tmp=a)
    second = _read(dataset, 1, resume=load_consumed(a), batches=7, tmp=b)
    resume = load_consumed(b)
    assert sum(resume[1][0].values()) == (2 * 5 + 7) * BATCH
    rest = _read(dataset, 3, resume=resume, until_epoch=1)
    seen = _rows(first) + _rows(second) + _rows(rest)
    assert not seen - ALL, f"read twice: {seen - ALL}"
    assert sum((ALL - seen).values()) < 3 * BATCH + ROWS % 3


def test_row_hashes_see_whole_values() -> None:
    """Arrays longer than numpy's print threshold differ past it: their hashes do too."""
    a, b = np.zeros(5000, dtype=np.int64), np.zeros(5000, dtype=np.int64)
    b[-1] = 1
    col = np.empty(2, dtype=object)
    col[0], col[1] = a, b
    h = row_hashes({"ids": col, "n": np.array([1, 1])})
    assert h[0] != h[1]
    assert row_hashes({"t": np.array(["x", "x"], dtype=object)})[0] == row_hashes({"t": np.array(["x"], dtype=object)})[0]


def test_equal_rows_built_apart_hash_equal() -> None:
    """A history of strings is an object array: its hash is of the strings, not of pointers
    (which differ between two reads of the same row)."""
    def batch(history: list[str]) -> dict[str, np.ndarray]:
        col = np.empty(1, dtype=object)
        col[0] = np.array([str(h) for h in history], dtype=object)
        return {"history": col, "ts": np.array(["2024-01-01T00:00"], dtype="datetime64[ms]")}

    assert row_hashes(batch(["a", "bb"]))[0] == row_hashes(batch(["a", "".join(["b", "b"])]))[0]
    assert row_hashes(batch(["a", "bb"]))[0] != row_hashes(batch(["ab", "b"]))[0]


def test_a_rows_hash_is_its_own_not_its_batch_mates() -> None:
    """A resume re-batches rows: a row must hash the same in any batch, whatever the other rows
    hold (an empty float cell, a string cell, another length), and in any order."""
    rng = np.random.default_rng(0)
    ids = np.empty(6, dtype=object)
    for i in range(6):
        ids[i] = rng.integers(0, 30_000, int(rng.integers(1, 40))).astype(np.int32)
    batch = {"q_ids": ids, "w": rng.random(6).astype(np.float32), "k": rng.integers(0, 2**62, 6)}
    h = row_hashes(batch)
    assert len(set(h.tolist())) == 6
    perm = rng.permutation(6)
    assert (row_hashes({k: v[perm] for k, v in batch.items()}) == h[perm]).all()
    assert (row_hashes({k: v[2:4] for k, v in batch.items()}) == h[2:4]).all()
    odd = ids.copy()
    odd[0], odd[1] = np.zeros(0, dtype=np.float64), "a string"
    assert (row_hashes({**batch, "q_ids": odd})[2:] == h[2:]).all()
    # Order within a cell, the column a value is in, and the dtype all count.
    def one(cell: np.ndarray) -> int:
        col = np.empty(1, dtype=object)
        col[0] = cell
        return int(row_hashes({"a": col})[0])

    assert one(np.array([1, 2], dtype=np.int32)) != one(np.array([2, 1], dtype=np.int32))
    assert one(np.arange(0, 12, 2)) == one(np.arange(12)[::2])  # a strided view hashes as its copy
    # Fixed-width strings are padded to the batch's longest: hashed as the strings themselves.
    assert row_hashes({"s": np.array(["a", "bb"])})[0] == row_hashes({"s": np.array(["a", "b" * 40])})[0]
    assert one(np.array(["a", "b"])) == one(np.array(["a", "b"], dtype="<U9"))
    assert one(np.array([1], dtype=np.int32)) != one(np.array([1], dtype=np.int64))
    assert row_hashes({"a": np.array([1]), "b": np.array([2])})[0] != row_hashes({"a": np.array([2]), "b": np.array([1])})[0]
    assert row_hashes({"a": np.array([1], dtype=np.int64)})[0] != row_hashes({"a": np.array([1], dtype=np.int32)})[0]


def test_a_checkpoint_hashed_another_way_restarts_its_epoch(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Consumed rows saved by another hash version cannot be matched: the epoch is kept and read
    from its head, with a warning, rather than walking past nothing while claiming a resume."""
    np.savez(tmp_path / "recsys_stream.rank0.npz", current=np.array([3]), epoch3=np.arange(5, dtype=np.uint64))
    with caplog.at_level("WARNING"):
        assert load_consumed(tmp_path) == (3, {})
    assert "version 1" in caplog.text


def _prepared_read(dataset, batches: int, resume=(0, {}), tmp=None) -> list[dict]:
    """One rank's first `batches` batches with a `prepare` that records the rows it saw and the
    thread it ran in."""
    def prepare(b: dict[str, np.ndarray]) -> dict:
        return {"keys": list(b["text"]), "w": b["w"].sum(), "thread": threading.get_ident(), "hash_seen": any(k.startswith("\x00") for k in b)}

    stream = Stream(dataset.streaming_split(1, equal=True)[0], BATCH, seed=0, rank=0, too_small="too small", resume=resume,
                    owner=True, prepare=prepare)
    out = []
    for _, p in stream:
        out.append(p)
        if len(out) == batches:
            break
    if tmp is not None:
        stream.save(tmp)
    return out


def test_prepare_runs_in_rays_fetch_threads_and_a_resume_prepares_what_it_re_batches(dataset, tmp_path) -> None:
    """Issue 19: `prepare` (the trainer's padding) runs ahead, in Ray's threads, on the batch as it
    will be yielded; batches a resume's walk-past shortens are re-batched, then prepared on the
    caller's thread. Either way each yielded value is prepare() of the batch a stream without
    prepare yields, hashes excluded, and the consumed rows saved are the same."""
    plain = _read(dataset, 1, batches=30)[0]
    whole = _prepared_read(dataset, 30)
    assert [p["keys"] for p in whole] == plain
    assert not any(p["hash_seen"] for p in whole)
    assert all(p["thread"] != threading.get_ident() for p in whole)

    # A 1-worker checkpoint after 4 batches, resumed by 1 worker whose stream is the same: the
    # walk-past drops whole leading batches, and the rest is what the uninterrupted run read.
    _prepared_read(dataset, 4, tmp=tmp_path)
    rest = _prepared_read(dataset, 26, resume=load_consumed(tmp_path))
    assert [p["keys"] for p in rest] == plain[4:]

    # Consumed by 2 workers, resumed by 1: batches lose rows in the walk-past and are re-batched.
    two = tmp_path / "two"
    two.mkdir()
    consumed = _read(dataset, 2, batches=3, tmp=two)
    mixed = _prepared_read(dataset, 20, resume=load_consumed(two))
    assert all(len(p["keys"]) == BATCH for p in mixed)
    seen = _rows(consumed) + Counter(k for p in mixed for k in p["keys"])
    assert not seen - ALL, f"read twice: {seen - ALL}"
    assert any(p["thread"] == threading.get_ident() for p in mixed)  # re-batched: prepared here
