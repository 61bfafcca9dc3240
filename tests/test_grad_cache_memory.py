"""bench/grad_cache_memory.py's premises: its peak is the measured region's own, and every
micro-batch of its synthetic batches has the same padded shape (so runs compare like with like).
The benchmark itself starts a DeepSpeed engine per configuration and is not run here."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.grad_cache_memory import Spec, _Peak, _status, synthetic_batch
from recsys.train_step import micro_batches

MIB = 1024


def _touch(mib: int) -> bytearray:
    buf = bytearray(mib * 2**20)
    buf[::4096] = b"\x01" * len(buf[::4096])  # resident, not just reserved
    return buf


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_the_peak_excludes_what_came_before_the_region_and_sees_what_came_in_it() -> None:
    before = _touch(300)
    del before  # a high-water mark ~300 MiB above the current RSS
    baseline = _status()["VmRSS"]
    peak = _Peak()
    inside = _touch(60)
    del inside
    grown = (peak.kib() - baseline) / MIB
    assert 55 <= grown < 200, f"{peak.method}: peak {grown:.0f} MiB above baseline for a 60 MiB buffer"


def test_every_micro_batch_pads_to_the_full_length() -> None:
    b = synthetic_batch(rows=24, micro=8, query_len=12, item_len=20, seed=3)
    for c in micro_batches(b, 8):
        assert c["q_ids"].shape == (8, 12) and c["d_ids"].shape == (8, 20)
        assert (c["q_ids"][:, 0] == 101).all() and c["q_mask"].sum(1).min() >= 6


def test_configs_parse_and_reject_a_batch_not_split_into_micro_batches() -> None:
    assert Spec.parse("2:1024/32") == Spec(2, 1024, 32) and Spec.parse("2:1024/32").cached
    assert not Spec.parse("3:256").cached
    with pytest.raises(SystemExit, match="multiple of MICRO"):
        Spec.parse("2:100/32")
