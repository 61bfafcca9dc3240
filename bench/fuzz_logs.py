"""Fuzzed logs: the data job on event logs corrupted at random, every row accounted for.

    python -m bench.fuzz_logs [--rows 10000] [--share 0.1] [--seed 0] [--formats parquet,jsonl,csv]
        [--root DIR] [--out results.json]

`fuzz_shop(fmt, rows, share, seed, root)` writes `rows` valid events over a 50-item catalog and
corrupts a seeded share of them, one corruption kind per row (KINDS: wrong types, missing
fields, bad UTF-8, huge strings, NaN / inf, dates in year 0 and 9999, duplicated ids,
truncated final lines, mixed encodings), in one format. Each row carries a token (`fz0000123`,
in an extra field the job keeps in `extra`) so its outcome can be found in the quarantine, and
the generator records for each row what the job must do with it: quarantine it for one named
reason, or keep it (the valid-but-odd variants, VALID_ODD). Blank lines are counted by the
generator too. `run_prepare` runs the real data job (`recsys.data.prepare.run`) on the files with
`data.max_quarantine_share=1.0`, so the job does not stop by design on a log this dirty, and
`check` compares the manifest and the quarantine parquet with the generator's record:

- no crash;
- rows written == kept + quarantined + blank lines (the generator's counts, not the job's);
- every quarantined row is a planted one, quarantined for the expected reason, its raw form
  holding the row (its token and, for rows split into fields, the intact fields);
- every planted row that must be quarantined is (no bad row kept, nothing dropped), and no row
  that must be kept is quarantined;
- the kept rows are the expected ones: the manifest's users and sessions equal those of the
  rows that must be kept;
- the catalog's planted duplicate ids are quarantined as duplicate_item_id.
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import datetime as dt
import io as stdio
import json
import logging
import random
import re
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

FORMATS = ("parquet", "jsonl", "csv")
KINDS = (
    "wrong_type", "missing_field", "bad_utf8", "huge_string", "nan_inf", "extreme_date",
    "duplicate", "truncated", "mixed_encoding",
)
# Truncation needs a file end per row: fewer of them keeps the file count small. Parquet has
# no lines to cut (a cut-off parquet file has no footer, so none of its rows can be read).
_KIND_WEIGHTS = {k: (0.3 if k == "truncated" else 1.0) for k in KINDS}
NOT_IN = {"parquet": {"truncated"}}
FIELDS = ("fuzz_row", "user_id", "session_id", "timestamp", "event_type", "query", "item_id")
EVENT_FIELDS = FIELDS[1:]
ID_FIELDS = ("user_id", "session_id", "item_id")
N_ITEMS = 50
CATALOG_DUPLICATES = 3
KEPT = "kept"
# Variants that are odd but valid, so the job must keep them (the expected outcome is KEPT):
VALID_ODD = {
    "missing_field/no_query": "the query is optional",
    "huge_string/query": "a 0.5-2 MB query: no length limit in the config",
    "huge_string/user_id": "a 100,000-character user id: any non-blank string is an id",
    "nan_inf/query_text": "'NaN' / 'inf' as query text is text",
    "duplicate/exact_copy": "a re-delivered event: the schema has no event id to tell it from a second, equal event",
    "mixed_encoding/mojibake": "UTF-8 read as latin-1 and written back as UTF-8 ('cafÃ©'): valid UTF-8, undetectable",
    "mixed_encoding/bom_mid_file": "a UTF-8 byte order mark at the start of a line (files concatenated): not content",
}
TOKEN = re.compile(r"fz(\d{7})")
# NUL bytes (UTF-16 rows) as they appear in the raw JSON, escaped once or twice (inside `extra`).
_NUL = re.compile(r"\x00|\\+u0000")
_T0 = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)


@dataclasses.dataclass
class Planted:
    row: int
    kind: str  # "valid" or one of KINDS
    variant: str
    expect: str  # KEPT or the quarantine reason
    fields: dict[str, Any]  # the values written (str fields as text), for the raw-form check
    line: str | None = None  # for rows the reader cannot split: the line as decoded with "replace"
    field: str | None = None  # the field the corruption is in, which the detail must name


@dataclasses.dataclass
class Shop:
    fmt: str
    events_uri: str
    catalog_uri: str
    planted: list[Planted]
    blank_lines: int
    files: int
    catalog_rows: int
    catalog_duplicates: int


def _token(i: int) -> str:
    return f"fz{i:07d}"


def _valid_row(rng: random.Random, i: int, users: int) -> dict[str, Any]:
    u = rng.randrange(users)
    t = _T0 + dt.timedelta(seconds=rng.randrange(300 * 86400))
    form = rng.random()
    ts = (t.strftime("%Y-%m-%dT%H:%M:%SZ") if form < 0.6 else str(int(t.timestamp())) if form < 0.8
          else str(int(t.timestamp() * 1000)))
    return {
        "fuzz_row": _token(i),
        "user_id": f"u{u:05d}",
        "session_id": f"s{u:05d}-{rng.randrange(3)}",
        "timestamp": ts,
        "event_type": rng.choice(("view", "click", "click", "add_to_cart", "purchase")),
        "query": rng.choice((None, None, "red shoe", "café au lait", "电钻 无绳", "kettle, 1.7l")),
        "item_id": f"P{rng.randrange(N_ITEMS):04d}",
    }


# ---- the corruptions ---------------------------------------------------------------------
# Each returns (variant, expected outcome, the field it is in, the row to write). Values are
# Python objects the format's writer renders; str values may hold surrogate escapes
# (\udc80-\udcff), written as the raw bytes 0x80-0xff (invalid UTF-8). Special markers:
# _TypedValue(value, arrow type) for parquet columns of another type, _Raw(bytes) for a whole
# line in another encoding, _Drop for a field left out.


@dataclasses.dataclass(frozen=True)
class _TypedValue:
    value: Any
    type: pa.DataType


@dataclasses.dataclass(frozen=True)
class _Raw:
    data: bytes


class _DropType:
    def __repr__(self) -> str:
        return "<dropped>"


_Drop = _DropType()
_BIG = 5000  # digits: above Python's int-from-string limit (4300)


def _corrupt(kind: str, fmt: str, row: dict[str, Any], rng: random.Random, prev: list[dict[str, Any]]) -> tuple[str, str, str | None, Any]:
    r = dict(row)
    pick = rng.choice
    if kind == "wrong_type":
        if fmt == "jsonl":
            v = pick(["user_int", "item_list", "ts_bool", "type_int", "session_dict", "array_row", "deep", "huge_int"])
            if v == "array_row":
                return v, "wrong_type", None, [row[f] for f in FIELDS]
            if v == "deep":  # a query nested far deeper than a JSON parser recurses
                return v, "wrong_type", None, _Raw(
                    f'{{"fuzz_row": "{row["fuzz_row"]}", "user_id": "u1", "query": '.encode() + b"[" * 100_000 + b"]" * 100_000 + b"}"
                )
            if v == "huge_int":
                return v, "wrong_type", None, _Raw(
                    json.dumps({**row, "timestamp": 0}).replace('"timestamp": 0', '"timestamp": ' + "9" * _BIG).encode()
                )
            field, value = {"user_int": ("user_id", 12345), "item_list": ("item_id", ["P0001"]), "ts_bool": ("timestamp", True),
                            "type_int": ("event_type", 3), "session_dict": ("session_id", {"id": "s1"})}[v]
            r[field] = value
            return v, "wrong_type", field, r
        if fmt == "parquet":
            v = pick(["item_int", "ts_bool", "type_int", "user_list"])
            field, value = {"item_int": ("item_id", _TypedValue(rng.randrange(10**6), pa.int64())),
                            "ts_bool": ("timestamp", _TypedValue(True, pa.bool_())),
                            "type_int": ("event_type", _TypedValue(3, pa.int64())),
                            "user_list": ("user_id", _TypedValue(["u1", "u2"], pa.list_(pa.string())))}[v]
            r[field] = value
            return v, "wrong_type", field, r
        # CSV has no types: a value of another type is text that is not a valid value.
        v = pick(["ts_bool", "type_int", "item_int", "ts_list", "extra_fields"])
        if v == "extra_fields":
            return v, "wrong_type", None, [*(row[f] for f in FIELDS), "surplus", "fields"]
        field, value, reason = {"ts_bool": ("timestamp", "true", "bad_timestamp"), "type_int": ("event_type", "3", "unknown_event_type"),
                                "item_int": ("item_id", "12345", "unknown_item"), "ts_list": ("timestamp", "[1, 2]", "bad_timestamp")}[v]
        r[field] = value
        return v, reason, field, r
    if kind == "missing_field":
        v = pick(["user_id", "session_id", "item_id", "event_type", "timestamp", "no_query", "blank_id"]
                 + (["short_row"] if fmt == "csv" else []))
        if v == "short_row":
            return v, "wrong_type", None, [row[f] for f in FIELDS[:-2]]
        if v == "no_query":
            r["query"] = _Drop if fmt == "jsonl" else None
            return v, KEPT, None, r
        if v == "blank_id":
            r[pick(ID_FIELDS)] = "   "
            return v, "missing_id", None, r
        # JSONL leaves the key out or writes null; CSV leaves the field empty; parquet null.
        r[v] = pick([_Drop, None]) if fmt == "jsonl" else None
        reason = {"event_type": "unknown_event_type", "timestamp": "bad_timestamp"}.get(v, "missing_id")
        return v, reason, v if reason != "missing_id" else None, r
    if kind == "bad_utf8":
        v = pick(["ff_byte", "overlong", "cut_multibyte", "encoded_surrogate"] + (["escaped_surrogate"] if fmt == "jsonl" else []))
        field = pick(["user_id", "query", "item_id"])
        bad = {"ff_byte": "\udcff", "overlong": "\udcc0\udcaf", "cut_multibyte": "\udce7\udc94",
               "encoded_surrogate": "\udced\udca0\udc80", "escaped_surrogate": "\ud800"}[v]
        r[field] = (r[field] or "shoe") + bad
        return v, "bad_encoding", field, r
    if kind == "huge_string":
        v = pick(["query", "user_id", "event_type", "item_id"])
        if v == "query":
            r["query"] = "red, \"quoted\" shoe\n" * (rng.randrange(25_000, 100_000))
            return v, KEPT, None, r
        if v == "user_id":
            r["user_id"] = "u" * 100_000
            return v, KEPT, None, r
        r[v] = "x" * rng.randrange(200_000, 1_500_000)
        return v, "unknown_event_type" if v == "event_type" else "unknown_item", v, r
    if kind == "nan_inf":
        v = pick(["ts_nan", "ts_inf", "ts_neg_inf", "query_text"] + (["item_nan", "ts_overflow"] if fmt == "jsonl" else []))
        if v == "ts_overflow":  # 1e999 parses as infinity
            return v, "bad_timestamp", "timestamp", _Raw(
                json.dumps({**row, "timestamp": 0}).replace('"timestamp": 0', '"timestamp": 1e999').encode()
            )
        if v == "query_text":
            r["query"] = pick(["NaN", "inf", "-Infinity"])
            return v, KEPT, None, r
        if v == "item_nan":
            r["item_id"] = float("nan")
            return v, "wrong_type", "item_id", r
        value = {"ts_nan": float("nan"), "ts_inf": float("inf"), "ts_neg_inf": float("-inf"), "ts_overflow": 1e999}[v]
        if fmt == "csv":
            r["timestamp"] = {"ts_nan": "NaN", "ts_inf": "inf", "ts_neg_inf": "-inf"}[v]
        elif fmt == "parquet":
            r["timestamp"] = _TypedValue(value, pa.float64())
        else:
            r["timestamp"] = value
        return v, "bad_timestamp", "timestamp", r
    if kind == "extreme_date":
        v = pick(["year0_iso", "year9999_iso", "year1_date", "year9999_epoch_ms", "year0_epoch"]
                 + (["typed_year0", "typed_year9999"] if fmt == "parquet" else []))
        if v == "typed_year0":
            r["timestamp"] = _TypedValue(-62167219200, pa.timestamp("s"))
        elif v == "typed_year9999":
            r["timestamp"] = _TypedValue(253402300799, pa.timestamp("s"))
        else:
            r["timestamp"] = {"year0_iso": "0000-01-01T00:00:00Z", "year9999_iso": "9999-12-31T23:59:59Z", "year1_date": "0001-01-01 00:00:00",
                              "year9999_epoch_ms": "253402300799000", "year0_epoch": "-62167219200"}[v]
        return v, "bad_timestamp", "timestamp", r
    if kind == "duplicate":
        src = pick(prev) if prev else row
        return "exact_copy", KEPT, None, {**src, "fuzz_row": row["fuzz_row"]}
    if kind == "truncated":
        return "last_line_cut", "truncated_line", None, r  # the writer cuts it (and sets the CSV reason)
    if kind == "mixed_encoding":
        v = pick(["latin1", "cp1252", "mojibake"] + (["utf16", "bom_mid_file"] if fmt != "parquet" else []))
        if v == "mojibake":
            r["query"] = "café au lait".encode().decode("latin-1")
            return v, KEPT, None, r
        if v in ("latin1", "cp1252"):
            enc, r["query"] = ("latin-1", "crème brûlée") if v == "latin1" else ("cp1252", "“smart” quotes – €5")
            if fmt == "parquet":  # the bytes of the other encoding in a string column
                r["query"] = r["query"].encode(enc).decode("utf-8", "surrogateescape")
                return v, "bad_encoding", "query", r
            return v, "bad_encoding", "query", (enc, r)
        if v == "utf16":
            # UTF-16 puts a NUL after each ASCII byte, so a CSV quote would not open a field.
            r["query"] = "red shoe"
            return v, "wrong_type" if fmt == "jsonl" else "bad_encoding", None, ("utf-16-le", r)
        return v, KEPT, None, ("utf-8-sig", r)
    raise ValueError(kind)


# ---- writers -----------------------------------------------------------------------------


def _json_line(row: Any) -> bytes:
    if isinstance(row, _Raw):
        return row.data
    if isinstance(row, tuple):  # (encoding, row): the whole line in another encoding
        enc, r = row
        return json.dumps(r, ensure_ascii=False).encode(enc)
    if isinstance(row, dict):
        row = {k: v for k, v in row.items() if v is not _Drop}
        if any(isinstance(v, str) and "\ud800" <= v[-1:] <= "\udbff" for v in row.values()):
            return json.dumps(row).encode()  # a lone surrogate as a JSON escape: \ud800
    return json.dumps(row, ensure_ascii=False).encode("utf-8", "surrogateescape")


def _csv_line(row: Any) -> bytes:
    buf = stdio.StringIO()
    w = csv.writer(buf, lineterminator="")
    enc = "utf-8"
    if isinstance(row, tuple):
        enc, row = row
    if isinstance(row, dict):
        row = ["" if row[f] is None else row[f] for f in FIELDS]
    w.writerow(row)
    return buf.getvalue().encode(enc, "surrogateescape") if enc == "utf-8" else buf.getvalue().encode(enc)


def _decoded(line: bytes) -> str:
    return line.decode("utf-8", errors="replace").rstrip("\r")


def _parquet_column(values: list[Any]) -> pa.Array:
    typed = [v for v in values if isinstance(v, _TypedValue)]
    if typed:
        return pa.array([v.value if isinstance(v, _TypedValue) else None for v in values], typed[0].type)
    # Strings as bytes viewed as strings: surrogate escapes become invalid UTF-8 in the file,
    # as a writer that does not validate leaves them.
    data = [None if v is None else str(v).encode("utf-8", "surrogateescape") for v in values]
    return pa.array(data, pa.binary()).view(pa.string())


def _write_parquet(path: Path, rows: list[dict[str, Any]], drop: tuple[str, ...] = ()) -> None:
    cols = {f: _parquet_column([r[f] for r in rows]) for f in FIELDS if f not in drop}
    pq.write_table(pa.table(cols), path)


def fuzz_shop(fmt: str, rows: int = 10_000, share: float = 0.1, seed: int = 0, root: str | Path = ".") -> Shop:
    """Write the fuzzed events and a catalog under `root`/`fmt`; return what was planted."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    rng = random.Random(f"{seed}-{fmt}")
    base = Path(root) / fmt
    ev_dir, cat_dir = base / "events", base / "catalog"
    ev_dir.mkdir(parents=True, exist_ok=True)
    cat_dir.mkdir(parents=True, exist_ok=True)
    users = max(2, rows // 20)
    planted: list[Planted] = []
    written: list[Any] = []
    valid_prev: list[dict[str, Any]] = []
    kinds = [k for k in KINDS if k not in NOT_IN.get(fmt, set())]
    weights = [_KIND_WEIGHTS[k] for k in kinds]
    for i in range(rows):
        row = _valid_row(rng, i, users)
        kind = rng.choices(kinds, weights)[0] if rng.random() < share else "valid"
        if kind == "valid":
            variant, expect, field, out = "valid", KEPT, None, row
            valid_prev.append(row)
        else:
            variant, expect, field, out = _corrupt(kind, fmt, row, rng, valid_prev[-50:])
        if fmt == "parquet" and isinstance(out, (list, tuple, _Raw)):
            raise AssertionError(f"{kind}/{variant} has no parquet form")
        fields = out[1] if isinstance(out, tuple) else out if isinstance(out, dict) else {}
        if variant == "utf16":  # no field survives as written
            fields = {}
        planted.append(Planted(i, kind, variant, expect, dict(fields), field=field))
        written.append(out)

    # Files: rows in shards; each truncated row ends a file of its own; parquet rows with a
    # column of another type (or a missing column) go to a shard per variant.
    n_shards = 4
    shards: dict[str, list[int]] = collections.defaultdict(list)
    truncated = [p.row for p in planted if p.kind == "truncated"]
    for p in planted:
        if p.kind == "truncated":
            continue
        typed = [f for f, v in p.fields.items() if isinstance(v, _TypedValue)]
        if fmt == "parquet" and typed:
            shards[f"typed-{typed[0]}-{p.variant}"].append(p.row)
        elif fmt == "parquet" and p.kind == "missing_field" and p.variant == "session_id" and rng.random() < 0.5:
            shards["no-session-column"].append(p.row)
        else:
            shards[f"part-{rng.randrange(n_shards)}"].append(p.row)
    for k, r in enumerate(truncated):
        # A few rows ahead of the cut one, so the file is not only the cut line.
        donors = shards[f"part-{k % n_shards}"]
        take = donors[-3:]
        del donors[-3:]
        shards[f"cut-{k:03d}"] = [*take, r]

    blank_lines = 0
    suffix = {"parquet": ".parquet", "jsonl": ".jsonl", "csv": ".csv"}[fmt]
    for name, members in sorted(shards.items()):
        if not members:
            continue
        path = ev_dir / f"{name}{suffix}"
        if fmt == "parquet":
            for m in members:
                if isinstance(written[m], dict) and name == "no-session-column":
                    written[m]["session_id"] = None
            _write_parquet(path, [written[m] for m in members], drop=("session_id",) if name == "no-session-column" else ())
            continue
        lines: list[bytes] = []
        if fmt == "csv":
            lines.append(",".join(FIELDS).encode())
        for m in members:
            if rng.random() < 0.02:  # blank lines between rows (CSV: empty only; JSONL: whitespace too)
                lines.append(b"" if fmt == "csv" else rng.choice([b"", b"   ", b"\r", b"\t "]))
                blank_lines += 1
            line = _json_line(written[m]) if fmt == "jsonl" else _csv_line(written[m])
            p = planted[m]
            if p.kind == "truncated":
                line = _cut(line, p, fmt, rng)
            lines.append(line)
            if p.expect in ("wrong_type", "truncated_line") and (
                isinstance(written[m], (list, _Raw, tuple)) or p.kind == "truncated"
            ):  # a row the reader cannot split into fields: the quarantine keeps its line
                p.line = _decoded(line)
        body = b"\n".join(lines)
        if not name.startswith("cut-"):
            body += b"\n"
        path.write_bytes(body)

    # The catalog, in the same format, with a few item ids given twice.
    items = [{"item_id": f"P{k:04d}", "title": f"Item {k}", "description": f"A thing, number {k}.",
              "brand": rng.choice(["Acme", "Bolt"]), "category": "Tools > Hand", "price": str(1 + k)} for k in range(N_ITEMS)]
    items += [{**items[k], "title": f"Item {k}, again"} for k in range(CATALOG_DUPLICATES)]
    cat_path = cat_dir / f"catalog{suffix}"
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(items), cat_path)
    elif fmt == "jsonl":
        cat_path.write_bytes(b"".join(json.dumps(x).encode() + b"\n" for x in items))
    else:
        buf = stdio.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(items[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(items)
        cat_path.write_text(buf.getvalue())
    return Shop(fmt, str(ev_dir), str(cat_dir), planted, blank_lines, len(list(ev_dir.iterdir())), len(items), CATALOG_DUPLICATES)


def _cut(line: bytes, p: Planted, fmt: str, rng: random.Random) -> bytes:
    """Cut a row's line after its token and before its end; sets the reason a CSV cut gets."""
    start = line.index(b"fz") + 9
    cut = rng.randrange(start + 1, len(line))
    out = line[:cut]
    if fmt == "csv":
        # A CSV row cut inside its last field (item_id) still has all its fields: the item id
        # is then a prefix no catalog id has; cut earlier, the row is short.
        fields = next(csv.reader([out.decode("utf-8", "replace")]))
        if len(fields) < len(FIELDS):
            p.expect = "wrong_type"
        else:
            p.expect, p.field = ("missing_id", None) if not fields[-1].strip() else ("unknown_item", "item_id")
    return out


# ---- running the job and checking the outputs ----------------------------------------------


def run_prepare(shop: Shop, root: str | Path) -> tuple[dict[str, Any] | None, str | None]:
    """The real data job on the shop's files; (manifest, None) or (None, the traceback)."""
    from recsys.config import Config, DataConfig, StorageConfig
    from recsys.data.prepare import run

    cfg = Config(storage=StorageConfig(root=str(Path(root) / shop.fmt / "run")))
    # The log is dirtier than any threshold a real run would allow: the job must not stop by
    # design, so every row reaches the outputs to be checked.
    cfg.data = DataConfig(source="files", events_uri=shop.events_uri, catalog_uri=shop.catalog_uri, max_quarantine_share=1.0)
    try:
        return run(cfg), None
    except Exception:  # noqa: BLE001 - a crash is a result here, reported in the table
        return None, traceback.format_exc()


def _raw_problem(p: Planted, raw: str) -> str | None:
    """Why the quarantine's raw form does not hold the planted row (None when it does)."""
    try:
        obj = json.loads(raw)
    except ValueError:
        return "raw is not JSON"
    if p.line is not None:
        return None if obj == p.line else f"raw line differs: {str(obj)[:80]!r} vs {p.line[:80]!r}"
    if not isinstance(obj, dict):
        return f"raw is a {type(obj).__name__}, expected the row's fields"
    for f in EVENT_FIELDS:
        v = p.fields.get(f)
        if isinstance(v, str) and f != p.field and v == v.encode("utf-8", "ignore").decode() and obj.get(f) != v.removeprefix("\ufeff"):
            return f"raw {f}={str(obj.get(f))[:40]!r}, written {v[:40]!r}"
    return None


def check(shop: Shop, manifest: dict[str, Any] | None, crash: str | None) -> dict[str, Any]:
    """Compare the job's outputs with what was planted; a dict of counts and problems."""
    rows = len(shop.planted)
    out: dict[str, Any] = {
        "format": shop.fmt, "files": shop.files, "rows_written": rows, "blank_lines": shop.blank_lines,
        "corrupted": sum(p.kind != "valid" for p in shop.planted),
        "expected_kept": sum(p.expect == KEPT for p in shop.planted), "crashes": int(crash is not None),
        "crash": crash, "problems": [],
    }
    if manifest is None:
        out.update(kept=None, quarantined=None, by_reason={}, unaccounted=None)
        return out
    c = manifest["counts"]
    problems: list[str] = out["problems"]
    qdir = Path(manifest["paths"]["quarantine"]) / "events"
    q = pq.read_table(qdir).to_pylist() if qdir.exists() else []
    seen: dict[int, dict[str, Any]] = {}
    for r in q:
        ids = {int(m) for m in TOKEN.findall(_NUL.sub("", r["raw"]))}
        if len(ids) != 1:
            problems.append(f"quarantined row with {len(ids)} tokens: {r['reason']} {r['raw'][:120]!r}")
            continue
        (i,) = ids
        if i in seen:
            problems.append(f"row {i} quarantined twice")
        seen[i] = r
    by_kind: dict[tuple[str, str], collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for p in shop.planted:
        got = seen.get(p.row)
        outcome = KEPT if got is None else got["reason"]
        by_kind[(p.kind, p.variant)][outcome] += 1
        if outcome != p.expect:
            what = "bad row kept" if outcome == KEPT else "valid row quarantined" if p.expect == KEPT else "wrong reason"
            problems.append(f"{what}: row {p.row} {p.kind}/{p.variant} expected {p.expect}, got {outcome}"
                            + ("" if got is None else f" ({got['detail'][:100]})"))
        if got is not None:
            if (why := _raw_problem(p, got["raw"])) is not None:
                problems.append(f"row {p.row} {p.kind}/{p.variant}: {why}")
            if p.field and p.field not in got["detail"] and got["reason"] == p.expect:
                problems.append(f"row {p.row} {p.kind}/{p.variant}: detail {got['detail'][:80]!r} does not name {p.field}")
            if not got["source"].startswith(shop.events_uri):
                problems.append(f"row {p.row}: source {got['source']!r} is not one of the files")
    kept = c["rows_kept"]
    unaccounted = rows - kept - len(q)
    expect_kept = [p for p in shop.planted if p.expect == KEPT]
    # The kept rows' content, from the manifest: users and sessions of the rows that must be kept.
    for key, name in (("user_id", "users"), ("session_id", "sessions")):
        want = len({p.fields[key] for p in expect_kept})
        if c[name] != want:
            problems.append(f"manifest {name}={c[name]}, the rows that must be kept have {want}")
    if c["rows_in_files"] != rows + shop.blank_lines or c["blank_lines"] != shop.blank_lines:
        problems.append(f"manifest rows_in_files={c['rows_in_files']} blank_lines={c['blank_lines']}, "
                        f"written {rows} rows + {shop.blank_lines} blank lines")
    if c["rows_quarantined"] != len(q):
        problems.append(f"manifest rows_quarantined={c['rows_quarantined']}, the quarantine holds {len(q)}")
    cat = c["catalog_quarantined_by_reason"]
    if cat != {"duplicate_item_id": shop.catalog_duplicates} or c["catalog_rows_kept"] != shop.catalog_rows - shop.catalog_duplicates:
        problems.append(f"catalog: kept {c['catalog_rows_kept']}, quarantined {cat}; planted {shop.catalog_duplicates} duplicate ids")
    out.update(
        kept=kept, quarantined=len(q), by_reason=dict(collections.Counter(r["reason"] for r in q)),
        unaccounted=unaccounted, by_kind={f"{k}/{v}": dict(n) for (k, v), n in sorted(by_kind.items())},
        wall_s=manifest["wall_s"],
    )
    return out


def fuzz_one(fmt: str, rows: int, share: float, seed: int, root: str | Path) -> dict[str, Any]:
    shop = fuzz_shop(fmt, rows, share, seed, root)
    manifest, crash = run_prepare(shop, root)
    return check(shop, manifest, crash)


def table(results: list[dict[str, Any]]) -> str:
    reasons = sorted({r for res in results for r in res["by_reason"]})
    head = ["format", "files", "rows written", "blank lines", "corrupted", "kept", "quarantined",
            *(f"q: {r}" for r in reasons), "unaccounted", "crashes", "problems"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for res in results:
        cells = [res["format"], res["files"], res["rows_written"], res["blank_lines"], res["corrupted"], res["kept"],
                 res["quarantined"], *(res["by_reason"].get(r, 0) for r in reasons), res["unaccounted"], res["crashes"],
                 len(res["problems"])]
        lines.append("| " + " | ".join("-" if v is None else f"{v:,}" if isinstance(v, int) else str(v) for v in cells) + " |")
    return "\n".join(lines)


def kind_table(results: list[dict[str, Any]]) -> str:
    """Outcomes per corruption variant, all formats summed."""
    total: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for res in results:
        for k, n in res.get("by_kind", {}).items():
            total[k].update(n)
    lines = ["| kind/variant | outcome |", "| --- | --- |"]
    for k, n in sorted(total.items()):
        lines.append(f"| {k} | " + ", ".join(f"{o}: {c:,}" for o, c in sorted(n.items())) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--share", type=float, default=0.1, help="share of rows corrupted")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--root", default=None, help="where to write (a fresh temporary folder by default)")
    ap.add_argument("--out", default=None, help="also write the results as JSON")
    args = ap.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("recsys.data.prepare").setLevel(logging.INFO)
    root = Path(args.root or tempfile.mkdtemp(prefix="fuzz-logs-"))
    results = []
    for fmt in args.formats.split(","):
        t0 = time.perf_counter()
        res = fuzz_one(fmt, args.rows, args.share, args.seed, root)
        res["bench_s"] = round(time.perf_counter() - t0, 1)
        results.append(res)
        print(f"{fmt}: {res['rows_written']} rows, {res['crashes']} crashes, {len(res['problems'])} problems, {res['bench_s']} s", flush=True)
        for line in res["problems"][:20]:
            print("   ", line)
        if res["crash"]:
            print(res["crash"])
    print()
    print(table(results))
    print()
    print(kind_table(results))
    print("\nkept by design:", *(f"  {k}: {why}" for k, why in VALID_ODD.items()), sep="\n")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    return results


if __name__ == "__main__":
    main()
