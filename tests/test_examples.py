"""Example building checked row by row on a tiny hand-made log (pure functions, no Ray), plus
the Ray Data wiring once."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pyarrow as pa
import pytest

from recsys.config import DataConfig
from recsys.data.examples import (
    EXAMPLES_WITH_SPLIT,
    TimeCutoffs,
    search_examples,
    sequence_examples,
)
from recsys.schemas import EVENTS_SCHEMA

T0 = dt.datetime(2026, 6, 1, tzinfo=dt.timezone.utc)


def t(minutes: float) -> dt.datetime:
    return T0 + dt.timedelta(minutes=minutes)


def events(rows: list[tuple[Any, ...]], user: str = "u1") -> pa.Table:
    """rows: (minute, session, event_type, item, query)."""
    return pa.Table.from_pylist(
        [
            {"user_id": user, "session_id": s, "timestamp": t(m), "event_type": e, "query": q,
             "item_id": i, "extra": None}
            for m, s, e, i, q in rows
        ],
        schema=EVENTS_SCHEMA,
    )


# Deliberately out of time order: the functions must sort.
LOG = events(
    [
        (8, "s3", "click", "A", None),
        (0, "s1", "view", "A", "shoe"),
        (1, "s1", "click", "A", "shoe"),
        (2, "s1", "add_to_cart", "A", "shoe"),
        (3, "s1", "click", "B", None),
        (4, "s2", "view", "C", "kettle"),
        (5, "s2", "purchase", "C", "kettle"),
        (6, "s3", "click", "D", None),
        (7, "s3", "click", "D", None),  # a consecutive repeat: collapsed
    ]
)


def rows_of(table: pa.Table) -> list[dict[str, Any]]:
    assert table.schema == EXAMPLES_WITH_SPLIT
    return table.to_pylist()


def test_sequence_examples_leave_one_out() -> None:
    got = rows_of(sequence_examples(LOG, DataConfig()))
    assert [(r["history"], r["item_id"], r["weight"], r["split"], r["timestamp"]) for r in got] == [
        (["A"], "B", 1.0, "train", t(3)),
        (["B", "A"], "C", 3.0, "train", t(5)),
        (["C", "B", "A"], "D", 1.0, "valid", t(6)),
        (["D", "C", "B", "A"], "A", 1.0, "test", t(8)),
    ]
    assert all(r["kind"] == "next_item" and r["user_id"] == "u1" and r["query"] is None for r in got)


def test_sequence_history_truncated_newest_first() -> None:
    got = rows_of(sequence_examples(LOG, DataConfig(max_history=2)))
    assert [r["history"] for r in got] == [["A"], ["B", "A"], ["C", "B"], ["D", "C"]]


def test_sequence_short_users_and_views_only() -> None:
    two = events([(0, "s", "click", "A", None), (1, "s", "purchase", "B", None)])
    got = rows_of(sequence_examples(two, DataConfig()))
    assert [(r["history"], r["item_id"], r["split"]) for r in got] == [(["A"], "B", "train")]
    views = events([(0, "s", "view", "A", "q"), (1, "s", "view", "B", "q")])
    assert sequence_examples(views, DataConfig()).num_rows == 0
    assert search_examples(views, DataConfig()).num_rows == 0


def test_min_positive_weight_excludes_clicks() -> None:
    got = rows_of(sequence_examples(LOG, DataConfig(min_positive_weight=2.0)))
    # Only A (add_to_cart) and C (purchase) are positives.
    assert [(r["history"], r["item_id"], r["weight"]) for r in got] == [(["A"], "C", 3.0)]


def test_sequence_time_split() -> None:
    cfg = DataConfig(sequence_split="time", valid_fraction=0.25, test_fraction=0.25)
    cutoffs = TimeCutoffs.from_range(t(0), t(8), cfg)  # valid from minute 4, test from minute 6
    got = rows_of(sequence_examples(LOG, cfg, cutoffs))
    assert [(r["item_id"], r["split"]) for r in got] == [
        ("B", "train"), ("C", "valid"), ("D", "test"), ("A", "test")
    ]
    with pytest.raises(ValueError, match="sequence_split"):
        sequence_examples(LOG, cfg.model_copy(update={"sequence_split": "random"}))


def test_search_examples() -> None:
    got = rows_of(search_examples(LOG, DataConfig()))
    assert sorted((r["query"], r["item_id"], r["weight"], r["history"], r["timestamp"]) for r in got) == [
        ("kettle", "C", 3.0, ["B", "A"], t(5)),  # positives before the search, newest first
        ("shoe", "A", 2.0, [], t(2)),  # strongest event of the (session, query, item) wins
    ]
    assert all(r["kind"] == "search" and r["split"] == "train" for r in got)


def test_search_examples_one_row_per_session_query_item_and_time_split() -> None:
    log = events(
        [
            (0, "s1", "click", "A", "q"),
            (1, "s1", "click", "A", "q"),  # same session, query, item: one example
            (2, "s1", "click", "B", "q"),
            (10, "s2", "purchase", "A", "q"),  # another session: another example
        ]
    )
    cfg = DataConfig(valid_fraction=0.1, test_fraction=0.1)
    cutoffs = TimeCutoffs.from_range(t(0), t(10), cfg)
    got = rows_of(search_examples(log, cfg, cutoffs))
    assert sorted((r["item_id"], r["weight"], r["split"], r["history"]) for r in got) == [
        ("A", 1.0, "train", []),
        ("A", 3.0, "test", ["B", "A"]),
        ("B", 1.0, "train", []),
    ]


def test_relevance_from_extra() -> None:
    log = events([(0, "s", "click", "A", "drill")])
    log = log.set_column(6, "extra", pa.array(['{"relevance": 2.67}']))
    (row,) = rows_of(search_examples(log, DataConfig()))
    assert row["relevance"] == pytest.approx(2.67)


def test_split_given_by_the_source_wins_over_time() -> None:
    """Home Depot splits by query: a query's rows all land in its split, whatever their time."""
    log = events([(0, "s", "click", "A", "drill"), (10, "s", "purchase", "B", "drill")])
    log = log.set_column(6, "extra", pa.array(['{"relevance": 2.0, "split": "test"}', '{"relevance": 3.0, "split": "test"}']))
    cfg = DataConfig(valid_fraction=0.1, test_fraction=0.1)
    got = rows_of(search_examples(log, cfg, TimeCutoffs.from_range(t(0), t(10), cfg)))
    assert [r["split"] for r in got] == ["test", "test"]


def judged_log(split: str) -> pa.Table:
    """A Home-Depot-like query judged 1, 2 and 3 (recsys.data.real: view, click, purchase)."""
    log = events([(0, "q", "view", "P1", "drill"), (1, "q", "click", "P2", "drill"), (2, "q", "purchase", "P3", "drill")])
    extras = [f'{{"relevance": {r}, "split": "{split}"}}' for r in (1.0, 2.0, 3.0)]
    return log.set_column(6, "extra", pa.array(extras))


@pytest.mark.parametrize("split", ["valid", "test"])
def test_evaluation_splits_keep_every_judged_item(split: str) -> None:
    """Judged items below the positive weight stay in valid/test: the re-rank protocol needs all
    of a query's judged products as candidates, the irrelevant ones included."""
    got = rows_of(search_examples(judged_log(split), DataConfig()))
    assert sorted((r["item_id"], r["relevance"], r["weight"], r["split"]) for r in got) == [
        ("P1", 1.0, 0.0, split), ("P2", 2.0, 1.0, split), ("P3", 3.0, 3.0, split)
    ]


def test_training_split_keeps_positives_only() -> None:
    got = rows_of(search_examples(judged_log("train"), DataConfig()))
    assert sorted(r["item_id"] for r in got) == ["P2", "P3"]
    # Unjudged views in an evaluation split are not judgements: still no example.
    views = events([(0, "s", "view", "A", "q")])
    views = views.set_column(6, "extra", pa.array(['{"split": "test"}']))
    assert search_examples(views, DataConfig()).num_rows == 0


@pytest.mark.ray
def test_build_examples_with_ray(ray_cluster: None) -> None:
    import ray

    from recsys.data.examples import build_examples

    other = events([(20, "x", "click", "A", "shoe"), (21, "x", "purchase", "B", None),
                    (22, "x", "click", "C", None)], user="u2")
    ds = ray.data.from_arrow([LOG, other])
    out = build_examples(ds, DataConfig())
    counts = {k: v.count() for k, v in out.items()}
    # u1: 4 next-item (2 train, valid, test) + 2 search; u2 has 3 positives, so 2 next-item
    # examples (B valid, C test) + 1 search.
    assert counts[("next_item", "train")] == 2
    assert counts[("next_item", "valid")] == 2
    assert counts[("next_item", "test")] == 2
    assert sum(v for (k, _), v in counts.items() if k == "search") == 3
    assert out[("next_item", "test")].schema().names == [f.name for f in EXAMPLES_WITH_SPLIT][:-1]
