"""The embedded default: a seeded synthetic shop that behaves like a real one, only smaller.

Catalog text reads like real products (category paths, brands, features, descriptions) with
near-duplicate variants in colours and sizes; popularity is Zipf-skewed; users keep stable
tastes (a few categories and a favourite brand); search sessions issue queries made of words of
the product they want (sometimes with a typo) and walk the view -> click -> add_to_cart ->
purchase funnel; browse sessions do the same without a query. A small planted share of rows is
malformed in every way the validator rejects. Events are written as JSONL shards (a common
export format that can carry wrongly typed fields), the catalog as parquet.

`data.synthetic_locale` picks the catalog's language: "en" (default) or "zh", the same shop
with Chinese titles, brands, category paths, attributes and descriptions, written the way
Chinese shops write them (no space between a feature and its noun), and Chinese queries
(mostly typed without spaces).
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

# The same shop in Chinese: one entry per English category, in the same order.
CATEGORIES_ZH: dict[str, dict[str, list[str]]] = {
    "运动户外 > 跑步 > 跑鞋": {
        "nouns": ["跑步鞋", "越野跑鞋", "竞速跑鞋", "健步鞋"],
        "features": ["轻量", "缓震", "防水", "透气网面", "宽楦"],
        "brands": ["迅跑", "峰线", "维乐"],
    },
    "家居 > 厨房 > 咖啡": {
        "nouns": ["磨豆机", "意式咖啡机", "法压壶", "手冲壶", "奶泡机"],
        "features": ["不锈钢", "可预约", "小巧", "玻璃", "电动"],
        "brands": ["布鲁蒙", "咖乐", "晨光"],
    },
    "数码 > 影音 > 耳机": {
        "nouns": ["无线耳机", "降噪耳机", "监听耳机", "运动耳机"],
        "features": ["蓝牙5.3", "头戴式", "40小时续航", "可折叠", "防汗"],
        "brands": ["声韵", "听联", "低音道"],
    },
    "户外 > 露营 > 帐篷": {
        "nouns": ["圆顶帐篷", "徒步帐篷", "睡袋", "露营吊床", "天幕"],
        "features": ["双人", "超轻", "四季", "防雨", "速开"],
        "brands": ["营家", "北松", "大本营"],
    },
    "美妆 > 护肤 > 面部": {
        "nouns": ["保湿面霜", "物理防晒霜", "维C精华", "温和洁面乳"],
        "features": ["无香精", "补水", "清爽控油", "敏感肌适用", "纯素"],
        "brands": ["德美", "纯悦", "光田"],
    },
    "五金工具 > 电动工具 > 电钻": {
        "nouns": ["锂电钻", "冲击起子", "冲击钻", "直角电钻"],
        "features": ["20V", "无刷", "迷你", "双速", "双电套装"],
        "brands": ["扭力王", "筑匠", "伏特"],
    },
    "宠物 > 狗狗 > 狗窝": {
        "nouns": ["记忆棉狗垫", "安抚甜甜圈窝", "行军床狗窝", "笼垫"],
        "features": ["加厚", "可拆洗", "防滑", "防水内衬", "耐咬"],
        "brands": ["爪乐", "汪福", "暖宝宠"],
    },
    "办公 > 家具 > 椅子": {
        "nouns": ["人体工学椅", "网布办公椅", "电竞椅", "绘图凳"],
        "features": ["腰部支撑", "可调扶手", "高背", "带头枕", "360度旋转"],
        "brands": ["坐享", "正姿", "桌伴"],
    },
    "园艺 > 浇灌 > 水管": {
        "nouns": ["伸缩水管", "渗灌水管", "水管卷盘车", "喷枪"],
        "features": ["15米", "防缠绕", "黄铜接头", "轻便", "10种喷洒模式"],
        "brands": ["绿流", "水绿", "庭院宝"],
    },
    "家纺 > 床品 > 床单": {
        "nouns": ["纯棉四件套", "亚麻被套", "竹纤维枕套", "床笠"],
        "features": ["400支", "凉感", "深口袋", "有机棉", "抗皱"],
        "brands": ["梦织", "麻屋", "暖巢"],
    },
}
COLOURS_ZH = ["黑色", "白色", "灰色", "蓝色", "红色", "绿色", "米色", "藏青色"]
SIZES_ZH = ["小号", "中号", "大号", "加大号"]
LOCALES = ("en", "zh")
BAD_REASONS = ("missing_id", "unknown_event_type", "bad_timestamp", "unknown_item", "bad_encoding", "wrong_type")
START = dt.datetime(2026, 6, 1, tzinfo=dt.timezone.utc)
DAYS = 60


def _typo(word: str, rng: np.random.Generator) -> str:
    if len(word) < 5:
        return word
    i = int(rng.integers(1, len(word) - 2))
    return word[:i] + word[i + 1] + word[i] + word[i + 2 :]


def check_locale(locale: str) -> str:
    if locale not in LOCALES:
        raise ValueError(f"data.synthetic_locale must be one of {', '.join(LOCALES)}, got {locale!r}")
    return locale


def _vocabulary(locale: str) -> tuple[dict[str, dict[str, list[str]]], list[str], list[str]]:
    """(categories, colours, sizes) of the catalog's language."""
    if check_locale(locale) == "zh":
        return CATEGORIES_ZH, COLOURS_ZH, SIZES_ZH
    return CATEGORIES, COLOURS, SIZES


def make_catalog(n_items: int, rng: np.random.Generator, locale: str = "en") -> list[dict[str, Any]]:
    categories, colour_names, size_names = _vocabulary(locale)
    zh = locale == "zh"
    items: list[dict[str, Any]] = []
    cats = list(categories)
    while len(items) < n_items:
        cat = cats[int(rng.integers(len(cats)))]
        spec = categories[cat]
        brand = spec["brands"][int(rng.integers(len(spec["brands"])))]
        noun = spec["nouns"][int(rng.integers(len(spec["nouns"])))]
        feats = list(rng.choice(spec["features"], size=2, replace=False))
        base = f"{brand} {feats[0]}{noun}" if zh else f"{brand} {feats[0]} {noun}"
        price = round(float(np.exp(rng.normal(3.5, 0.7))), 2)
        leaf = cat.split(" > ")[-1]
        if zh:
            desc = f"{brand}{noun}，{feats[0]}、{feats[1]}。{brand}出品，日常使用无压力，{leaf}类目好评热销。"
        else:
            desc = (
                f"The {base.lower()} is {feats[0].lower()} and {feats[1].lower()}. "
                f"Designed by {brand} for everyday use; rated highly in {leaf.lower()}."
            )
        # ~30% of products come in several colours/sizes: near-duplicate catalog entries.
        n_var = int(rng.integers(2, 5)) if rng.random() < 0.3 else 1
        colours = rng.choice(colour_names, size=n_var, replace=False)
        size = size_names[int(rng.integers(len(size_names)))]
        for colour in colours:
            if len(items) >= n_items:
                break
            if zh:
                title = f"{base} {colour}" + (f" {size}" if n_var > 1 else "")
                attrs = {"颜色": str(colour), "特点": feats[1], "尺码": size}
            else:
                title = f"{base} - {colour}" + (f", {size}" if n_var > 1 else "")
                attrs = {"colour": str(colour), "feature": feats[1], "size": size}
            items.append(
                {
                    "item_id": f"P{len(items):06d}",
                    "title": title,
                    "description": desc,
                    "brand": brand,
                    "category": cat,
                    "price": price,
                    "attributes": json.dumps(attrs, ensure_ascii=False),
                }
            )
    return items


def _query_words(it: dict[str, Any], categories: dict[str, dict[str, list[str]]], rng: np.random.Generator) -> str:
    """Words of the product a searcher wants: its noun, maybe a feature, brand or colour, and
    sometimes a typo (swapped letters; swapped characters in Chinese)."""
    if it["category"] in CATEGORIES_ZH:
        named = it["title"].split()[1]  # feature and noun, written together
        noun = max((n for n in categories[it["category"]]["nouns"] if named.endswith(n)), key=len)
        feature = named[: -len(noun)]
        words = [noun] if rng.random() < 0.6 else [feature, noun]
        if rng.random() < 0.4:
            words = [it["brand"], *words]
        if rng.random() < 0.3:
            words = [json.loads(it["attributes"])["颜色"], *words]
        if rng.random() < 0.1 and len(words[-1]) >= 3:
            w = words[-1]
            i = int(rng.integers(len(w) - 1))
            words[-1] = w[:i] + w[i + 1] + w[i] + w[i + 2 :]
        # Chinese queries are mostly typed without spaces between words.
        return "".join(words) if rng.random() < 0.7 else " ".join(words)
    noun_words = it["title"].split(" - ")[0].split()
    words = noun_words[-2:] if rng.random() < 0.6 else noun_words[-1:]
    if rng.random() < 0.4:
        words = [it["brand"].split()[0], *words]
    if rng.random() < 0.3:
        words = [json.loads(it["attributes"])["colour"], *words]
    words = [w.lower() for w in words]
    if rng.random() < 0.1:
        words[-1] = _typo(words[-1], rng)
    return " ".join(words)


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
    categories, _, _ = _vocabulary(cfg.synthetic_locale)
    n = len(items)
    # Zipf-like popularity over a random permutation of items.
    pop = 1.0 / np.arange(1, n + 1) ** 1.1
    pop = pop[rng.permutation(n)]
    by_cat: dict[str, np.ndarray] = {}
    for cat in categories:
        by_cat[cat] = np.array([i for i, it in enumerate(items) if it["category"] == cat], dtype=np.int64)
    cats = [c for c in categories if len(by_cat[c])]
    events: list[dict[str, Any]] = []
    for u in range(cfg.synthetic_users):
        user = f"U{u:05d}"
        likes = list(rng.choice(cats, size=min(2, len(cats)), replace=False))
        fav_brand = categories[likes[0]]["brands"][int(rng.integers(3))]
        n_sessions = 1 + int(rng.poisson(cfg.synthetic_sessions_per_user))
        times = sorted(START + dt.timedelta(seconds=float(s)) for s in rng.uniform(0, DAYS * 86400, n_sessions))
        for s, t0 in enumerate(times):
            session = f"{user}-S{s:03d}"
            cat = likes[0] if rng.random() < 0.7 else likes[-1]
            cand = by_cat[cat]
            w = pop[cand] * np.array([3.0 if items[i]["brand"] == fav_brand else 1.0 for i in cand])
            target = int(rng.choice(cand, p=w / w.sum()))
            it = items[target]
            query = _query_words(it, categories, rng) if rng.random() < 0.6 else None
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
    locale = check_locale(cfg.synthetic_locale)
    rng = np.random.default_rng(cfg.seed)
    items = make_catalog(cfg.synthetic_items, rng, locale)
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
        "locale": locale,
    }
    log.info("synthetic shop written to %s: %s", out_uri, summary)
    return summary
