"""What the app takes: its typed arguments (AppArgs) and the HTTP request bodies.

Both are pydantic models, so a bad config fails when the app is built and a bad request gets a
422 naming the field (serve/app.py's handler), before any model code runs."""

# No `from __future__ import annotations` here: FastAPI resolves the request models of a
# class-based Serve ingress from real (not string) annotations.

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from recsys.config import ServeArgs

MAX_K = 1000
MAX_QUERY_CHARS = 1000
MAX_ITEM_IDS = 1000
# Request bodies above this are refused with 413 before they are parsed (the largest valid body,
# 1,000 ids of 200 characters, is ~0.2 MB).
MAX_BODY_BYTES = 1 << 20


class Body(BaseModel):
    """A request body: an unknown field is an error naming it (a typo such as `filter` for
    `filters` must not be silently ignored), and so are a non-finite number and a value of
    another JSON type."""

    # NaN and infinities are not JSON (Python's parser accepts them): refused, not compared.
    # Strict: `"k": true` or `"k": "10"` is an error, not silently 1 or 10.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class AppArgs(ServeArgs):
    """The app's typed arguments: the config's serve-section fields (recsys.config.ServeArgs:
    URIs, auth, batching, replicas and their resources; unknown keys rejected) plus what only
    the app takes. No credentials: replicas read the object store's keys from their environment
    (the cluster's secret store), so none sits in the Serve config or the deployment args."""

    batching: bool = True
    max_history: int = Field(50, ge=1)
    # Name of the detached actor holding live profiles; apps sharing it share users' profiles.
    # It also names the store's log file (<profile_log_dir>/<profile_store>.jsonl).
    profile_store: str = Field("recsys-profiles", pattern=r"^[A-Za-z0-9._-]{1,200}$")
    # The profile log is rewritten as one snapshot line per user past this many lines.
    profile_log_compact_lines: int = Field(10_000, ge=1)
    s3_endpoint: str = ""
    s3_max_attempts: int = Field(10, ge=1)  # storage.s3_max_attempts: a replica loading rides out an S3 restart


class Filters(Body):
    category: str | None = Field(None, max_length=500, description="prefix of the category path")
    brand: str | None = Field(None, max_length=200)
    min_price: float | None = Field(None, ge=0)
    max_price: float | None = Field(None, ge=0)


class SearchRequest(Body):
    query: str = Field(min_length=1, max_length=MAX_QUERY_CHARS)
    k: int = Field(10, ge=1, le=MAX_K)
    filters: Filters | None = None
    # dense (the towers), lexical (BM25) or hybrid (both fused); None = the app's `search_mode`.
    mode: Literal["dense", "lexical", "hybrid"] | None = None

    @model_validator(mode="after")
    def _not_blank(self) -> "SearchRequest":
        if not self.query.strip():
            raise ValueError("query is empty")
        return self


class Event(Body):
    item_id: str = Field(min_length=1, max_length=200)
    event_type: Literal["view", "click", "add_to_cart", "purchase"]
    timestamp: float | None = None


class RecommendRequest(Body):
    user_id: str | None = Field(None, max_length=200)
    recent_item_ids: list[str] = Field(default_factory=list, max_length=MAX_ITEM_IDS, description="oldest first")
    k: int = Field(10, ge=1, le=MAX_K)
    include_purchased: bool = False
    filters: Filters | None = None

    @model_validator(mode="after")
    def _someone(self) -> "RecommendRequest":
        if not self.user_id and not self.recent_item_ids:
            raise ValueError("give user_id and/or recent_item_ids")
        return self


class ScoreRequest(Body):
    query: str | None = Field(None, max_length=MAX_QUERY_CHARS)
    user_id: str | None = Field(None, max_length=200)
    recent_item_ids: list[str] = Field(default_factory=list, max_length=MAX_ITEM_IDS)
    item_ids: list[str] = Field(min_length=1, max_length=MAX_ITEM_IDS)

    @model_validator(mode="after")
    def _something(self) -> "ScoreRequest":
        if not (self.query and self.query.strip()) and not self.user_id and not self.recent_item_ids:
            raise ValueError("give a query, a user_id or recent_item_ids")
        return self


class EventsRequest(Body):
    user_id: str = Field(min_length=1, max_length=200)
    events: list[Event] = Field(min_length=1, max_length=MAX_ITEM_IDS)
