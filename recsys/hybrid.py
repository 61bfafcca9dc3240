"""Hybrid retrieval: BM25 and the dense index each retrieve, and their scores fuse.

One implementation for evaluation (the `hybrid` system), the index job (which chooses the fusion
on the validation split and saves it with the index) and `POST /search` with `mode: hybrid`.

Per query, each retriever's top `candidates` items among those passing the filters (and not
excluded) form the candidate set; the other retriever's score is computed for every candidate,
so no candidate lacks a score. Then, as Elasticsearch / OpenSearch hybrid queries do:

    convex  fused = w * minmax(dense) + (1 - w) * minmax(bm25), min-max over the candidates
            (w = 1 is the dense ranking of the candidates, w = 0 BM25's)
    rrf     fused = sum over the two rankings of 1 / (rrf_k + rank), rank from 1; an item
            outside a retriever's top `candidates` gets nothing from it

A query without a single BM25 token has all-zero lexical scores; min-max then gives 0 to every
candidate and the dense order decides.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from recsys import retrieval
from recsys.bm25 import BM25Index
from recsys.metrics import per_query_metrics

if TYPE_CHECKING:
    from recsys.config import StorageConfig

log = logging.getLogger(__name__)

FUSION_FILE = "fusion.json"  # beside the catalog index: the fusion the index job chose
BM25_DIR = "bm25"  # beside the catalog index: the BM25 index over the same items
# The convex weights tried on the validation split (the dense share).
WEIGHT_GRID = tuple(round(0.05 * i, 2) for i in range(21))


@dataclasses.dataclass(frozen=True)
class Fusion:
    method: Literal["convex", "rrf"] = "rrf"
    weight: float = 0.5  # convex only: the dense share
    candidates: int = 100  # per retriever
    rrf_k: int = 60

    def __post_init__(self) -> None:
        if self.method not in ("convex", "rrf"):
            raise ValueError(f"fusion method must be convex or rrf, got {self.method!r}")
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"fusion weight must be in [0, 1], got {self.weight}")
        if self.candidates < 1 or self.rrf_k < 1:
            raise ValueError(f"fusion candidates and rrf_k must be >= 1, got {self.candidates} and {self.rrf_k}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Fusion:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})

    def describe(self) -> str:
        return f"convex, dense weight {self.weight}" if self.method == "convex" else f"rrf, k={self.rrf_k}"


@dataclasses.dataclass(frozen=True)
class Candidates:
    """One query's candidate set: catalog positions and both retrievers' view of them."""

    rows: np.ndarray  # (c,) int64 catalog positions
    dense: np.ndarray  # (c,) min-max normalised dense scores
    lexical: np.ndarray  # (c,) min-max normalised BM25 scores
    dense_rank: np.ndarray  # (c,) 1-based rank in the dense top list, 0 = not in it
    lexical_rank: np.ndarray  # (c,) the same for BM25


def _top_rows(scores: np.ndarray, allowed: np.ndarray, n: int) -> np.ndarray:
    """Positions of the n best allowed scores, best first; ties by position, also at the cut."""
    return retrieval.top_k(scores, allowed, n)[0]


def _minmax(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return np.zeros_like(x, dtype=np.float64) if hi <= lo else (x.astype(np.float64) - lo) / (hi - lo)


def candidates(dense: np.ndarray, lexical: np.ndarray, allowed: np.ndarray, n: int) -> Candidates:
    """Candidates from full-catalog scores (n_items,) of both retrievers; `allowed` (n_items,)
    bool: passed the filters and not excluded."""
    return candidates_from_top(_top_rows(dense, allowed, n), lambda rows: dense[rows], lexical, allowed, n)


def candidates_from_top(
    d_top: np.ndarray, dense_of: Callable[[np.ndarray], np.ndarray], lexical: np.ndarray, allowed: np.ndarray, n: int
) -> Candidates:
    """Candidates when the dense top list comes from an index (recsys.index.Index.search_one,
    approximate above its exact threshold): `d_top` the dense top positions, best first;
    `dense_of(rows)` the dense scores of any positions (the union's, from the embeddings), so
    no full-catalog dense pass is needed. With an exact top list this equals `candidates`."""
    # A query with no BM25 token scores 0 everywhere: its "top" is arbitrary, so it adds nothing.
    l_top = _top_rows(lexical, allowed & (lexical > 0), n)
    rows = np.unique(np.concatenate([d_top, l_top]).astype(np.int64))
    d_rank = np.zeros(len(rows), dtype=np.int64)
    l_rank = np.zeros(len(rows), dtype=np.int64)
    d_rank[np.searchsorted(rows, d_top)] = np.arange(1, len(d_top) + 1)
    l_rank[np.searchsorted(rows, l_top)] = np.arange(1, len(l_top) + 1)
    if len(rows) == 0:
        empty = np.zeros(0, dtype=np.float64)
        return Candidates(rows, empty, empty, d_rank, l_rank)
    return Candidates(rows, _minmax(np.asarray(dense_of(rows))), _minmax(lexical[rows]), d_rank, l_rank)


def fused_scores(c: Candidates, fusion: Fusion) -> np.ndarray:
    """(c,) fused score of each candidate."""
    if fusion.method == "convex":
        return fusion.weight * c.dense + (1.0 - fusion.weight) * c.lexical
    rrf = np.zeros(len(c.rows), dtype=np.float64)
    for rank in (c.dense_rank, c.lexical_rank):
        hit = rank > 0
        rrf[hit] += 1.0 / (fusion.rrf_k + rank[hit])
    return rrf


def top_k(c: Candidates, fusion: Fusion, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The fused top-k: (positions, fused scores), best first; ties by the dense score, then
    by catalog position, so equal fused scores always come out in the same order."""
    s = fused_scores(c, fusion)
    order = np.lexsort((c.rows, -c.dense, -s))[:k]
    return c.rows[order], s[order].astype(np.float32)


def depth(fusion: Fusion, k: int) -> int:
    """Each retriever's list length for a top-k: `candidates`, or k when more are asked for
    (so a top-k is never cut short by the lists). Evaluation uses it with its largest K."""
    return max(fusion.candidates, k)


def fuse(dense: np.ndarray, lexical: np.ndarray, allowed: np.ndarray, k: int, fusion: Fusion) -> tuple[np.ndarray, np.ndarray]:
    """One query's hybrid top-k from both retrievers' full-catalog scores."""
    return top_k(candidates(dense, lexical, allowed, depth(fusion, k)), fusion, k)


def query_candidates(
    q_emb: np.ndarray, texts: Sequence[str], item_emb: np.ndarray, lexical_scores: Callable[[str], np.ndarray],
    n: int, exclude: Sequence[Sequence[int]] | None = None,
) -> list[Candidates]:
    """Candidate sets for many queries: q_emb (m, dim) against item_emb (n_items, dim), texts the
    queries' BM25 text; `lexical_scores(text)` -> (n_items,) BM25 scores."""
    out = []
    for i, text in enumerate(texts):
        allowed = np.ones(item_emb.shape[0], dtype=bool)
        if exclude is not None and len(exclude[i]):
            allowed[list(exclude[i])] = False
        out.append(candidates(item_emb @ q_emb[i], lexical_scores(text), allowed, n))
    return out


def rank_ids(cands: Sequence[Candidates], fusion: Fusion, k: int, item_ids: Sequence[str]) -> list[list[str]]:
    return [[item_ids[j] for j in top_k(c, fusion, k)[0]] for c in cands]


def choose_fusion(
    cands: Sequence[Candidates], relevant: Sequence[dict[str, float]], item_ids: Sequence[str], metric_k: int = 10,
    method: str = "auto", weight: float | None = None, base: Fusion | None = None,
) -> tuple[Fusion, dict[str, float]]:
    """The fusion with the best mean NDCG@metric_k over (validation) queries: RRF and the convex
    weights of WEIGHT_GRID (only `method` when not "auto"; only `weight` when given). Returns it
    and every tried fusion's score (`describe()` -> NDCG), for the report."""
    base = base or Fusion()
    tried: list[Fusion] = []
    if method in ("auto", "rrf"):
        tried.append(dataclasses.replace(base, method="rrf"))
    if method in ("auto", "convex"):
        tried += [dataclasses.replace(base, method="convex", weight=w) for w in ((weight,) if weight is not None else WEIGHT_GRID)]
    if not tried:
        raise ValueError(f"fusion method must be auto, convex or rrf, got {method!r}")
    grid: dict[str, float] = {}
    best, best_score = tried[0], -1.0
    for f in tried:
        values = per_query_metrics(rank_ids(cands, f, metric_k, item_ids), relevant, [metric_k])[f"ndcg@{metric_k}"]
        score = float(np.nanmean(values)) if np.isfinite(values).any() else 0.0
        grid[f.describe()] = round(score, 6)
        if score > best_score + 1e-12:  # ties keep the earlier (RRF, then the lower dense weight)
            best, best_score = f, score
    log.info("hybrid fusion chosen on %d queries: %s (NDCG@%d %.4f)", len(cands), best.describe(), metric_k, best_score)
    return best, grid


def save_lexical(folder: Path, bm25: BM25Index, fusion: Fusion, how: dict[str, Any]) -> None:
    """Write the BM25 index and the fusion (with how it was chosen) into an index folder."""
    bm25.save(folder / BM25_DIR)
    (folder / FUSION_FILE).write_text(json.dumps({"fusion": fusion.to_dict(), **how}, indent=1, ensure_ascii=False))


def load_lexical(index_uri: str, cfg: StorageConfig | None = None) -> tuple[BM25Index, Fusion, dict[str, Any]] | None:
    """The BM25 index, fusion and its record saved with a catalog index; None when the index has
    none (built before hybrid search)."""
    from recsys import storage

    if not storage.exists(storage.join(index_uri, FUSION_FILE), cfg):
        return None
    record = storage.read_json(storage.join(index_uri, FUSION_FILE), cfg)
    with tempfile.TemporaryDirectory(prefix="recsys-bm25-") as tmp:
        bm25 = BM25Index.load(storage.download_dir(storage.join(index_uri, BM25_DIR), tmp, cfg))
    return bm25, Fusion.from_dict(record["fusion"]), record


def base_fusion(cfg: Any) -> Fusion:
    """The fixed part of the fusion from a config's `hybrid` section (HybridConfig)."""
    h = cfg.hybrid
    method = "rrf" if h.fusion == "auto" else h.fusion
    return Fusion(method=method, weight=0.5 if h.weight is None else h.weight, candidates=h.candidates, rrf_k=h.rrf_k)


def needs_choice(cfg: Any) -> bool:
    """Whether the config leaves the fusion to the validation split."""
    return cfg.hybrid.fusion == "auto" or (cfg.hybrid.fusion == "convex" and cfg.hybrid.weight is None)
