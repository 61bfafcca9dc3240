"""The live-profile store's event log (serve/profiles.py ProfileStore), in process: what a
restarted store replays, compaction, and a torn or corrupt log. The same store killed and
restarted as a Ray actor under a running app: tests/test_serve_faults.py."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from serve.profiles import ProfileStore

TYPES = ["view", "click", "add_to_cart", "purchase"]


def _batches(n: int, users: int, seed: int = 0) -> list[tuple[str, list[dict]]]:
    rng = random.Random(seed)
    out = []
    for b in range(n):
        events = [{"item_id": f"I{rng.randrange(30)}", "event_type": rng.choice(TYPES), "timestamp": b * 10 + k}
                  for k in range(rng.randint(1, 4))]
        out.append((f"u{rng.randrange(users)}", events))
    return out


def test_a_restarted_store_replays_its_log_to_the_same_profiles(tmp_path: Path) -> None:
    """Issue 18: profiles survive the loss of the store (before, they lived only in its memory)."""
    batches = _batches(60, users=5)
    store = ProfileStore(max_history=8, log_dir=str(tmp_path), name="p")
    memory = ProfileStore(max_history=8)  # no log: the reference state
    for user, events in batches:
        assert store.add(user, events) == memory.add(user, events)
    assert (tmp_path / "p.jsonl").exists() and store.log_lines() == 60
    again = ProfileStore(max_history=8, log_dir=str(tmp_path), name="p")
    assert again.dump() == store.dump() == memory.dump()
    assert len(again.dump()) == 5 and any(p["purchased"] for p in again.dump().values())
    again.add("u-new", [{"item_id": "I1", "event_type": "click"}])
    assert ProfileStore(max_history=8, log_dir=str(tmp_path), name="p").get("u-new") == {"history": ["I1"], "purchased": []}


def test_compaction_bounds_the_log_and_keeps_the_same_state(tmp_path: Path) -> None:
    batches = _batches(500, users=7, seed=3)
    store = ProfileStore(max_history=6, log_dir=str(tmp_path), compact_lines=20, name="p")
    memory = ProfileStore(max_history=6)
    most = 0
    for user, events in batches:
        store.add(user, events)
        memory.add(user, events)
        most = max(most, len((tmp_path / "p.jsonl").read_text().splitlines()))
        assert store.dump() == memory.dump()
    assert most <= 20, f"the log grew to {most} lines past its bound of 20"
    lines = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert any("history" in rec for rec in lines), "the log was rewritten as a snapshot"
    assert ProfileStore(max_history=6, log_dir=str(tmp_path), compact_lines=20, name="p").dump() == memory.dump()
    # A store started over a log already past its bound compacts it at once.
    big = ProfileStore(max_history=6, log_dir=str(tmp_path / "big"), name="p")
    for user, events in batches:
        big.add(user, events)
    assert big.log_lines() == 500
    small = ProfileStore(max_history=6, log_dir=str(tmp_path / "big"), compact_lines=20, name="p")
    assert small.dump() == memory.dump() and small.log_lines() == 7
    assert len((tmp_path / "big" / "p.jsonl").read_text().splitlines()) == 7
    assert not list(tmp_path.rglob("*.compacting"))


def test_a_torn_last_line_is_dropped_and_a_corrupt_line_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = ProfileStore(log_dir=str(tmp_path), name="p")
    store.add("u1", [{"item_id": "I1", "event_type": "click"}])
    store.add("u1", [{"item_id": "I2", "event_type": "purchase"}])
    log = tmp_path / "p.jsonl"
    whole = log.read_bytes()
    # A kill in the middle of a write: the batch was never acknowledged.
    log.write_bytes(whole + b'{"user_id":"u1","events":[{"item_id":"I3","ev')
    with caplog.at_level("WARNING", logger="serve.profiles"):
        again = ProfileStore(log_dir=str(tmp_path), name="p")
    assert again.get("u1") == {"history": ["I2", "I1"], "purchased": ["I2"]}
    assert "line 3 is incomplete" in caplog.text
    assert log.read_bytes() == whole, "the torn tail is cut off, so the next append starts a line of its own"
    again.add("u2", [{"item_id": "I4", "event_type": "click"}])
    assert ProfileStore(log_dir=str(tmp_path), name="p").get("u2")["history"] == ["I4"]
    # A bad line with acknowledged events after it is not skipped: the store refuses to start.
    lines = log.read_text().splitlines()
    log.write_text("\n".join([lines[0], '{"user_id": "u1", "events": [{"item_id": "I9"}]}', *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"p\.jsonl line 2 is corrupt"):
        ProfileStore(log_dir=str(tmp_path), name="p")
    with pytest.raises(ValueError, match="store name"):
        ProfileStore(log_dir=str(tmp_path), name="../escape")


def test_profile_log_dir_is_a_local_path_and_defaults_under_a_local_root(tmp_path: Path) -> None:
    from recsys.config import ConfigError, load_config
    from serve.control import _profile_log_dir
    from serve.schemas import AppArgs

    with pytest.raises(ConfigError, match="profile_log_dir 's3://b/p' is a URI"):
        load_config(None, ["serve.profile_log_dir=s3://b/p"])
    with pytest.raises(ValueError, match="profile_store"):
        AppArgs(profile_store="a/b")
    cfg = load_config(None, [f"storage.root={tmp_path}"])
    assert _profile_log_dir(cfg) == str(tmp_path / "profiles")
    cfg = load_config(None, [f"storage.root={tmp_path}", "serve.profile_log_dir=rel/dir"])
    assert _profile_log_dir(cfg) == str(Path.cwd() / "rel" / "dir")
    assert _profile_log_dir(load_config(None, ["storage.root=s3://bucket/runs"])) == ""
