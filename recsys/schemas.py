"""The canonical schemas every shop's data is turned into (pyarrow).

Behaviour events
    user_id      string, required       who acted
    session_id   string, required       groups the events of one visit
    timestamp    timestamp[ms, UTC]     when; must parse and lie within [1990, now + 1 day]
    event_type   string, required       one of EVENT_TYPES (view < click < add_to_cart < purchase)
    query        string, nullable       the search query when the event came from a search
    item_id      string, required       must exist in the catalog
    extra        string (JSON), nullable  any other fields of the source row, kept verbatim

Catalog
    item_id      string, required, unique
    title        string, required
    description  string, nullable
    brand        string, nullable
    category     string, nullable       category path, levels separated by " > "
    price        float64, nullable
    attributes   string (JSON object), nullable  free-form key/value attributes

Quarantine (rows that failed validation; nothing is dropped silently)
    source       string   file or dataset the row came from
    reason       string   one of QUARANTINE_REASONS
    detail       string   human-readable specifics (which field, which value)
    raw          string   the original row as JSON: an object of its fields, or, for a line the
                          reader could not split into fields (unparsable JSON, a CSV row with
                          the wrong number of fields), the line itself as a JSON string

Items (the prepared catalog used by training, evaluation and serving)
    item_id, title, brand, category, price (as in the catalog)
    text         string   rendered item text (recsys.data.text.render_item_text)
    dup_group    int64    near-duplicate group id; items in one group are never negatives
                          for each other. A singleton's group is its own index.
    popularity   int64    number of positive training examples with this item as target

Training examples (search pairs and next-item sequences share one schema)
    kind         string   "search" | "next_item"
    user_id      string, nullable
    query        string, nullable   the search query (search pairs only)
    history      list<string>       the user's earlier engaged item ids, NEWEST FIRST,
                                    truncated to data.max_history
    item_id      string   the positive (engaged / next) item
    weight       float32  event-strength weight (purchase > add_to_cart > click)
    timestamp    timestamp[ms, UTC] when the positive happened
    relevance    float32, nullable  graded relevance when the source has it (Home Depot)
"""

from __future__ import annotations

import pyarrow as pa

EVENT_TYPES: tuple[str, ...] = ("view", "click", "add_to_cart", "purchase")

TS = pa.timestamp("ms", tz="UTC")

EVENTS_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("session_id", pa.string(), nullable=False),
        pa.field("timestamp", TS, nullable=False),
        pa.field("event_type", pa.string(), nullable=False),
        pa.field("query", pa.string()),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("extra", pa.string()),
    ]
)

CATALOG_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("title", pa.string(), nullable=False),
        pa.field("description", pa.string()),
        pa.field("brand", pa.string()),
        pa.field("category", pa.string()),
        pa.field("price", pa.float64()),
        pa.field("attributes", pa.string()),
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("detail", pa.string()),
        pa.field("raw", pa.string()),
    ]
)

QUARANTINE_REASONS: tuple[str, ...] = (
    "missing_id",
    "unknown_event_type",
    "bad_timestamp",
    "unknown_item",
    "bad_encoding",
    "wrong_type",
    "duplicate_item_id",
    # The last line of a JSONL file has no newline and does not parse: the export was cut off.
    "truncated_line",
)

ITEMS_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("title", pa.string()),
        pa.field("brand", pa.string()),
        pa.field("category", pa.string()),
        pa.field("price", pa.float64()),
        pa.field("text", pa.string(), nullable=False),
        pa.field("dup_group", pa.int64(), nullable=False),
        pa.field("popularity", pa.int64(), nullable=False),
    ]
)

EXAMPLES_SCHEMA = pa.schema(
    [
        pa.field("kind", pa.string(), nullable=False),
        pa.field("user_id", pa.string()),
        pa.field("query", pa.string()),
        pa.field("history", pa.list_(pa.string())),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("weight", pa.float32(), nullable=False),
        pa.field("timestamp", TS),
        pa.field("relevance", pa.float32()),
    ]
)

SPLITS: tuple[str, ...] = ("train", "valid", "test")
EXAMPLE_KINDS: tuple[str, ...] = ("search", "next_item")
