"""A/B report: one system of run A against one of run B, query by query, with paired tests.

Each evaluation run writes `per_query.parquet` beside its report (recsys.evaluate): one row per
(task, query, system) with a query key that names the query the same way in every run over the
same data. This matches the two runs' queries by key, and for each task and metric prints A's
and B's means, A/B as a ratio, the relative change, the paired bootstrap 95% CI of the
difference (10,000 resamples, seeded), bootstrap and t-test p-values and the verdict
("within noise" when the CI covers 0). Queries found in only one run are counted, not used.

    python -m bench.ab_compare REPORT_DIR_A REPORT_DIR_B [--system fine_tuned] [--system-b NAME]
        [--metric ndcg@10 --metric recall@10] [--task test/search] [--out ab.md | ab.json]

Report dirs are local paths or URIs (s3:// with the usual AWS_* environment).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recsys import significance, storage
from recsys.evaluate import PER_QUERY_FILE

DEFAULT_METRICS = ("ndcg@10", "recall@10")


def load_per_query(report_dir: str) -> pa.Table:
    uri = report_dir if report_dir.endswith(".parquet") else storage.join(report_dir, PER_QUERY_FILE)
    fs, path = storage.filesystem(uri)
    if not storage.exists(uri):
        raise SystemExit(f"no per-query values at {uri}: evaluate that run again (runs made before per_query.parquet existed have none)")
    return pq.read_table(path, filesystem=fs)


def _values(t: pa.Table, task: str, system: str, metric: str, where: str) -> dict[str, float]:
    if metric not in t.column_names:
        known = [c for c in t.column_names if "@" in c]
        raise SystemExit(f"{where}: no metric {metric!r}; it has {known}")
    rows = t.filter(pc.and_(pc.equal(t["task"], task), pc.equal(t["system"], system)))
    if rows.num_rows == 0:
        have = sorted(set(t.filter(pc.equal(t["task"], task))["system"].to_pylist()))
        raise SystemExit(f"{where}: no system {system!r} for task {task}; it has {have}")
    keys = rows["query_key"].to_pylist()
    if len(set(keys)) != len(keys):
        raise SystemExit(f"{where}: query keys repeat within {task} / {system}; cannot pair queries")
    return dict(zip(keys, rows[metric].to_numpy(zero_copy_only=False).astype(np.float64), strict=True))


def compare(
    a: pa.Table, b: pa.Table, system_a: str, system_b: str, metrics: Sequence[str], tasks: Sequence[str] | None = None,
    resamples: int = 10_000, seed: int = 0, where: tuple[str, str] = ("A", "B"),
) -> dict[str, Any]:
    """Paired comparison per (task, metric) over the queries both runs share (matched by key)."""
    tasks_a, tasks_b = set(a["task"].to_pylist()), set(b["task"].to_pylist())
    chosen = list(tasks) if tasks else sorted(tasks_a & tasks_b)
    missing = [t for t in chosen if t not in tasks_a or t not in tasks_b]
    if missing or not chosen:
        raise SystemExit(f"tasks {missing or chosen} not in both runs (A has {sorted(tasks_a)}, B has {sorted(tasks_b)})")
    rows: list[dict[str, Any]] = []
    matching: dict[str, dict[str, int]] = {}
    for task in chosen:
        for metric in metrics:
            va = _values(a, task, system_a, metric, where[0])
            vb = _values(b, task, system_b, metric, where[1])
            common = sorted(va.keys() & vb.keys())
            matching[task] = {"matched": len(common), "only_in_a": len(va.keys() - vb.keys()), "only_in_b": len(vb.keys() - va.keys())}
            if not common:
                raise SystemExit(f"{task}: the runs share no query keys (different data or splits?)")
            r = significance.paired_comparison([va[k] for k in common], [vb[k] for k in common], resamples=resamples, seed=seed)
            rows.append({"task": task, "metric": metric, **r})
    return {"system_a": system_a, "system_b": system_b, "comparisons": rows, "matching": matching}


def to_markdown(result: dict[str, Any], label_a: str, label_b: str) -> str:
    lines = [
        f"A = {label_a} ({result['system_a']}), B = {label_b} ({result['system_b']}); "
        "paired over queries matched by key, bootstrap 95% CI of A - B "
        f"({result['comparisons'][0]['resamples']} resamples, seed {result['comparisons'][0]['seed']}), t-test.",
        "",
        significance.markdown_table(result["comparisons"], ["task", "metric"], sides=("A", "B")),
        "",
    ]
    for task, m in result["matching"].items():
        lines.append(f"{task}: {m['matched']} queries matched, {m['only_in_a']} only in A, {m['only_in_b']} only in B")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report_a", help="run A's eval dir (holding per_query.parquet), or the file itself")
    parser.add_argument("report_b", help="run B's eval dir, or the file itself")
    parser.add_argument("--system", default="fine_tuned", help="system of run A (and of B unless --system-b)")
    parser.add_argument("--system-b", default=None, help="system of run B (default: --system)")
    parser.add_argument("--metric", action="append", help=f"metric column, repeatable (default {' '.join(DEFAULT_METRICS)})")
    parser.add_argument("--task", action="append", help="task such as test/search, repeatable (default: all both runs have)")
    parser.add_argument("--resamples", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the summary: .md for Markdown, .json for JSON")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.out and not args.out.endswith((".md", ".json")):
        parser.error("--out must end in .md or .json")
    result = compare(
        load_per_query(args.report_a), load_per_query(args.report_b), args.system, args.system_b or args.system,
        args.metric or list(DEFAULT_METRICS), args.task, args.resamples, args.seed, (args.report_a, args.report_b),
    )
    result.update(a=args.report_a, b=args.report_b)
    text = to_markdown(result, args.report_a, args.report_b)
    print(text, end="")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n" if args.out.endswith(".json") else text)
        print(f"written to {out}")
    return result


if __name__ == "__main__":
    main()
