"""Streaming readers for sharded logs and catalogs: parquet, JSONL or CSV at any URI.

A source is a file, a folder (read recursively; names starting with "." or "_" such as
`_SUCCESS` or `.crc` files are skipped), a glob (`s3://bucket/logs/part-*.parquet`, `**` for any
depth) or a list of these. A comma is part of a name, never a separator.

Everything is read as "raw": the canonical columns as strings (a typed parquet timestamp
becomes timestamp[ms, UTC]), unknown columns packed into an `extra` JSON string, plus
`_source` (the file) and `_type_error` (set when a field had a type the schema does not allow).
Rows the reader could not split into fields (an unparsable JSONL line, a CSV row with the wrong
number of fields) also carry `_raw`, the line itself, and a JSONL file's last line that has no
newline and does not parse carries `_truncated`. Reading loosely is deliberate: a bad row must
reach validation and the quarantine instead of failing the read.

Each format streams shard by shard through Ray Data with the pyarrow filesystem passed
explicitly: parquet via ray.data.read_parquet (or file by file, row group by row group, when
shards disagree on a column's type), JSONL via read_binary_files + per-line decoding (invalid
UTF-8 becomes U+FFFD instead of failing the file), CSV file by file through pyarrow's streaming
CSV reader with every column as bytes.

`count_rows` counts the rows in the same files without this module's readers (parquet footers,
newlines, a separate CSV parse), so the data job can check that every row read came out kept
or quarantined.
"""

from __future__ import annotations

import codecs
import fnmatch
import json
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from recsys import storage
from recsys.config import StorageConfig
from recsys.data.validate import timestamps_to_utc_ms

log = logging.getLogger(__name__)

EVENT_COLUMNS = ("user_id", "session_id", "timestamp", "event_type", "query", "item_id", "extra")
CATALOG_COLUMNS = ("item_id", "title", "description", "brand", "category", "price", "attributes")
# Fields whose JSON value may legitimately be a number; everything else must be a string.
_NUMERIC_OK = {"timestamp", "price"}
_FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv"}
_GLOB_CHARS = "*?["

Source = str | Sequence[str]


class SourceNotFoundError(FileNotFoundError, ValueError):
    """A configured data source does not exist (or cannot: an invalid path) or holds no data
    files; the one-line message names the config key and the path. A ValueError too, as any
    bad config value is."""


def _file_info(fs: pafs.FileSystem, path: str, uri: str, key: str) -> pafs.FileInfo:
    try:
        return fs.get_file_info(path)
    except (pa.ArrowInvalid, ValueError) as e:  # e.g. an empty path component: "a,s3://b"
        raise SourceNotFoundError(f"{key}: {uri} is not a valid path ({e})") from None


def describe(uri: Source) -> str:
    """A source for messages: the URI, or the list's entries joined by ', '."""
    return uri if isinstance(uri, str) else ", ".join(uri)


def _hidden(name: str) -> bool:
    return name.startswith((".", "_"))


def _glob_match(pattern: list[str], parts: list[str]) -> bool:
    """Path segments against glob segments: `*`, `?`, `[..]` within a segment, `**` for any
    number of segments. Hidden names match only a segment that names them (`_*`, `.x`)."""
    if not pattern:
        return not parts
    head = pattern[0]
    if head == "**":
        for i in range(len(parts) + 1):
            if _glob_match(pattern[1:], parts[i:]):
                return True
            if i < len(parts) and _hidden(parts[i]):
                return False
        return False
    if not parts or (_hidden(parts[0]) and head[:1] != parts[0][:1]):
        return False
    return fnmatch.fnmatchcase(parts[0], head) and _glob_match(pattern[1:], parts[1:])


def _expand(uri: str, cfg: StorageConfig, key: str) -> list[str]:
    """The data files one entry of a source names (a file, a folder or a glob), as URIs."""
    fs, path = storage.filesystem(uri, cfg)
    prefix = uri.split("://", 1)[0] + "://" if storage.is_remote(uri) else ""
    info = _file_info(fs, path, uri, key)
    # A glob only when no file or folder has that very name ("[" can be part of a name).
    if info.type == pafs.FileType.NotFound and any(ch in path for ch in _GLOB_CHARS):
        segments = path.split("/")
        first = next(i for i, s in enumerate(segments) if any(ch in s for ch in _GLOB_CHARS))
        base, pattern = "/".join(segments[:first]), segments[first:]
        if prefix and first == 0:
            raise ValueError(f"{key}: {uri}: a glob cannot name the bucket")
        base = base or "/"
        deep = len(pattern) > 1 or "**" in pattern
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=deep, allow_not_found=True))
        found = sorted(
            prefix + i.path
            for i in infos
            if i.type == pafs.FileType.File
            and _glob_match(pattern, i.path[len(base) :].lstrip("/").split("/"))
        )
        if not found:
            raise SourceNotFoundError(f"{key}: no files match {uri}")
        return found
    if info.type == pafs.FileType.File:
        return [uri]
    if info.type == pafs.FileType.NotFound:
        raise SourceNotFoundError(f"{key}: {uri} does not exist")
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    found = sorted(
        prefix + i.path
        for i in infos
        if i.type == pafs.FileType.File
        and not any(_hidden(p) for p in i.path[len(path) :].lstrip("/").split("/"))
    )
    if not found:
        raise SourceNotFoundError(f"{key}: the folder {uri} holds no data files")
    return found


def list_data_files(
    uri: Source, cfg: StorageConfig, fmt: str = "auto", key: str = "data source"
) -> tuple[list[str], str]:
    """Data files a source names (see the module doc) and their format.

    `key` is the config key the source came from (data.events_uri, data.catalog_uri): a
    missing path raises SourceNotFoundError naming it and the path.
    """
    entries = [uri] if isinstance(uri, str) else list(uri)
    if not entries or any(not isinstance(e, str) or not e.strip() for e in entries):
        raise ValueError(f"{key}: expected a file, folder or glob (or a list of them), got {uri!r}")
    files: list[str] = []
    seen: set[str] = set()
    for entry in entries:
        for f in _expand(entry, cfg, key):
            if f not in seen:
                seen.add(f)
                files.append(f)
    schemes = {f.split("://", 1)[0] if storage.is_remote(f) else "local" for f in files}
    if len(schemes) > 1:
        raise ValueError(f"{key}: all files must be on one filesystem, got {sorted(schemes)} in {describe(uri)}")
    return files, detect_format(files, fmt, key)


def detect_format(files: list[str], fmt: str = "auto", key: str = "data source") -> str:
    if fmt != "auto":
        if fmt not in ("parquet", "jsonl", "csv"):
            raise ValueError(f"data.format must be auto, parquet, jsonl or csv, got {fmt!r}")
        return fmt
    by_file = {f: next((v for k, v in _FORMATS.items() if f.lower().endswith(k)), None) for f in files}
    unknown = [f for f, kind in by_file.items() if kind is None]
    kinds = {kind for kind in by_file.values() if kind is not None}
    if unknown or len(kinds) != 1:
        what = f"no known extension on {unknown[:3]}" if unknown else f"mixed formats {sorted(kinds)}"
        raise ValueError(
            f"{key}: cannot tell the format of {len(files)} file(s): {what}; "
            f"extensions {sorted(_FORMATS)} are known, or set data.format to parquet, jsonl or csv"
        )
    return kinds.pop()


def _typed_timestamps(col: pa.ChunkedArray) -> pa.ChunkedArray | pa.Array:
    """A typed timestamp column (any unit or zone) -> timestamp[ms, UTC].

    Staying typed avoids a text round trip that would cost more than the whole validation.
    Only a value no millisecond timestamp can hold (seconds beyond +-292 million years) makes
    the batch's column text instead, so that row reaches the quarantine with its stored value.
    """
    ts = timestamps_to_utc_ms(col)
    if ts.null_count == col.null_count:
        return ts
    stored = pc.binary_join_element_wise(
        pc.cast(pc.cast(col, pa.int64()), pa.string()), pa.scalar(f" ({col.type}, out of range)"), ""
    )
    return pc.if_else(pc.is_valid(ts), pc.cast(ts, pa.string()), stored)


def _utf8_or_replaced(values: list[bytes | None]) -> pa.Array:
    """Bytes -> strings, invalid UTF-8 as U+FFFD (as the text readers decode), so the row is
    quarantined as bad_encoding."""
    return pa.array([None if v is None else v.decode("utf-8", errors="replace") for v in values], pa.string())


def _valid_utf8(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """A string column as is, or with invalid UTF-8 replaced by U+FFFD: parquet writers need
    not validate and pyarrow's reader does not, and invalid bytes fail the string kernels
    (ArrowInvalid: Invalid UTF8) or the conversion to Python later. One validation pass; only a
    column holding invalid bytes pays per-row work."""
    try:
        col.validate(full=True)
        return col
    except pa.ArrowInvalid:
        return pa.chunked_array(
            [_utf8_or_replaced(ch.view(pa.binary()).to_pylist()) for ch in col.chunks], pa.string()
        )


def _to_raw(batch: pa.Table, columns: tuple[str, ...], source: str | None = None) -> pa.Table:
    """Canonical columns as strings + `extra` for the rest + `_source` + `_type_error`.

    Vectorised for well-typed batches; only a column of a wrong type pays per-row work.
    """
    n = batch.num_rows
    out: dict[str, Any] = {}
    errors: list[str | None] | None = None
    for c in columns:
        if c == "extra" and "extra" not in batch.column_names:
            continue
        if c not in batch.column_names:
            out[c] = pa.nulls(n, pa.string())
            continue
        col = batch.column(c)
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            out[c] = _valid_utf8(pc.cast(col, pa.string()))
        elif pa.types.is_null(col.type):
            out[c] = pa.nulls(n, pa.string())
        elif c == "timestamp" and pa.types.is_timestamp(col.type):
            out[c] = _typed_timestamps(col)
        elif c in _NUMERIC_OK and (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
            out[c] = pc.cast(col, pa.string())
        else:
            # A column of another type (e.g. ids written as integers): keep the values as text
            # but flag each row, so the quarantine shows exactly what arrived.
            values = col.to_pylist()
            out[c] = pa.array([None if v is None else str(v) for v in values], pa.string())
            errors = errors or [None] * n
            for i, v in enumerate(values):
                if v is not None and errors[i] is None:
                    errors[i] = f"{c} has type {col.type}, expected string"
    rest = [c for c in batch.column_names if c not in columns and not c.startswith("_")]
    if "extra" in columns and "extra" not in out:
        if rest:
            # Unknown source fields are kept verbatim as JSON (only shops with extra columns pay).
            extra_cols = batch.select(rest)
            for k, f in enumerate(extra_cols.schema):
                if pa.types.is_string(f.type) or pa.types.is_large_string(f.type):
                    extra_cols = extra_cols.set_column(k, f.name, _valid_utf8(pc.cast(extra_cols.column(k), pa.string())))
            rows = extra_cols.to_pylist()
            extra = [json.dumps({k: v for k, v in r.items() if v is not None}, default=str) for r in rows]
            out["extra"] = pa.array(extra, pa.string())
        else:
            out["extra"] = pa.nulls(n, pa.string())
    if "_source" in batch.column_names:
        out["_source"] = pc.cast(batch.column("_source"), pa.string())
    else:
        out["_source"] = pa.repeat(pa.scalar(source or "", pa.string()), n)
    prev = (
        pc.cast(batch.column("_type_error"), pa.string())
        if "_type_error" in batch.column_names
        else pa.nulls(n, pa.string())
    )
    out["_type_error"] = prev if errors is None else pc.coalesce(prev, pa.array(errors, pa.string()))
    return pa.table(out)


def _unsplit_rows(lines: list[str], errors: list[str], columns: tuple[str, ...], source: str) -> pa.Table:
    """Rows the reader could not split into fields: all fields null, the line kept in `_raw`."""
    n = len(lines)
    cols: dict[str, pa.Array] = {c: pa.nulls(n, pa.string()) for c in columns}
    cols["_source"] = pa.repeat(pa.scalar(source, pa.string()), n)
    cols["_type_error"] = pa.array(errors, pa.string())
    cols["_raw"] = pa.array(lines, pa.string())
    return pa.table(cols)


def _strings(values: list[str | None]) -> pa.Array:
    """Parsed JSON strings -> a string column. A JSON escape of a lone surrogate ("\\ud800")
    parses to a str UTF-8 cannot hold: it becomes U+FFFD, so the row is quarantined as
    bad_encoding instead of failing the read (only a batch holding one pays per value)."""
    try:
        return pa.array(values, pa.string())
    except UnicodeEncodeError:
        return _utf8_or_replaced([None if v is None else v.encode("utf-8", "surrogatepass") for v in values])


def _parse_jsonl_lines(batch: pa.Table, columns: tuple[str, ...]) -> pa.Table:
    """Lines of JSON -> raw rows; unparsable lines and wrongly typed fields are flagged.

    `batch` has `text` and `path`, and optionally `final` (the line ended the file without a
    newline: if it does not parse either, the export was most likely cut off mid-line).
    """
    texts = batch.column("text").to_pylist()
    paths = batch.column("path").to_pylist() if "path" in batch.column_names else [""] * len(texts)
    finals = batch.column("final").to_pylist() if "final" in batch.column_names else [False] * len(texts)
    rows: list[dict[str, Any]] = []
    for text, path, final in zip(texts, paths, finals, strict=True):
        row: dict[str, Any] = {"_source": path, "_type_error": None}
        if text is None or not text.strip():
            row["_type_error"] = "empty line"
            rows.append(row)
            continue
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as e:
            # RecursionError: nested deeper than the parser recurses; a ValueError other than
            # JSONDecodeError (an integer over Python's digit limit) has no .msg.
            msg = getattr(e, "msg", None) or str(e)
            if final:
                row["_truncated"] = True
                row["_type_error"] = f"the file's last line has no newline and is not valid JSON (cut off?): {msg}"
            else:
                row["_type_error"] = f"unparsable JSON: {msg} ({text[:80]!r})"
            row["_raw"] = text
            rows.append(row)
            continue
        if not isinstance(obj, dict):
            row["_type_error"] = f"JSON line is a {type(obj).__name__}, expected an object"
            row["_raw"] = text
            rows.append(row)
            continue
        extra = {}
        for k, v in obj.items():
            if k in columns and k != "extra":
                ok = v is None or isinstance(v, str) or (
                    k in _NUMERIC_OK and isinstance(v, (int, float)) and not isinstance(v, bool)
                ) or (k == "attributes" and isinstance(v, dict))
                if not ok and row["_type_error"] is None:
                    row["_type_error"] = f"{k} has JSON type {type(v).__name__}: {v!r}"
                row[k] = json.dumps(v) if isinstance(v, dict) else (None if v is None else str(v))
            else:
                extra[k] = v
        if "extra" in columns and extra:
            row["extra"] = json.dumps(extra, default=str)
        rows.append(row)
    names = [*columns, "_source", "_type_error", "_raw"]
    out = {c: _strings([r.get(c) for r in rows]) for c in names}
    out["_truncated"] = pa.array([r.get("_truncated", False) for r in rows], pa.bool_())
    return pa.table(out)


def _decode_csv_bytes(batch: pa.Table, columns: tuple[str, ...], source: str | None = None) -> pa.Table:
    """CSV read as binary so invalid UTF-8 reaches validation instead of failing the read."""
    out = {}
    for c in batch.column_names:
        col = batch.column(c)
        if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
            try:
                out[c] = pc.cast(col, pa.string())
            except pa.ArrowInvalid:
                out[c] = _utf8_or_replaced(col.to_pylist())
        else:
            out[c] = col
    return _to_raw(pa.table(out), columns, source)


_JSONL_CHUNK_LINES = 50_000


def _jsonl_files_to_raw(
    batch: pa.Table, columns: tuple[str, ...], prefix: str = ""
) -> Iterator[pa.Table]:
    """Whole JSONL files (bytes) -> raw rows, in chunks of lines.

    Lines are decoded one by one with errors="replace", so invalid UTF-8 becomes U+FFFD and
    that row is quarantined as bad_encoding instead of the file failing to read (Ray's
    read_text decodes a whole file strictly). Blank lines are not rows (count_rows reports
    them as blank lines).
    """
    for data, path in zip(
        batch.column("bytes").to_pylist(), batch.column("path").to_pylist(), strict=True
    ):
        if data.startswith(codecs.BOM_UTF8):  # as Windows tools write UTF-8; not JSON
            data = data[len(codecs.BOM_UTF8) :]
        pieces = data.split(b"\n")
        # What follows the last newline is a last line without one ("" when the file ends
        # with a newline); it is the last of the kept lines whenever it is not blank.
        open_end = bool(pieces[-1].strip())
        lines = [ln for ln in pieces if ln.strip()]
        for start in range(0, len(lines), _JSONL_CHUNK_LINES):
            chunk = lines[start : start + _JSONL_CHUNK_LINES]
            # A byte order mark also starts each file that was concatenated onto another.
            texts = [ln.decode("utf-8", errors="replace").rstrip("\r").removeprefix("\ufeff") for ln in chunk]
            final = np.zeros(len(texts), dtype=bool)
            if open_end and start + len(chunk) == len(lines):
                final[-1] = True
            yield _parse_jsonl_lines(
                pa.table(
                    {
                        "text": pa.array(texts, pa.string()),
                        "path": pa.array([prefix + path] * len(texts), pa.string()),
                        "final": pa.array(final),
                    }
                ),
                columns,
            )


# Quoted values (product descriptions) may hold newlines: the CSV reader must not split there.
_CSV_PARSE = {"newlines_in_values": True}
# pyarrow's CSV reader fails on a row longer than its block ("straddling object straddles two
# block boundaries"; 1 MiB by default): a block as large as the file holds any row, up to a
# cap that bounds a reader's memory on large files (a row over 64 MiB still fails there).
_CSV_MIN_BLOCK, _CSV_MAX_BLOCK = 1 << 20, 1 << 26


def _csv_read_options(fs: pafs.FileSystem, path: str) -> pacsv.ReadOptions:
    size = fs.get_file_info(path).size or 0
    return pacsv.ReadOptions(block_size=int(min(max(size + 1, _CSV_MIN_BLOCK), _CSV_MAX_BLOCK)))


def _csv_names(fs: pafs.FileSystem, path: str) -> list[str]:
    """Column names from a CSV file's header (pyarrow's parser: BOM, quotes, leading blank
    lines); [] for an empty file."""
    try:
        with fs.open_input_stream(path) as f:
            reader = pacsv.open_csv(
                f,
                read_options=_csv_read_options(fs, path),
                parse_options=pacsv.ParseOptions(invalid_row_handler=lambda row: "skip", **_CSV_PARSE),
            )
            return list(reader.schema.names)
    except pa.ArrowInvalid as e:
        if "Empty CSV file" in str(e):
            return []
        raise


def _csv_file_to_raw(fs: pafs.FileSystem, path: str, columns: tuple[str, ...], source: str) -> Iterator[pa.Table]:
    names = _csv_names(fs, path)
    if not names:
        return
    bad: list[Any] = []

    def keep(row: Any) -> str:
        bad.append(row)
        return "skip"

    def unsplit() -> pa.Table:
        rows = _unsplit_rows(
            [r.text for r in bad],
            [f"CSV row has {r.actual_columns} fields, the header has {len(names)}" for r in bad],
            columns,
            source,
        )
        bad.clear()
        return rows

    with fs.open_input_stream(path) as f:
        reader = pacsv.open_csv(
            f,
            read_options=_csv_read_options(fs, path),
            parse_options=pacsv.ParseOptions(invalid_row_handler=keep, **_CSV_PARSE),
            convert_options=pacsv.ConvertOptions(
                column_types={n: pa.binary() for n in names}, strings_can_be_null=True
            ),
        )
        for rb in reader:
            yield _decode_csv_bytes(pa.Table.from_batches([rb]), columns, source)
            if bad:
                yield unsplit()
    if bad:
        yield unsplit()


def _csv_files_to_raw(
    batch: pa.Table, fs: pafs.FileSystem, columns: tuple[str, ...], prefix: str
) -> Iterator[pa.Table]:
    """CSV files streamed block by block, every column as bytes (each file with its own
    header); rows with the wrong number of fields become quarantinable raw rows."""
    for path in batch.column("path").to_pylist():
        yield from _csv_file_to_raw(fs, path, columns, prefix + path)


def _parquet_files_to_raw(
    batch: pa.Table, fs: pafs.FileSystem, columns: tuple[str, ...], prefix: str
) -> Iterator[pa.Table]:
    """Parquet files read one row group batch at a time, each file with its own types."""
    for path in batch.column("path").to_pylist():
        with fs.open_input_file(path) as f:
            for rb in pq.ParquetFile(f, **_PARQUET_READ).iter_batches(batch_size=65_536):
                yield _to_raw(pa.Table.from_batches([rb]), columns, prefix + path)


# Spark's default timestamp encoding (INT96) is read as nanoseconds by default, which wraps
# for dates outside 1677-2262; milliseconds hold every date.
_PARQUET_READ: dict[str, Any] = {"coerce_int96_timestamp_unit": "ms"}


def _ray_can_read(fs: pafs.FileSystem, paths: list[str]) -> bool:
    """Whether Ray's parquet reader can take all files at once: no conflicting column types,
    and no INT96 timestamps (Ray reads those as nanoseconds, with no way to ask for ms)."""

    def read(path: str) -> tuple[bool, pa.Schema]:
        f = pq.ParquetFile(path, filesystem=fs)
        parquet = f.metadata.schema
        int96 = any(parquet.column(i).physical_type == "INT96" for i in range(len(parquet)))
        return int96, f.schema_arrow

    with ThreadPoolExecutor(max_workers=16) as pool:
        found = list(pool.map(read, paths))
    if any(int96 for int96, _ in found):
        return False
    schemas = [schema for _, schema in found]
    if all(sch.equals(schemas[0]) for sch in schemas[1:]):
        return True
    try:
        pa.unify_schemas(schemas)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return False
    return True


def _files_and_fs(
    uri: Source, cfg: StorageConfig, fmt: str, key: str
) -> tuple[list[str], str, pafs.FileSystem, list[str], str]:
    files, fmt = list_data_files(uri, cfg, fmt, key)
    fs, _ = storage.filesystem(files[0], cfg)
    paths = [storage.filesystem(f, cfg)[1] for f in files]
    prefix = files[0].split("://", 1)[0] + "://" if storage.is_remote(files[0]) else ""
    return files, fmt, fs, paths, prefix


def _read_raw(
    uri: Source, cfg: StorageConfig, fmt: str, columns: tuple[str, ...], parallelism: int, key: str
) -> ray.data.Dataset:
    files, fmt, fs, paths, prefix = _files_and_fs(uri, cfg, fmt, key)
    kwargs: dict[str, Any] = {"filesystem": fs}
    if parallelism:
        kwargs["override_num_blocks"] = parallelism
    log.info("reading %d %s file(s) from %s", len(files), fmt, describe(uri))

    def add_prefix(b: pa.Table) -> pa.Table:
        names = ["_source" if c == "path" else c for c in b.column_names]
        b = b.rename_columns(names)
        if prefix and "_source" in names:
            b = b.set_column(
                names.index("_source"), "_source", pc.binary_join_element_wise(prefix, b["_source"], "")
            )
        return b

    def per_file(fn: Callable[..., Iterator[pa.Table]]) -> ray.data.Dataset:
        files_ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=len(paths))
        first = files[0]  # the task rebuilds the filesystem: see storage.task_filesystem
        return files_ds.map_batches(
            lambda b: fn(b, storage.task_filesystem(first, cfg), columns, prefix), batch_size=1, batch_format="pyarrow"
        )

    if fmt == "parquet":
        if _ray_can_read(fs, paths):
            ds = ray.data.read_parquet(paths, include_paths=True, **kwargs)
            return ds.map_batches(
                lambda b: _to_raw(add_prefix(b), columns),
                batch_format="pyarrow",
                batch_size=None,
                zero_copy_batch=True,
            )
        # Shards disagree on a column's type (e.g. ids written as integers in one export):
        # Ray's reader would fail to merge them, so each file is read with its own schema and
        # the offending rows are flagged for the quarantine.
        log.warning("parquet files in %s have conflicting schemas or INT96 timestamps; reading file by file", describe(uri))
        return per_file(_parquet_files_to_raw)
    if fmt == "jsonl":
        ds = ray.data.read_binary_files(paths, include_paths=True, **kwargs)
        return ds.map_batches(
            lambda b: _jsonl_files_to_raw(b, columns, prefix),
            batch_size=1,
            batch_format="pyarrow",
        )
    return per_file(_csv_files_to_raw)


def read_events(
    uri: Source, cfg: StorageConfig, fmt: str = "auto", parallelism: int = 0, key: str = "data.events_uri"
) -> ray.data.Dataset:
    """Stream raw behaviour events from sharded files (see module doc for the raw form)."""
    return _read_raw(uri, cfg, fmt, EVENT_COLUMNS, parallelism, key)


def read_catalog(
    uri: Source, cfg: StorageConfig, fmt: str = "auto", parallelism: int = 0, key: str = "data.catalog_uri"
) -> ray.data.Dataset:
    """Stream the raw catalog from sharded files."""
    return _read_raw(uri, cfg, fmt, CATALOG_COLUMNS, parallelism, key)


def read_rows(
    uri: Source, cfg: StorageConfig, columns: Sequence[str], fmt: str = "auto", parallelism: int = 0, key: str = "data source"
) -> ray.data.Dataset:
    """Stream rows of another kind (batch requests: recsys.recommend) in the same raw form:
    `columns` as strings, every other field packed into `extra` when `columns` names it."""
    return _read_raw(uri, cfg, fmt, tuple(columns), parallelism, key)


# ---- the independent row count ------------------------------------------------------------

_COUNT_CHUNK = 1 << 24
_WHITESPACE = np.zeros(256, dtype=bool)
_WHITESPACE[list(b" \t\r\x0b\x0c")] = True  # what bytes.strip() removes, less the newline
# A newline followed by a newline or whitespace: where a blank line can start (one regex scan
# is ~30x faster than six substring searches, whose second byte is common in JSON).
_BLANK_HINT = re.compile(rb"\n[\n \t\r\x0b\x0c]")


def count_jsonl_lines(stream: Any, chunk_size: int = _COUNT_CHUNK) -> tuple[int, int]:
    """(lines, blank lines) of a JSONL stream, read in chunks: every newline ends a line, and
    bytes after the last newline are one more line. Blank = only whitespace (as bytes.strip).

    A line inside a chunk is blank only if it is empty or starts with whitespace, so a chunk
    without "\n\n" or "\n<whitespace>" is counted with bytes.count alone; otherwise the lines
    are found with numpy and only those starting with whitespace are looked at one by one.
    """
    lines = blank = 0
    open_line = open_has_text = False  # bytes after the last newline seen so far
    while chunk := stream.read(chunk_size):
        first = chunk.find(b"\n")
        if first < 0:
            open_line = True
            open_has_text = open_has_text or bool(chunk.strip())
            continue
        # The line the previous chunk left open ends at this chunk's first newline.
        blank += int(not open_has_text and not chunk[:first].strip())
        if _BLANK_HINT.search(chunk):
            buf = np.frombuffer(chunk, dtype=np.uint8)
            nl = np.flatnonzero(buf == 10)
            starts, ends = nl[:-1] + 1, nl[1:]
            empty = starts == ends
            maybe = np.flatnonzero(~empty & _WHITESPACE[buf[starts]])
            blank += int(empty.sum()) + sum(1 for i in maybe if not chunk[starts[i] : ends[i]].strip())
            lines += int(nl.size)
        else:
            lines += chunk.count(b"\n")
        rest = chunk[chunk.rfind(b"\n") + 1 :]
        open_line, open_has_text = bool(rest), bool(rest.strip())
    if open_line:
        lines += 1
        blank += int(not open_has_text)
    return lines, blank


def _count_csv(fs: pafs.FileSystem, path: str) -> tuple[int, int]:
    """(records including empty lines, empty lines) by pyarrow's CSV parser reading one
    column; rows with the wrong number of fields count as records (the reader quarantines
    them). Only a file whose first field is ever empty is parsed a second time, to tell empty
    lines from rows with an empty first field."""
    names = _csv_names(fs, path)
    if not names:
        return 0, 0

    def records(ignore_empty_lines: bool) -> tuple[int, int]:
        n = [0, 0]

        def invalid(row: Any) -> str:
            n[0] += 1
            return "skip"

        with fs.open_input_stream(path) as f:
            reader = pacsv.open_csv(
                f,
                read_options=_csv_read_options(fs, path),
                parse_options=pacsv.ParseOptions(
                    invalid_row_handler=invalid, ignore_empty_lines=ignore_empty_lines, **_CSV_PARSE
                ),
                convert_options=pacsv.ConvertOptions(
                    include_columns=names[:1], column_types={names[0]: pa.binary()}
                ),
            )
            for rb in reader:
                n[0] += rb.num_rows
                n[1] += int(pc.sum(pc.equal(pc.binary_length(rb.column(0)), 0)).as_py() or 0)
        return n[0], n[1]

    total, empty_first = records(ignore_empty_lines=False)
    if empty_first == 0:
        return total, 0
    return total, total - records(ignore_empty_lines=True)[0]


def _count_text_files(uri: str, cfg: StorageConfig, paths: list[str], fmt: str) -> list[tuple[int, int]]:
    fs = storage.task_filesystem(uri, cfg)
    out = []
    for path in paths:
        if fmt == "csv":
            out.append(_count_csv(fs, path))
        else:
            with fs.open_input_stream(path) as f:
                out.append(count_jsonl_lines(f))
    return out


def count_rows(uri: Source, cfg: StorageConfig, fmt: str = "auto", key: str = "data source") -> dict[str, int]:
    """Rows in a source's files, counted without this module's readers: parquet from the
    footers, JSONL by newlines (a last line without one counts), CSV by a separate parse of
    one column. Returns {"files", "rows" (blank lines included), "blank_lines"}.

    Text files are counted in Ray tasks next to the data, not on the driver."""
    files, fmt, fs, paths, _ = _files_and_fs(uri, cfg, fmt, key)
    if fmt == "parquet":
        with ThreadPoolExecutor(max_workers=16) as pool:
            rows = sum(pool.map(lambda p: pq.read_metadata(p, filesystem=fs).num_rows, paths))
        return {"files": len(files), "rows": int(rows), "blank_lines": 0}
    groups = max(1, min(len(paths), 2 * int(ray.cluster_resources().get("CPU", 1))))
    task = ray.remote(num_cpus=0.25)(_count_text_files)
    refs = [task.remote(files[0], cfg, paths[g::groups], fmt) for g in range(groups)]
    counts = [c for part in ray.get(refs) for c in part]
    return {
        "files": len(files),
        "rows": sum(r for r, _ in counts),
        "blank_lines": sum(b for _, b in counts),
    }
