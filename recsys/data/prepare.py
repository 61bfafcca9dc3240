"""The data job: raw logs + catalog -> validated events (quarantine) -> items, duplicates, examples.

    run(cfg) -> manifest dict (also written to <root>/data/manifest.json)

Events stream through Ray Data (read -> validate per batch -> group by user -> examples ->
sharded parquet); only the catalog (small relative to logs) and per-item counts are gathered
on the driver. Nothing is dropped: the rows in the files are counted apart from the readers
(recsys.data.io.count_rows: parquet footers, newlines, a separate CSV parse), and
rows_in_files == rows_kept + rows_quarantined + blank_lines is checked here, for the events
and the catalog; a mismatch raises RowAccountingError.
"""

from __future__ import annotations

import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from recsys import paths, storage
from recsys.config import Config, redacted
from recsys.data import dedup, io
from recsys.data.examples import build_all_examples
from recsys.data.text import render_item_text
from recsys.data.validate import (
    DataQualityError,
    RowAccountingError,
    check_quarantine_share,
    split_tagged,
    tag_events,
    validate_catalog,
)
from recsys.runtime import ensure_ray
from recsys.schemas import (
    CATALOG_SCHEMA,
    EVENTS_SCHEMA,
    EXAMPLE_KINDS,
    EXAMPLES_SCHEMA,
    ITEMS_SCHEMA,
    QUARANTINE_SCHEMA,
    SPLITS,
)

__all__ = ["DataQualityError", "RowAccountingError", "run"]

log = logging.getLogger(__name__)


def _write_ds(ds: ray.data.Dataset, uri: str, cfg: Config) -> None:
    fs, path = storage.filesystem(uri, cfg.storage)
    # A directory marker object makes rclone (and some S3 stores) refuse writes beneath it.
    ds.write_parquet(path, filesystem=fs, try_create_dir=isinstance(fs, pafs.LocalFileSystem))


def _load_real(src: str, data_dir: str) -> tuple[pa.Table, pa.Table]:
    from recsys.data import real

    loader = real.load_amazon_scientific if src == "amazon" else real.load_homedepot
    sub = storage.join(data_dir, "amazon-scientific" if src == "amazon" else "homedepot")
    # data.real_data_dir names the folder holding both data sets, or the data set's own folder.
    return loader(sub if storage.exists(sub) else data_dir)


def _materialize_source(cfg: Config) -> tuple[io.Source, io.Source, dict[str, Any]]:
    """Put the configured source's raw files in storage; return (events_uri, catalog_uri, info).

    For data.source=files each URI is the configured file, folder, glob or list of them."""
    src = cfg.data.source
    raw_root = storage.join(cfg.storage.root, "raw")
    raw_events, raw_catalog = storage.join(raw_root, "events"), storage.join(raw_root, "catalog")
    if src == "files":
        if not cfg.data.events_uri or not cfg.data.catalog_uri:
            raise ValueError("data.source=files needs data.events_uri and data.catalog_uri")
        return cfg.data.events_uri, cfg.data.catalog_uri, {}
    if src == "synthetic":
        from recsys.data.synthetic import generate_shop

        storage.clear_dir(raw_root, cfg.storage)
        info = generate_shop(cfg.data, raw_root, cfg.storage)
        return raw_events, raw_catalog, {"synthetic": info}
    if src in ("amazon", "homedepot"):
        events, catalog = _load_real(src, cfg.data.real_data_dir)
        storage.clear_dir(raw_root, cfg.storage)
        # Written as shards so the read below is the same sharded, streaming read as any shop's.
        shards = max(1, cfg.data.synthetic_shards)
        per = max(1, (events.num_rows + shards - 1) // shards)
        for s in range(shards):
            part = events.slice(s * per, per)
            storage.write_parquet(part, storage.join(raw_events, f"part-{s:05d}.parquet"), cfg.storage)
        storage.write_parquet(catalog, storage.join(raw_catalog, "part-00000.parquet"), cfg.storage)
        info = {"events": events.num_rows, "catalog_items": catalog.num_rows, "event_shards": shards}
        return raw_events, raw_catalog, {src: info}
    raise ValueError(f"data.source must be files, synthetic, amazon or homedepot, got {src!r}")


def shuffle_partitions() -> int:
    """Hash-shuffle width: Ray's default of 200 partitions costs minutes on a small cluster."""
    return max(2, int(ray.cluster_resources().get("CPU", 2)))


def _counts_by(ds: ray.data.Dataset, keys: list[str]) -> dict[tuple[Any, ...], int]:
    """Row counts per distinct key, without a shuffle: vectorised partial counts per block,
    merged on the driver (the result is as large as the key space: reasons, kinds, items, ids)."""

    def partial(b: pa.Table) -> pa.Table:
        if not set(keys) <= set(b.column_names):  # an empty block without columns
            return pa.table({})
        g = b.select(keys).group_by(keys).aggregate([([], "count_all")])
        return g.select([*keys, "count_all"]).rename_columns([*keys, "n"])

    refs = ds.map_batches(partial, batch_format="pyarrow").to_arrow_refs()
    # Empty blocks come back as tables without columns.
    parts = [t.select([*keys, "n"]) for t in ray.get(refs) if t.num_rows and "n" in t.column_names]
    if not parts:
        return {}
    table = pa.concat_tables(parts).group_by(keys).aggregate([("n", "sum")])
    cols = [table.column(k).to_pylist() for k in keys] + [table.column("n_sum").to_pylist()]
    return {tuple(r[:-1]): int(r[-1]) for r in zip(*cols, strict=True)}


def _event_stats(clean: ray.data.Dataset) -> dict[str, dict[tuple[str, ...], int]]:
    """One pass over clean events: counts per (item, event_type), per user and per session.

    Vectorised per block, merged on the driver (ids only, never rows)."""

    def partial(b: pa.Table) -> pa.Table:
        if "item_id" not in b.column_names:  # an empty block without columns
            return pa.table({"what": [], "a": [], "b": [], "n": []}, schema=_STATS_SCHEMA)
        parts = []
        for what, keys in (("item_event", ["item_id", "event_type"]), ("user", ["user_id"]), ("session", ["session_id"])):
            g = b.select(keys).group_by(keys).aggregate([([], "count_all")])
            m = g.num_rows
            parts.append(
                pa.table(
                    {
                        "what": pa.repeat(pa.scalar(what, pa.string()), m),
                        "a": g.column(keys[0]),
                        "b": g.column(keys[1]) if len(keys) > 1 else pa.nulls(m, pa.string()),
                        "n": g.column("count_all"),
                    },
                    schema=_STATS_SCHEMA,
                )
            )
        return pa.concat_tables(parts)

    refs = clean.map_batches(partial, batch_format="pyarrow", batch_size=None).to_arrow_refs()
    tables = [t for t in ray.get(refs) if t.num_rows]
    out: dict[str, dict[tuple[str, ...], int]] = {"item_event": {}, "user": {}, "session": {}}
    if not tables:
        return out
    merged = pa.concat_tables(tables).group_by(["what", "a", "b"]).aggregate([("n", "sum")])
    for what, a, b, n in zip(*(merged.column(c).to_pylist() for c in ("what", "a", "b", "n_sum")), strict=True):
        out[what][(a, b) if what == "item_event" else (a,)] = int(n)
    return out


_STATS_SCHEMA = pa.schema([("what", pa.string()), ("a", pa.string()), ("b", pa.string()), ("n", pa.int64())])
_EX_COUNT_SCHEMA = pa.schema([("kind", pa.string()), ("split", pa.string()), ("item_id", pa.string()), ("n", pa.int64())])


def _write_examples(examples: ray.data.Dataset, cfg: Config) -> dict[tuple[str, str, str], int]:
    """Write EXAMPLES_SCHEMA parquet files under paths.examples(cfg, kind, split) as the
    examples stream out of the groupby; return counts per (kind, split, target item)."""
    fs, _ = storage.filesystem(paths.data_dir(cfg), cfg.storage)
    dirs = {(k, s): storage.filesystem(paths.examples(cfg, k, s), cfg.storage)[1] for k in EXAMPLE_KINDS for s in SPLITS}
    local = isinstance(fs, pafs.LocalFileSystem)

    def write(b: pa.Table) -> pa.Table:
        if "kind" not in b.column_names or b.num_rows == 0:
            return _EX_COUNT_SCHEMA.empty_table()
        for (kind, split), where in dirs.items():
            part = b.filter(pc.and_(pc.equal(b["kind"], kind), pc.equal(b["split"], split)))
            if part.num_rows == 0:
                continue
            if local:
                fs.create_dir(where, recursive=True)
            # No directory markers: rclone (and some S3 stores) refuse writes beneath them.
            pq.write_table(
                part.select(EXAMPLES_SCHEMA.names).cast(EXAMPLES_SCHEMA),
                f"{where}/part-{uuid.uuid4().hex}.parquet",
                filesystem=fs,
            )
        g = b.select(["kind", "split", "item_id"]).group_by(["kind", "split", "item_id"]).aggregate([([], "count_all")])
        g = g.select(["kind", "split", "item_id", "count_all"])
        return g.rename_columns(["kind", "split", "item_id", "n"]).cast(_EX_COUNT_SCHEMA)

    refs = examples.map_batches(write, batch_format="pyarrow", batch_size=None).to_arrow_refs()
    tables = [t for t in ray.get(refs) if t.num_rows]
    if not tables:
        return {}
    merged = pa.concat_tables(tables).group_by(["kind", "split", "item_id"]).aggregate([("n", "sum")])
    cols = [merged.column(c).to_pylist() for c in ("kind", "split", "item_id", "n_sum")]
    return {(k, s, i): int(n) for k, s, i, n in zip(*cols, strict=True)}


def _stage(name: str, t0: float) -> None:
    log.info("prepare: %s done at %.1fs", name, time.perf_counter() - t0)


def _examples_by_reason(quarantined: ray.data.Dataset, reasons: list[str], k: int = 3) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for r in reasons:
        rows = quarantined.filter(expr=f"reason == '{r}'").take(k)
        out[r] = [f"{x['detail']} | {x['raw'][:300]}" for x in rows]
    return out


def _table_examples(bad: pa.Table, k: int = 3) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for reason, detail, raw in zip(*(bad.column(c).to_pylist() for c in ("reason", "detail", "raw")), strict=True):
        if len(out.setdefault(reason, [])) < k:
            out[reason].append(f"{detail} | {raw[:300]}")
    return out


def _reason_counts(bad: pa.Table) -> dict[str, int]:
    if bad.num_rows == 0:
        return {}
    vc = pc.value_counts(bad.column("reason")).to_pylist()
    return {str(x["values"]): int(x["counts"]) for x in vc}


def _check_accounting(what: str, files: dict[str, int], kept: int, quarantined: int) -> None:
    """The no-silent-drop invariant against the files' own count (blank lines are not rows)."""
    if files["rows"] != kept + quarantined + files["blank_lines"]:
        raise RowAccountingError(
            f"row accounting broken for {what}: the {files['files']} file(s) hold {files['rows']} rows "
            f"({files['blank_lines']} of them blank lines), but {kept} were kept and {quarantined} "
            f"quarantined ({kept + quarantined + files['blank_lines'] - files['rows']:+d})"
        )


def run(cfg: Config) -> dict[str, Any]:
    """The whole data job; returns the manifest (also written to paths.manifest(cfg))."""
    t0 = time.perf_counter()
    ensure_ray(cfg=cfg)
    events_uri, catalog_uri, source_info = _materialize_source(cfg)
    data_dir = paths.data_dir(cfg)
    storage.clear_dir(data_dir, cfg.storage)
    qdir = paths.quarantine(cfg)

    # data.format describes a shop's own files; what this job wrote itself is told by extension.
    own = cfg.data.source == "files"
    fmt = cfg.data.format if own else "auto"
    ev_key = "data.events_uri" if own else f"data.source={cfg.data.source} (events written under storage.root)"
    cat_key = "data.catalog_uri" if own else f"data.source={cfg.data.source} (catalog written under storage.root)"
    ev_where, cat_where = f"events at {io.describe(events_uri)}", f"catalog at {io.describe(catalog_uri)}"
    # A missing or empty source stops the job here, before any work.
    io.list_data_files(events_uri, cfg.storage, fmt, ev_key)
    # The files' own row counts: a second look at the same files, not through the readers,
    # compared below with what the readers produced.
    cat_files = io.count_rows(catalog_uri, cfg.storage, fmt, cat_key)

    # Catalog: small relative to logs, validated and de-duplicated on the driver.
    raw_catalog = io.read_catalog(catalog_uri, cfg.storage, fmt, key=cat_key)
    catalog, cat_bad = validate_catalog(raw_catalog, cat_where)
    cat_in = catalog.num_rows + cat_bad.num_rows
    _check_accounting(cat_where, cat_files, catalog.num_rows, cat_bad.num_rows)
    cat_reasons = _reason_counts(cat_bad)
    if cat_bad.num_rows:
        storage.write_parquet(cat_bad, storage.join(qdir, "catalog", "part-00000.parquet"), cfg.storage)
    check_quarantine_share(
        cat_in, cat_reasons, _table_examples(cat_bad), cfg.data.max_quarantine_share, cat_where,
    )
    if catalog.num_rows == 0:
        raise DataQualityError(f"{cat_where} has no valid rows")

    # Events: streamed, validated once per batch, then split into clean and quarantined rows.
    known = pa.array(catalog.column("item_id").to_pylist(), pa.string())
    # The events' count runs beside the read (Ray tasks for text files, footers for parquet).
    counter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="count-rows")
    ev_counting = counter.submit(io.count_rows, events_uri, cfg.storage, fmt, ev_key)
    counter.shutdown(wait=False)
    raw_events = io.read_events(events_uri, cfg.storage, fmt, cfg.data.read_parallelism, key=ev_key)
    # Tagging checks per batch that every row read comes out clean or quarantined, so the
    # tagged count is the count of rows read.
    tagged = tag_events(raw_events, known, ev_where)
    clean, quarantined = split_tagged(tagged)
    clean = clean.materialize()
    quarantined = quarantined.materialize()
    rows_in, rows_kept, rows_bad = tagged.count(), clean.count(), quarantined.count()
    del tagged
    if rows_in != rows_kept + rows_bad:
        raise RowAccountingError(
            f"row accounting broken for {ev_where}: {rows_in} rows read != {rows_kept} kept + {rows_bad} quarantined"
        )
    ev_files = ev_counting.result()
    _check_accounting(ev_where, ev_files, rows_kept, rows_bad)
    ev_reasons = {str(k[0]): v for k, v in _counts_by(quarantined, ["reason"]).items()}
    # Quarantine is written before the threshold check so a failed run can be inspected.
    if rows_bad:
        _write_ds(quarantined, storage.join(qdir, "events"), cfg)
    if rows_in and rows_bad / rows_in > cfg.data.max_quarantine_share:
        check_quarantine_share(
            rows_in, ev_reasons, _examples_by_reason(quarantined, list(ev_reasons)),
            cfg.data.max_quarantine_share, ev_where,
        )

    # Examples: grouped by user and written per (kind, split) in the same pass, which also
    # returns the counts (one Ray execution instead of one per output and per count).
    _stage("validation", t0)
    examples = build_all_examples(
        clean, cfg.data, num_partitions=max(1, min(clean.num_blocks(), 4 * shuffle_partitions()))
    )
    ex_counts = _write_examples(examples, cfg)
    by_ks: dict[tuple[str, str], int] = {}
    train_targets: dict[str, int] = {}
    for (kind, split, item), n in ex_counts.items():
        by_ks[(kind, split)] = by_ks.get((kind, split), 0) + n
        if split == "train":
            train_targets[item] = train_targets.get(item, 0) + n
    example_counts = {f"{k}/{s}": by_ks.get((k, s), 0) for k in EXAMPLE_KINDS for s in SPLITS}
    _stage("examples", t0)

    # Items: rendered text (one place), duplicate groups, popularity = train targets.
    weights = cfg.data.event_weights
    positive_types = {t for t, w in weights.items() if w >= cfg.data.min_positive_weight}
    stats = _event_stats(clean)
    engaged: dict[str, int] = {}
    for (item, et), n in stats["item_event"].items():
        if et in positive_types:
            engaged[item] = engaged.get(item, 0) + n
    ids = catalog.column("item_id").to_pylist()
    texts = [render_item_text(r) for r in catalog.to_pylist()]
    # Duplicates are judged on brand + title: variants differ there only by colour or size,
    # while shared description templates would make distinct products look alike.
    dedup_keys = [f"{r.get('brand') or ''} {r.get('title') or ''}" for r in catalog.select(["brand", "title"]).to_pylist()]
    groups = np.asarray(dedup.duplicate_groups(ids, dedup_keys, cfg.data.near_duplicate_threshold), dtype=np.int64)
    popularity = np.array([train_targets.get(i, 0) for i in ids], dtype=np.int64)
    engagement = np.array([engaged.get(i, 0) for i in ids], dtype=np.int64)
    items = pa.table(
        {
            "item_id": catalog.column("item_id"),
            "title": catalog.column("title"),
            "brand": catalog.column("brand"),
            "category": catalog.column("category"),
            "price": catalog.column("price"),
            "text": pa.array(texts, pa.string()),
            "dup_group": pa.array(groups, pa.int64()),
            "popularity": pa.array(popularity, pa.int64()),
        },
        schema=ITEMS_SCHEMA,
    )
    storage.write_parquet(items, storage.join(paths.items(cfg), "part-00000.parquet"), cfg.storage)
    uniq, sizes = np.unique(groups, return_counts=True)
    multi = np.isin(groups, uniq[sizes > 1])
    storage.write_parquet(
        pa.table(
            {
                "item_id": pa.array(np.array(ids, dtype=object)[multi], pa.string()),
                "dup_group": pa.array(groups[multi], pa.int64()),
            }
        ),
        paths.duplicates(cfg),
        cfg.storage,
    )

    _stage("items and duplicates", t0)
    manifest: dict[str, Any] = {
        "source": {"type": cfg.data.source, "events_uri": events_uri, "catalog_uri": catalog_uri, **source_info},
        "counts": {
            # rows_in_files (counted in the files) == rows_in (read) + blank_lines, and
            # rows_in == rows_kept + rows_quarantined: both checked above.
            "event_files": ev_files["files"],
            "rows_in_files": ev_files["rows"],
            "blank_lines": ev_files["blank_lines"],
            "rows_in": rows_in,
            "rows_kept": rows_kept,
            "rows_quarantined": rows_bad,
            "quarantined_by_reason": ev_reasons,
            "catalog_files": cat_files["files"],
            "catalog_rows_in_files": cat_files["rows"],
            "catalog_blank_lines": cat_files["blank_lines"],
            "catalog_rows_in": cat_in,
            "catalog_rows_kept": catalog.num_rows,
            "catalog_rows_quarantined": cat_bad.num_rows,
            "catalog_quarantined_by_reason": cat_reasons,
            "users": len(stats["user"]),
            "sessions": len(stats["session"]),
            "items": catalog.num_rows,
            "items_engaged": int((engagement > 0).sum()),
            "examples": example_counts,
        },
        "quarantine_share": {
            "events": rows_bad / max(rows_in, 1),
            "catalog": cat_bad.num_rows / max(cat_in, 1),
            "max_allowed": cfg.data.max_quarantine_share,
        },
        "duplicates": dedup.group_stats(groups),
        "popularity_skew": dedup.popularity_skew(engagement),
        "paths": {
            "data": data_dir,
            "items": paths.items(cfg),
            "examples": storage.join(data_dir, "examples"),
            "quarantine": qdir,
            "duplicates": paths.duplicates(cfg),
            "manifest": paths.manifest(cfg),
        },
        "schemas": {
            "events": EVENTS_SCHEMA.to_string(),
            "catalog": CATALOG_SCHEMA.to_string(),
            "examples": EXAMPLES_SCHEMA.to_string(),
            "items": ITEMS_SCHEMA.to_string(),
            "quarantine": QUARANTINE_SCHEMA.to_string(),
        },
        "config": redacted(cfg),  # credentials never in a written manifest
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    storage.write_json(paths.manifest(cfg), manifest, cfg.storage)
    log.info(
        "prepared %s in %.1fs: %d events in, %d kept, %d quarantined %s; catalog %d kept, %d quarantined %s; examples %s",
        data_dir, manifest["wall_s"], rows_in, rows_kept, rows_bad, ev_reasons,
        catalog.num_rows, cat_bad.num_rows, cat_reasons, example_counts,
    )
    return manifest
