"""Fuzzed logs (issue 18): the data job on event logs corrupted at random in parquet, JSONL and
CSV must not crash and must account for every row; plus one focused test per defect the
fuzzing found. The generator and the checks are bench/fuzz_logs.py's."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from bench.fuzz_logs import FORMATS, KEPT, VALID_ODD, check, fuzz_shop, run_prepare
from recsys.config import StorageConfig
from recsys.data import io
from recsys.data.validate import validate_catalog_batch, validate_event_batch, validate_events

KNOWN = {"P0001"}
GOOD = {"user_id": "u1", "session_id": "s1", "timestamp": "2026-06-01T10:00:00Z", "event_type": "click", "item_id": "P0001"}


def _jsonl_raw(*lines: bytes) -> pa.Table:
    batch = pa.table({"bytes": [b"\n".join(lines) + b"\n"], "path": ["events.jsonl"]})
    return pa.concat_tables(io._jsonl_files_to_raw(batch, io.EVENT_COLUMNS))


# ---- the defects the fuzzing found, one test each ---------------------------------------------


def test_jsonl_lines_the_json_parser_refuses_are_quarantined_not_a_crash() -> None:
    """Three JSONL lines used to fail the whole read: nesting deeper than the parser recurses
    (RecursionError), an integer of 5,000 digits (a ValueError without .msg: AttributeError),
    and a lone surrogate escape "\\ud800" (UnicodeEncodeError building the column)."""
    deep = b'{"user_id": "u1", "query": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    big_int = json.dumps(GOOD).replace('"2026-06-01T10:00:00Z"', "9" * 5000).encode()
    surrogate = json.dumps({**GOOD, "query": "shoe\ud800"}).encode()
    clean, bad = validate_event_batch(_jsonl_raw(json.dumps(GOOD).encode(), deep, big_int, surrogate), KNOWN)
    assert clean.num_rows == 1
    rows = bad.to_pylist()
    assert [r["reason"] for r in rows] == ["wrong_type", "wrong_type", "bad_encoding"]
    assert "unparsable JSON" in rows[0]["detail"] and "recursion" in rows[0]["detail"]
    assert "unparsable JSON" in rows[1]["detail"] and "digits" in rows[1]["detail"]
    assert json.loads(rows[0]["raw"]) == deep.decode() and json.loads(rows[1]["raw"]) == big_int.decode()
    assert json.loads(rows[2]["raw"])["query"].startswith("shoe\ufffd")


def test_jsonl_byte_order_mark_at_a_line_start_is_not_content() -> None:
    """Files concatenated (`cat a.jsonl b.jsonl`) leave b's byte order mark at a line start
    mid-file; that row used to be quarantined as unparsable JSON."""
    clean, bad = validate_event_batch(_jsonl_raw(json.dumps(GOOD).encode(), b"\xef\xbb\xbf" + json.dumps(GOOD).encode()), KNOWN)
    assert (clean.num_rows, bad.num_rows) == (2, 0)


def _invalid_utf8_parquet(path: Path) -> None:
    """A string column holding bytes that are not UTF-8 (a writer that does not validate, or
    latin-1 text stored as is): pyarrow writes and reads them back without a check."""
    users = pa.array([b"u1", b"u\xff2", b"u3"], pa.binary()).view(pa.string())
    query = pa.array([None, None, "cr\xe8me".encode("latin-1")], pa.binary()).view(pa.string())
    n = 3
    pq.write_table(pa.table({"user_id": users, "session_id": ["s1"] * n, "timestamp": [GOOD["timestamp"]] * n,
                             "event_type": ["click"] * n, "query": query, "item_id": ["P0001"] * n,
                             "note": query}), path)


@pytest.mark.ray
def test_parquet_strings_that_are_not_utf8_are_bad_encoding(tmp_path: Path, ray_cluster: None) -> None:
    """Such rows used to pass validation's byte scan (only control bytes and U+FFFD were looked
    for) and then fail a string kernel (ArrowInvalid: Invalid UTF8), stopping the job; they are
    bad_encoding rows now, through Ray's parquet reader and the file-by-file one."""
    _invalid_utf8_parquet(tmp_path / "part-0.parquet")
    clean, bad = validate_events(io.read_events(str(tmp_path), StorageConfig(root=str(tmp_path))), KNOWN, "t")
    assert [r["user_id"] for r in clean.take_all()] == ["u1"]
    rows = bad.take_all()
    assert [r["reason"] for r in rows] == ["bad_encoding", "bad_encoding"]
    assert json.loads(rows[0]["raw"])["user_id"] == "u\ufffd2"
    raw = pa.concat_tables(io._parquet_files_to_raw(pa.table({"path": [str(tmp_path / "part-0.parquet")]}),
                                                    pafs.LocalFileSystem(), io.EVENT_COLUMNS, ""))
    clean2, bad2 = validate_event_batch(raw, KNOWN)
    assert clean2.num_rows == 1 and bad2.column("reason").to_pylist() == ["bad_encoding"] * 2


def test_csv_row_longer_than_the_readers_block(tmp_path: Path) -> None:
    """A row over pyarrow's CSV block (1 MiB by default) failed the read and the count:
    "straddling object straddles two block boundaries"."""
    header = b"user_id,session_id,timestamp,event_type,query,item_id\n"
    good = b"u1,s1,2026-06-01T10:00:00Z,click,,P0001\n"
    huge = b'u2,s2,2026-06-01T10:00:00Z,click,"' + b"red, shoe\n" * 300_000 + b'",P0001\n'
    path = tmp_path / "events.csv"
    path.write_bytes(header + good + huge + huge.replace(b'"', b"").replace(b"\n", b" ")[:-1] + b"\n" + good)
    fs = pafs.LocalFileSystem()
    assert io._count_csv(fs, str(path)) == (4, 0)
    raw = pa.concat_tables(io._csv_file_to_raw(fs, str(path), io.EVENT_COLUMNS, str(path)), promote_options="default")
    clean, bad = validate_event_batch(raw, KNOWN)
    assert clean.num_rows == 3 and len(clean.column("query")[1].as_py()) == 3_000_000 - 1  # trailing newline trimmed
    assert bad.column("reason").to_pylist() == ["wrong_type"]  # the unquoted one: its commas split it


def test_bad_encoding_and_missing_id_details_name_the_field() -> None:
    rows = [{**GOOD, "query": "caf\ufffd"}, {**GOOD, "item_id": "P\x0001"}, {**GOOD, "session_id": " "}]
    batch = pa.table({c: pa.array([r.get(c) for r in rows], pa.string()) for c in io.EVENT_COLUMNS})
    _, bad = validate_event_batch(batch, KNOWN)
    details = bad.column("detail").to_pylist()
    assert bad.column("reason").to_pylist() == ["bad_encoding", "bad_encoding", "missing_id"]
    assert "query" in details[0] and "item_id" not in details[0]
    assert "item_id" in details[1] and "query" not in details[1]
    assert details[2].startswith("session_id") and "user_id" not in details[2]
    catalog = pa.table({"item_id": ["P1", "P2"], "title": ["Shoe", "Kettle"], "brand": [None, "Caf\ufffd"]})
    _, bad = validate_catalog_batch(catalog)
    assert bad.column("detail").to_pylist() == ["brand holds invalid text encoding (control or U+FFFD characters)"]


# ---- the fuzzed logs, end to end through the data job ------------------------------------------


def test_generator_plants_every_kind_and_records_the_outcome(tmp_path: Path) -> None:
    """The generator's own bookkeeping (no job): every kind is planted in every format, each
    row has an expected outcome, the valid-but-odd variants are the only corrupted rows kept."""
    for fmt in FORMATS:
        shop = fuzz_shop(fmt, rows=400, share=0.5, seed=3, root=tmp_path)
        kinds = {p.kind for p in shop.planted}
        assert kinds >= {"valid", "wrong_type", "missing_field", "bad_utf8", "nan_inf", "extreme_date", "duplicate",
                         "mixed_encoding", "huge_string"} | ({"truncated"} if fmt != "parquet" else set()), fmt
        for p in shop.planted:
            if p.kind != "valid" and p.expect == KEPT:
                assert f"{p.kind}/{p.variant}" in VALID_ODD, (fmt, p.kind, p.variant)


@pytest.mark.ray
@pytest.mark.parametrize(
    ("fmt", "rows", "share"),
    # 27-93 s each on 2 shared cores, nearly all the job's fixed cost; 1,000 rows per format ~40-75 s.
    # The default suite runs JSONL (the reader with the most ways to fail); the focused tests
    # above keep each fixed parquet and CSV defect in it too.
    [pytest.param(f, 300, 0.3, marks=() if f == "jsonl" else pytest.mark.slow) for f in FORMATS]
    + [pytest.param(f, 1000, 0.15, marks=pytest.mark.slow) for f in FORMATS],
)
def test_fuzzed_logs_every_row_accounted_for(fmt: str, rows: int, share: float, tmp_path: Path, ray_cluster: None) -> None:
    """Every kind of corruption in each format through the real data job: no crash, rows
    written == kept + quarantined + blank lines (the generator's count), every bad row
    quarantined for its reason with its raw form, every valid (or valid-but-odd) row kept."""
    shop = fuzz_shop(fmt, rows=rows, share=share, seed=1, root=tmp_path)
    manifest, crash = run_prepare(shop, tmp_path)
    res = check(shop, manifest, crash)
    assert res["crashes"] == 0, res["crash"]
    assert res["problems"] == []
    assert res["unaccounted"] == 0
    assert res["kept"] + res["quarantined"] == len(shop.planted)
    assert res["kept"] == res["expected_kept"]
