"""Item text rendered from catalog fields: the one place that decides what the item tower reads."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

MAX_DESCRIPTION_CHARS = 300
MAX_ATTRIBUTES = 6


def _attributes(value: Any) -> dict[str, Any]:
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, str) and value.strip():
        try:
            parsed = json.loads(value)
        except ValueError:
            return {}
        return parsed if isinstance(parsed, dict) else {}
    return {}


def render_item_text(row: Mapping[str, Any]) -> str:
    """Title first (it carries most signal and must survive truncation), then brand, category
    path, a few attributes and the start of the description."""
    parts: list[str] = []
    title = (row.get("title") or "").strip()
    if title:
        parts.append(title)
    brand = (row.get("brand") or "").strip()
    if brand and brand.lower() not in title.lower():
        parts.append(f"Brand: {brand}")
    category = (row.get("category") or "").strip()
    if category:
        parts.append(f"Category: {category}")
    attrs = _attributes(row.get("attributes"))
    if attrs:
        kv = [f"{k}: {v}" for k, v in list(attrs.items())[:MAX_ATTRIBUTES] if v not in (None, "")]
        if kv:
            parts.append("; ".join(kv))
    desc = (row.get("description") or "").strip()
    if desc:
        parts.append(desc[:MAX_DESCRIPTION_CHARS])
    return ". ".join(parts)
