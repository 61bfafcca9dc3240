"""Live user profiles: the recent items each user engaged with (newest first) and their purchases,
updated by `POST /events` and read by `/recommend` and `/score`."""

from __future__ import annotations

import collections
from typing import Any

from ray import serve


class ProfileStore:
    """Recent engaged items (newest first) and purchases, bounded per user.

    A named detached actor rather than deployment state, so profiles outlive a redeploy or a
    restarted replica. One actor holds them all: enough for one node's
    traffic; a shop at scale would put a key-value store (Redis, DynamoDB) behind the same calls.
    """

    def __init__(self, max_history: int = 50) -> None:
        self.max_history = max_history
        self.history: dict[str, collections.deque[str]] = {}
        self.purchased: dict[str, set[str]] = collections.defaultdict(set)

    def add(self, user_id: str, events: list[dict[str, Any]]) -> int:
        hist = self.history.setdefault(user_id, collections.deque(maxlen=self.max_history))
        for e in sorted(events, key=lambda e: e.get("timestamp") or 0):
            if e["event_type"] != "view":  # views are impressions, not interest
                if e["item_id"] in hist:
                    hist.remove(e["item_id"])
                hist.appendleft(e["item_id"])
            if e["event_type"] == "purchase":
                self.purchased[user_id].add(e["item_id"])
        return len(hist)

    def get(self, user_id: str) -> dict[str, Any]:
        return {"history": list(self.history.get(user_id, [])), "purchased": sorted(self.purchased.get(user_id, set()))}


@serve.deployment
class Profiles:
    """The profile API with Serve's queue limits in front of the shared ProfileStore actor."""

    def __init__(self, max_history: int = 50, store_name: str = "recsys-profiles") -> None:
        import ray

        self.store = (
            ray.remote(ProfileStore)
            .options(name=store_name, namespace="recsys", lifetime="detached", get_if_exists=True, num_cpus=0)
            .remote(max_history)
        )

    async def add(self, user_id: str, events: list[dict[str, Any]]) -> int:
        return await self.store.add.remote(user_id, events)

    async def get(self, user_id: str) -> dict[str, Any]:
        return await self.store.get.remote(user_id)
