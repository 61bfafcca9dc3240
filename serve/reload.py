"""A replica's move to the model its user_config declares, without ever serving nothing.

Serve calls a deployment's `reconfigure` with the new user_config on a swap. If it raises, Serve
stops that replica and starts another with the same config, and while the object store is down
longer than its retries that one fails to load too: a swap then turns a store outage into an
outage of the service. So a replica that already serves a model keeps serving it when the next
fails to load: it records the failure (`error`, shown by the deployment's `info`, which
serve/control.py's swap waits on and reports, then rolls the app back), and retries in the
background with backoff until it loads or another target is declared. A refusal (ValueError:
another model than the declared one at the URI, an index of another model) is not retried. A replica serving
nothing yet raises, as before, and Serve replaces it until the store is back."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)


class Reloader:
    """One replica's load of its declared model. `load()` loads and, at its end with no await
    after, installs the model; a cancelled retry therefore never installs a superseded one."""

    def __init__(self, first_retry_s: float = 5.0, max_retry_s: float = 60.0) -> None:
        self.first_retry_s, self.max_retry_s = first_retry_s, max_retry_s
        self.error: dict[str, Any] | None = None
        self.retries = 0
        self._task: asyncio.Task[None] | None = None

    async def to(self, target: dict[str, str], load: Callable[[], Awaitable[None]], serving: bool) -> None:
        """Load `target` (its URIs and expected model id) now. On failure: raise if nothing is
        being served (`serving` False), else keep serving and retry in the background."""
        if self._task is not None:  # a newer target supersedes a retry still due
            self._task.cancel()
            self._task = None
        self.retries = 0
        try:
            await load()
        except Exception as e:
            if not serving:
                raise
            self._failed(target, e)
            if not isinstance(e, ValueError):  # a refusal (another model at the URI) will not pass on retry
                self._task = asyncio.get_running_loop().create_task(self._retry(target, load))
            return
        self.error = None

    def _failed(self, target: dict[str, str], e: BaseException) -> None:
        self.error = {**target, "error": f"{type(e).__name__}: {e}"[:2000], "retries": self.retries}
        log.error("could not load model %s from %s (retry %d); still serving the current model: %s",
                  target.get("model_id") or "?", target.get("model_uri"), self.retries, self.error["error"])

    async def _retry(self, target: dict[str, str], load: Callable[[], Awaitable[None]]) -> None:
        delay = self.first_retry_s
        while True:
            await asyncio.sleep(delay)
            self.retries += 1
            try:
                await load()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - recorded and retried: the store may come back
                self._failed(target, e)
                if isinstance(e, ValueError):
                    self._task = None
                    return
                delay = min(2 * delay, self.max_retry_s)
                continue
            log.info("loaded model %s from %s after %d retries", target.get("model_id") or "?", target.get("model_uri"), self.retries)
            self.error = None
            self._task = None
            return
