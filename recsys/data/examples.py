"""Training examples from clean events: search pairs and next-item sequences, with their splits.

The per-group functions are pure (a table of events in, example rows out) so they are tested row
by row without Ray; `build_examples` wires them into Ray Data with a groupby on user_id (search
pairs need the user's earlier positives as history, so the group is the user, whose events hold
all of that user's sessions).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from recsys.config import DataConfig
from recsys.schemas import EXAMPLE_KINDS, EXAMPLES_SCHEMA, SPLITS, TS

SPLIT_FIELD = pa.field("split", pa.string(), nullable=False)
# Examples as built: EXAMPLES_SCHEMA plus the split they belong to (dropped when written).
EXAMPLES_WITH_SPLIT = EXAMPLES_SCHEMA.append(SPLIT_FIELD)


@dataclass(frozen=True)
class TimeCutoffs:
    """Events at or after `test` are test; at or after `valid` (and before test) valid."""

    valid: dt.datetime
    test: dt.datetime

    @staticmethod
    def from_range(t_min: dt.datetime, t_max: dt.datetime, cfg: DataConfig) -> TimeCutoffs:
        span = t_max - t_min
        return TimeCutoffs(
            valid=t_max - span * (cfg.valid_fraction + cfg.test_fraction),
            test=t_max - span * cfg.test_fraction,
        )

    def split(self, t: dt.datetime) -> str:
        return "test" if t >= self.test else "valid" if t >= self.valid else "train"


def _relevance(extra: str | None) -> float | None:
    """Graded relevance some sources carry in `extra` (Home Depot's 1-3 human judgements)."""
    if not extra or "relevance" not in extra:
        return None
    try:
        v = json.loads(extra).get("relevance")
    except (ValueError, AttributeError):
        return None
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            return None
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _given_split(extra: str | None) -> str | None:
    """A split fixed by the source (Home Depot: by query, so no test query is seen in training)."""
    if not extra or "split" not in extra:
        return None
    try:
        v = json.loads(extra).get("split")
    except (ValueError, AttributeError):
        return None
    return v if v in ("train", "valid", "test") else None


def _sorted_rows(events: pa.Table) -> list[dict[str, Any]]:
    rows = events.to_pylist()
    # Stable sort: events with equal timestamps keep their log order.
    return sorted(rows, key=lambda r: r["timestamp"])


def _positive_runs(rows: list[dict[str, Any]], cfg: DataConfig) -> list[dict[str, Any]]:
    """Positives in time order with consecutive repeats of one item collapsed into one entry.

    A click -> add_to_cart -> purchase of one item is one step of the sequence, carrying the
    strongest weight of the run and the time of its first event. With data.collapse_repeats
    off every positive is a step (repeat purchases are kept, as Amazon's published split does).
    """
    runs: list[dict[str, Any]] = []
    for r in rows:
        w = float(cfg.event_weights.get(r["event_type"], 0.0))
        if w < cfg.min_positive_weight:
            continue
        if cfg.collapse_repeats and runs and runs[-1]["item_id"] == r["item_id"]:
            last = runs[-1]
            if w > last["weight"]:
                last["weight"] = w
                last["relevance"] = _relevance(r.get("extra"))
            continue
        runs.append(
            {
                "item_id": r["item_id"],
                "user_id": r["user_id"],
                "timestamp": r["timestamp"],
                "weight": w,
                "relevance": _relevance(r.get("extra")),
            }
        )
    return runs


def _table(rows: list[dict[str, Any]]) -> pa.Table:
    if not rows:
        return EXAMPLES_WITH_SPLIT.empty_table()
    return pa.Table.from_pylist(rows, schema=EXAMPLES_WITH_SPLIT)


def sequence_examples(
    user_events: pa.Table, cfg: DataConfig, cutoffs: TimeCutoffs | None = None
) -> pa.Table:
    """Next-item examples of ONE user (EXAMPLES_SCHEMA + `split`).

    Positives (weight >= data.min_positive_weight) ordered by time, consecutive repeats of one
    item collapsed; every position i >= 1 gives (history = items[:i] newest first, truncated to
    data.max_history) -> items[i]. Leave-one-out: last example test, second-to-last valid, rest
    train; users with fewer than 3 positives only give train rows. With
    data.sequence_split == "time" the split comes from `cutoffs` (train if none).
    """
    if cfg.sequence_split not in ("leave_one_out", "time"):
        raise ValueError(
            f"data.sequence_split must be 'leave_one_out' or 'time', got {cfg.sequence_split!r}"
        )
    runs = _positive_runs(_sorted_rows(user_events), cfg)
    items = [r["item_id"] for r in runs]
    n = len(items)
    out: list[dict[str, Any]] = []
    for i in range(1, n):
        r = runs[i]
        if cfg.sequence_split == "leave_one_out":
            split = "train"
            if n >= 3 and i == n - 1:
                split = "test"
            elif n >= 3 and i == n - 2:
                split = "valid"
        else:
            split = cutoffs.split(r["timestamp"]) if cutoffs else "train"
        out.append(
            {
                "kind": "next_item",
                "user_id": r["user_id"],
                "query": None,
                "history": items[:i][::-1][: cfg.max_history],
                "item_id": r["item_id"],
                "weight": r["weight"],
                "timestamp": r["timestamp"],
                "relevance": r["relevance"],
                "split": split,
            }
        )
    return _table(out)


def search_examples(
    session_events: pa.Table, cfg: DataConfig, cutoffs: TimeCutoffs | None = None
) -> pa.Table:
    """Search pairs from the events of one session or of all sessions of one user.

    One example per (session, query, item) among positives that carry a query, with the
    strongest event's weight (and that event's time); history = the positives in the given
    events strictly before the first event of that (session, query), newest first (pass a
    user's whole log to get the user's full history). Split by the source's own split in
    `extra` if any, else by `cutoffs` on the event's time (train if none).

    In the valid and test splits every JUDGED event (a relevance grade in `extra`, as Home
    Depot's 1-3) gives an example whatever its weight: evaluation needs a query's irrelevant
    judged items too (the re-rank protocol ranks all of them; gain = relevance - 1 can be 0).
    Training examples stay positives only.
    """
    rows = _sorted_rows(session_events)
    runs = _positive_runs(rows, cfg)
    best: dict[tuple[str, str, str], dict[str, Any]] = {}
    first_seen: dict[tuple[str, str], dt.datetime] = {}
    for r in rows:
        q = r.get("query")
        if q is None or not q.strip():
            continue
        first_seen.setdefault((r["session_id"], q), r["timestamp"])
        w = float(cfg.event_weights.get(r["event_type"], 0.0))
        relevance = _relevance(r.get("extra"))
        split = _given_split(r.get("extra")) or (cutoffs.split(r["timestamp"]) if cutoffs else "train")
        if w < cfg.min_positive_weight and (relevance is None or split == "train"):
            continue
        key = (r["session_id"], q, r["item_id"])
        if key not in best or w > best[key]["weight"]:
            best[key] = {"weight": w, "row": r, "relevance": relevance, "split": split}
    out: list[dict[str, Any]] = []
    for (session, q, item), b in best.items():
        r = b["row"]
        start = first_seen[(session, q)]
        history = [p["item_id"] for p in runs if p["timestamp"] < start][::-1]
        out.append(
            {
                "kind": "search",
                "user_id": r["user_id"],
                "query": q,
                "history": history[: cfg.max_history],
                "item_id": item,
                "weight": b["weight"],
                "timestamp": r["timestamp"],
                "relevance": b["relevance"],
                "split": b["split"],
            }
        )
    return _table(out)


def user_examples(events: pa.Table, cfg: DataConfig, cutoffs: TimeCutoffs | None) -> pa.Table:
    """Both kinds of examples of ONE user (the map_groups function)."""
    return pa.concat_tables(
        [sequence_examples(events, cfg, cutoffs), search_examples(events, cfg, cutoffs)]
    )


def _as_dt(value: Any) -> dt.datetime:
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
    if hasattr(value, "to_pydatetime"):
        return _as_dt(value.to_pydatetime())
    return pc.cast(pa.scalar(value), TS).as_py()


def time_cutoffs(clean_events: Any, cfg: DataConfig) -> TimeCutoffs | None:
    """Global time cutoffs over a clean events Dataset (None when it is empty).

    One pass of vectorised per-block min/max, merged on the driver (no shuffle).
    """
    import ray

    def partial(b: pa.Table) -> pa.Table:
        mm = pc.min_max(b["timestamp"])
        return pa.table({"lo": pa.array([mm["min"].as_py()], TS), "hi": pa.array([mm["max"].as_py()], TS)})

    parts = ray.get(clean_events.map_batches(partial, batch_format="pyarrow").to_arrow_refs())
    # Empty blocks come back as tables without columns.
    parts = [p.select(["lo", "hi"]) for p in parts if p.num_rows and "lo" in p.column_names]
    if not parts:
        return None
    t = pa.concat_tables(parts)
    lo, hi = pc.min(t["lo"]).as_py(), pc.max(t["hi"]).as_py()
    if lo is None or hi is None:
        return None
    return TimeCutoffs.from_range(_as_dt(lo), _as_dt(hi), cfg)


def build_all_examples(clean_events: Any, cfg: DataConfig, num_partitions: int | None = None) -> Any:
    """Ray Data: every example (EXAMPLES_WITH_SPLIT) by a groupby on user_id + map_groups.

    `num_partitions` sizes the hash shuffle (None: the input's block count when it is
    materialised, else Ray's default)."""
    from ray.data.dataset import MaterializedDataset

    cutoffs = time_cutoffs(clean_events, cfg)

    def per_user(batch: pa.Table) -> pa.Table:
        return user_examples(batch, cfg, cutoffs)

    if num_partitions is None and isinstance(clean_events, MaterializedDataset):
        # One shuffle partition per block: Ray's default (200) costs seconds per stage on a
        # small machine and buys nothing for small logs.
        num_partitions = max(1, clean_events.num_blocks())
    return clean_events.groupby("user_id", num_partitions=num_partitions).map_groups(
        per_user, batch_format="pyarrow"
    )


def split_examples(all_examples: Any) -> dict[tuple[str, str], Any]:
    """(kind, split) -> Dataset in EXAMPLES_SCHEMA (the split column dropped)."""
    out: dict[tuple[str, str], Any] = {}
    for kind in EXAMPLE_KINDS:
        for split in SPLITS:

            def pick(b: pa.Table, k: str = kind, s: str = split) -> pa.Table:
                if "kind" not in b.column_names:  # an empty block without columns
                    return EXAMPLES_SCHEMA.empty_table()
                mask = pc.and_(pc.equal(b["kind"], k), pc.equal(b["split"], s))
                return b.filter(mask).select(EXAMPLES_SCHEMA.names).cast(EXAMPLES_SCHEMA)

            out[(kind, split)] = all_examples.map_batches(pick, batch_format="pyarrow")
    return out


def build_examples(clean_events: Any, cfg: DataConfig) -> dict[tuple[str, str], Any]:
    """Ray Data wiring: clean events Dataset -> {(kind, split): Dataset of EXAMPLES_SCHEMA}.

    The examples are materialised once and then filtered per (kind, split).
    """
    return split_examples(build_all_examples(clean_events, cfg).materialize())
