"""bench.ab_compare on two hand-made runs' per-query files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from bench import ab_compare
from recsys.evaluate import PER_QUERY_FILE, per_query_table


def _write_run(path: Path, keys: list[str], values: dict[str, dict[str, np.ndarray]]) -> str:
    path.mkdir(parents=True)
    pq.write_table(per_query_table({"test/search": values}, {"test/search": keys}), path / PER_QUERY_FILE)
    return str(path)


def test_ab_compare_pairs_by_key_and_writes_summaries(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    n = 400
    keys = [json.dumps([f"u{i}", f"query {i}"]) for i in range(n)]
    base = rng.uniform(0.1, 0.6, size=n)
    base[0] = np.nan  # a query with nothing relevant
    noise = rng.normal(0.0, 0.02, size=n)
    # Run B read its examples in another order and has a query A lacks: matching is by key.
    order = rng.permutation(n)
    b_keys = [keys[i] for i in order] + ['["extra", "q"]']
    b_vals = np.append(base[order], 0.5)
    a_dir = _write_run(tmp_path / "a", keys[1:], {"fine_tuned": {"ndcg@10": base[1:] * 1.2 + noise[1:], "recall@10": base[1:]},
                                                 "bm25": {"ndcg@10": base[1:], "recall@10": base[1:]}})
    b_dir = _write_run(tmp_path / "b", b_keys, {"fine_tuned": {"ndcg@10": b_vals, "recall@10": b_vals}})
    out = tmp_path / "ab.json"
    res = ab_compare.main([a_dir, b_dir, "--out", str(out)])
    ndcg, recall = res["comparisons"]
    assert (ndcg["metric"], recall["metric"]) == ("ndcg@10", "recall@10")
    assert res["matching"]["test/search"] == {"matched": n - 1, "only_in_a": 0, "only_in_b": 2}
    assert ndcg["n"] == n - 1 and ndcg["verdict"] == "significantly better"
    assert ndcg["ratio"] == pytest.approx(1.2, abs=0.01)
    assert recall["diff"] == 0.0 and recall["verdict"] == "within noise"  # identical per query once paired
    assert json.loads(out.read_text())["comparisons"] == json.loads(json.dumps(res["comparisons"]))
    printed = capsys.readouterr().out
    assert "| test/search | ndcg@10 |" in printed and "significantly better" in printed
    # Another system of run A as B, and the Markdown summary.
    md = tmp_path / "ab.md"
    res = ab_compare.main([a_dir, a_dir, "--system-b", "bm25", "--metric", "ndcg@10", "--out", str(md)])
    assert res["comparisons"][0]["ratio"] == pytest.approx(1.2, abs=0.01)
    assert "A = " in md.read_text() and "| A | B |" in md.read_text()


def test_ab_compare_errors_name_what_is_missing(tmp_path: Path) -> None:
    a_dir = _write_run(tmp_path / "a", ["k1", "k2"], {"bm25": {"ndcg@10": np.array([0.1, 0.2])}})
    with pytest.raises(SystemExit, match="no system 'fine_tuned' for task test/search; it has \\['bm25'\\]"):
        ab_compare.main([a_dir, a_dir])
    with pytest.raises(SystemExit, match="no metric 'mrr@10'"):
        ab_compare.main([a_dir, a_dir, "--system", "bm25", "--metric", "mrr@10"])
    with pytest.raises(SystemExit, match="no per-query values"):
        ab_compare.main([a_dir, str(tmp_path / "nowhere")])
