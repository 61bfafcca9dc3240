"""Streaming readers for sharded logs and catalogs: parquet, JSONL or CSV at any URI.

Everything is read as "raw": the canonical columns as strings (a typed parquet timestamp stays
typed), unknown columns packed into an `extra` JSON string, plus `_source` (the file) and
`_type_error` (set when a field had a type the schema does not allow). Reading loosely is
deliberate: a bad row must reach validation and the quarantine instead of failing the read.

Each format streams shard by shard through Ray Data with the pyarrow filesystem passed
explicitly: parquet via ray.data.read_parquet (or file by file, row group by row group, when
shards disagree on a column's type), JSONL via read_binary_files + per-line decoding (invalid
UTF-8 becomes U+FFFD instead of failing the file), CSV via read_csv with every column as bytes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from recsys import storage
from recsys.config import StorageConfig
from recsys.schemas import TS

log = logging.getLogger(__name__)

EVENT_COLUMNS = ("user_id", "session_id", "timestamp", "event_type", "query", "item_id", "extra")
CATALOG_COLUMNS = ("item_id", "title", "description", "brand", "category", "price", "attributes")
# Fields whose JSON value may legitimately be a number; everything else must be a string.
_NUMERIC_OK = {"timestamp", "price"}
_FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv"}


def detect_format(files: list[str], fmt: str = "auto") -> str:
    if fmt != "auto":
        if fmt not in ("parquet", "jsonl", "csv"):
            raise ValueError(f"data.format must be auto, parquet, jsonl or csv, got {fmt!r}")
        return fmt
    kinds = {next((v for k, v in _FORMATS.items() if f.endswith(k)), None) for f in files}
    kinds.discard(None)
    if len(kinds) != 1:
        raise ValueError(
            f"cannot tell the format of {files[:3]}...: found {sorted(map(str, kinds)) or 'no known extension'}; "
            "set data.format to parquet, jsonl or csv"
        )
    return kinds.pop()


def list_data_files(uri: str, cfg: StorageConfig, fmt: str = "auto") -> tuple[list[str], str]:
    """Data files under a URI (a directory or a single file) and their format."""
    files = [
        f for f in storage.list_files(uri, cfg) if not f.rsplit("/", 1)[-1].startswith((".", "_"))
    ]
    if not files and storage.exists(uri, cfg):
        files = [uri]
    if not files:
        raise FileNotFoundError(f"no data files found at {uri}")
    return files, detect_format(files, fmt)


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
            out[c] = pc.cast(col, pa.string())
        elif pa.types.is_null(col.type):
            out[c] = pa.nulls(n, pa.string())
        elif c == "timestamp" and pa.types.is_timestamp(col.type):
            # Typed timestamps stay typed (validation takes both); a text round trip would cost
            # more than the whole validation. Times without a zone are taken as UTC.
            if col.type.tz is None:
                col = pc.cast(pc.cast(col, pa.timestamp("ms")), pa.int64())
            out[c] = pc.cast(col, TS)
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
            rows = batch.select(rest).to_pylist()
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


def _parse_jsonl_lines(batch: pa.Table, columns: tuple[str, ...]) -> pa.Table:
    """Lines of JSON -> raw rows; unparsable lines and wrongly typed fields are flagged."""
    texts = batch.column("text").to_pylist()
    paths = batch.column("path").to_pylist() if "path" in batch.column_names else [""] * len(texts)
    rows: list[dict[str, Any]] = []
    for text, path in zip(texts, paths, strict=True):
        row: dict[str, Any] = {"_source": path, "_type_error": None}
        if text is None or not text.strip():
            row["_type_error"] = "empty line"
            rows.append(row)
            continue
        try:
            obj = json.loads(text)
        except ValueError as e:
            row["_type_error"] = f"unparsable JSON: {e.msg} ({text[:80]!r})"
            rows.append(row)
            continue
        if not isinstance(obj, dict):
            row["_type_error"] = f"JSON line is a {type(obj).__name__}, expected an object"
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
    names = [c for c in columns] + ["_source", "_type_error"]
    return pa.table({c: pa.array([r.get(c) for r in rows], pa.string()) for c in names})


def _decode_csv_bytes(batch: pa.Table, columns: tuple[str, ...]) -> pa.Table:
    """CSV read as binary so invalid UTF-8 reaches validation instead of failing the read."""
    out = {}
    for c in batch.column_names:
        col = batch.column(c)
        if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
            try:
                out[c] = pc.cast(col, pa.string())
            except pa.ArrowInvalid:
                out[c] = pa.array(
                    [None if v is None else v.decode("utf-8", errors="replace") for v in col.to_pylist()],
                    pa.string(),
                )
        else:
            out[c] = col
    return _to_raw(pa.table(out), columns)


_JSONL_CHUNK_LINES = 50_000


def _jsonl_files_to_raw(
    batch: pa.Table, columns: tuple[str, ...], prefix: str = ""
) -> Iterator[pa.Table]:
    """Whole JSONL files (bytes) -> raw rows, in chunks of lines.

    Lines are decoded one by one with errors="replace", so invalid UTF-8 becomes U+FFFD and
    that row is quarantined as bad_encoding instead of the file failing to read (Ray's
    read_text decodes a whole file strictly).
    """
    for data, path in zip(
        batch.column("bytes").to_pylist(), batch.column("path").to_pylist(), strict=True
    ):
        lines = [ln for ln in data.split(b"\n") if ln.strip()]
        for start in range(0, len(lines), _JSONL_CHUNK_LINES):
            chunk = lines[start : start + _JSONL_CHUNK_LINES]
            texts = [ln.decode("utf-8", errors="replace").rstrip("\r") for ln in chunk]
            yield _parse_jsonl_lines(
                pa.table(
                    {
                        "text": pa.array(texts, pa.string()),
                        "path": pa.array([prefix + path] * len(texts), pa.string()),
                    }
                ),
                columns,
            )


def _parquet_files_to_raw(
    batch: pa.Table, fs: pafs.FileSystem, columns: tuple[str, ...], prefix: str
) -> Iterator[pa.Table]:
    """Parquet files read one row group batch at a time, each file with its own types."""
    for path in batch.column("path").to_pylist():
        with fs.open_input_file(path) as f:
            for rb in pq.ParquetFile(f).iter_batches(batch_size=65_536):
                yield _to_raw(pa.Table.from_batches([rb]), columns, prefix + path)


def _schemas_unify(fs: pafs.FileSystem, paths: list[str]) -> bool:
    """Whether Ray's parquet reader can take all files at once (no conflicting column types)."""

    def read(path: str) -> pa.Schema:
        return pq.read_schema(path, filesystem=fs)

    with ThreadPoolExecutor(max_workers=16) as pool:
        schemas = list(pool.map(read, paths))
    if all(sch.equals(schemas[0]) for sch in schemas[1:]):
        return True
    try:
        pa.unify_schemas(schemas)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return False
    return True


def _read_raw(
    uri: str, cfg: StorageConfig, fmt: str, columns: tuple[str, ...], parallelism: int
) -> ray.data.Dataset:
    files, fmt = list_data_files(uri, cfg, fmt)
    fs, _ = storage.filesystem(uri, cfg)
    paths = [storage.filesystem(f, cfg)[1] for f in files]
    prefix = uri.split("://", 1)[0] + "://" if storage.is_remote(uri) else ""
    kwargs: dict[str, Any] = {"filesystem": fs}
    if parallelism:
        kwargs["override_num_blocks"] = parallelism
    log.info("reading %d %s file(s) from %s", len(files), fmt, uri)

    def add_prefix(b: pa.Table) -> pa.Table:
        names = ["_source" if c == "path" else c for c in b.column_names]
        b = b.rename_columns(names)
        if prefix and "_source" in names:
            b = b.set_column(
                names.index("_source"), "_source", pc.binary_join_element_wise(prefix, b["_source"], "")
            )
        return b

    if fmt == "parquet":
        if _schemas_unify(fs, paths):
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
        log.warning("parquet files under %s have conflicting schemas; reading file by file", uri)
        files_ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=len(paths))
        return files_ds.map_batches(
            lambda b: _parquet_files_to_raw(b, fs, columns, prefix), batch_size=1, batch_format="pyarrow"
        )
    if fmt == "jsonl":
        ds = ray.data.read_binary_files(paths, include_paths=True, **kwargs)
        return ds.map_batches(
            lambda b: _jsonl_files_to_raw(b, columns, prefix),
            batch_size=1,
            batch_format="pyarrow",
        )
    # CSV: read the header once so every column can be typed as binary (no inference failures).
    with fs.open_input_stream(paths[0]) as f:
        header = f.read(64 * 1024).split(b"\n", 1)[0].decode("utf-8", errors="replace").strip()
    names = pacsv.read_csv(pa.py_buffer(header.encode() + b"\n")).schema.names
    ds = ray.data.read_csv(
        paths,
        include_paths=True,
        convert_options=pacsv.ConvertOptions(
            column_types={n: pa.binary() for n in names}, strings_can_be_null=True
        ),
        **kwargs,
    )
    return ds.map_batches(
        lambda b: _decode_csv_bytes(add_prefix(b), columns), batch_format="pyarrow", batch_size=None
    )


def read_events(uri: str, cfg: StorageConfig, fmt: str = "auto", parallelism: int = 0) -> ray.data.Dataset:
    """Stream raw behaviour events from sharded files (see module doc for the raw form)."""
    return _read_raw(uri, cfg, fmt, EVENT_COLUMNS, parallelism)


def read_catalog(uri: str, cfg: StorageConfig, fmt: str = "auto", parallelism: int = 0) -> ray.data.Dataset:
    """Stream the raw catalog from sharded files."""
    return _read_raw(uri, cfg, fmt, CATALOG_COLUMNS, parallelism)
