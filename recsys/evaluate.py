"""Evaluation: the fine-tuned model against popularity, BM25 and the zero-shot pretrained encoder.

Full ranking over the whole catalog (no sampled negatives). The report (JSON, Markdown table,
PNG of Recall@K curves) goes to <root>/<run>/eval/. The fine-tuned catalog embeddings are made
by Ray Data batch inference (an actor pool) and written to the store as parquet. The serving
index is not written here but by `build_catalog_index` (jobs.index), from the export alone.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from recsys import hybrid, paths, significance, storage
from recsys.bm25 import BM25Index
from recsys.catalog_index import embed_catalog, local_export, open_text_encoder
from recsys.config import Config, to_dict
from recsys.encoder import TextEncoder, render_user_text
from recsys.index import build_index
from recsys.items import read_items
from recsys.metrics import average, per_query_metrics
from recsys.runtime import Progress
from recsys.sequence import SequenceCatalog, SequenceModel, open_sequence_tower

log = logging.getLogger(__name__)


def _read_dir(uri: str, cfg: Config) -> pa.Table | None:
    return storage.read_parquet_dir(uri, cfg.storage)


def build_queries(ex: pa.Table, kind: str) -> list[dict[str, Any]]:
    """One evaluation query per next-item row; per (user, query) for search with graded gains.

    Each query has `judged` (every example item -> gain, gain-0 judgements included: the
    re-rank candidates), `relevant` (the items with gain > 0: what metrics count) and `key`, a
    string naming the query the same way in every run over the same data (JSON of user and
    query text for search; user, time and target item for next-item; `#n` on repeats) so two
    runs' per-query values can be paired whatever order the examples were read in.
    """
    rows = ex.to_pylist()
    if kind == "next_item":
        out = [
            {"key": json.dumps([r["user_id"], r["timestamp"].isoformat(), r["item_id"]]), "query": None,
             "history": r["history"] or [], "judged": {r["item_id"]: 1.0}}
            for r in rows
        ]
    else:
        grouped: dict[tuple[Any, str], dict[str, Any]] = {}
        for r in rows:
            g = grouped.setdefault(
                (r["user_id"], r["query"]),
                {"key": json.dumps([r["user_id"], r["query"]]), "query": r["query"], "history": r["history"] or [], "judged": {}},
            )
            # Graded judgements (Home Depot's 1-3): gain = relevance - 1, so "irrelevant" is 0.
            gain = (r["relevance"] - 1.0) if r["relevance"] is not None else r["weight"]
            g["judged"][r["item_id"]] = max(g["judged"].get(r["item_id"], 0.0), float(gain))
        out = list(grouped.values())
    seen: dict[str, int] = {}
    for q in out:
        q["relevant"] = {i: g for i, g in q["judged"].items() if g > 0}
        n = seen[q["key"]] = seen.get(q["key"], 0) + 1
        if n > 1:
            q["key"] += f"#{n}"
    return out


def _rank_popularity(items: pa.Table, queries: list[dict[str, Any]], k: int, exclude: list[set[str]] | None) -> list[list[str]]:
    ids = items.column("item_id").to_pylist()
    pop = items.column("popularity").to_numpy()
    order = [ids[i] for i in np.argsort(-pop, kind="stable")]
    out = []
    for n in range(len(queries)):
        ex = exclude[n] if exclude else set()
        out.append([i for i in order[: k + len(ex)] if i not in ex][:k])
    return out


def _rank_bm25(items: pa.Table, retriever: BM25Index, texts: list[str], k: int, exclude: list[set[str]] | None) -> list[list[str]]:
    ids = items.column("item_id").to_pylist()
    extra = max((len(e) for e in exclude), default=0) if exclude else 0
    kk = min(k + extra, len(ids))
    docs = retriever.retrieve(texts, kk)
    out = []
    for n, row in enumerate(docs):
        ex = exclude[n] if exclude else set()
        out.append([ids[j] for j in row if ids[j] not in ex][:k])
    return out


def _bm25_scorer(items: pa.Table, cfg: Config) -> BM25Index:
    return BM25Index.build(items.column("text").to_pylist(), items.column("item_id").to_pylist(), cfg.bm25)


def _rerank(candidates: list[list[str]], scores: list[np.ndarray]) -> list[list[str]]:
    """Each query's candidates by score, descending (ties keep the candidates' order)."""
    return [[c[j] for j in np.argsort(-s, kind="stable")] for c, s in zip(candidates, scores, strict=True)]


def _rerank_all(
    items: pa.Table, queries: list[dict[str, Any]], texts: list[str], q_emb: dict[str, np.ndarray],
    item_emb: dict[str, np.ndarray], systems: Sequence[str], bm25: BM25Index | None = None,
) -> dict[str, list[list[str]]]:
    """Re-rank each query's judged items (every judged item, whatever its gain) per system."""
    pos = {i: n for n, i in enumerate(items.column("item_id").to_pylist())}
    cands = [[i for i in q["judged"] if i in pos] for q in queries]
    rows = [np.array([pos[i] for i in c], dtype=np.int64) for c in cands]
    out: dict[str, list[list[str]]] = {}
    if "popularity" in systems:
        pop = items.column("popularity").to_numpy().astype(np.float64)
        out["popularity"] = _rerank(cands, [pop[r] for r in rows])
    if "bm25" in systems:
        if bm25 is None:
            raise ValueError("_rerank_all: the bm25 system needs the BM25 index (built with the config's analyser)")
        out["bm25"] = _rerank(cands, [bm25.scores(t, r) for t, r in zip(texts, rows, strict=True)])
    for name, emb in item_emb.items():
        out[name] = _rerank(cands, [emb[r] @ q for r, q in zip(rows, q_emb[name], strict=True)])
    return out


def pooled_history(histories: list[list[str]], item_ids: list[str], emb: np.ndarray, n: int, decay: float) -> np.ndarray:
    """Users as the L2-normalised decayed sum of their newest `n` history item embeddings."""
    pos = {i: k for k, i in enumerate(item_ids)}
    out = np.zeros((len(histories), emb.shape[1]), dtype=np.float32)  # (users, dim)
    for u, hist in enumerate(histories):
        rows = [pos[h] for h in hist if h in pos][:n]  # histories are newest first
        if rows:
            v = (decay ** np.arange(len(rows), dtype=np.float32))[:, None] * emb[rows]
            s = v.sum(0)
            out[u] = s / max(float(np.linalg.norm(s)), 1e-12)
    return out


def rank_with_sequence_tower(
    model: SequenceModel, histories: list[list[str]], text_emb: np.ndarray, item_ids: list[str], k: int,
    exclude: list[set[str]] | None,
) -> list[list[str]]:
    """Full-catalog top-k by the sequence tower over the catalog's text embeddings; histories
    newest first (items missing from the catalog are left out)."""
    pos = {i: n for n, i in enumerate(item_ids)}
    rows = [[pos[h] for h in hist if h in pos] for hist in histories]
    ex_rows = [[pos[i] for i in ex if i in pos] for ex in exclude] if exclude else None
    catalog = SequenceCatalog(model, text_emb, item_ids)  # the one history -> top-k, as served
    out: list[list[str]] = []
    for sl in _chunks(len(rows), 2048):
        out += [[item_ids[i] for i in top] for top, _ in catalog.rank(rows[sl], k, None, ex_rows[sl] if ex_rows else None)]
    return out


def _query_texts(queries: list[dict[str, Any]], text_of: dict[str, str], n_hist: int) -> list[str]:
    return [render_user_text(q["query"], [text_of[h] for h in q["history"] if h in text_of], n_hist) for q in queries]


def hybrid_candidates(
    queries: list[dict[str, Any]], bm25_texts: list[str], q_emb: np.ndarray, item_emb: np.ndarray, item_ids: list[str],
    bm25: BM25Index, n: int, exclude: list[set[str]] | None,
) -> list[hybrid.Candidates]:
    pos = {i: k for k, i in enumerate(item_ids)}
    ex_rows = [[pos[i] for i in ex if i in pos] for ex in exclude] if exclude else None
    bar = Progress(len(queries), "hybrid candidates", "queries")
    out = []
    for sl in _chunks(len(queries), 256):
        out += hybrid.query_candidates(q_emb[sl], bm25_texts[sl], item_emb, bm25.scores, n, ex_rows[sl] if ex_rows else None)
        bar.update(sl.stop - sl.start)
    bar.close()
    return out


def choose_hybrid_fusion(
    cfg: Config, items: pa.Table, enc: TextEncoder, item_emb: np.ndarray, bm25: BM25Index,
) -> tuple[hybrid.Fusion, dict[str, Any]]:
    """The fusion for `hybrid`: the config's when it fixes one, else the best on the
    `hybrid.split` search queries (never the evaluated split: evaluate refuses that), and a
    record of how it was chosen. Without search queries there the parameter-free RRF is used."""
    base = hybrid.base_fusion(cfg)
    if not hybrid.needs_choice(cfg):
        return base, {"chosen_on": None, "reason": "fixed by the config"}
    split = cfg.hybrid.split
    ex = _read_dir(paths.examples(cfg, "search", split), cfg)
    if ex is None or ex.num_rows == 0:
        fallback = dataclasses.replace(base, method="rrf")
        log.warning("hybrid: no search queries in the %s split to choose the fusion on; using %s", split, fallback.describe())
        return fallback, {"chosen_on": None, "reason": f"no search queries in the {split} split"}
    queries = build_queries(ex, "search")
    if cfg.eval.max_queries:
        queries = queries[: cfg.eval.max_queries]
    text_of = dict(zip(items.column("item_id").to_pylist(), items.column("text").to_pylist(), strict=True))
    dense_texts = _query_texts(queries, text_of, enc.user_history_items)
    q_emb = _encode(enc.encode_queries, dense_texts, cfg.eval.embed_batch_size, enc.dim, f"encode {split} queries (hybrid)", "queries")
    # BM25 reads the query alone, as POST /search does (the towers read what they were trained on).
    exclude = [set(q["history"]) for q in queries] if cfg.eval.exclude_history else None
    cands = hybrid_candidates(queries, [q["query"] for q in queries], q_emb, item_emb,
                              items.column("item_id").to_pylist(), bm25, hybrid.depth(base, max(cfg.eval.ks)), exclude)
    method = cfg.hybrid.fusion
    fusion, grid = hybrid.choose_fusion(cands, [q["relevant"] for q in queries], items.column("item_id").to_pylist(),
                                        method=method, weight=cfg.hybrid.weight, base=base)
    return fusion, {"chosen_on": {"split": split, "queries": len(queries), "metric": "ndcg@10", "grid": grid}}


def _plot(curves: dict[str, dict[int, float]], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in curves.items():
        ks = sorted(pts)
        ax.plot(ks, [pts[k] for k in ks], marker="o", label=name)
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def markdown_table(metrics: dict[str, dict[str, float]], names: Sequence[str]) -> str:
    systems = list(metrics)
    lines = ["| system | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for s in systems:
        lines.append(f"| {s} | " + " | ".join(f"{metrics[s][n]:.4f}" if n in metrics[s] else "-" for n in names) + " |")
    return "\n".join(lines)


# Systems every other one is compared with (report.json "significance"), weakest first.
# `text_tower`: a sequence export's own text user tower (the history as one text), beside the
# sequence tower that `fine_tuned` then names for next-item.
BASELINES = ("popularity", "bm25", "zero_shot", "text_tower")
TASK_ORDER = ("next_item", "search", "search_rerank")
# Pairs tested beside system-vs-baseline: what hybrid adds to the dense ranking it fuses.
EXTRA_PAIRS = (("hybrid", "fine_tuned"),)


def headline_metrics(ks: Sequence[int]) -> list[str]:
    """The few metrics a reader looks at first: NDCG, recall and MRR at 10, recall at 50 (at the
    evaluated K nearest to 10 / 50 when those are not evaluated)."""
    ks = sorted(set(ks))
    small = min(ks, key=lambda k: abs(k - 10))  # ties: the smaller K
    large = min(ks, key=lambda k: abs(k - 50))
    names = [f"ndcg@{small}", f"recall@{small}"]
    if large != small:
        names.append(f"recall@{large}")
    return [*names, f"mrr@{small}"]


def summary_table(
    metrics: dict[str, dict[str, float]], tasks: Sequence[str], ks: Sequence[int],
    comparisons: Sequence[dict[str, Any]] = (),
) -> str:
    """One small table per task (systems x headline metrics, best in bold), then how fine_tuned
    compares with each baseline on the first headline metric (paired test over queries)."""
    names = headline_metrics(ks)
    blocks = []
    for task in tasks:
        systems = [s for s in metrics if f"{task}/{names[0]}" in metrics[s]]
        if not systems:
            continue
        best = {n: max(metrics[s].get(f"{task}/{n}", float("-inf")) for s in systems) for n in names}
        lines = [f"{task} ({int(metrics[systems[0]].get(f'{task}/queries', 0))} queries)", "",
                 "| system | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
        for s in systems:
            cells = []
            for n in names:
                v = metrics[s].get(f"{task}/{n}")
                cells.append("-" if v is None else f"**{v:.4f}**" if v == best[n] else f"{v:.4f}")
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        vs = [c for c in comparisons if c["task"] == task and c["system"] == "fine_tuned" and c["metric"] == names[0]]
        if vs:
            lines += ["", f"fine_tuned vs the baselines on {names[0]}, paired over queries:"]
            lines += [f"- vs {c['baseline']}: {significance.describe(c)}" for c in vs]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def compare_systems(
    per_query: dict[str, dict[str, dict[str, np.ndarray]]], metric_names: Sequence[str],
    resamples: int = 10_000, seed: int = 0,
) -> list[dict[str, Any]]:
    """Paired tests (recsys.significance) of every system against every baseline before it in
    BASELINES order, per task (`per_query`: task -> system -> metric -> per-query values)."""
    rows = []
    for task, systems in per_query.items():
        order = [s for s in BASELINES if s in systems] + [s for s in systems if s not in BASELINES]
        pairs = [(system, base) for i, system in enumerate(order) for base in order[:i] if base in BASELINES]
        pairs += [(system, base) for system, base in EXTRA_PAIRS if system in systems and base in systems]
        for system, base in pairs:
            for metric in metric_names:
                try:
                    r = significance.paired_comparison(systems[system][metric], systems[base][metric], resamples=resamples, seed=seed)
                except ValueError as err:
                    log.warning("no significance test of %s vs %s on %s %s: %s", system, base, task, metric, err)
                    continue
                rows.append({"task": task, "metric": metric, "system": system, "baseline": base, **r})
    return rows


PER_QUERY_FILE = "per_query.parquet"


def per_query_table(per_query: dict[str, dict[str, dict[str, np.ndarray]]], keys: dict[str, list[str]]) -> pa.Table:
    """Long format, one row per (task, query, system): task, query_index, query_key, system,
    scored (False: nothing relevant, the metrics are NaN) and one column per metric."""
    parts = []
    for task, systems in per_query.items():
        for system, values in systems.items():
            n = len(keys[task])
            first = next(iter(values.values()))
            cols: dict[str, Any] = {
                "task": pa.array([task] * n, pa.string()),
                "query_index": pa.array(np.arange(n, dtype=np.int32)),
                "query_key": pa.array(keys[task], pa.string()),
                "system": pa.array([system] * n, pa.string()),
                "scored": pa.array(~np.isnan(first)),
            }
            cols.update({name: pa.array(v, pa.float64()) for name, v in values.items()})
            parts.append(pa.table(cols))
    return pa.concat_tables(parts)


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


def _encode(encode: Any, texts: list[str], batch_size: int, dim: int, desc: str, unit: str) -> np.ndarray:
    """`encode(texts, batch_size=...)` chunk by chunk with progress; the chunks are whole
    batches, so the embeddings equal one call's."""
    parts = []
    bar = Progress(len(texts), desc, unit)
    for sl in _chunks(len(texts), batch_size * 32):
        parts.append(encode(texts[sl], batch_size=batch_size))
        bar.update(sl.stop - sl.start)
    bar.close()
    return np.concatenate(parts) if parts else np.zeros((0, dim), dtype=np.float32)


def _items(cfg: Config) -> pa.Table:
    return read_items(paths.items(cfg), cfg.storage)


def run(cfg: Config) -> dict[str, Any]:
    t0 = time.perf_counter()
    e = cfg.eval
    items = _items(cfg)
    text_of = dict(zip(items.column("item_id").to_pylist(), items.column("text").to_pylist(), strict=True))
    ks = sorted(set(e.ks))
    kmax = max(ks)
    export = paths.export_dir(cfg)
    have_export = storage.exists(storage.join(export, "recsys_model.json"), cfg.storage)
    encoders: dict[str, str] = {}
    if "zero_shot" in e.systems:
        encoders["zero_shot"] = cfg.model.name_or_path
    if "fine_tuned" in e.systems:
        if have_export:
            encoders["fine_tuned"] = local_export(cfg)
        else:
            log.warning("fine_tuned skipped: no exported model at %s (run the train job first)", export)

    if "hybrid" in e.systems and e.split == cfg.hybrid.split and hybrid.needs_choice(cfg):
        raise ValueError(f"eval.split and hybrid.split are both {e.split!r}: the fusion would be chosen on the queries it is evaluated on")
    dense_of_hybrid = "fine_tuned" if "fine_tuned" in encoders else "zero_shot" if "zero_shot" in encoders else ""
    if "hybrid" in e.systems and not dense_of_hybrid:
        raise ValueError("eval.systems has hybrid but neither fine_tuned (with an export) nor zero_shot to fuse BM25 with")
    bm25_index = _bm25_scorer(items, cfg) if {"bm25", "hybrid"} & set(e.systems) else None
    hybrid_report: dict[str, Any] = {}
    item_emb: dict[str, np.ndarray] = {}
    timings: dict[str, float] = {}
    # An export with a sequence user tower ranks next-item with it (as it is served).
    # The same rule as serving: the export's metadata says whether it has one (never a folder's presence).
    sequence_towers = {n: m for n, p in encoders.items() if n == "fine_tuned" and (m := open_sequence_tower(p)) is not None}
    for name, path in encoders.items():
        t = time.perf_counter()
        if name == "fine_tuned":
            log.info("embedding %d catalog items with %s by Ray Data batch inference", items.num_rows, name)
            item_emb[name] = embed_catalog(cfg, path, items, paths.embeddings(cfg))[0]
        else:
            enc = open_text_encoder(path, cfg)
            item_emb[name] = _encode(enc.encode_items, items.column("text").to_pylist(), e.embed_batch_size, enc.dim,
                                     f"embed catalog ({name})", "items")
        timings[f"embed_catalog/{name}_s"] = round(time.perf_counter() - t, 2)

    metrics: dict[str, dict[str, float]] = {}
    per_query: dict[str, dict[str, dict[str, np.ndarray]]] = {}  # task -> system -> metric -> values
    keys: dict[str, list[str]] = {}  # task -> query keys, aligned with the per-query values
    opened: dict[str, TextEncoder] = {}  # system -> its encoder, loaded once for every task
    # The task the model was trained for (both kinds for "both"): a search-only data set's
    # per-query "sequences" are not a recommendation task.
    kinds = ("next_item", "search") if cfg.train.task == "both" else (cfg.train.task,)
    for kind in kinds:
        ex = _read_dir(paths.examples(cfg, kind, e.split), cfg)
        if ex is None or ex.num_rows == 0:
            continue
        queries = build_queries(ex, kind)
        if e.max_queries:
            queries = queries[: e.max_queries]
        exclude = [set(q["history"]) for q in queries] if e.exclude_history else None
        relevant = [q["relevant"] for q in queries]
        prefix = f"{e.split}/{kind}"
        rankings: dict[str, list[list[str]]] = {}
        q_embs: dict[str, np.ndarray] = {}
        if "popularity" in e.systems:
            rankings["popularity"] = _rank_popularity(items, queries, kmax, exclude)
        if "bm25" in e.systems:
            rankings["bm25"] = _rank_bm25(items, bm25_index, _query_texts(queries, text_of, cfg.model.user_history_items), kmax, exclude)
        for name, path in encoders.items():
            t = time.perf_counter()
            enc = opened[name] = opened.get(name) or open_text_encoder(path, cfg)
            index = build_index(item_emb[name], items.column("item_id").to_pylist(), e.index, e.exact_max_items,
                                nlist=e.ivf_nlist, nprobe=e.ivf_nprobe, filter_exact_max_kept=e.filter_exact_max_kept)
            seq = sequence_towers.get(name) if kind == "next_item" else None
            # Over the pretrained item tower, a sequence export's text user tower is zero_shot's.
            text_user = seq is None or enc.meta.get("sequence_item_tower") == "fine_tuned"
            texts = _query_texts(queries, text_of, enc.user_history_items) if text_user else []
            bar = Progress(len(texts), f"rank {kind} ({name})", "queries")
            q_parts: list[np.ndarray] = []
            ranked: list[list[str]] = []
            for sl in _chunks(len(texts), e.embed_batch_size * 16):  # whole batches: same embeddings
                q_parts.append(enc.encode_queries(texts[sl], batch_size=e.embed_batch_size))
                ranked += index.search(q_parts[-1], kmax, exclude[sl] if exclude else None)[1]
                bar.update(sl.stop - sl.start)
            bar.close()
            q_embs[name] = np.concatenate(q_parts) if q_parts else np.zeros((0, enc.dim), dtype=np.float32)
            if seq is None:
                rankings[name] = ranked
            else:
                if text_user:
                    rankings["text_tower"] = ranked
                rankings[name] = rank_with_sequence_tower(seq, [q["history"] for q in queries], item_emb[name],
                                                          items.column("item_id").to_pylist(), kmax, exclude)
            if kind == "next_item" and e.history_pool_items > 0:
                pooled = pooled_history([q["history"] for q in queries], items.column("item_id").to_pylist(),
                                        item_emb[name], e.history_pool_items, e.history_pool_decay)
                rankings[f"{name}+histpool"] = index.search(pooled, kmax, exclude)[1]
            timings[f"rank/{kind}/{name}_s"] = round(time.perf_counter() - t, 2)
        if kind == "search" and "hybrid" in e.systems:
            t = time.perf_counter()
            fusion, how = choose_hybrid_fusion(cfg, items, opened[dense_of_hybrid], item_emb[dense_of_hybrid], bm25_index)
            cands = hybrid_candidates(queries, [q["query"] for q in queries], q_embs[dense_of_hybrid],
                                      item_emb[dense_of_hybrid], items.column("item_id").to_pylist(), bm25_index,
                                      hybrid.depth(fusion, kmax), exclude)
            rankings["hybrid"] = hybrid.rank_ids(cands, fusion, kmax, items.column("item_id").to_pylist())
            hybrid_report = {"dense": dense_of_hybrid, "fusion": fusion.to_dict(), "described": fusion.describe(), **how}
            timings["rank/search/hybrid_s"] = round(time.perf_counter() - t, 2)
        keys[prefix] = [q["key"] for q in queries]
        for name, ranked in rankings.items():
            per_query.setdefault(prefix, {})[name] = values = per_query_metrics(ranked, relevant, ks)
            metrics.setdefault(name, {}).update(average(values, prefix))
        if kind == "search" and e.rerank_judged:
            texts = _query_texts(queries, text_of, cfg.model.user_history_items)
            reranked = _rerank_all(items, queries, texts, q_embs, item_emb, e.systems, bm25_index)
            rprefix = f"{e.split}/search_rerank"
            keys[rprefix] = keys[prefix]
            for name, ranked in reranked.items():
                per_query.setdefault(rprefix, {})[name] = values = per_query_metrics(ranked, relevant, ks)
                metrics.setdefault(name, {}).update(average(values, rprefix))

    # No serving index here: that is build_catalog_index's (jobs.index), from the export only.
    names = sorted({n for m in metrics.values() for n in m if not n.endswith("/queries")})
    table = markdown_table(metrics, names)
    note = f"split={e.split}; full ranking over {items.num_rows} items; history items {'excluded' if e.exclude_history else 'NOT excluded'} from rankings"
    markdown = f"## Evaluation ({note})\n\n{table}\n"
    t = time.perf_counter()
    comparisons = compare_systems(per_query, headline_metrics(ks)[:2])  # NDCG and recall at 10
    timings["significance_s"] = round(time.perf_counter() - t, 2)
    tasks = sorted(per_query, key=lambda p: TASK_ORDER.index(p.split("/", 1)[1]))
    out = paths.eval_dir(cfg)
    summary = summary_table(metrics, tasks, ks, comparisons)
    sig_table = significance.markdown_table(comparisons, ["task", "metric", "system", "baseline"]) if comparisons else "(no pairs to compare)"
    report_md = (f"## Evaluation ({note})\n\n### Summary\n\n{summary}\n\n### Paired significance over queries "
                 f"(bootstrap 10,000 resamples, seed 0; t-test)\n\n{sig_table}\n\n### All metrics\n\n{table}\n")
    summary += (f"\n\nAll metrics and significance: {storage.join(out, 'report.md')}; Recall@K curves: "
                f"{storage.join(out, 'report.png')}; per-query values: {storage.join(out, PER_QUERY_FILE)}")
    settings = {"note": note, **to_dict(cfg)["eval"]}
    settings["checkpoint"] = paths.relative(cfg, settings["checkpoint"])
    if hybrid_report:
        settings["hybrid"] = hybrid_report
    report = {"metrics": metrics, "significance": comparisons, "settings": settings, "timings": timings,
              "per_query": PER_QUERY_FILE, "paths": "relative to storage.root"}
    storage.write_json(storage.join(out, "report.json"), paths.relative_all(report, cfg), cfg.storage)
    storage.write_bytes(storage.join(out, "report.md"), report_md.encode(), cfg.storage)
    if per_query:
        storage.write_parquet(per_query_table(per_query, keys), storage.join(out, PER_QUERY_FILE), cfg.storage)
    curves = {}
    for s, m in metrics.items():
        for kind in ("next_item", "search"):
            pts = {k: m[f"{e.split}/{kind}/recall@{k}"] for k in ks if f"{e.split}/{kind}/recall@{k}" in m}
            if pts:
                curves[f"{s} ({kind})"] = pts
    storage.write_bytes(storage.join(out, "report.png"), _plot(curves, f"Recall@K, {e.split} split"), cfg.storage)
    log.info("evaluation written to %s in %.1fs", out, time.perf_counter() - t0)
    return {"metrics": metrics, "markdown": markdown, "summary": summary, "significance": comparisons,
            "report_dir": out, "wall_s": round(time.perf_counter() - t0, 1)}

