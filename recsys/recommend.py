"""Batch recommendations and search: the top-k for every user of the shop, or for every row of a
file, by Ray Data batch inference, written as parquet to the run's store.

Requests (recommend.input_uri)
    empty      one request per user of the shop's prepared data (<root>/data/examples, every kind
               and split): the user's latest history, as the user tower reads it
    a file     parquet / JSONL / CSV (a file, folder, glob or list; read by recsys.data.io like the
               raw logs, so a broken line or a wrong type reaches the output instead of failing
               the read), one request per row with any of
                 user_id     a user of the shop's data: their latest history is used
                 history     item ids, OLDEST FIRST (as Serve's recent_item_ids); with a known
                             user_id it comes before the user's own (as Serve merges its profile)
                 query       a search query; with a history or user, personalised search
                 exclude     item ids never to return for this row (e.g. its purchases)
                 request_id  copied to the output
               In CSV, `history` / `exclude` are a JSON array or ids separated by spaces.

Output (<root>/<run>/recommendations/*.parquet, OUTPUT_SCHEMA): one row per request row, ranked
or not, so rows in = rows out (checked against the input files' own count). A row that cannot be
ranked has no items and `error` set to one of ERRORS (with `error_detail`); the counts per reason
and the totals are in `_summary.json` beside the parts (a leading "_" hides it from parquet
readers of the folder).

Same model and ranking as the Serve app: the model, items and index are the `serve` section's
(else this run's export, items and index, built first when missing or stale: recommend.build_index);
the user text is recsys.encoder.render_user_text (history newest first), the vectors
TextEncoder.encode_queries, the top-k recsys.retrieval.search with its filters and exclusions,
exactly as the served app (serve/catalog.py; exact there up to eval.exact_max_items items, IVF above). A model with a sequence user tower
(recsys.sequence) ranks the rows without a query by that tower over the index's embeddings of
the history (recsys.sequence.SequenceCatalog, as the app does); rows with a query
keep the text path. Each actor of the pool holds the encoder, the sequence tower if any, the
catalog embeddings (recsys.index.load_index, refused unless this model built them) and the
shop's user histories (one copy in the object store) once.
"""

from __future__ import annotations

import collections
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from recsys import paths, storage
from recsys.config import Config, StorageConfig, to_dict
from recsys.schemas import EXAMPLE_KINDS, SPLITS

log = logging.getLogger(__name__)

SUMMARY_FILE = "_summary.json"
ROWS_PER_FILE = 100_000
SHOP_SOURCE = "shop"  # `source` of the requests made for every user of the shop's data

ERRORS = {
    "unparsable": "the reader could not split the row into fields (a broken JSON line, a CSV row with the wrong number of fields)",
    "bad_type": "a field of the wrong type (user_id or query not text, history not a list of item id strings, ...)",
    "empty_request": "no user_id, history or query",
    "unknown_user": "a user_id alone, of a user the shop's data does not know (no history to rank from)",
    "unknown_items": "history (and user) give no item of the catalog, and there is no query",
}

# What the reader hands over as text; every other field of a row arrives in `extra` (JSON).
INPUT_COLUMNS = ("user_id", "query", "extra")

# Requests as the actors take them: history NEWEST FIRST (the file's order reversed).
REQUEST_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string()),
        pa.field("query", pa.string()),
        pa.field("request_id", pa.string()),
        pa.field("history", pa.list_(pa.string())),
        pa.field("exclude", pa.list_(pa.string())),
        pa.field("source", pa.string()),
        pa.field("error", pa.string()),
        pa.field("error_detail", pa.string()),
    ]
)

OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string()),
        pa.field("query", pa.string()),
        pa.field("request_id", pa.string()),
        pa.field("item_ids", pa.list_(pa.string())),  # best first
        pa.field("scores", pa.list_(pa.float32())),  # aligned with item_ids
        pa.field("model_id", pa.string()),  # the model that ranked (recsys.encoder.model_identity)
        # History / exclusion ids that are not in the catalog: skipped, named here.
        pa.field("unknown_item_ids", pa.list_(pa.string())),
        pa.field("error", pa.string()),  # null when ranked, else one of ERRORS
        pa.field("error_detail", pa.string()),
        pa.field("source", pa.string()),  # the input file, or "shop"
    ]
)

# Users' history kept per user (newest first): what the user tower could ever read, with room.
_USERS_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string()),
        pa.field("history", pa.list_(pa.string())),  # newest first, at most data.max_history
        pa.field("seen", pa.list_(pa.string())),  # every item the user engaged with
    ]
)


class _BadRow(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


# ---- requests ---------------------------------------------------------------------------------


def _id_list(value: Any, name: str) -> list[str]:
    """Item ids from a field: a list of strings, or (CSV, text columns) a JSON array or
    space-separated ids. Anything else is a bad_type, naming the field and the value."""
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except ValueError as e:
                raise _BadRow("bad_type", f"{name} is not a JSON array: {e.msg} ({text[:80]!r})") from None
        else:
            return text.split()
    if not isinstance(value, list):
        raise _BadRow("bad_type", f"{name} has type {type(value).__name__} ({value!r:.80}), expected a list of item ids")
    for n, v in enumerate(value):
        if not isinstance(v, str) or not v.strip():
            raise _BadRow("bad_type", f"{name}[{n}] is {v!r:.80} ({type(v).__name__}), expected an item id string")
    return [v.strip() for v in value]


def _text(value: str | None) -> str | None:
    return value.strip() if value and value.strip() else None


def _parse_row(row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "user_id": row.get("user_id"), "query": row.get("query"), "request_id": None, "history": None,
        "exclude": None, "source": row.get("_source") or "", "error": None, "error_detail": None,
    }
    try:
        if row.get("_type_error"):
            raw = row.get("_raw")
            if raw is not None:
                raise _BadRow("unparsable", f"{row['_type_error']}: {raw[:200]!r}")
            raise _BadRow("bad_type", str(row["_type_error"]))
        try:
            extra = json.loads(row["extra"]) if row.get("extra") else {}
        except ValueError:
            raise _BadRow("bad_type", f"extra is not JSON: {row['extra'][:80]!r}") from None
        if not isinstance(extra, dict):
            raise _BadRow("bad_type", f"extra is a {type(extra).__name__}, expected an object")
        rid = extra.get("request_id")
        if isinstance(rid, (dict, list)):
            raise _BadRow("bad_type", f"request_id is a {type(rid).__name__}, expected text or a number")
        out["request_id"] = None if rid is None else str(rid)
        history = _id_list(extra.get("history"), "history")
        out["history"] = history[::-1]  # newest first, as the user tower reads it
        out["exclude"] = _id_list(extra.get("exclude"), "exclude")
        out["user_id"], out["query"] = _text(row.get("user_id")), _text(row.get("query"))
        if not out["user_id"] and not history and not out["query"]:
            raise _BadRow("empty_request", "the row has no user_id, history or query")
    except _BadRow as e:
        out["error"], out["error_detail"] = e.reason, e.detail
    return out


def parse_requests(batch: pa.Table) -> pa.Table:
    """Raw rows from recsys.data.io (INPUT_COLUMNS as text, the rest in `extra`, `_type_error`,
    `_raw`) -> REQUEST_SCHEMA, one row per row: a malformed row keeps its place with its reason."""
    return pa.Table.from_pylist([_parse_row(r) for r in batch.to_pylist()], schema=REQUEST_SCHEMA)


def shop_requests(users: pa.Table) -> pa.Table:
    """A request per user of the shop's data: the user alone (the actors look the history up)."""
    n = users.num_rows
    nulls = {f.name: pa.nulls(n, f.type) for f in REQUEST_SCHEMA}
    cols = {**nulls, "user_id": users.column("user_id"), "source": pa.repeat(pa.scalar(SHOP_SOURCE), n)}
    return pa.table([cols[f.name] for f in REQUEST_SCHEMA], schema=REQUEST_SCHEMA)


def latest_histories(examples: pa.Table, max_history: int) -> pa.Table:
    """Every user's latest history from training examples (of any kind and split): the newest
    example's item followed by that example's history (newest first, repeats dropped, at most
    `max_history`), and every item the user ever engaged with (`seen`). One row per user, sorted."""
    ex = examples.filter(pc.is_valid(examples["user_id"]))
    if ex.num_rows == 0:
        return _USERS_SCHEMA.empty_table()
    # Newest first within a user; a search and a next-item example of one event tie on time.
    ex = ex.take(pc.sort_indices(ex, sort_keys=[("user_id", "ascending"), ("timestamp", "descending"), ("kind", "ascending")]))
    uid = ex.column("user_id").combine_chunks()
    first = np.ones(ex.num_rows, dtype=bool)
    if ex.num_rows > 1:
        first[1:] = pc.not_equal(uid.slice(1), uid.slice(0, ex.num_rows - 1)).to_numpy(zero_copy_only=False)
    latest = ex.filter(pa.array(first))
    histories = []
    for item, hist in zip(latest.column("item_id").to_pylist(), latest.column("history").to_pylist(), strict=True):
        seq = list(dict.fromkeys([item, *(hist or [])]))  # ordered, repeats dropped
        histories.append(seq[:max_history])
    # Everything each user engaged with: the examples' items and the histories' ids.
    hist_col = ex.column("history").combine_chunks()
    owners = pc.take(uid, pc.list_parent_indices(hist_col))
    pairs = pa.table({
        "user_id": pa.concat_arrays([uid, owners.combine_chunks() if isinstance(owners, pa.ChunkedArray) else owners]),
        "item_id": pa.concat_arrays([ex.column("item_id").combine_chunks(), pc.list_flatten(hist_col)]),
    })
    seen = pairs.group_by("user_id").aggregate([("item_id", "distinct")]).sort_by("user_id")
    users = latest.column("user_id")
    if not seen.column("user_id").equals(users):
        raise RuntimeError("user ids of the latest examples and of the engaged items disagree")  # cannot happen
    return pa.table({"user_id": users, "history": pa.array(histories, pa.list_(pa.string())),
                     "seen": seen.column("item_id_distinct")}, schema=_USERS_SCHEMA)


def shop_users(cfg: Config) -> pa.Table | None:
    """The shop's users with their latest history, from <root>/data/examples (None when absent)."""
    files = [f for kind in EXAMPLE_KINDS for split in SPLITS
             for f in storage.list_files(paths.examples(cfg, kind, split), cfg.storage, ".parquet")]
    if not files:
        return None
    fs, _ = storage.filesystem(files[0], cfg.storage)
    cols = ["kind", "user_id", "history", "item_id", "timestamp"]
    parts = [pq.read_table(storage.filesystem(f, cfg.storage)[1], filesystem=fs, columns=cols) for f in files]
    return latest_histories(pa.concat_tables(parts), cfg.data.max_history)


# ---- the ranking actor ------------------------------------------------------------------------


class Ranker:
    """One actor's state: the encoder, the catalog (embeddings from the saved index, in catalog
    order, with the filters applied once), the sequence tower's item vectors over it (when the
    model has one) and the shop's users. Called on REQUEST_SCHEMA batches
    (or the reader's raw rows), returns OUTPUT_SCHEMA rows, exactly one per row in. Also used
    in-process (the benchmark's baseline, tests)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        from recsys.encoder import open_encoder
        from recsys.index import load_index
        from recsys.items import read_items
        from recsys.retrieval import FilterFields, align_embeddings, filter_mask
        from recsys.sequence import SequenceCatalog, open_sequence_tower

        scfg = StorageConfig(**spec["storage"])
        self.k = int(spec["k"])
        self.exclude_history = bool(spec["exclude_history"])
        self.encode_batch_size = int(spec["encode_batch_size"])
        self.encoder = open_encoder(spec["model_uri"], scfg)
        self.model_id = self.encoder.model_id
        if spec.get("model_id") and self.model_id != spec["model_id"]:
            raise RuntimeError(f"the model at {spec['model_uri']} is now {self.model_id}, the job started with {spec['model_id']}: it was re-exported meanwhile; run again")
        index = load_index(spec["index_uri"], scfg, model_id=self.model_id)
        items = read_items(spec["items_uri"], scfg)
        self.ids: list[str] = items.column("item_id").to_pylist()
        self.texts: list[str] = items.column("text").to_pylist()
        self.pos = {i: n for n, i in enumerate(self.ids)}
        self.emb = align_embeddings(index.ids, index.emb, self.ids, spec["index_uri"])
        meta = items.select([c for c in ("category", "brand", "price") if c in items.column_names]).to_pylist()
        self.keep = filter_mask(FilterFields.from_rows(meta), spec.get("filters"))
        tower = open_sequence_tower(spec["model_uri"], scfg, self.model_id)
        self.sequence = SequenceCatalog(tower, self.emb, self.ids) if tower is not None else None
        self.users: pa.Table | None = None
        self.user_pos: dict[str, int] = {}
        if spec.get("users") is not None:
            import ray

            ref = spec["users"][0]  # in a list: Ray would resolve a bare ref only as a direct argument
            self.users = ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref
            self.user_pos = {u: n for n, u in enumerate(self.users.column("user_id").to_pylist())}
        self.shop = spec.get("shop_uri", "the shop's data")

    def _user(self, user_id: str | None) -> tuple[list[str], list[str]] | None:
        n = self.user_pos.get(user_id) if user_id else None
        if n is None or self.users is None:
            return None
        return self.users.column("history")[n].as_py(), self.users.column("seen")[n].as_py()

    def _prepare(self, r: dict[str, Any]) -> tuple[list[int], list[int], list[str]]:
        """(the history's catalog positions, newest first; excluded catalog positions; unknown
        ids) of a well-formed request."""
        history = list(r["history"] or [])  # newest first
        exclude = set(r["exclude"] or [])
        user = self._user(r["user_id"])
        if user is not None:
            own, seen = user
            history += [h for h in own if h not in history]  # as Serve merges its live profile
            if self.exclude_history:
                exclude.update(seen)
        elif r["user_id"] and not history and not r["query"]:
            raise _BadRow("unknown_user", f"user {r['user_id']!r} is not in {self.shop}, and the row gives no history or query")
        known = [h for h in history if h in self.pos]
        unknown = list(dict.fromkeys([h for h in [*history, *sorted(exclude)] if h not in self.pos]))
        if not known and not r["query"]:
            raise _BadRow("unknown_items", f"none of the {len(history)} history item id(s) is in the catalog (e.g. {unknown[:5]}), and there is no query")
        if self.exclude_history:
            exclude.update(history)
        return [self.pos[h] for h in known], sorted(self.pos[i] for i in exclude if i in self.pos), unknown

    def __call__(self, batch: pa.Table) -> pa.Table:
        from recsys.encoder import render_user_text
        from recsys.retrieval import search

        if "error" not in batch.column_names:  # the reader's raw rows
            batch = parse_requests(batch)
        rows = batch.to_pylist()
        out = [{"user_id": r["user_id"], "query": r["query"], "request_id": r["request_id"], "item_ids": [], "scores": [],
                "model_id": self.model_id, "unknown_item_ids": [], "error": r["error"], "error_detail": r["error_detail"],
                "source": r["source"]} for r in rows]
        # Two paths: the text towers (a query, or a model without a sequence tower) and the
        # sequence tower (a history alone); each row's (row, history rows, excluded) goes to one.
        by_text: list[tuple[int, list[int], list[int]]] = []
        by_sequence: list[tuple[int, list[int], list[int]]] = []
        for n, r in enumerate(rows):
            if r["error"]:
                continue
            try:
                hist, ex, unknown = self._prepare(r)
            except _BadRow as e:
                out[n]["error"], out[n]["error_detail"] = e.reason, e.detail
                continue
            out[n]["unknown_item_ids"] = unknown
            (by_sequence if self.sequence is not None and not r["query"] else by_text).append((n, hist, ex))
        ranked: list[tuple[int, tuple[np.ndarray, np.ndarray]]] = []
        if by_text:
            texts = [render_user_text(rows[n]["query"], [self.texts[i] for i in hist], self.encoder.user_history_items) for n, hist, _ in by_text]
            q = self.encoder.encode_queries(texts, batch_size=self.encode_batch_size)  # (rows, dim)
            ranked += zip([n for n, _, _ in by_text], search(self.emb, q, self.k, self.keep, [ex for _, _, ex in by_text]), strict=True)
        if by_sequence:
            hists, exs = [hist for _, hist, _ in by_sequence], [ex for _, _, ex in by_sequence]
            ranked += zip([n for n, _, _ in by_sequence], self.sequence.rank(hists, self.k, self.keep, exs), strict=True)
        for n, (top, scores) in ranked:
            out[n]["item_ids"] = [self.ids[i] for i in top]
            out[n]["scores"] = scores.tolist()
        table = pa.Table.from_pylist(out, schema=OUTPUT_SCHEMA)
        if table.num_rows != batch.num_rows:  # cannot happen: one output per row by construction
            raise RuntimeError(f"{table.num_rows} rows out for {batch.num_rows} in")
        return table


# ---- the job ----------------------------------------------------------------------------------


def _model_uri(cfg: Config) -> str:
    return cfg.serve.model_uri or paths.export_dir(cfg)


def ensure_index(cfg: Config, model_uri: str, model_id: str) -> str:
    """The index to rank with: serve.index_uri (refused unless this model built it), else the run's
    index, built first (jobs.index) when missing or built by another model, unless
    recommend.build_index=never."""
    from recsys.index import INDEX_META, check_model, index_model_id

    if cfg.serve.index_uri:
        check_model(index_model_id(cfg.serve.index_uri, cfg.storage), model_id, cfg.serve.index_uri)
        return cfg.serve.index_uri
    index = paths.index_dir(cfg)
    found = index_model_id(index, cfg.storage) if storage.exists(storage.join(index, INDEX_META), cfg.storage) else None
    if found == model_id:
        return index
    why = "missing" if found is None else f"built by model {found or '(not recorded)'}, not by {model_id}"
    if cfg.recommend.build_index == "never":
        raise FileNotFoundError(f"the run's index at {index} is {why}: build it (python -m jobs.index), or set recommend.build_index=auto")
    if model_uri != paths.export_dir(cfg):
        raise FileNotFoundError(f"no index for serve.model_uri={model_uri} (the run's index at {index} is {why}): build one for that model and set serve.index_uri")
    from recsys.catalog_index import build_catalog_index

    log.info("the run's index at %s is %s: building it with model %s first (jobs.index)", index, why, model_id)
    built = build_catalog_index(cfg)
    if built["model_id"] != model_id:
        raise RuntimeError(f"the index was built by model {built['model_id']}, but the job started with {model_id}: the export changed meanwhile; run again")
    return index


def _filters(cfg: Config) -> dict[str, Any]:
    r = cfg.recommend
    return {"category": r.category or None, "brand": r.brand or None, "min_price": r.min_price, "max_price": r.max_price}


def request_dataset(cfg: Config, users: pa.Table | None) -> tuple[Any, int, str]:
    """(the requests as a Ray Dataset in blocks of one batch, their count in the input, its name).
    A file's rows are counted by the files' own count (recsys.data.io.count_rows)."""
    import ray.data

    from recsys.data import io

    r = cfg.recommend
    examples_uri = storage.join(paths.data_dir(cfg), "examples")
    if r.input_uri:
        ds = io.read_rows(r.input_uri, cfg.storage, INPUT_COLUMNS, r.input_format, key="recommend.input_uri")
        counted = io.count_rows(r.input_uri, cfg.storage, r.input_format, key="recommend.input_uri")
        rows_in, source = counted["rows"] - counted["blank_lines"], io.describe(r.input_uri)
    else:
        if users is None:
            raise FileNotFoundError(f"no prepared examples under {examples_uri}: run the prepare job first, or give recommend.input_uri (a file of requests)")
        table = shop_requests(users)
        rows_in, source = table.num_rows, f"every user of {examples_uri}"
        if rows_in == 0:
            raise ValueError(f"the examples under {examples_uri} name no user (user_id is empty in every one): "
                             "give recommend.input_uri, a file of requests (histories or queries)")
        ds = ray.data.from_arrow(table)
    # A block is one actor task: a file read as one block would keep every actor but one idle
    # (measured: 2 actors at 0.72x of 1 on a one-file input). Streaming, no shuffle.
    return ds.repartition(target_num_rows_per_block=r.batch_size), rows_in, source


def _read_back(out_uri: str, cfg: Config) -> pa.Table:
    files = [f for f in storage.list_files(out_uri, cfg.storage, ".parquet")]
    if not files:
        return pa.table({"error": pa.array([], pa.string()), "model_id": pa.array([], pa.string())})
    fs, _ = storage.filesystem(out_uri, cfg.storage)
    return pa.concat_tables([pq.read_table(storage.filesystem(f, cfg.storage)[1], filesystem=fs, columns=["error", "model_id"]) for f in files])


def run(cfg: Config) -> dict[str, Any]:
    """The batch job; returns its summary (also written to `<output>/_summary.json`)."""
    import ray.data

    from recsys.encoder import model_id_at
    from recsys.runtime import ensure_ray

    t0 = time.perf_counter()
    r = cfg.recommend
    # No dashboard of its own: only Ray Train needs it (recsys.runtime), and it is the slowest part
    # of a local start on a busy machine. A cluster's (RAY_ADDRESS) is used as it is.
    ensure_ray(cfg=cfg, include_dashboard=False)
    model_uri = _model_uri(cfg)
    try:
        model_id = model_id_at(model_uri, cfg.storage)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"no model to rank with at {model_uri} (serve.model_uri, else the run's export): run the train job first ({e})") from e
    users = shop_users(cfg)
    examples_uri = storage.join(paths.data_dir(cfg), "examples")
    if users is None and r.input_uri:
        log.info("no prepared examples under %s: requests giving only a user_id cannot be ranked", examples_uri)
    requests, rows_in, source = request_dataset(cfg, users)  # a missing input fails here, before any index build
    index_uri = ensure_index(cfg, model_uri, model_id)
    items_uri = cfg.serve.items_uri or paths.items(cfg)

    spec = {
        "model_uri": model_uri, "model_id": model_id, "index_uri": index_uri, "items_uri": items_uri,
        "storage": to_dict(cfg.storage), "k": r.k, "exclude_history": r.exclude_history,
        "encode_batch_size": r.encode_batch_size, "filters": _filters(cfg), "shop_uri": examples_uri,
        # One copy in the object store, shared by the actors of a node.
        "users": [ray.put(users)] if users is not None else None,
    }
    out_uri = paths.recommendations(cfg)
    # The marker first: a later run may replace this folder, and only one holding it.
    storage.clear_dir(out_uri, cfg.storage, marker=SUMMARY_FILE)
    storage.write_json(storage.join(out_uri, SUMMARY_FILE), {"status": "running", "input": source}, cfg.storage)
    log.info("ranking %d request rows from %s with model %s (index %s), %d actor(s); progress: Ray Data's bars",
             rows_in, source, model_id, index_uri, r.actors)
    ranked = requests.map_batches(
        Ranker,
        fn_constructor_kwargs={"spec": spec},
        compute=ray.data.ActorPoolStrategy(size=r.actors),
        batch_size=r.batch_size,
        batch_format="pyarrow",
        num_cpus=r.cpus_per_actor,
        num_gpus=r.gpus_per_actor,
    )
    fs, path = storage.filesystem(out_uri, cfg.storage)
    t_rank = time.perf_counter()
    # try_create_dir only on local disk: a directory marker object makes rclone refuse writes.
    # Files of at least ROWS_PER_FILE rows, not one per batch.
    ranked.write_parquet(path, filesystem=fs, try_create_dir=isinstance(fs, pafs.LocalFileSystem), min_rows_per_file=ROWS_PER_FILE)
    rank_s = time.perf_counter() - t_rank

    written = _read_back(out_uri, cfg)
    errors = dict(sorted(collections.Counter(e for e in written.column("error").to_pylist() if e is not None).items()))
    models = sorted(set(written.column("model_id").to_pylist()))
    summary = {
        "status": "done", "input": source, "output": out_uri, "rows_in": rows_in, "rows_out": written.num_rows,
        "ranked": written.num_rows - sum(errors.values()), "errors": errors, "model_id": model_id,
        "model": model_uri, "index": index_uri, "items": items_uri, "k": r.k, "exclude_history": r.exclude_history,
        "filters": {k: v for k, v in _filters(cfg).items() if v is not None}, "actors": r.actors,
        "rank_s": round(rank_s, 2), "rows_per_s": round(written.num_rows / rank_s, 1) if rank_s > 0 else None,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    storage.write_json(storage.join(out_uri, SUMMARY_FILE), summary, cfg.storage)
    if written.num_rows != rows_in:
        raise RuntimeError(f"{rows_in} request rows in {source}, but {written.num_rows} rows written to {out_uri}: rows were lost or duplicated")
    if models != [model_id]:
        raise RuntimeError(f"rows ranked by models {models}, the job started with {model_id}: the export changed meanwhile; run again")
    log.info("%d rows -> %s in %.1fs (%s rows/s): %d ranked, errors %s", written.num_rows, out_uri, rank_s,
             summary["rows_per_s"], summary["ranked"], errors or "none")
    return summary


def head(out_uri: str, cfg: Config, n: int = 5) -> list[dict[str, Any]]:
    """The first `n` rows of the job's output (for printing)."""
    files = storage.list_files(out_uri, cfg.storage, ".parquet")
    rows: list[dict[str, Any]] = []
    fs, _ = storage.filesystem(out_uri, cfg.storage)
    for f in files:
        rows += pq.read_table(storage.filesystem(f, cfg.storage)[1], filesystem=fs).slice(0, n - len(rows)).to_pylist()
        if len(rows) >= n:
            break
    return rows


def rank_in_process(cfg: Config, requests: Sequence[dict[str, Any]] | pa.Table) -> pa.Table:
    """The same ranking in this process, without Ray Data (tests, the benchmark's baseline):
    REQUEST_SCHEMA rows (or raw reader rows) -> OUTPUT_SCHEMA rows, in order."""
    from recsys.encoder import model_id_at

    model_uri = _model_uri(cfg)
    model_id = model_id_at(model_uri, cfg.storage)
    users = shop_users(cfg)
    table = requests if isinstance(requests, pa.Table) else pa.Table.from_pylist(list(requests), schema=REQUEST_SCHEMA)
    r = cfg.recommend
    ranker = Ranker({
        "model_uri": model_uri, "model_id": model_id, "index_uri": ensure_index(cfg, model_uri, model_id),
        "items_uri": cfg.serve.items_uri or paths.items(cfg), "storage": to_dict(cfg.storage), "k": r.k,
        "exclude_history": r.exclude_history, "encode_batch_size": r.encode_batch_size, "filters": _filters(cfg),
        "users": [users] if users is not None else None,
    })
    return pa.concat_tables([ranker(table.slice(s, r.batch_size)) for s in range(0, max(1, table.num_rows), r.batch_size)])
