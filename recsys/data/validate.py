"""Row validation with quarantine: every rejected row is kept, with its reason, never dropped.

The checks are vectorised pyarrow compute over whole batches; only rejected rows pay for
per-row work (their raw JSON for the quarantine). Input batches are "raw" tables: every
canonical column as a string (see recsys.data.io; `timestamp` may also arrive typed from
parquet), plus `_source` (file the row came from) and `_type_error` (non-null when the reader
already saw a wrongly typed field).

Rows that pass become EVENTS_SCHEMA / CATALOG_SCHEMA rows; rows that fail become
QUARANTINE_SCHEMA rows (source, reason, detail, raw JSON). `tag_event_batch` checks per batch
that clean + quarantined == rows in; the data job checks the total against the files' own row
count (recsys.data.io.count_rows), so nothing is dropped silently.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys.schemas import CATALOG_SCHEMA, EVENT_TYPES, EVENTS_SCHEMA, QUARANTINE_SCHEMA, TS

EVENT_ID_COLUMNS = ("user_id", "session_id", "item_id")
EVENT_TEXT_COLUMNS = ("user_id", "session_id", "item_id", "query", "event_type")
CATALOG_TEXT_COLUMNS = ("item_id", "title", "description", "brand", "category")

MIN_TIME = dt.datetime(1990, 1, 1, tzinfo=dt.timezone.utc)
# Control characters (except tab/newline in free text) and U+FFFD are what broken decoding leaves.
_BAD_ID_CHARS = r"[\x00-\x1f\x7f\x{FFFD}]"
_BAD_TEXT_CHARS = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\x{FFFD}]"
_ISO = r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?(Z|[+-]\d{2}:?\d{2})?$"
# Epoch seconds or milliseconds: 9-13 digits, or a float as Arrow prints one (1.78e+12).
_EPOCH = r"^(\d{9,13}(\.\d*)?|\d(\.\d+)?[eE]\+?\d{1,2})$"
# Epoch values in [1e8, 1e11) are seconds (1973-5138), in [1e11, 1e13) milliseconds.
_EPOCH_MIN, _EPOCH_MS, _EPOCH_MAX = 1e8, 1e11, 1e13
# Largest number of seconds whose milliseconds fit in int64.
_MAX_SECONDS = (2**63 - 1) // 1000
_EPOCH_START = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_ZONE = r"(Z|[+-]\d{2}:?\d{2})$"


class DataQualityError(RuntimeError):
    """Too large a share of the input was quarantined; the message names the worst reasons."""


class RowAccountingError(RuntimeError):
    """Rows were lost or invented between the files and the outputs (a bug, never bad data)."""


def _col(batch: pa.Table, name: str) -> pa.ChunkedArray:
    if name in batch.column_names:
        return batch.column(name)
    return pa.chunked_array([pa.nulls(batch.num_rows, pa.string())])


def _flag(batch: pa.Table, name: str) -> pa.ChunkedArray:
    """A boolean reader flag (e.g. `_truncated`); all false where the reader set none."""
    if name in batch.column_names:
        return pc.fill_null(batch.column(name), False)
    return pa.chunked_array([pa.array(np.zeros(batch.num_rows, dtype=bool))])


def _as_text(col: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """Timestamps as Arrow's text: Python's datetime cannot hold years before 1 or after 9999,
    which a typed parquet timestamp can."""
    return pc.cast(col, pa.string()) if pa.types.is_timestamp(col.type) else col


def _first_reason(n: int, checks: Iterable[tuple[str, Any, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Assign each row the first failing check (reason, detail) in order; None where all pass."""
    reasons = np.full(n, None, dtype=object)
    details = np.full(n, None, dtype=object)
    for reason, mask, detail in checks:
        m = np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False), dtype=bool)
        m &= reasons == None  # noqa: E711 - elementwise on an object array
        if m.any():
            reasons[m] = reason
            details[m] = detail(m) if callable(detail) else detail
    return reasons, details


def _may_hold_bad_chars(col: pa.ChunkedArray | pa.Array) -> bool:
    """Whether any string byte could start a control char or U+FFFD (EF BF BD) - a scan of
    the raw value bytes with numpy, ~100x cheaper than a regex over the rows. UTF-8 never
    uses bytes < 0x80 inside multi-byte characters, so clean text has none of these."""
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    for chunk in chunks:
        if len(chunk) == 0 or chunk.null_count == len(chunk):
            continue
        if not pa.types.is_string(chunk.type):
            return True
        _, offsets_buf, data_buf = chunk.buffers()
        if data_buf is None:
            continue
        offsets = np.frombuffer(offsets_buf, dtype=np.int32)[chunk.offset : chunk.offset + len(chunk) + 1]
        data = np.frombuffer(data_buf, dtype=np.uint8)[offsets[0] : offsets[-1]]
        if ((data < 0x20) | (data == 0x7F) | (data == 0xEF)).any():
            return True
    return False


def _bad_chars(col: pa.ChunkedArray, pattern: str) -> pa.ChunkedArray:
    """Rows holding a character of `pattern` (control chars, U+FFFD), vectorised; the regex
    runs only on batches whose bytes could hold one."""
    if not _may_hold_bad_chars(col):
        return pa.chunked_array([pa.array(np.zeros(len(col), dtype=bool))])
    return pc.fill_null(pc.match_substring_regex(col, pattern), False)


def _any_of(masks: dict[str, Any]) -> pa.ChunkedArray | pa.Array:
    """The rows where any of the named masks is true."""
    out = None
    for m in masks.values():
        out = m if out is None else pc.or_(out, m)
    return out


def _naming_fields(masks: dict[str, Any], what: str) -> Any:
    """A detail callable for _first_reason: per rejected row, the fields whose mask holds
    ("query holds invalid text encoding ..."), so the quarantine says where the problem is."""

    def detail(rows: np.ndarray) -> list[str]:
        hit = {c: np.asarray(pc.fill_null(m, False).to_numpy(zero_copy_only=False), dtype=bool)[rows] for c, m in masks.items()}
        return [", ".join(c for c in masks if hit[c][i]) + f" {what}" for i in range(int(rows.sum()))]

    return detail


def _is_blank(col: pa.ChunkedArray) -> pa.ChunkedArray:
    return pc.or_kleene(pc.is_null(col), pc.equal(pc.utf8_trim_whitespace(col), ""))


def _parse_one_timestamp(value: str | None) -> int | None:
    """Per-row fallback for timestamps the vectorised cast could not take (ms since epoch)."""
    if value is None:
        return None
    s = value.strip()
    try:
        if re.match(_EPOCH, s):
            x = float(s)
            if not _EPOCH_MIN <= x < _EPOCH_MAX:
                return None
            return int(np.floor(round(x if x >= _EPOCH_MS else x * 1000, 3)))
        t = dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
        if t.tzinfo is None:
            t = t.replace(tzinfo=dt.timezone.utc)
        # Integer arithmetic: float seconds * 1000 can land a millisecond low.
        return (t - _EPOCH_START) // dt.timedelta(milliseconds=1)
    except (ValueError, OverflowError):
        return None


def _cast_or_none(col: pa.Array, to: pa.DataType) -> pa.Array | None:
    try:
        return pc.cast(col, to)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None


def timestamps_to_utc_ms(col: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """Any Arrow timestamp (unit s, ms, us or ns; any zone or none) -> timestamp[ms, UTC].

    Sub-millisecond parts are truncated on purpose (a "safe" cast refuses to drop them). Arrow
    keeps zoned values as UTC instants, so a zone only relabels; values without a zone are
    taken as UTC. Seconds too large for milliseconds (beyond +-292 million years) -> null.
    """
    if col.type.unit == "s":
        secs = pc.cast(col, pa.int64())
        fits = pc.and_(pc.greater_equal(secs, -_MAX_SECONDS), pc.less_equal(secs, _MAX_SECONDS))
        col = pc.if_else(fits, col, pa.scalar(None, col.type))
    return pc.cast(col, TS, safe=False)


def _cast_iso(col: pa.Array, to: pa.DataType) -> pa.Array | None:
    """ISO strings -> `to` (ms); strings with micro- or nanoseconds (Spark, Python's
    isoformat) only parse as ns, then are truncated to ms. None: some value parses as neither."""
    cast = _cast_or_none(col, to)
    if cast is None:
        ns = _cast_or_none(col, pa.timestamp("ns", to.tz))
        cast = None if ns is None else pc.cast(ns, to, safe=False)
    return cast


def parse_timestamps(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Strings (ISO-8601 with or without zone, or epoch s/ms) or typed timestamps ->
    timestamp[ms, UTC]; bad -> null.

    Vectorised: each form is cast in one go; only a batch holding a string that looks right
    but does not parse (e.g. month 13) falls back to per-row parsing.
    """
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_timestamp(col.type):
        return timestamps_to_utc_ms(col)
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        col = pc.cast(col, pa.string())
    col = pc.utf8_trim_whitespace(col)
    null = pa.scalar(None, pa.string())
    iso = pc.fill_null(pc.match_substring_regex(col, _ISO), False)
    zoned = pc.and_(iso, pc.fill_null(pc.match_substring_regex(col, _ZONE), False))
    naive = pc.and_(iso, pc.invert(zoned))
    epoch = pc.fill_null(pc.match_substring_regex(col, _EPOCH), False)
    parts: list[pa.Array] = []
    if pc.any(zoned).as_py():
        # "T" and " " separators both occur in exports; pyarrow's ISO cast wants "T".
        cast = _cast_iso(pc.if_else(zoned, col, null), TS)
        if cast is None:
            return _parse_per_row(col)
        parts.append(cast)
    if pc.any(naive).as_py():
        # Times without a zone are taken as UTC.
        cast = _cast_iso(pc.if_else(naive, col, null), pa.timestamp("ms"))
        if cast is None:
            return _parse_per_row(col)
        parts.append(pc.cast(pc.cast(cast, pa.int64()), TS))
    if pc.any(epoch).as_py():
        x = pc.cast(pc.if_else(epoch, col, null), pa.float64())
        x = pc.if_else(pc.and_(pc.greater_equal(x, _EPOCH_MIN), pc.less(x, _EPOCH_MAX)), x, pa.scalar(None, pa.float64()))
        ms = pc.if_else(pc.greater_equal(x, _EPOCH_MS), x, pc.multiply(x, 1000.0))
        # Rounded to the microsecond first: 1780000000.123 s * 1000 is 1780000000122.9999...
        parts.append(pc.cast(pc.cast(pc.floor(pc.round(ms, 3)), pa.int64()), TS))
    if not parts:
        return pa.nulls(len(col), TS)
    return pc.coalesce(*parts)


def _parse_per_row(col: pa.Array) -> pa.Array:
    vals = [_parse_one_timestamp(v) for v in col.to_pylist()]
    return pa.array(vals, type=pa.int64()).cast(TS)


def _raw_json(batch: pa.Table, mask: np.ndarray, columns: list[str]) -> list[str]:
    """The rejected rows as JSON objects; a row the reader could not split into fields
    (`_raw`: an unparsable line) is its line, as a JSON string."""
    picked = batch.filter(pa.array(mask))
    rows = pa.table({c: _as_text(picked.column(c)) for c in columns}).to_pylist()
    out = [json.dumps(r, default=str, ensure_ascii=False) for r in rows]
    if "_raw" in picked.column_names:
        lines = picked.column("_raw").to_pylist()
        out = [r if line is None else json.dumps(line, ensure_ascii=False) for r, line in zip(out, lines, strict=True)]
    return out


def _quarantine(
    batch: pa.Table, reasons: np.ndarray, details: np.ndarray, columns: list[str], source: str
) -> pa.Table:
    bad = reasons != None  # noqa: E711
    if not bad.any():
        return QUARANTINE_SCHEMA.empty_table()
    sources = pc.cast(_col(batch, "_source").filter(pa.array(bad)), pa.string())
    # The reader's per-row file name wins; the caller's label names sources without one.
    sources = pc.if_else(_is_blank(sources), pa.scalar(source, pa.string()), sources)
    return pa.table(
        {
            "source": sources,
            "reason": pa.array(list(reasons[bad]), pa.string()),
            "detail": pa.array([str(d) for d in details[bad]], pa.string()),
            "raw": pa.array(_raw_json(batch, bad, columns), pa.string()),
        },
        schema=QUARANTINE_SCHEMA,
    )


def validate_event_batch(
    batch: pa.Table,
    known_items: pa.Array | set[str] | None,
    source: str = "",
    now: dt.datetime | None = None,
) -> tuple[pa.Table, pa.Table]:
    """Split a raw events batch into (clean rows in EVENTS_SCHEMA, rejected rows in QUARANTINE_SCHEMA).

    Reasons are checked in a fixed order and a row gets the first it fails: truncated_line,
    wrong_type, bad_encoding, missing_id, unknown_event_type, bad_timestamp, unknown_item.
    """
    n = batch.num_rows
    now = now or dt.datetime.now(dt.timezone.utc)
    raw_cols = [c for c in batch.column_names if not c.startswith("_")]
    type_err = _col(batch, "_type_error")
    ts = parse_timestamps(_col(batch, "timestamp"))
    max_time = pa.scalar(now + dt.timedelta(days=1), TS)
    event_type = pc.utf8_lower(pc.utf8_trim_whitespace(_col(batch, "event_type")))
    known = known_items if isinstance(known_items, pa.Array) or known_items is None else pa.array(sorted(known_items), pa.string())

    bad_text = {c: _bad_chars(_col(batch, c), _BAD_TEXT_CHARS if c == "query" else _BAD_ID_CHARS) for c in EVENT_TEXT_COLUMNS}
    missing = {c: _is_blank(_col(batch, c)) for c in EVENT_ID_COLUMNS}

    checks: list[tuple[str, Any, Any]] = [
        ("truncated_line", _flag(batch, "_truncated"), lambda m: type_err.filter(pa.array(m)).to_pylist()),
        ("wrong_type", pc.is_valid(type_err), lambda m: type_err.filter(pa.array(m)).to_pylist()),
        ("bad_encoding", _any_of(bad_text), _naming_fields(bad_text, "holds invalid text encoding (control or U+FFFD characters)")),
        ("missing_id", _any_of(missing), _naming_fields(missing, "missing or blank")),
        (
            "unknown_event_type",
            pc.invert(pc.is_in(event_type, value_set=pa.array(EVENT_TYPES))),
            lambda m: [f"event_type={v!r}" for v in _col(batch, "event_type").filter(pa.array(m)).to_pylist()],
        ),
        (
            "bad_timestamp",
            pc.or_kleene(
                pc.is_null(ts),
                pc.or_(pc.less(ts, pa.scalar(MIN_TIME, TS)), pc.greater(ts, max_time)),
            ),
            lambda m: [f"timestamp={v!r}" for v in _as_text(_col(batch, "timestamp").filter(pa.array(m))).to_pylist()],
        ),
    ]
    if known is not None:
        checks.append(
            (
                "unknown_item",
                pc.invert(pc.is_in(_col(batch, "item_id"), value_set=known)),
                lambda m: [f"item_id={v!r} not in catalog" for v in _col(batch, "item_id").filter(pa.array(m)).to_pylist()],
            )
        )
    reasons, details = _first_reason(n, checks)
    good = pa.array(reasons == None)  # noqa: E711
    query = _col(batch, "query")
    query = pc.if_else(_is_blank(query), pa.scalar(None, pa.string()), pc.utf8_trim_whitespace(query))
    clean = pa.table(
        {
            "user_id": _col(batch, "user_id"),
            "session_id": _col(batch, "session_id"),
            "timestamp": ts,
            "event_type": event_type,
            "query": query,
            "item_id": _col(batch, "item_id"),
            "extra": _col(batch, "extra"),
        }
    ).filter(good)
    clean = clean.cast(EVENTS_SCHEMA)
    return clean, _quarantine(batch, reasons, details, raw_cols, source)


def validate_catalog_batch(batch: pa.Table, source: str = "") -> tuple[pa.Table, pa.Table]:
    """Split a raw catalog batch into (clean CATALOG_SCHEMA rows, QUARANTINE_SCHEMA rows).

    Duplicate item ids are resolved across the whole catalog by the caller (first one wins).
    """
    n = batch.num_rows
    raw_cols = [c for c in batch.column_names if not c.startswith("_")]
    type_err = _col(batch, "_type_error")
    price_raw = _col(batch, "price")
    price_str = pc.cast(price_raw, pa.string()) if not pa.types.is_string(price_raw.type) else price_raw
    price_ok = pc.or_kleene(
        _is_blank(price_str),
        pc.match_substring_regex(price_str, r"^\s*-?\d+(\.\d*)?([eE][-+]?\d+)?\s*$"),
    )
    attrs = _col(batch, "attributes")

    def attrs_bad() -> np.ndarray:
        out = np.zeros(n, dtype=bool)
        for i, v in enumerate(attrs.to_pylist()):
            if v not in (None, ""):
                try:
                    out[i] = not isinstance(json.loads(v), dict)
                except (ValueError, TypeError):
                    out[i] = True
        return out

    bad_text = {c: _bad_chars(_col(batch, c), _BAD_ID_CHARS if c == "item_id" else _BAD_TEXT_CHARS) for c in CATALOG_TEXT_COLUMNS}

    checks: list[tuple[str, Any, Any]] = [
        ("truncated_line", _flag(batch, "_truncated"), lambda m: type_err.filter(pa.array(m)).to_pylist()),
        ("wrong_type", pc.is_valid(type_err), lambda m: type_err.filter(pa.array(m)).to_pylist()),
        ("wrong_type", pc.invert(price_ok), lambda m: [f"price={v!r} is not a number" for v in price_str.filter(pa.array(m)).to_pylist()]),
        ("wrong_type", pa.array(attrs_bad()), "attributes is not a JSON object"),
        ("bad_encoding", _any_of(bad_text), _naming_fields(bad_text, "holds invalid text encoding (control or U+FFFD characters)")),
        ("missing_id", pc.or_(_is_blank(_col(batch, "item_id")), _is_blank(_col(batch, "title"))), "item_id or title is missing"),
    ]
    reasons, details = _first_reason(n, checks)
    good = pa.array(reasons == None)  # noqa: E711
    price = pc.cast(pc.if_else(_is_blank(price_str), pa.scalar(None, pa.string()), pc.utf8_trim_whitespace(price_str)).filter(good), pa.float64())
    clean = pa.table(
        {
            "item_id": _col(batch, "item_id").filter(good),
            "title": _col(batch, "title").filter(good),
            "description": _col(batch, "description").filter(good),
            "brand": _col(batch, "brand").filter(good),
            "category": _col(batch, "category").filter(good),
            "price": price,
            "attributes": attrs.filter(good),
        }
    ).cast(CATALOG_SCHEMA)
    return clean, _quarantine(batch, reasons, details, raw_cols, source)


def dedupe_catalog(catalog: pa.Table, source: str = "catalog") -> tuple[pa.Table, pa.Table]:
    """Keep the first row of each item_id; later repeats go to quarantine as duplicate_item_id."""
    ids = catalog.column("item_id").to_pylist()
    seen: set[str] = set()
    keep = np.ones(len(ids), dtype=bool)
    for i, v in enumerate(ids):
        if v in seen:
            keep[i] = False
        seen.add(v)
    if keep.all():
        return catalog, QUARANTINE_SCHEMA.empty_table()
    dup = ~keep
    rows = catalog.filter(pa.array(dup)).to_pylist()
    q = pa.table(
        {
            "source": pa.array([source] * len(rows), pa.string()),
            "reason": pa.array(["duplicate_item_id"] * len(rows), pa.string()),
            "detail": pa.array([f"item_id={r['item_id']!r} appears earlier in the catalog" for r in rows], pa.string()),
            "raw": pa.array([json.dumps(r, default=str, ensure_ascii=False) for r in rows], pa.string()),
        },
        schema=QUARANTINE_SCHEMA,
    )
    return catalog.filter(pa.array(keep)), q


_TAG_COLUMNS = ("source", "reason", "detail", "raw")
# One table carries clean and rejected rows of a batch, told apart by a null / non-null reason,
# so the log is read and validated once and then split.
TAGGED_SCHEMA = pa.schema(
    [*[f.with_nullable(True) for f in EVENTS_SCHEMA], *[pa.field(c, pa.string()) for c in _TAG_COLUMNS]]
)


def tag_event_batch(
    batch: pa.Table, known_items: pa.Array | set[str] | None, source: str = ""
) -> pa.Table:
    """validate_event_batch's two outputs stacked in TAGGED_SCHEMA (reason null = clean)."""
    clean, bad = validate_event_batch(batch, known_items, source)
    n_clean, n_bad = clean.num_rows, bad.num_rows
    if n_clean + n_bad != batch.num_rows:
        raise RuntimeError(
            f"validation lost rows: {batch.num_rows} in, {n_clean} clean + {n_bad} quarantined"
        )
    clean_part = {c: clean.column(c) for c in EVENTS_SCHEMA.names}
    clean_part.update({c: pa.nulls(n_clean, pa.string()) for c in _TAG_COLUMNS})
    bad_part = {f.name: pa.nulls(n_bad, f.type) for f in EVENTS_SCHEMA}
    bad_part.update({c: bad.column(c) for c in _TAG_COLUMNS})
    return pa.concat_tables(
        [pa.table(clean_part).cast(TAGGED_SCHEMA), pa.table(bad_part).cast(TAGGED_SCHEMA)]
    )


def tag_events(ds: Any, known_item_ids: pa.Array | set[str], source: str = "") -> Any:
    """Ray Data: raw events -> materialised TAGGED_SCHEMA rows (validated once, kept in the
    object store across the cluster, not in one process)."""
    known = (
        known_item_ids
        if isinstance(known_item_ids, pa.Array)
        else pa.array(sorted(known_item_ids), pa.string())
    )
    # Whole blocks as batches: Ray's default of 1024 rows adds milliseconds per batch, which
    # costs more than the vectorised checks themselves.
    return ds.map_batches(
        lambda b: tag_event_batch(b, known, source), batch_format="pyarrow", batch_size=None
    ).materialize()


def split_tagged(tagged: Any) -> tuple[Any, Any]:
    """Tagged rows -> (clean Dataset in EVENTS_SCHEMA, quarantine Dataset in QUARANTINE_SCHEMA)."""

    def pick(b: pa.Table, clean: bool) -> pa.Table:
        schema = EVENTS_SCHEMA if clean else QUARANTINE_SCHEMA
        if "reason" not in b.column_names:  # an empty block without columns
            return schema.empty_table()
        mask = pc.is_null(b["reason"]) if clean else pc.is_valid(b["reason"])
        return b.filter(mask).select(schema.names).cast(schema)

    clean = tagged.map_batches(lambda b: pick(b, True), batch_format="pyarrow", batch_size=None)
    quarantined = tagged.map_batches(lambda b: pick(b, False), batch_format="pyarrow", batch_size=None)
    return clean, quarantined


def validate_events(ds: Any, known_item_ids: pa.Array | set[str], source: str = "") -> tuple[Any, Any]:
    """Ray Data: raw events Dataset -> (clean Dataset in EVENTS_SCHEMA, quarantine Dataset).

    The log is read and validated once; both outputs are views of the same tagged rows.
    """
    return split_tagged(tag_events(ds, known_item_ids, source))


def validate_catalog(ds: Any, source: str = "catalog") -> tuple[pa.Table, pa.Table]:
    """Raw catalog Dataset -> (clean CATALOG_SCHEMA table, QUARANTINE_SCHEMA table).

    Catalogs are small relative to logs, so they are gathered on the driver, where duplicate
    item ids can be resolved across shards (the first row wins).
    """
    import ray

    parts = ray.get(ds.to_arrow_refs())
    raw = pa.concat_tables(parts, promote_options="default") if parts else pa.table({})
    if raw.num_rows == 0:
        return CATALOG_SCHEMA.empty_table(), QUARANTINE_SCHEMA.empty_table()
    clean, bad = validate_catalog_batch(raw, source)
    clean, dups = dedupe_catalog(clean, source)
    bad = pa.concat_tables([bad, dups])
    if raw.num_rows != clean.num_rows + bad.num_rows:
        raise RuntimeError(
            f"catalog validation lost rows: {raw.num_rows} in, {clean.num_rows} kept + {bad.num_rows} quarantined"
        )
    return clean, bad


def check_quarantine_share(
    rows_in: int, by_reason: dict[str, int], examples: dict[str, list[str]], max_share: float, what: str
) -> None:
    """Raise DataQualityError naming the worst reasons (with example rows) above the threshold."""
    bad = sum(by_reason.values())
    if rows_in == 0 or bad / rows_in <= max_share:
        return
    worst = sorted(by_reason.items(), key=lambda kv: -kv[1])[:3]
    lines = [
        f"{what}: {bad} of {rows_in} rows ({bad / rows_in:.1%}) were quarantined, above "
        f"data.max_quarantine_share={max_share:.1%}. Worst reasons:"
    ]
    for reason, count in worst:
        lines.append(f"  {reason}: {count} rows, e.g.")
        lines.extend(f"    {ex}" for ex in examples.get(reason, [])[:3])
    raise DataQualityError("\n".join(lines))
