"""Issue 18: a replica whose next model fails to load keeps serving the one it has, reports the
failure, and retries in the background until the model loads or another is declared
(serve/reload.py; the integration test with the object store down is in
tests/test_object_store_faults.py)."""

from __future__ import annotations

import asyncio

import pytest

from serve.reload import Reloader


class _Model:
    """What a replica serves, and a load that fails while `down` is set."""

    def __init__(self) -> None:
        self.serving = ""
        self.down = False
        self.calls = 0

    def load(self, name: str):  # noqa: ANN201
        async def go() -> None:
            self.calls += 1
            await asyncio.sleep(0)
            if self.down:
                raise OSError(f"store down reading {name}")
            self.serving = name
        return go


def test_a_replica_serving_nothing_raises_so_serve_replaces_it() -> None:
    m, r = _Model(), Reloader()
    m.down = True

    async def go() -> None:
        with pytest.raises(OSError, match="store down"):
            await r.to({"model_uri": "a"}, m.load("a"), serving=False)

    asyncio.run(go())
    assert m.serving == ""


def test_a_failed_load_keeps_the_current_model_and_retries_until_the_store_is_back() -> None:
    m, r = _Model(), Reloader(first_retry_s=0.01, max_retry_s=0.02)

    async def go() -> None:
        await r.to({"model_uri": "a"}, m.load("a"), serving=False)
        m.down = True
        await r.to({"model_uri": "b", "model_id": "B"}, m.load("b"), serving=True)  # does not raise
        assert m.serving == "a" and r.error["model_uri"] == "b" and "store down" in r.error["error"]
        await asyncio.sleep(0.1)
        assert m.serving == "a" and r.retries >= 2, "retried while down, still serving a"
        m.down = False
        await asyncio.sleep(0.1)
        assert m.serving == "b" and r.error is None

    asyncio.run(go())


def test_a_newer_target_cancels_the_retry_of_the_failed_one() -> None:
    """The rollback case: swap to b fails, the app is declared back to a; the retry of b must
    never install b afterwards."""
    m, r = _Model(), Reloader(first_retry_s=0.01, max_retry_s=0.01)

    async def go() -> None:
        await r.to({"model_uri": "a"}, m.load("a"), serving=False)
        m.down = True
        await r.to({"model_uri": "b"}, m.load("b"), serving=True)
        m.down = False
        await r.to({"model_uri": "a"}, m.load("a"), serving=True)
        calls = m.calls
        await asyncio.sleep(0.1)
        assert m.serving == "a" and r.error is None and m.calls == calls

    asyncio.run(go())


def test_a_refusal_is_reported_and_not_retried() -> None:
    """Another model than the declared one at the URI will not pass on retry."""
    r = Reloader(first_retry_s=0.01, max_retry_s=0.01)
    calls = []

    async def refused() -> None:
        calls.append(1)
        raise ValueError("the model at u is m2, but this deployment was deployed with model m1")

    async def go() -> None:
        await r.to({"model_uri": "u", "model_id": "m1"}, refused, serving=True)
        await asyncio.sleep(0.1)

    asyncio.run(go())
    assert calls == [1] and "deployed with model m1" in r.error["error"]
