"""Validation and quarantine: exact counts per reason on hand-made logs with planted bad rows,
pure (one batch) and through the real readers (parquet, JSONL, CSV) on the S3 server."""

from __future__ import annotations

import csv
import datetime as dt
import io as stdio
import json
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys import storage
from recsys.data.validate import (
    DataQualityError,
    check_quarantine_share,
    dedupe_catalog,
    parse_timestamps,
    validate_catalog_batch,
    validate_event_batch,
)
from recsys.schemas import CATALOG_SCHEMA, EVENTS_SCHEMA, QUARANTINE_SCHEMA

EVENT_FIELDS = ["user_id", "session_id", "timestamp", "event_type", "query", "item_id"]
KNOWN = {"i1", "i2", "i3"}


def _ev(user: Any = "u1", session: Any = "s1", ts: Any = "2026-06-01T10:00:00Z",
        etype: Any = "click", query: Any = None, item: Any = "i1") -> dict[str, Any]:
    return dict(zip(EVENT_FIELDS, [user, session, ts, etype, query, item], strict=True))


# Rows every format can carry (all fields text), with the reason each must be quarantined for.
GOOD_EVENTS = [
    _ev(),
    _ev(ts="2026-06-01T10:01:00.250Z", etype="view", query="red shoe", item="i2"),
    _ev(ts="2026-06-01 10:02:00", etype="purchase", item="i2"),  # no zone: taken as UTC
    _ev(user="u2", session="s2", ts="1780000000", etype="add_to_cart", item="i3"),  # epoch s
    _ev(user="u2", session="s2", ts="1780000000123", etype="CLICK ", item="i1"),  # epoch ms, case
    _ev(user="u3", session="s3", ts="2026-06-01T12:00:00+02:00", query="café au lait"),
]
BAD_EVENTS = [
    ("missing_id", _ev(user=None)),
    ("missing_id", _ev(session="")),
    ("missing_id", _ev(item="   ")),
    ("unknown_event_type", _ev(etype="wishlist")),
    ("unknown_event_type", _ev(etype=None)),
    ("bad_timestamp", _ev(ts="not-a-date")),
    ("bad_timestamp", _ev(ts="1970-01-01T00:00:00Z")),  # before 1990
    ("bad_timestamp", _ev(ts="2999-01-01T00:00:00Z")),  # more than a day in the future
    ("bad_timestamp", _ev(ts="2026-13-45T00:00:00Z")),  # looks ISO, is not a date
    ("unknown_item", _ev(item="GHOST")),
    ("bad_encoding", _ev(query="caf\ufffd shoes")),
    ("bad_encoding", _ev(user="u\x01x")),
]


def _raw_batch(rows: list[dict[str, Any]], type_errors: list[str | None] | None = None) -> pa.Table:
    cols = {f: pa.array([r.get(f) for r in rows], pa.string()) for f in EVENT_FIELDS}
    cols["extra"] = pa.nulls(len(rows), pa.string())
    cols["_source"] = pa.array(["hand-made"] * len(rows), pa.string())
    cols["_type_error"] = pa.array(type_errors or [None] * len(rows), pa.string())
    return pa.table(cols)


def test_parse_timestamps_forms() -> None:
    col = pa.array(["2026-06-01T00:00:00.123Z", "2026-06-01T02:00:00+02:00", "2026-06-01 00:00:00",
                    "1780000000", "1780000000123", "nope", None])
    got = parse_timestamps(col).to_pylist()
    utc = dt.timezone.utc
    assert got[0] == dt.datetime(2026, 6, 1, 0, 0, 0, 123000, tzinfo=utc)
    assert got[1] == got[2] == dt.datetime(2026, 6, 1, tzinfo=utc)
    assert got[3] == dt.datetime.fromtimestamp(1780000000, utc)
    assert got[4] == dt.datetime.fromtimestamp(1780000000.123, utc)
    assert got[5] is None and got[6] is None


@pytest.mark.parametrize("unit", ["s", "ms", "us", "ns"])
@pytest.mark.parametrize("tz", [None, "UTC", "America/New_York"])
def test_parse_typed_timestamps_every_unit_and_zone(unit: str, tz: str | None) -> None:
    """Typed timestamps of any unit and zone -> the UTC instant truncated to ms (a "safe" cast
    refused sub-ms parts); zoned values are instants already, naive ones are taken as UTC."""
    per_s = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}[unit]
    t_ns = int(dt.datetime(2026, 6, 1, 10, tzinfo=dt.timezone.utc).timestamp()) * 10**9 + 123_456_789
    col = pa.array([t_ns // (10**9 // per_s), None], pa.timestamp(unit, tz))
    want = dt.datetime(2026, 6, 1, 10, 0, 0, 0 if unit == "s" else 123000, tzinfo=dt.timezone.utc)
    assert parse_timestamps(col).to_pylist() == [want, None]
    # Through the raw form the readers produce, a chunked column.
    assert parse_timestamps(pa.chunked_array([col])).to_pylist() == [want, None]


def test_parse_timestamps_sub_ms_text_and_float_epochs() -> None:
    """Text as exports write it: micro/nanosecond ISO strings (Spark, Python's isoformat),
    epoch floats as Arrow prints them, and out-of-range epochs -> null, not an overflow."""
    col = pa.array(["2026-06-01T10:00:00.123456Z", "2026-06-01 10:00:00.123456789",
                    "1.780000000123e+12", "1780000000.123", "1e+20", "nan", "inf", "99999999999999"])
    got = parse_timestamps(col).to_pylist()
    utc = dt.timezone.utc
    assert got[0] == got[1] == dt.datetime(2026, 6, 1, 10, 0, 0, 123000, tzinfo=utc)
    # 1780000000.123 s * 1000 is 1780000000122.9999 in floats: still .123.
    assert got[2] == got[3] == dt.datetime(2026, 5, 28, 20, 26, 40, 123000, tzinfo=utc)
    assert got[4:] == [None] * 4
    # A batch that also holds an unparsable ISO string takes the per-row path: same answers.
    assert parse_timestamps(pa.array([*col.to_pylist(), "2026-13-45T00:00:00Z"])).to_pylist() == [*got, None]


def test_impossible_typed_timestamps_are_quarantined_not_a_crash() -> None:
    """Typed values Python's datetime cannot hold (year 0, year 10000) or ms cannot hold
    (seconds beyond +-292 million years) are bad_timestamp rows showing the stored value."""
    from recsys.data.io import EVENT_COLUMNS, _to_raw

    ok = int(dt.datetime(2026, 6, 1, tzinfo=dt.timezone.utc).timestamp())
    for unit, values, shown in [
        ("us", [ok * 10**6, 253402300800 * 10**6, -62167219200 * 10**6], ["10000-01-01", "0000-01-01"]),
        ("s", [ok, 2**62], [str(2**62)]),
    ]:
        n = len(values)
        table = pa.table({"user_id": ["u1"] * n, "session_id": ["s1"] * n, "event_type": ["click"] * n,
                          "item_id": ["i1"] * n, "timestamp": pa.array(values, pa.timestamp(unit, "UTC"))})
        clean, bad = validate_event_batch(_to_raw(table, EVENT_COLUMNS), KNOWN)
        assert clean.num_rows == 1
        assert bad.column("reason").to_pylist() == ["bad_timestamp"] * len(shown)
        for raw, detail, text in zip(bad.column("raw").to_pylist(), bad.column("detail").to_pylist(), shown, strict=True):
            assert text in json.loads(raw)["timestamp"] and text in detail


def test_event_batch_exact_counts_per_reason() -> None:
    rows = GOOD_EVENTS + [r for _, r in BAD_EVENTS] + [_ev(item="7")]
    type_errors = [None] * (len(rows) - 1) + ["item_id has JSON type int: 7"]
    clean, bad = validate_event_batch(_raw_batch(rows, type_errors), KNOWN, source="test")
    assert clean.schema == EVENTS_SCHEMA
    assert bad.schema == QUARANTINE_SCHEMA
    assert clean.num_rows + bad.num_rows == len(rows)  # nothing dropped
    expected = Counter(reason for reason, _ in BAD_EVENTS)
    expected["wrong_type"] += 1
    assert Counter(bad.column("reason").to_pylist()) == expected
    assert clean.num_rows == len(GOOD_EVENTS)
    # Clean rows are normalised: lower-case event types, parsed timestamps, blank query -> null.
    assert set(clean.column("event_type").to_pylist()) <= {"view", "click", "add_to_cart", "purchase"}
    assert clean.column("query").to_pylist()[5] == "café au lait"
    # Every rejected row keeps its original content and says why.
    for raw, detail, source in zip(*(bad.column(c).to_pylist() for c in ("raw", "detail", "source")), strict=True):
        assert isinstance(json.loads(raw), dict)
        assert detail and source == "hand-made"
    ghost = [json.loads(r) for r, why in zip(bad.column("raw").to_pylist(), bad.column("reason").to_pylist(), strict=True) if why == "unknown_item"]
    assert ghost == [{**_ev(item="GHOST"), "extra": None}]


def test_catalog_batch_and_duplicates() -> None:
    good = [
        {"item_id": "i1", "title": "Red shoe", "price": "19.5", "attributes": '{"colour": "red"}'},
        {"item_id": "i2", "title": "Blue shoe", "price": None, "attributes": None},
        {"item_id": "i3", "title": "Kettle", "price": " 7 ", "description": "Line one\nline two"},
    ]
    bad = [
        ("missing_id", {"item_id": None, "title": "No id"}),
        ("missing_id", {"item_id": "i9", "title": " "}),
        ("wrong_type", {"item_id": "i8", "title": "Pricey", "price": "cheap"}),
        ("wrong_type", {"item_id": "i7", "title": "Attrs", "attributes": "not json"}),
        ("bad_encoding", {"item_id": "i6", "title": "Caf\ufffd"}),
    ]
    dup = {"item_id": "i1", "title": "Red shoe again"}
    rows = good + [r for _, r in bad] + [dup]
    names = list(CATALOG_SCHEMA.names)
    batch = pa.table({c: pa.array([r.get(c) for r in rows], pa.string()) for c in names})
    clean, rejected = validate_catalog_batch(batch, source="cat")
    clean, dups = dedupe_catalog(clean, "cat")
    assert clean.schema == CATALOG_SCHEMA
    assert clean.column("item_id").to_pylist() == ["i1", "i2", "i3"]
    assert clean.column("title").to_pylist()[0] == "Red shoe"  # the first row of a duplicate wins
    assert clean.column("price").to_pylist() == [19.5, None, 7.0]
    got = Counter(rejected.column("reason").to_pylist() + dups.column("reason").to_pylist())
    assert got == Counter([r for r, _ in bad] + ["duplicate_item_id"])
    assert clean.num_rows + rejected.num_rows + dups.num_rows == len(rows)


def test_threshold_error_names_worst_reason_with_examples() -> None:
    by_reason = {"unknown_item": 30, "bad_timestamp": 5, "missing_id": 1}
    examples = {"unknown_item": ['{"item_id": "GHOST1"}'], "bad_timestamp": ['{"timestamp": "x"}']}
    with pytest.raises(DataQualityError) as e:
        check_quarantine_share(100, by_reason, examples, 0.05, "events at test")
    msg = str(e.value)
    assert msg.index("unknown_item") < msg.index("bad_timestamp")
    assert "GHOST1" in msg and "36 of 100" in msg
    check_quarantine_share(1000, by_reason, examples, 0.05, "events")  # 3.6% passes


# ---- through the real readers (Ray Data) on the S3 server ---------------------------------

CATALOG_ROWS = [
    {"item_id": i, "title": f"Item {i}", "description": None, "brand": "B", "category": "C > D",
     "price": 1.0, "attributes": None}
    for i in sorted(KNOWN)
]


def _jsonl(rows: list[Any]) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rows)


def _csv(rows: list[dict[str, Any]]) -> bytes:
    buf = stdio.StringIO()
    w = csv.DictWriter(buf, fieldnames=EVENT_FIELDS)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue().encode()


def _parquet(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def write_event_files(fmt: str, root: str, cfg: storage.StorageConfig) -> tuple[str, Counter]:
    """Write GOOD_EVENTS + BAD_EVENTS (+ format-specific bad rows) as 2 shards; return the URI
    and the expected quarantine counts."""
    uri = storage.join(root, fmt, "events")
    expected = Counter(reason for reason, _ in BAD_EVENTS)
    rows = GOOD_EVENTS + [r for _, r in BAD_EVENTS]
    half = len(rows) // 2
    invalid_utf8 = json.dumps(_ev(item="i1")).encode().replace(b'"i1"', b'"i\xff1"')
    expected["bad_encoding"] += 1
    if fmt == "jsonl":
        shards = [
            _jsonl(rows[:half]) + invalid_utf8 + b"\n",
            _jsonl(rows[half:] + [_ev(item=7), _ev(user=["u1"])]) + b"{not json\n",
        ]
        expected["wrong_type"] += 3
    elif fmt == "csv":
        bad_line = b"u1,s1,2026-06-01T10:00:00Z,click,,i\xff1\n"
        shards = [_csv(rows[:half]) + bad_line, _csv(rows[half:])]
    else:
        table = pa.Table.from_pylist(rows, schema=pa.schema([(f, pa.string()) for f in EVENT_FIELDS]))
        # A shard written by another exporter with integer item ids: conflicting schemas.
        ints = pa.table({"user_id": ["u1", "u2"], "session_id": ["s1", "s2"],
                         "timestamp": ["2026-06-01T10:00:00Z"] * 2, "event_type": ["click"] * 2,
                         "item_id": pa.array([7, 8], pa.int64())})
        bad_enc = pa.table({f: [v.decode("utf-8", "replace") if isinstance(v, bytes) else v]
                            for f, v in zip(EVENT_FIELDS, ["u1", "s1", "2026-06-01T10:00:00Z", "click", None, b"i\xff1"], strict=True)})
        shards = [_parquet(pa.concat_tables([table.slice(0, half), bad_enc.cast(table.schema)])),
                  _parquet(table.slice(half)), _parquet(ints)]
        expected["wrong_type"] += 2
    for k, body in enumerate(shards):
        storage.write_bytes(storage.join(uri, f"part-{k:05d}.{fmt}"), body, cfg)
    return uri, expected


@pytest.mark.ray
@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv"])
def test_readers_quarantine_exact_counts(fmt: str, ray_cluster: None, s3_storage: storage.StorageConfig) -> None:
    from recsys.data import io
    from recsys.data.validate import validate_events

    uri, expected = write_event_files(fmt, s3_storage.root, s3_storage)
    raw = io.read_events(uri, s3_storage)
    clean, bad = validate_events(raw, KNOWN, source=fmt)
    bad_rows = bad.take_all()
    clean_rows = clean.take_all()
    assert Counter(r["reason"] for r in bad_rows) == expected
    assert len(clean_rows) == len(GOOD_EVENTS)
    rows_in = len(GOOD_EVENTS) + sum(expected.values())
    assert len(clean_rows) + len(bad_rows) == rows_in
    assert {r["user_id"] for r in clean_rows} == {"u1", "u2", "u3"}
    # Each rejected row names the shard it came from.
    assert all(r["source"].startswith(f"{uri}/part-") for r in bad_rows)


def test_lost_rows_are_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The no-silent-drop invariant is enforced in code: a validator that loses a row fails."""
    from recsys.data import validate

    batch = _raw_batch(GOOD_EVENTS + [r for _, r in BAD_EVENTS])
    tagged = validate.tag_event_batch(batch, KNOWN, "t")
    assert tagged.num_rows == batch.num_rows
    real = validate.validate_event_batch

    def lossy(*args: Any, **kwargs: Any) -> tuple[pa.Table, pa.Table]:
        clean, bad = real(*args, **kwargs)
        return clean.slice(1), bad

    monkeypatch.setattr(validate, "validate_event_batch", lossy)
    with pytest.raises(RuntimeError, match="lost rows"):
        validate.tag_event_batch(batch, KNOWN, "t")
