"""Real-data loaders (skipped when ../shared/data is absent)."""

from __future__ import annotations

import pyarrow.compute as pc

from recsys.config import DataConfig
from recsys.data.examples import sequence_examples
from recsys.data.real import homedepot_split, load_amazon_scientific, load_homedepot


def _inter(path):
    with open(path) as f:
        next(f)
        return [line.rstrip("\n").split("\t") for line in f]


def test_amazon_counts_and_exact_published_split(shared_data) -> None:
    d = shared_data / "amazon-scientific"
    events, catalog = load_amazon_scientific(d)
    assert catalog.num_rows == 4385
    assert len(set(events.column("user_id").to_pylist())) == 8442
    assert events.num_rows == 59427  # every user's full sequence, rebuilt from the .inter files
    asin = dict(line.split("\t") for line in (d / "Scientific.item2index").read_text().splitlines())
    by_index = {int(v): k for k, v in asin.items()}
    expected: dict[str, dict[str, set]] = {s: {} for s in ("train", "valid", "test")}
    for split in expected:
        for user, hist, target in _inter(d / f"Scientific.{split}.inter"):
            key = (tuple(by_index[int(i)] for i in hist.split())[::-1], by_index[int(target)])
            expected[split].setdefault(f"u{user}", set()).add(key)
    cfg = DataConfig(max_history=50, collapse_repeats=False)
    users = sorted(expected["test"])[:300]
    uid = events.column("user_id")
    counts = {"train": 0, "valid": 0, "test": 0}
    for u in users:
        ex = sequence_examples(events.filter(pc.equal(uid, u)), cfg)
        for split in counts:
            got = {(tuple(h), i) for h, i, s in zip(ex.column("history").to_pylist(), ex.column("item_id").to_pylist(), ex.column("split").to_pylist(), strict=True) if s == split}
            assert got == expected[split].get(u, set()), (u, split)
            counts[split] += len(got)
    assert counts["valid"] == counts["test"] == len(users)
    assert sum(len(v) for v in expected["train"].values()) == 34101


def test_homedepot_counts_and_query_split(shared_data) -> None:
    events, catalog = load_homedepot(shared_data / "homedepot")
    assert events.num_rows == 74067
    assert catalog.num_rows == 54667
    queries = {q.lower() for q in events.column("query").to_pylist()}
    assert len(queries) == 11795
    # Splitting by query: a query never lands in two splits.
    splits: dict[str, set[str]] = {}
    for q in events.column("query").to_pylist():
        splits.setdefault(q.lower(), set()).add(homedepot_split(q))
    assert all(len(s) == 1 for s in splits.values())
    test_queries = [q for q, s in splits.items() if s == {"test"}]
    assert 0.15 < len(test_queries) / len(queries) < 0.25
    types = set(events.column("event_type").to_pylist())
    assert types == {"view", "click", "add_to_cart", "purchase"}
