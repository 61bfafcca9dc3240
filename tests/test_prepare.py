"""The data job end to end through the real S3 server on the synthetic shop: round trip of what
was generated vs. what was read back, row accounting, artefacts, and the quality threshold."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.dataset as pads
import pytest

from recsys import paths, storage
from recsys.config import Config, DataConfig
from recsys.data.validate import DataQualityError
from recsys.schemas import EXAMPLE_KINDS, EXAMPLES_SCHEMA, ITEMS_SCHEMA, QUARANTINE_SCHEMA, SPLITS

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "jobs" / "configs" / "prepare_tiny.yaml"


def _read(uri: str, cfg: Config) -> pads.Dataset:
    fs, path = storage.filesystem(uri, cfg.storage)
    return pads.dataset(path, filesystem=fs, format="parquet")


def _raw_events(cfg: Config) -> list[dict]:
    rows = []
    for f in storage.list_files(paths.raw_events(cfg), cfg.storage, suffix=".jsonl"):
        text = storage.read_bytes(f, cfg.storage).decode()
        rows += [json.loads(line) for line in text.splitlines() if line.strip()]
    return rows


@pytest.mark.ray
def test_prepare_synthetic_round_trip_through_s3(ray_cluster: None, s3_server, s3_storage) -> None:  # noqa: ANN001
    from jobs.prepare import main

    manifest = main(
        [
            "--config", str(TINY),
            f"storage.root={s3_storage.root}",
            f"storage.s3_endpoint={s3_storage.s3_endpoint}",
            f"storage.s3_secret_key={s3_storage.s3_secret_key}",
        ]
    )
    cfg = Config(storage=s3_storage)
    # Issue 18: the manifest records the resolved config, never its credentials.
    written = storage.read_bytes(paths.manifest(cfg), cfg.storage).decode()
    assert s3_storage.s3_secret_key not in written and s3_storage.s3_secret_key not in json.dumps(manifest)
    c = manifest["counts"]
    gen = manifest["source"]["synthetic"]

    # Round trip, count-wise: every generated row was read, and each planted bad row was
    # quarantined for the reason it was planted for; nothing else was.
    assert c["rows_in"] == gen["events"] == c["rows_kept"] + c["rows_quarantined"]
    # The files' own count (newlines, parquet footers) agrees, with nothing left over.
    assert c["rows_in_files"] == gen["events"] and c["blank_lines"] == 0
    assert c["event_files"] == 2 and c["catalog_rows_in_files"] == gen["catalog_items"]
    planted = {k: v for k, v in gen["bad_rows_planted"].items() if v}
    assert planted and c["quarantined_by_reason"] == planted
    q = _read(paths.quarantine(cfg) + "/events", cfg).to_table()
    assert q.schema.equals(QUARANTINE_SCHEMA)
    assert q.num_rows == c["rows_quarantined"]
    assert Counter(q.column("reason").to_pylist()) == Counter(planted)

    # ... and by ids: users / sessions / items read back are the generated ones.
    raw = _raw_events(cfg)
    assert len(raw) == gen["events"]
    good_ids = lambda key: {r[key] for r in raw if isinstance(r.get(key), str) and r[key].strip()}  # noqa: E731
    assert c["users"] == len(good_ids("user_id"))
    assert c["sessions"] == len(good_ids("session_id"))
    items = _read(paths.items(cfg), cfg).to_table()
    assert items.schema.equals(ITEMS_SCHEMA)
    catalog = _read(paths.raw_catalog(cfg), cfg).to_table()
    assert sorted(items.column("item_id").to_pylist()) == sorted(catalog.column("item_id").to_pylist())
    assert c["items"] == c["catalog_rows_kept"] == gen["catalog_items"]

    # Examples: written per (kind, split), counts as in the manifest, popularity = train targets.
    n_train = 0
    for kind in EXAMPLE_KINDS:
        for split in SPLITS:
            n = c["examples"][f"{kind}/{split}"]
            uri = paths.examples(cfg, kind, split)
            if n == 0:
                continue
            t = _read(uri, cfg).to_table()
            assert t.num_rows == n
            assert t.schema.names == EXAMPLES_SCHEMA.names
            assert set(t.column("kind").to_pylist()) == {kind}
            if split == "train":
                n_train += n
    assert c["examples"]["next_item/train"] > 0 and c["examples"]["search/train"] > 0
    assert c["examples"]["next_item/test"] > 0
    assert pc.sum(items.column("popularity")).as_py() == n_train

    # Duplicates: the synthetic catalog has colour/size variants.
    dups = _read(paths.duplicates(cfg), cfg).to_table()
    assert manifest["duplicates"]["items_in_duplicate_groups"] == dups.num_rows > 0
    assert set(manifest["popularity_skew"]) >= {"gini"}

    # The manifest in storage is the one returned.
    stored = storage.read_json(paths.manifest(cfg), cfg.storage)
    assert stored["counts"] == json.loads(json.dumps(c))
    assert stored["config"]["data"]["synthetic_users"] == 30
    assert set(stored["schemas"]) == {"events", "catalog", "examples", "items", "quarantine"}


@pytest.mark.ray
def test_prepare_threshold_raises_naming_worst_reason(ray_cluster: None, s3_storage) -> None:  # noqa: ANN001
    from recsys.data.prepare import run

    cfg = Config(storage=s3_storage)
    cfg.data = DataConfig(
        source="synthetic", synthetic_users=10, synthetic_items=20, synthetic_shards=1,
        synthetic_bad_row_share=0.2, max_quarantine_share=0.05,
    )
    with pytest.raises(DataQualityError) as e:
        run(cfg)
    msg = str(e.value)
    assert "max_quarantine_share" in msg and "e.g." in msg
    # Planted reasons cycle, so the first in the message is one of the most frequent.
    first = min(("missing_id", "unknown_event_type", "bad_timestamp", "unknown_item", "bad_encoding", "wrong_type"),
                key=lambda r: msg.find(r) if r in msg else 10**9)
    q = _read(paths.quarantine(cfg) + "/events", cfg).to_table()  # written before raising
    counts = Counter(q.column("reason").to_pylist())
    assert counts[first] == max(counts.values())


@pytest.mark.ray
def test_prepare_files_source_hand_made_log(ray_cluster: None, s3_storage) -> None:  # noqa: ANN001
    """data.source=files on a hand-made JSONL log + catalog with planted bad rows of every kind:
    exact counts per reason in the manifest, and rows in == kept + quarantined."""
    from test_validate import CATALOG_ROWS, GOOD_EVENTS, _jsonl, write_event_files

    from recsys.data.prepare import run

    events_uri, expected = write_event_files("jsonl", s3_storage.root, s3_storage)
    catalog_uri = storage.join(s3_storage.root, "catalog")
    bad_catalog = [
        {"item_id": "i1", "title": "Duplicate of i1"},
        {"item_id": "i5", "title": None},
        {"item_id": "i6", "title": "Cheap", "price": "cheap"},
    ]
    storage.write_bytes(catalog_uri + "/part-00000.jsonl", _jsonl(CATALOG_ROWS[:2]), s3_storage)
    storage.write_bytes(catalog_uri + "/part-00001.jsonl", _jsonl(CATALOG_ROWS[2:] + bad_catalog), s3_storage)
    cfg = Config(storage=s3_storage)
    cfg.data = DataConfig(source="files", events_uri=events_uri, catalog_uri=catalog_uri,
                          max_quarantine_share=1.0)
    c = run(cfg)["counts"]
    assert c["quarantined_by_reason"] == dict(expected)
    assert c["rows_kept"] == len(GOOD_EVENTS)
    assert c["rows_in"] == c["rows_kept"] + c["rows_quarantined"] == len(GOOD_EVENTS) + sum(expected.values())
    assert (c["event_files"], c["rows_in_files"], c["blank_lines"]) == (2, c["rows_in"], 0)
    assert (c["catalog_files"], c["catalog_rows_in_files"], c["catalog_blank_lines"]) == (2, 6, 0)
    assert c["catalog_quarantined_by_reason"] == {"duplicate_item_id": 1, "missing_id": 1, "wrong_type": 1}
    assert c["catalog_rows_in"] == 6 and c["items"] == 3
    assert c["users"] == 3
