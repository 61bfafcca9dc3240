"""The readers on ordinary shop exports, through real files on local disk and the S3 server:
typed parquet timestamps in every unit and zone, a file / folder / glob / list as a source,
CSV values spanning lines, and the files' own row count the data job checks the readers by."""

from __future__ import annotations

import csv
import datetime as dt
import io as stdio
import json
import random
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys import storage
from recsys.config import StorageConfig
from recsys.data import io

UTC = dt.timezone.utc
KNOWN = {"i1", "i2", "i3"}


@pytest.fixture(params=["local", "s3"])
def place(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, StorageConfig]:
    """(root URI, storage config): a fresh folder on local disk or a fresh prefix on S3."""
    if request.param == "local":
        return str(tmp_path), StorageConfig(root=str(tmp_path))
    cfg = request.getfixturevalue("s3_server").storage_config(f"s3://test/io-{uuid.uuid4().hex[:8]}")
    return cfg.root, cfg


# ---- sources: a file, a folder, a glob, a list ----------------------------------------------


def test_source_file_folder_glob_list_and_missing(place: tuple[str, StorageConfig]) -> None:
    root, cfg = place
    names = [
        "events/part-0.jsonl", "events/part-1.jsonl", "events/day=2/part-2.jsonl",
        "events/_SUCCESS", "events/.part-0.jsonl.crc", "events/_temporary/0/part-9.jsonl",
        "more/x.jsonl", "odd,name.jsonl",
    ]
    for name in names:
        storage.write_bytes(storage.join(root, name), b'{"user_id": "u1"}\n', cfg)
    ev = storage.join(root, "events")

    def files(src: Any) -> list[str]:
        found, fmt = io.list_data_files(src, cfg, key="data.events_uri")
        assert fmt == "jsonl"
        return found

    p0, p1, p2 = f"{ev}/part-0.jsonl", f"{ev}/part-1.jsonl", f"{ev}/day=2/part-2.jsonl"
    assert files(p0) == [p0]  # a single file
    assert files(ev) == [p2, p0, p1]  # a folder, recursively; _SUCCESS, .crc, _temporary skipped
    assert files(ev + "/") == [p2, p0, p1]
    assert files(f"{ev}/part-*.jsonl") == [p0, p1]
    assert files(f"{ev}/**/part-*.jsonl") == [p2, p0, p1]
    assert files(f"{root}/*/x.jsonl") == [f"{root}/more/x.jsonl"]
    # A list keeps its order and names each file once; a comma belongs to the name.
    assert files([p1, f"{root}/more", f"{ev}/part-*.jsonl"]) == [p1, f"{root}/more/x.jsonl", p0]
    assert files(f"{root}/odd,name.jsonl") == [f"{root}/odd,name.jsonl"]

    missing = {
        f"{root}/nope": f"{root}/nope",
        f"{ev}/part-9*.jsonl": f"{ev}/part-9*.jsonl",
        f"{p0},{p1}": f"{p0},{p1}",
    }
    for src, shown in [*missing.items(), ((p0, f"{root}/gone.jsonl"), f"{root}/gone.jsonl")]:
        with pytest.raises(io.SourceNotFoundError) as e:
            files(list(src) if isinstance(src, tuple) else src)
        msg = str(e.value)
        assert msg.startswith("data.events_uri: ") and shown in msg and "\n" not in msg, msg
    # A file the reader cannot take is named up front instead of failing the read.
    storage.write_bytes(storage.join(root, "mixed/notes.txt"), b"hi", cfg)
    storage.write_bytes(storage.join(root, "mixed/a.jsonl"), b"{}\n", cfg)
    with pytest.raises(ValueError, match="data.catalog_uri.*no known extension.*notes.txt"):
        io.list_data_files(storage.join(root, "mixed"), cfg, key="data.catalog_uri")


@pytest.mark.ray
def test_read_events_from_file_glob_and_list(place: tuple[str, StorageConfig], ray_cluster: None) -> None:
    """Through the Ray readers: a single file (a local one used to fail with NotADirectoryError
    from pyarrow), a glob and a list; every row names the file it came from."""
    root, cfg = place
    a, b = storage.join(root, "ev/part-a.jsonl"), storage.join(root, "ev/part-b.jsonl")
    storage.write_bytes(a, b'{"user_id": "u1"}\n{"user_id": "u2"}\n', cfg)
    storage.write_bytes(b, b'{"user_id": "u3"}\n', cfg)
    for src, users in [(a, ["u1", "u2"]), (storage.join(root, "ev/part-*.jsonl"), ["u1", "u2", "u3"]), ([b, a], ["u1", "u2", "u3"])]:
        rows = io.read_events(src, cfg).take_all()
        assert sorted(r["user_id"] for r in rows) == users
        assert {r["_source"] for r in rows} <= {a, b}
    with pytest.raises(io.SourceNotFoundError, match="data.events_uri: .*nope.jsonl does not exist"):
        io.read_events(storage.join(root, "ev/nope.jsonl"), cfg)


# ---- typed parquet timestamps ------------------------------------------------------------

# 2026-06-01T10:00:00.123456789Z in nanoseconds; every unit holds it truncated.
T_NS = int(dt.datetime(2026, 6, 1, 10, tzinfo=UTC).timestamp()) * 10**9 + 123_456_789
PER_SECOND = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}
YEAR_10000 = int(dt.datetime(9999, 12, 31, tzinfo=UTC).timestamp()) + 86400  # seconds
YEAR_0 = -62167219200  # 0000-01-01T00:00:00Z in seconds


def _timestamp_file(path: Path, unit: str, tz: str | None) -> tuple[dt.datetime, list[str]]:
    """One good event and impossible timestamps, as `timestamp[unit, tz]`; returns the good
    event's expected time and the text each impossible value must show in the quarantine."""
    per = PER_SECOND[unit]
    good = T_NS // (10**9 // per)
    if unit == "ns":  # every int64 is a valid ns timestamp: the extremes are the impossible ones
        bad, shown = [-(2**63) + 1, 2**63 - 1], ["1677-09-21", "2262-04-11"]
    else:
        bad, shown = [YEAR_10000 * per, YEAR_0 * per], ["10000-01-01", "0000-01-01"]
    n = 1 + len(bad)
    table = pa.table(
        {
            "user_id": ["u1"] * n, "session_id": ["s1"] * n, "event_type": ["click"] * n,
            "item_id": ["i1"] * n,
            "timestamp": pa.array([good, *bad], pa.timestamp(unit, tz)),
        }
    )
    pq.write_table(table, path)
    return dt.datetime(2026, 6, 1, 10, 0, 0, 0 if unit == "s" else 123000, tzinfo=UTC), shown


def _read_validated(src: Any, cfg: StorageConfig) -> tuple[list[dict], list[dict]]:
    from recsys.data.validate import validate_events

    clean, bad = validate_events(io.read_events(src, cfg), KNOWN, "test")
    return clean.take_all(), bad.take_all()


@pytest.mark.ray
def test_typed_parquet_timestamps_every_unit_and_zone(tmp_path: Path, ray_cluster: None) -> None:
    """timestamp[s|ms|us|ns] naive, UTC and America/New_York (as pyarrow, pandas, Spark and
    DuckDB write them) -> the same UTC instant truncated to ms; impossible values (year 0,
    year 10000, the ns extremes) are quarantined as bad_timestamp showing the value, never a
    crash. Each file alone (Ray's parquet reader) and all together (conflicting schemas: file
    by file)."""
    cfg = StorageConfig(root=str(tmp_path))
    expected_bad = 0
    for unit in PER_SECOND:
        for tz in (None, "UTC", "America/New_York"):
            path = tmp_path / "ts" / f"{unit}-{(tz or 'naive').replace('/', '_')}" / "part-0.parquet"
            path.parent.mkdir(parents=True)
            want, shown = _timestamp_file(path, unit, tz)
            clean, bad = _read_validated(str(path.parent), cfg)
            assert [r["timestamp"] for r in clean] == [want], (unit, tz)
            assert [r["reason"] for r in bad] == ["bad_timestamp"] * len(shown), (unit, tz)
            for row, text in zip(bad, shown, strict=True):
                assert text in row["detail"] and text in json.loads(row["raw"])["timestamp"], (unit, tz, row)
            expected_bad += len(shown)
    clean, bad = _read_validated(str(tmp_path / "ts"), cfg)
    assert len(clean) == 12 and len(bad) == expected_bad
    assert {r["timestamp"] for r in clean} == {
        dt.datetime(2026, 6, 1, 10, 0, 0, 123000, tzinfo=UTC), dt.datetime(2026, 6, 1, 10, tzinfo=UTC)
    }


@pytest.mark.ray
def test_pandas_and_spark_int96_timestamps(tmp_path: Path, ray_cluster: None) -> None:
    """pandas' datetime64[ns] and a New York local time, and Spark's default INT96 encoding
    with a date outside the nanosecond range (read as ms, not wrapped to a date in 1830)."""
    pd = pytest.importorskip("pandas")
    cfg = StorageConfig(root=str(tmp_path))
    base = {"user_id": ["u1", "u2"], "session_id": ["s1", "s2"], "event_type": ["click"] * 2, "item_id": ["i1", "i2"]}
    for name in ("naive", "ny", "spark"):
        (tmp_path / name).mkdir()
    df = pd.DataFrame({**base, "timestamp": pd.to_datetime(["2026-06-01 10:00:00.123456789", "2026-06-01 11:00:00.000000000"])})
    df.to_parquet(tmp_path / "naive" / "part-0.parquet")
    ny = pd.DataFrame({**base, "timestamp": pd.to_datetime(["2026-06-01 06:00:00.123456", "2026-01-15 05:00:00.000000"]).tz_localize("America/New_York")})
    ny.to_parquet(tmp_path / "ny" / "part-0.parquet")
    want = [dt.datetime(2026, 6, 1, 10, 0, 0, 123000, tzinfo=UTC), dt.datetime(2026, 6, 1, 11, tzinfo=UTC)]
    assert sorted(r["timestamp"] for r in _read_validated(str(tmp_path / "naive"), cfg)[0]) == want
    # New York is UTC-4 in June and UTC-5 in January.
    want_ny = [dt.datetime(2026, 1, 15, 10, tzinfo=UTC), dt.datetime(2026, 6, 1, 10, 0, 0, 123000, tzinfo=UTC)]
    assert sorted(r["timestamp"] for r in _read_validated(str(tmp_path / "ny"), cfg)[0]) == want_ny

    spark = pa.table({**base, "timestamp": pa.array([dt.datetime(2026, 6, 1, 10, 0, 0, 123456), dt.datetime(3000, 1, 1)], pa.timestamp("us"))})
    pq.write_table(spark, tmp_path / "spark" / "part-0.parquet", use_deprecated_int96_timestamps=True)
    assert pq.read_schema(tmp_path / "spark" / "part-0.parquet").field("timestamp").type == pa.timestamp("ns")
    clean, bad = _read_validated(str(tmp_path / "spark"), cfg)
    assert [r["timestamp"] for r in clean] == [want[0]]
    assert [r["reason"] for r in bad] == ["bad_timestamp"] and "3000-01-01" in bad[0]["detail"]


# ---- CSV --------------------------------------------------------------------------------


@pytest.mark.ray
def test_csv_values_spanning_lines_and_a_short_last_row(place: tuple[str, StorageConfig], ray_cluster: None) -> None:
    """A catalog export whose quoted descriptions hold newlines, over several of the reader's
    blocks (Ray's CSV reader used to fail: "CSV parser got out of sync with chunker"), with
    empty lines and a cut-off last row (quarantined, not a failed read)."""
    from recsys.data.validate import validate_catalog

    root, cfg = place
    rows = [
        {"item_id": f"i{i}", "title": f"Item {i}", "description": f'Para one, "quoted".\n\nPara two of {i}.\r\nEnd'}
        for i in range(50_000)
    ]
    buf = stdio.StringIO()
    w = csv.DictWriter(buf, fieldnames=["item_id", "title", "description"])
    w.writeheader()
    w.writerows(rows[:10])
    body = buf.getvalue() + "\n\n"  # two empty lines
    buf = stdio.StringIO()
    csv.DictWriter(buf, fieldnames=["item_id", "title", "description"]).writerows(rows[10:])
    body += buf.getvalue() + "i99999,Cut off"
    assert len(body) > 3 * 2**20  # more than one block of pyarrow's CSV reader
    uri = storage.join(root, "catalog/catalog.csv")
    storage.write_bytes(uri, body.encode(), cfg)

    assert io.count_rows(uri, cfg) == {"files": 1, "rows": 50_003, "blank_lines": 2}
    clean, bad = validate_catalog(io.read_catalog(uri, cfg))
    assert clean.num_rows == 50_000
    assert clean.column("description").to_pylist()[7] == rows[7]["description"]
    assert bad.column("reason").to_pylist() == ["wrong_type"]
    assert json.loads(bad.column("raw")[0].as_py()) == "i99999,Cut off"
    assert "2 fields" in bad.column("detail")[0].as_py()


# ---- the independent row count ------------------------------------------------------------


def _lines_reference(data: bytes) -> tuple[int, int]:
    pieces = data.split(b"\n")
    if pieces[-1] == b"":
        pieces = pieces[:-1]
    return len(pieces), sum(1 for p in pieces if not p.strip())


def test_jsonl_line_count_across_chunk_boundaries() -> None:
    """The counter reads in chunks; lines and blank lines (whitespace only, CRLF included)
    must come out the same wherever a chunk boundary falls."""
    rng = random.Random(0)
    alphabet = [b"\n", b"\n", b"\n", b" ", b"\r", b"\t", b"{", b'"x"', b"}"]
    for _ in range(2000):
        data = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        for chunk in (1, 2, 3, 7, 1 << 20):
            assert io.count_jsonl_lines(stdio.BytesIO(data), chunk) == _lines_reference(data), (data, chunk)
    assert io.count_jsonl_lines(stdio.BytesIO(b'{"a": 1}\n\n  \r\n{"a": 2}')) == (4, 2)


@pytest.mark.ray
def test_count_rows_per_format(place: tuple[str, StorageConfig], ray_cluster: None) -> None:
    root, cfg = place
    t = pa.table({"user_id": ["u1", "u2", "u3"]})
    storage.write_parquet(t, storage.join(root, "pq/a.parquet"), cfg)
    storage.write_parquet(t.slice(1), storage.join(root, "pq/b.parquet"), cfg)
    assert io.count_rows(storage.join(root, "pq"), cfg) == {"files": 2, "rows": 5, "blank_lines": 0}
    storage.write_bytes(storage.join(root, "js/a.jsonl"), b'{"a": 1}\n\n{"a": 2}\n', cfg)
    storage.write_bytes(storage.join(root, "js/b.jsonl"), b'\r\n{"a": 3}\n{"a": ', cfg)
    assert io.count_rows(storage.join(root, "js"), cfg) == {"files": 2, "rows": 6, "blank_lines": 2}
    # An empty first field is a row, an empty line is not; a quoted newline is not a new row.
    storage.write_bytes(storage.join(root, "csv/a.csv"), b'a,b\n,1\n\n"x\ny",2\n', cfg)
    storage.write_bytes(storage.join(root, "csv/b.csv"), b"", cfg)
    assert io.count_rows(storage.join(root, "csv"), cfg) == {"files": 2, "rows": 3, "blank_lines": 1}


def _write_catalog(root: str, cfg: StorageConfig) -> str:
    from test_validate import CATALOG_ROWS, _jsonl

    catalog_uri = storage.join(root, "shop/catalog.jsonl")
    storage.write_bytes(catalog_uri, _jsonl(CATALOG_ROWS) + b"\n", cfg)  # one blank line
    return catalog_uri


def _write_shop(root: str, cfg: StorageConfig, events: bytes) -> tuple[str, str]:
    events_uri = storage.join(root, "shop/events.jsonl")
    storage.write_bytes(events_uri, events, cfg)
    return events_uri, _write_catalog(root, cfg)


def _ev_line(user: str, item: str = "i1", minute: int = 0, **kw: Any) -> bytes:
    row = {"user_id": user, "session_id": f"s-{user}", "timestamp": f"2026-06-01T10:{minute:02d}:00Z",
           "event_type": "click", "item_id": item, **kw}
    return json.dumps(row).encode()


def _files_cfg(cfg: StorageConfig, events_uri: str, catalog_uri: str) -> Any:
    from recsys.config import Config, DataConfig

    out = Config(storage=cfg)
    out.data = DataConfig(source="files", events_uri=events_uri, catalog_uri=catalog_uri, max_quarantine_share=1.0)
    return out


@pytest.mark.ray
def test_prepare_counts_blank_lines_and_a_truncated_last_line(s3_storage: StorageConfig, ray_cluster: None) -> None:
    """A JSONL export with a byte order mark, blank lines (LF and CRLF), an unparsable line
    and a last line cut off mid-write: exact counts in the manifest, files' count == kept +
    quarantined + blank lines."""
    from recsys.data.prepare import run

    good = [_ev_line(u, i, m) for m, (u, i) in enumerate([("u1", "i1"), ("u1", "i2"), ("u2", "i3"), ("u2", "i1")])]
    cut = _ev_line("u3", "i2")[:25]
    # A UTF-8 byte order mark first, as Windows tools write: not part of the first row.
    events = b"\n".join([b"\xef\xbb\xbf" + good[0], b"", b"   ", good[1], b"\r", good[2], b"{not json", good[3]]) + b"\n" + cut
    events_uri, catalog_uri = _write_shop(s3_storage.root, s3_storage, events)
    # The catalog's last line is cut off too (after its one blank line).
    catalog = storage.read_bytes(catalog_uri, s3_storage) + b'{"item_id": "i4", "ti'
    storage.write_bytes(catalog_uri, catalog, s3_storage)
    manifest = run(_files_cfg(s3_storage, events_uri, catalog_uri))
    c = manifest["counts"]
    assert (c["event_files"], c["rows_in_files"], c["blank_lines"]) == (1, 9, 3)
    assert (c["rows_in"], c["rows_kept"], c["rows_quarantined"]) == (6, 4, 2)
    assert c["quarantined_by_reason"] == {"wrong_type": 1, "truncated_line": 1}
    assert (c["catalog_rows_in_files"], c["catalog_blank_lines"], c["catalog_rows_kept"]) == (5, 1, 3)
    assert c["catalog_quarantined_by_reason"] == {"truncated_line": 1}

    fs, path = storage.filesystem(storage.join(manifest["paths"]["quarantine"], "events"), s3_storage)
    q = pq.read_table(path, filesystem=fs).to_pylist()
    by_reason = {r["reason"]: r for r in q}
    assert json.loads(by_reason["truncated_line"]["raw"]) == cut.decode()
    assert "no newline" in by_reason["truncated_line"]["detail"]
    assert json.loads(by_reason["wrong_type"]["raw"]) == "{not json"
    assert all(r["source"] == events_uri for r in q)


@pytest.mark.ray
def test_prepare_raises_when_the_reader_loses_a_row(
    s3_storage: StorageConfig, ray_cluster: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check can fail: a JSONL reader that drops one row (here by a patch; in life a bug)
    makes prepare raise RowAccountingError instead of writing a short data set."""
    from recsys.data.prepare import run

    real = io._jsonl_files_to_raw

    def lossy(batch: pa.Table, columns: tuple[str, ...], prefix: str = "") -> Any:
        for k, table in enumerate(real(batch, columns, prefix)):
            yield table.slice(1) if k == 0 and columns == io.EVENT_COLUMNS else table

    # Patched on the module the Ray tasks' functions are pickled from, so the workers get it.
    monkeypatch.setattr(io, "_jsonl_files_to_raw", lossy)
    events = b"\n".join(_ev_line(u) for u in ("u1", "u2", "u3")) + b"\n"
    events_uri, catalog_uri = _write_shop(s3_storage.root, s3_storage, events)
    with pytest.raises(RuntimeError, match=r"events at .*hold 3 rows .* 2 were kept and 0 quarantined \(-1\)") as e:
        run(_files_cfg(s3_storage, events_uri, catalog_uri))
    assert type(e.value).__name__ == "RowAccountingError"


@pytest.mark.ray
def test_prepare_single_parquet_file_with_ns_new_york_timestamps(tmp_path: Path, ray_cluster: None) -> None:
    """prepare on one parquet file (not a folder) whose timestamps are timestamp[ns,
    America/New_York] with sub-millisecond parts, as pandas writes them."""
    from recsys.data.prepare import run

    cfg = StorageConfig(root=str(tmp_path / "run"))
    local = [dt.datetime(2026, 6, 1, 6, m, 0, 123456) for m in range(4)]
    ny = pa.array(local, pa.timestamp("ns")).cast(pa.int64()).to_pylist()
    # New York wall times -> UTC instants (UTC-4 in June), stored with the zone as pandas does.
    instants = pa.array([v + 4 * 3600 * 10**9 + 789 for v in ny], pa.timestamp("ns", "America/New_York"))
    table = pa.table(
        {
            "user_id": ["u1", "u1", "u2", "u2"], "session_id": ["s1", "s1", "s2", "s2"],
            "timestamp": instants, "event_type": ["click", "purchase", "click", "click"],
            "query": ["red shoe", None, "kettle", None], "item_id": ["i1", "i2", "i3", "i1"],
        }
    )
    events_uri = str(tmp_path / "export" / "events.parquet")
    Path(events_uri).parent.mkdir()
    pq.write_table(table, events_uri)
    manifest = run(_files_cfg(cfg, events_uri, _write_catalog(str(tmp_path), cfg)))
    c = manifest["counts"]
    assert (c["event_files"], c["rows_in_files"], c["rows_kept"], c["rows_quarantined"]) == (1, 4, 4, 0)
    ex = pq.read_table(manifest["paths"]["examples"]).to_pylist()
    assert ex and {r["timestamp"] for r in ex} <= {
        dt.datetime(2026, 6, 1, 10, m, 0, 123000, tzinfo=UTC) for m in range(4)
    }
