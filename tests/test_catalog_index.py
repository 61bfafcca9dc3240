"""How many Ray Data actors embed the catalog (eval.embed_actors, 0 = auto)."""

from __future__ import annotations

import pytest
import ray

from recsys.catalog_index import AUTO_EMBED_MAX_ACTORS, embed_actor_count
from recsys.config import load_config


@pytest.mark.parametrize(
    ("resources", "use_gpu", "items", "want"),
    [
        ({"CPU": 4.0}, False, 54_667, 2),  # a local cluster on 2 cores: one actor per core
        ({"CPU": 1.0}, False, 54_667, 1),
        ({"CPU": 64.0}, False, 10**6, AUTO_EMBED_MAX_ACTORS),
        ({"CPU": 64.0}, False, 3_000, 2),  # small catalogs do not start an actor per 2 CPUs
        ({"CPU": 64.0, "GPU": 4.0}, True, 10**6, 4),  # one per GPU
        ({"CPU": 64.0}, True, 10**6, 1),  # no GPU node yet: one actor, for the autoscaler to place
    ],
)
def test_auto_embed_actors_follow_the_cluster(
    monkeypatch: pytest.MonkeyPatch, resources: dict[str, float], use_gpu: bool, items: int, want: int
) -> None:
    monkeypatch.setattr(ray, "cluster_resources", lambda: resources)
    cfg = load_config(overrides=[f"train.use_gpu={str(use_gpu).lower()}"])
    assert cfg.eval.embed_actors == 0
    assert embed_actor_count(cfg, items) == want


def test_an_explicit_embed_actors_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 64.0})
    assert embed_actor_count(load_config(overrides=["eval.embed_actors=3"]), 100) == 3
