"""Hard negatives for the text towers: BM25 neighbours of each positive's text that are not
accidental hits (the positive itself, its near-duplicates, the example's history and its user's
or query's other positives), drawn from the best `hard_negative_pool` so the same near-duplicate
is not always the negative."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from recsys.items import ItemTable

if TYPE_CHECKING:
    from recsys.config import BM25Config


class HardNegatives:
    def __init__(self, items: ItemTable, pool: int = 10, seed: int = 0, analyser: BM25Config | None = None) -> None:
        self.items = items
        self.analyser = analyser
        self.pool = pool
        self._rng = np.random.default_rng(seed)
        self._bm25: Any = None
        self._neighbours: dict[int, np.ndarray] = {}  # item row -> its BM25 neighbours, best first

    def _find_neighbours(self, rows: np.ndarray) -> None:
        from recsys.bm25 import BM25Index

        if self._bm25 is None:
            self._bm25 = BM25Index.build(self.items.texts, analyser=self.analyser)
        todo = sorted({int(r) for r in rows} - self._neighbours.keys())
        if not todo:
            return
        # Room for the item itself, its duplicates and history hits on top of the pool.
        k = min(len(self.items), self.pool + 16)
        docs = self._bm25.retrieve([self.items.texts[r] for r in todo], k)
        for r, found in zip(todo, docs, strict=True):
            self._neighbours[r] = np.asarray(found, dtype=np.int64)

    def rows(self, pos: np.ndarray, history: list[np.ndarray], n: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """(batch, n) item rows for the positives `pos` (batch,), never one of the row's
        accidental hits (`history[i]`: rows the i-th example must not be contrasted with). Too
        few neighbours: random items that are not accidental hits either."""
        rng = rng or self._rng
        dups = self.items.dups
        self._find_neighbours(pos)
        out = np.empty((len(pos), n), dtype=np.int64)
        for i, (p, hist) in enumerate(zip(pos, history, strict=True)):
            banned = set(hist.tolist()) | {int(p)}
            ok = [c for c in self._neighbours[int(p)].tolist() if c not in banned and dups[c] != dups[p]][: self.pool]
            if len(ok) < n:
                rest = np.flatnonzero(dups != dups[p])
                rest = rest[~np.isin(rest, list(banned | set(ok)))]
                if len(ok) + len(rest) < n:
                    raise ValueError(
                        f"train.hard_negatives={n}: item {p} of the catalog has only {len(ok) + len(rest)} "
                        "items that are neither it, its duplicates nor in the example's history"
                    )
                ok += rng.choice(rest, size=n - len(ok), replace=False).tolist()
            out[i] = rng.choice(ok, size=n, replace=False) if len(ok) > n else ok[:n]
        return out
