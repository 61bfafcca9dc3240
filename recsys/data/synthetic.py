"""The embedded default: a seeded synthetic shop that behaves like a real one, only smaller.

Catalog text reads like real products (category paths, brands, features, descriptions) with
near-duplicate variants in colours and sizes; popularity is Zipf-skewed; users keep stable
tastes (a few categories and a favourite brand); search sessions issue queries made of words of
the product they want (sometimes with a typo) and walk the view -> click -> add_to_cart ->
purchase funnel; browse sessions do the same without a query. A small planted share of rows is
malformed in every way the validator rejects. Events are written as JSONL shards (a common
export format that can carry wrongly typed fields), the catalog as parquet.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any

import numpy as np
import pyarrow as pa

from recsys import storage
from recsys.config import DataConfig, StorageConfig
from recsys.schemas import CATALOG_SCHEMA

log = logging.getLogger(__name__)

CATEGORIES: dict[str, dict[str, list[str]]] = {
    "Sports > Running > Shoes": {
        "nouns": ["Running Shoe", "Trail Running Shoe", "Racing Flat", "Walking Shoe"],
        "features": ["Lightweight", "Cushioned", "Waterproof", "Breathable Mesh", "Wide Fit"],
        "brands": ["Stridex", "Peakline", "Velora"],
    },
    "Home > Kitchen > Coffee": {
        "nouns": ["Burr Coffee Grinder", "Espresso Machine", "French Press", "Pour-Over Kettle", "Milk Frother"],
        "features": ["Stainless Steel", "Programmable", "Compact", "Glass", "Electric"],
        "brands": ["Brewmont", "Caffelo", "Morning Co"],
    },
    "Electronics > Audio > Headphones": {
        "nouns": ["Wireless Headphones", "Noise Cancelling Earbuds", "Studio Headphones", "Sports Earbuds"],
        "features": ["Bluetooth 5.3", "Over-Ear", "40h Battery", "Foldable", "Sweatproof"],
        "brands": ["Sonique", "Auralink", "Bassway"],
    },
    "Outdoors > Camping > Shelter": {
        "nouns": ["Dome Tent", "Backpacking Tent", "Sleeping Bag", "Camping Hammock", "Tarp Shelter"],
        "features": ["2-Person", "Ultralight", "Four Season", "Waterproof", "Quick Setup"],
        "brands": ["Trailhaven", "Northpine", "Basecamp Gear"],
    },
    "Beauty > Skincare > Face": {
        "nouns": ["Daily Moisturizer", "Mineral Sunscreen SPF 50", "Vitamin C Serum", "Gentle Cleanser"],
        "features": ["Fragrance-Free", "Hydrating", "Oil-Free", "For Sensitive Skin", "Vegan"],
        "brands": ["Dermalux", "Purelle", "Glowfield"],
    },
    "Tools > Power Tools > Drills": {
        "nouns": ["Cordless Drill", "Impact Driver", "Hammer Drill", "Right Angle Drill"],
        "features": ["20V", "Brushless", "Compact", "2-Speed", "With Battery Kit"],
        "brands": ["Torqmax", "Buildright", "Voltcraft Pro"],
    },
    "Pets > Dogs > Beds": {
        "nouns": ["Orthopedic Dog Bed", "Calming Donut Bed", "Elevated Dog Cot", "Crate Mat"],
        "features": ["Memory Foam", "Washable Cover", "Non-Slip", "Waterproof Liner", "Chew Resistant"],
        "brands": ["Pawsome", "Barkwell", "Snugglepup"],
    },
    "Office > Furniture > Chairs": {
        "nouns": ["Ergonomic Office Chair", "Mesh Task Chair", "Gaming Chair", "Drafting Stool"],
        "features": ["Lumbar Support", "Adjustable Armrests", "High Back", "Headrest", "Swivel"],
        "brands": ["Sitwell", "Posturo", "Deskmate"],
    },
    "Garden > Watering > Hoses": {
        "nouns": ["Expandable Garden Hose", "Soaker Hose", "Hose Reel Cart", "Spray Nozzle"],
        "features": ["50 ft", "Kink-Free", "Brass Fittings", "Lightweight", "10 Patterns"],
        "brands": ["Greenflow", "Aquaverde", "Yardpro"],
    },
    "Home > Bedding > Sheets": {
        "nouns": ["Cotton Sheet Set", "Linen Duvet Cover", "Bamboo Pillowcase", "Fitted Sheet"],
        "features": ["400 Thread Count", "Cooling", "Deep Pocket", "Organic", "Wrinkle-Resistant"],
        "brands": ["Dreamweave", "Linenhaus", "Cozynest"],
    },
}
COLOURS = ["Black", "White", "Grey", "Blue", "Red", "Green", "Beige", "Navy"]
SIZES = ["Small", "Medium", "Large", "XL"]
BAD_REASONS = ("missing_id", "unknown_event_type", "bad_timestamp", "unknown_item", "bad_encoding", "wrong_type")
START = dt.datetime(2026, 6, 1, tzinfo=dt.timezone.utc)
DAYS = 60


def _typo(word: str, rng: np.random.Generator) -> str:
    if len(word) < 5:
        return word
    i = int(rng.integers(1, len(word) - 2))
    return word[:i] + word[i + 1] + word[i] + word[i + 2 :]


def make_catalog(n_items: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cats = list(CATEGORIES)
    while len(items) < n_items:
        cat = cats[int(rng.integers(len(cats)))]
        spec = CATEGORIES[cat]
        brand = spec["brands"][int(rng.integers(len(spec["brands"])))]
        noun = spec["nouns"][int(rng.integers(len(spec["nouns"])))]
        feats = list(rng.choice(spec["features"], size=2, replace=False))
        base = f"{brand} {feats[0]} {noun}"
        price = round(float(np.exp(rng.normal(3.5, 0.7))), 2)
        desc = (
            f"The {base.lower()} is {feats[0].lower()} and {feats[1].lower()}. "
            f"Designed by {brand} for everyday use; rated highly in {cat.split(' > ')[-1].lower()}."
        )
        # ~30% of products come in several colours/sizes: near-duplicate catalog entries.
        n_var = int(rng.integers(2, 5)) if rng.random() < 0.3 else 1
        colours = rng.choice(COLOURS, size=n_var, replace=False)
        size = SIZES[int(rng.integers(len(SIZES)))]
        for colour in colours:
            if len(items) >= n_items:
                break
            title = f"{base} - {colour}" + (f", {size}" if n_var > 1 else "")
            items.append(
                {
                    "item_id": f"P{len(items):06d}",
                    "title": title,
                    "description": desc,
                    "brand": brand,
                    "category": cat,
                    "price": price,
                    "attributes": json.dumps({"colour": str(colour), "feature": feats[1], "size": size}),
                }
            )
    return items


def _event(user: str, session: str, ts: dt.datetime, etype: str, item: str, query: str | None) -> dict[str, Any]:
    return {
        "user_id": user,
        "session_id": session,
        "timestamp": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "event_type": etype,
        "query": query,
        "item_id": item,
    }


def make_events(items: list[dict[str, Any]], cfg: DataConfig, rng: np.random.Generator) -> list[dict[str, Any]]:
    n = len(items)
    # Zipf-like popularity over a random permutation of items.
    pop = 1.0 / np.arange(1, n + 1) ** 1.1
    pop = pop[rng.permutation(n)]
    by_cat: dict[str, np.ndarray] = {}
    for cat in CATEGORIES:
        by_cat[cat] = np.array([i for i, it in enumerate(items) if it["category"] == cat], dtype=np.int64)
    cats = [c for c in CATEGORIES if len(by_cat[c])]
    events: list[dict[str, Any]] = []
    for u in range(cfg.synthetic_users):
        user = f"U{u:05d}"
        likes = list(rng.choice(cats, size=min(2, len(cats)), replace=False))
        fav_brand = CATEGORIES[likes[0]]["brands"][int(rng.integers(3))]
        n_sessions = 1 + int(rng.poisson(cfg.synthetic_sessions_per_user))
        times = sorted(START + dt.timedelta(seconds=float(s)) for s in rng.uniform(0, DAYS * 86400, n_sessions))
        for s, t0 in enumerate(times):
            session = f"{user}-S{s:03d}"
            cat = likes[0] if rng.random() < 0.7 else likes[-1]
            cand = by_cat[cat]
            w = pop[cand] * np.array([3.0 if items[i]["brand"] == fav_brand else 1.0 for i in cand])
            target = int(rng.choice(cand, p=w / w.sum()))
            it = items[target]
            query = None
            if rng.random() < 0.6:
                noun_words = it["title"].split(" - ")[0].split()
                words = noun_words[-2:] if rng.random() < 0.6 else noun_words[-1:]
                if rng.random() < 0.4:
                    words = [it["brand"].split()[0], *words]
                if rng.random() < 0.3:
                    words = [json.loads(it["attributes"])["colour"], *words]
                words = [w.lower() for w in words]
                if rng.random() < 0.1:
                    words[-1] = _typo(words[-1], rng)
                query = " ".join(words)
            k = min(len(cand), 4)
            shown = [target, *[int(x) for x in rng.choice(cand, size=k, replace=False) if x != target]][:k]
            t = t0
            for i in rng.permutation(shown):
                t += dt.timedelta(seconds=float(rng.uniform(2, 30)))
                events.append(_event(user, session, t, "view", items[int(i)]["item_id"], query))
            clicked = [target] if rng.random() < 0.85 else []
            clicked += [int(i) for i in shown if i != target and rng.random() < 0.15]
            for i in clicked:
                t += dt.timedelta(seconds=float(rng.uniform(5, 60)))
                events.append(_event(user, session, t, "click", items[i]["item_id"], query))
                if rng.random() < 0.45:
                    t += dt.timedelta(seconds=float(rng.uniform(10, 120)))
                    events.append(_event(user, session, t, "add_to_cart", items[i]["item_id"], query))
                    if rng.random() < 0.55:
                        t += dt.timedelta(seconds=float(rng.uniform(30, 300)))
                        events.append(_event(user, session, t, "purchase", items[i]["item_id"], query))
    return events


def plant_bad_rows(events: list[dict[str, Any]], share: float, rng: np.random.Generator) -> dict[str, int]:
    """Append malformed rows, each otherwise valid and failing exactly one check."""
    n_bad = int(round(len(events) * share))
    counts = {r: 0 for r in BAD_REASONS}
    if n_bad == 0:
        return counts
    for k in range(n_bad):
        reason = BAD_REASONS[k % len(BAD_REASONS)]
        row = dict(events[int(rng.integers(len(events)))])
        if reason == "missing_id":
            row["user_id"] = None if k % 2 else ""
        elif reason == "unknown_event_type":
            row["event_type"] = "wishlist"
        elif reason == "bad_timestamp":
            row["timestamp"] = "not-a-date" if k % 2 else "1970-01-01T00:00:00Z"
        elif reason == "unknown_item":
            row["item_id"] = f"GHOST{k:05d}"
        elif reason == "bad_encoding":
            row["query"] = "caf\ufffd\ufffd shoes"
        elif reason == "wrong_type":
            row["item_id"] = 1000 + k
        counts[reason] += 1
        events.insert(int(rng.integers(len(events) + 1)), row)
    return counts


def generate_shop(cfg: DataConfig, out_uri: str, storage_cfg: StorageConfig) -> dict[str, Any]:
    """Write `{out_uri}/events/part-*.jsonl` and `{out_uri}/catalog/part-00000.parquet`."""
    rng = np.random.default_rng(cfg.seed)
    items = make_catalog(cfg.synthetic_items, rng)
    events = make_events(items, cfg, rng)
    bad = plant_bad_rows(events, cfg.synthetic_bad_row_share, rng)
    shards = max(1, cfg.synthetic_shards)
    per = (len(events) + shards - 1) // shards
    for s in range(shards):
        chunk = events[s * per : (s + 1) * per]
        body = "\n".join(json.dumps(e, ensure_ascii=False) for e in chunk) + "\n"
        storage.write_bytes(storage.join(out_uri, "events", f"part-{s:05d}.jsonl"), body.encode(), storage_cfg)
    table = pa.Table.from_pylist(items, schema=CATALOG_SCHEMA)
    storage.write_parquet(table, storage.join(out_uri, "catalog", "part-00000.parquet"), storage_cfg)
    summary = {
        "events": len(events),
        "catalog_items": len(items),
        "users": cfg.synthetic_users,
        "sessions": len({e["session_id"] for e in events if e.get("session_id")}),
        "bad_rows_planted": bad,
        "event_shards": shards,
    }
    log.info("synthetic shop written to %s: %s", out_uri, summary)
    return summary
