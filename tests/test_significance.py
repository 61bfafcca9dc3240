"""Paired significance tests on hand-made per-query values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from recsys.significance import (
    BETTER,
    WITHIN_NOISE,
    WORSE,
    describe,
    markdown_table,
    paired_comparison,
)


def test_identical_systems_are_within_noise() -> None:
    v = np.random.default_rng(0).uniform(size=500)
    r = paired_comparison(v, v.copy())
    assert r["diff"] == 0.0 and r["ci_low"] == 0.0 and r["ci_high"] == 0.0
    assert r["p_bootstrap"] == 1.0 and r["p_ttest"] == 1.0
    assert r["verdict"] == WITHIN_NOISE and not r["significant"]
    assert r["ratio"] == 1.0 and r["rel_change"] == 0.0


def test_symmetric_differences_are_within_noise() -> None:
    """Wins and losses of equal size on different queries: mean difference exactly 0."""
    rng = np.random.default_rng(1)
    base = rng.uniform(0.2, 0.8, size=400)
    swing = rng.uniform(0.0, 0.2, size=200)
    d = np.concatenate([swing, -swing])
    r = paired_comparison(base + d, base)
    assert r["diff"] == pytest.approx(0.0, abs=1e-12)
    assert r["ci_low"] < 0.0 < r["ci_high"]
    assert r["p_bootstrap"] > 0.5 and r["p_ttest"] > 0.5
    assert r["verdict"] == WITHIN_NOISE


def test_clear_shift_is_significant_both_ways() -> None:
    rng = np.random.default_rng(2)
    base = rng.uniform(0.0, 0.5, size=300)
    better = base + 0.1 + rng.normal(0.0, 0.05, size=300)
    r = paired_comparison(better, base)
    assert r["verdict"] == BETTER and r["significant"]
    assert 0.09 < r["ci_low"] < r["diff"] < r["ci_high"] < 0.11
    assert r["p_bootstrap"] == pytest.approx(1 / 10_001)  # no resample of the null got that far
    assert r["p_ttest"] < 1e-10
    assert r["rel_change"] == pytest.approx(r["diff"] / base.mean())
    assert r["ratio"] == pytest.approx(better.mean() / base.mean())
    worse = paired_comparison(base, better)
    assert worse["verdict"] == WORSE
    assert worse["ci_low"] == pytest.approx(-r["ci_high"], abs=0.003)


def test_ci_matches_the_normal_approximation_and_is_seeded() -> None:
    rng = np.random.default_rng(3)
    a = rng.normal(0.30, 0.2, size=2000)
    b = a - rng.normal(0.01, 0.1, size=2000)
    r = paired_comparison(a, b)
    d = a - b
    half = 1.96 * d.std(ddof=1) / math.sqrt(len(d))
    assert r["ci_low"] == pytest.approx(d.mean() - half, abs=0.1 * half)
    assert r["ci_high"] == pytest.approx(d.mean() + half, abs=0.1 * half)
    assert paired_comparison(a, b) == r  # same seed, same answer
    assert paired_comparison(a, b, seed=1)["ci_low"] != r["ci_low"]
    assert paired_comparison(a, b, confidence=0.5)["ci_high"] < r["ci_high"]


def test_t_test_p_value_by_hand() -> None:
    """d = 1, 2, 3, 4: t = 2.5 / (sd / 2) with 3 degrees of freedom, whose CDF is closed form."""
    r = paired_comparison([1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0])
    t = 2.5 / (math.sqrt(5 / 3) / 2)
    theta = math.atan(t / math.sqrt(3))
    p = 1 - (2 / math.pi) * (theta + math.sin(theta) * math.cos(theta))
    assert r["p_ttest"] == pytest.approx(p, rel=1e-9)
    assert r["p_ttest"] == pytest.approx(0.0305, abs=1e-4)


def test_skipped_queries_and_bad_input() -> None:
    a = np.array([0.5, np.nan, 0.2, 0.9, 0.1])
    b = np.array([0.4, 0.3, np.nan, 0.8, 0.0])
    r = paired_comparison(a, b)
    assert r["n"] == 3 and r["skipped"] == 2
    assert r["diff"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="one length"):
        paired_comparison([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="at least 2 queries"):
        paired_comparison([0.1, np.nan], [0.1, 0.2])


def test_text_and_table() -> None:
    r = paired_comparison([0.2, 0.4, 0.6], [0.1, 0.3, 0.5])
    assert describe(r).startswith("0.4000 vs 0.3000 (1.33x, +33.3%)")
    table = markdown_table([{**r, "metric": "ndcg@10"}], ["metric"])
    assert table.splitlines()[2].startswith("| ndcg@10 | 3 | 0.4000 | 0.3000 | 1.333x | +33.3% |")
