"""Issue 18, a 30-minute training run (bench/train_soak.py): the bench's bookkeeping on synthetic
samples, no Ray. The run itself: docs/reliability.md, "A 30-minute training run"."""

from __future__ import annotations

import math
from typing import Any

import pytest

from bench import train_soak as ts

EXAMPLES_PER_STEP = 32


def _rows(n: int, step_s: float, checkpoint_every: int, save_s: float) -> tuple[list[dict[str, Any]], dict[int, float]]:
    """n metric rows at a constant step time, the row after each checkpoint `save_s` longer;
    and when each was first seen."""
    rows, seen, t = [], {}, 0.0
    for step in range(1, n + 1):
        s = step_s + (save_s if step > 1 and (step - 1) % checkpoint_every == 0 else 0.0)
        t += s
        rows.append({"step": step, "examples_per_s": EXAMPLES_PER_STEP / s, "data_wait_s": 0.1 * s, "loss": 1.0})
        seen[step] = round(t, 1)
    return rows, seen


def _samples(end_s: float, every_s: float, worker_slope: float) -> list[dict[str, Any]]:
    """RSS samples: worker A jumps 200 MiB in the first 5 minutes (warm-up), then grows at
    `worker_slope` MiB/min; worker B and the controller are flat; the load rises steadily."""
    out, t = [], every_s
    while t <= end_s:
        a = 3000.0 + (200.0 * t / 300.0 if t < 300 else 200.0 + worker_slope * (t - 300) / 60.0)
        out.append({"t_s": t, "load_1m": 2.0 + t / 600.0,
                    "rss_mib": {"RayTrainWorker:11": a, "RayTrainWorker:12": 3100.0, "TrainController:13": 450.0}})
        t += every_s
    return out


def test_step_rows_mark_the_row_after_each_checkpoint_and_derive_step_time() -> None:
    rows, seen = _rows(12, 2.0, checkpoint_every=5, save_s=8.0)
    steps = ts.step_rows(rows, seen, EXAMPLES_PER_STEP, checkpoint_every=5)
    assert [s["step"] for s in steps if s["after_checkpoint"]] == [6, 11]
    assert steps[0]["step_s"] == pytest.approx(2.0)
    assert steps[5]["step_s"] == pytest.approx(10.0)
    assert all(s["data_wait_share"] == pytest.approx(0.1) for s in steps)
    assert steps[-1]["t_s"] == seen[12]


def test_windows_count_steps_and_take_medians_without_checkpoint_rows() -> None:
    rows, seen = _rows(400, 2.0, checkpoint_every=50, save_s=20.0)
    end = max(seen.values())
    steps = ts.step_rows(rows, seen, EXAMPLES_PER_STEP, checkpoint_every=50)
    ws = ts.windows(steps, _samples(end, 30.0, worker_slope=1.0), window_s=300.0, end_s=end)
    assert len(ws) == math.ceil(end / 300.0)
    assert sum(w["steps"] for w in ws) == 400  # every step in exactly one window
    # Step k is seen at 2k s plus 20 s per save before it: steps 1-129 fall in the first 300 s.
    assert ws[0]["steps"] == 129
    assert all(w["median_step_s"] == pytest.approx(2.0) for w in ws)
    assert all(w["median_data_wait_share"] == pytest.approx(0.1) for w in ws)
    assert sum(w["checkpoint_rows"] for w in ws) == 7  # steps 51, 101, ..., 351
    assert ws[0]["median_checkpoint_step_s"] == pytest.approx(22.0)
    # The window's last sample: at 300 s worker A is past its warm-up jump (3200 MiB at 300 s is
    # in window 2); the 270 s sample is window 1's last.
    assert ws[0]["rss_mib"]["RayTrainWorker:11"] == pytest.approx(3000 + 200 * 270 / 300)
    assert ws[0]["load_1m_mean"] == pytest.approx(2.0 + 150 / 600, abs=0.01)


def test_summary_fits_rss_slopes_after_warmup_and_the_step_time_trend() -> None:
    # Steps slow down by 1% of 2 s every minute: 2 s at t=0 -> step_s = 2 * (1 + 0.01 * t / 60).
    rows, seen, t = [], {}, 0.0
    for step in range(1, 800):
        s = 2.0 * (1 + 0.01 * t / 60.0)
        t += s
        rows.append({"step": step, "examples_per_s": EXAMPLES_PER_STEP / s, "data_wait_s": 0.0})
        seen[step] = t
    steps = ts.step_rows(rows, seen, EXAMPLES_PER_STEP, checkpoint_every=10**6)
    samples = _samples(t, 30.0, worker_slope=1.5)
    s = ts.summarize(steps, samples, warmup_s=300.0)
    # The 200 MiB warm-up jump is left out: the fit sees only the 1.5 MiB/min growth.
    assert s["rss"]["RayTrainWorker:11"]["slope_mib_per_min"] == pytest.approx(1.5, abs=1e-6)
    assert s["rss"]["RayTrainWorker:11"]["theil_sen_mib_per_min"] == pytest.approx(1.5, abs=1e-6)
    assert s["rss"]["RayTrainWorker:11"]["mib_per_day_at_slope"] == pytest.approx(1.5 * 1440, abs=0.1)
    assert s["rss"]["RayTrainWorker:12"]["slope_mib_per_min"] == pytest.approx(0.0, abs=1e-9)
    assert s["rss"]["TrainController:13"]["end_mib"] == 450.0
    # 0.02 s/min; relative to the mean step time after warm-up, per 10 min.
    assert s["step_s_slope_s_per_min"] == pytest.approx(0.02, rel=1e-3)
    mean = s["step_s_mean_after_warmup"]
    assert s["step_s_slope_pct_per_10min"] == pytest.approx(100 * 10 * 0.02 / mean, rel=1e-2)
    # Step time and load both rise with time: rank correlation 1.
    assert s["step_s_vs_load_spearman"] == pytest.approx(1.0)
    assert s["step_s_vs_load_pairs"] > 10


def test_slope_and_rank_correlation_edge_cases() -> None:
    assert ts.slope_per_min([0.0], [1.0]) is None
    assert ts.slope_per_min([5.0, 5.0], [1.0, 2.0]) is None
    assert ts.slope_per_min([0.0, 60.0, 120.0], [10.0, 12.0, 14.0]) == pytest.approx(2.0)
    assert ts.spearman([1.0, 2.0], [1.0, 2.0]) is None
    assert ts.spearman([1.0, 2.0, 3.0], [5.0, 5.0, 5.0]) is None
    assert ts.spearman([1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]) == pytest.approx(-1.0)


def test_estimate_max_steps_from_a_warmup_run() -> None:
    # 20 steps of 2 s, a checkpoint every 10 costing 10 s more, 60 s of fixed cost.
    rows, _ = _rows(20, 2.0, checkpoint_every=10, save_s=10.0)
    wall = 20 * 2.0 + 10.0 + 60.0
    est = ts.estimate_max_steps(rows, wall, duration_s=1800.0, examples_per_step=EXAMPLES_PER_STEP,
                                checkpoint_every=50, warm_checkpoint_every=10)
    assert est["step_s"] == pytest.approx(2.0)
    assert est["checkpoint_extra_s"] == pytest.approx(10.0)
    assert est["fixed_s"] == pytest.approx(60.0)
    assert est["max_steps"] == int((1800 - 60) / (2.0 + 10.0 / 50))


def test_windows_leave_checkpoint_rows_out_of_the_medians_and_keep_the_last_step() -> None:
    # A checkpoint every step: only step 1 is a plain step; the other 9 carry a 10 s save.
    rows, seen = _rows(10, 2.0, checkpoint_every=1, save_s=10.0)
    steps = ts.step_rows(rows, seen, EXAMPLES_PER_STEP, checkpoint_every=1)
    (w,) = ts.windows(steps, [], window_s=300.0, end_s=max(seen.values()))
    assert w["median_step_s"] == pytest.approx(2.0)
    assert w["checkpoint_rows"] == 9
    assert w["median_checkpoint_step_s"] == pytest.approx(12.0)
    # A run ending exactly on a window boundary: its last step (seen at the end) is not dropped.
    edge = ts.step_rows([{"step": 1, "examples_per_s": 16.0}, {"step": 2, "examples_per_s": 16.0}], {1: 100.0, 2: 300.0},
                        EXAMPLES_PER_STEP, checkpoint_every=50)
    ws = ts.windows(edge, [], window_s=300.0, end_s=300.0)
    assert [w["steps"] for w in ws] == [2]
