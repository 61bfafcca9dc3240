"""Is system A really better than system B? Paired tests over per-query metric values.

Both systems are scored on the same queries, so the test is on the per-query differences
d_i = a_i - b_i (pairing removes the query-difficulty variance, which dwarfs most model gains):

- paired bootstrap: resample queries with replacement (seeded), the mean difference of each
  resample gives the percentile confidence interval; the same resamples re-centred on zero (the
  null of no difference) give a two-sided p-value;
- paired t-test (`scipy.stats.ttest_rel`) as the classic cross-check.

The verdict follows the bootstrap CI: "within noise" when it covers 0, otherwise significantly
better / worse. Queries a metric skipped (NaN: nothing relevant) are left out of both systems and
counted in `skipped`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

WITHIN_NOISE = "within noise"
BETTER = "significantly better"
WORSE = "significantly worse"

# Resampled index matrices are built this many elements at a time (memory, not speed).
_CHUNK_ELEMENTS = 4_000_000


def paired_comparison(
    system: Sequence[float] | np.ndarray,
    baseline: Sequence[float] | np.ndarray,
    *,
    resamples: int = 10_000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Compare `system` with `baseline`, two arrays of one metric aligned query by query.

    Returns n (paired queries used), skipped (queries NaN in either), mean_system,
    mean_baseline, diff (mean of system - baseline), ratio and rel_change (None when the
    baseline mean is 0), ci_low / ci_high (bootstrap percentile CI of diff), p_bootstrap,
    p_ttest, significant and verdict.
    """
    from scipy import stats

    a = np.asarray(system, dtype=np.float64)
    b = np.asarray(baseline, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"paired values must be two 1-d arrays of one length, got {a.shape} and {b.shape}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if resamples < 100:
        raise ValueError(f"resamples must be at least 100, got {resamples}")
    ok = ~(np.isnan(a) | np.isnan(b))
    a, b = a[ok], b[ok]
    n = len(a)
    if n < 2:
        raise ValueError(f"need at least 2 queries scored by both systems, got {n}")
    d = a - b
    diff = float(d.mean())

    rng = np.random.default_rng(seed)
    means = np.empty(resamples, dtype=np.float64)
    step = max(1, _CHUNK_ELEMENTS // n)
    for s in range(0, resamples, step):
        m = min(step, resamples - s)
        means[s : s + m] = d[rng.integers(0, n, size=(m, n))].mean(axis=1)
    alpha = 1.0 - confidence
    lo, hi = (float(x) for x in np.quantile(means, [alpha / 2, 1 - alpha / 2]))
    # Null distribution: the same resamples of d - mean(d) (mean zero), i.e. means - diff.
    extreme = int(np.count_nonzero(np.abs(means - diff) >= abs(diff)))
    p_boot = (extreme + 1) / (resamples + 1)

    if np.allclose(d, diff, rtol=1e-9, atol=1e-12):
        # No spread beyond float rounding: ttest_rel would divide by ~0 (and warn); the
        # difference is then certain either way.
        p_t = 1.0 if abs(diff) <= 1e-12 else 0.0
    else:
        p_t = float(stats.ttest_rel(a, b).pvalue)

    mean_a, mean_b = float(a.mean()), float(b.mean())
    significant = not (lo <= 0.0 <= hi)
    return {
        "n": n,
        "skipped": int((~ok).sum()),
        "mean_system": mean_a,
        "mean_baseline": mean_b,
        "diff": diff,
        "ratio": mean_a / mean_b if mean_b else None,
        "rel_change": diff / mean_b if mean_b else None,
        "ci_low": lo,
        "ci_high": hi,
        "confidence": confidence,
        "p_bootstrap": p_boot,
        "p_ttest": p_t,
        "resamples": resamples,
        "seed": seed,
        "significant": significant,
        "verdict": (BETTER if diff > 0 else WORSE) if significant else WITHIN_NOISE,
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.1%}"


def describe(r: dict[str, Any]) -> str:
    """One line: `0.3424 vs 0.3153 (1.09x, +8.6%), diff 95% CI [+0.0120, +0.0420], p=... : verdict`."""
    ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
    return (
        f"{r['mean_system']:.4f} vs {r['mean_baseline']:.4f} ({ratio}, {_pct(r['rel_change'])}), "
        f"diff {r['confidence']:.0%} CI [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}], "
        f"p={r['p_bootstrap']:.4f} bootstrap / {r['p_ttest']:.4f} t-test, n={r['n']}: {r['verdict']}"
    )


def markdown_table(
    rows: Sequence[dict[str, Any]], label_keys: Sequence[str], sides: tuple[str, str] = ("system", "baseline")
) -> str:
    """Comparisons as a Markdown table; `label_keys` name the columns that say what was compared,
    `sides` head the two mean columns."""
    head = [*label_keys, "n", *sides, "ratio", "change", "CI of diff", "p (bootstrap)", "p (t-test)", "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}x"
        cells = [
            *(str(r[k]) for k in label_keys), str(r["n"]), f"{r['mean_system']:.4f}", f"{r['mean_baseline']:.4f}",
            ratio, _pct(r["rel_change"]), f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]",
            f"{r['p_bootstrap']:.4f}", f"{r['p_ttest']:.4f}", r["verdict"],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
