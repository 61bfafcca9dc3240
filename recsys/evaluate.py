"""Evaluation: the fine-tuned model against popularity, BM25 and the zero-shot pretrained encoder.

Full ranking over the whole catalog (no sampled negatives). The report (JSON, Markdown table,
PNG of Recall@K curves) goes to <root>/<run>/eval/. The fine-tuned catalog embeddings are made
by Ray Data batch inference (an actor pool) and written to the store as parquet; the index over
them is saved beside the model for serving.
"""

from __future__ import annotations

import io
import logging
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recsys import paths, storage
from recsys.config import Config, to_dict
from recsys.encoder import TextEncoder, render_user_text
from recsys.index import build_index
from recsys.metrics import ranking_metrics

log = logging.getLogger(__name__)


def _read_dir(uri: str, cfg: Config) -> pa.Table | None:
    files = storage.list_files(uri, cfg.storage, ".parquet")
    if not files:
        return None
    fs, _ = storage.filesystem(uri, cfg.storage)
    return pa.concat_tables([pq.read_table(storage.filesystem(f, cfg.storage)[1], filesystem=fs) for f in files])


def build_queries(ex: pa.Table, kind: str) -> list[dict[str, Any]]:
    """One evaluation query per next-item row; per (user, query) for search with graded gains."""
    rows = ex.to_pylist()
    if kind == "next_item":
        return [{"query": None, "history": r["history"] or [], "relevant": {r["item_id"]: 1.0}} for r in rows]
    grouped: dict[tuple[Any, str], dict[str, Any]] = {}
    for r in rows:
        g = grouped.setdefault((r["user_id"], r["query"]), {"query": r["query"], "history": r["history"] or [], "relevant": {}})
        gain = (r["relevance"] - 1.0) if r["relevance"] is not None else r["weight"]
        g["relevant"][r["item_id"]] = max(g["relevant"].get(r["item_id"], 0.0), float(gain))
    return list(grouped.values())


def _encoder(path: str, cfg: Config) -> TextEncoder:
    return TextEncoder.from_model_config(path, cfg.model)


def embed_catalog(cfg: Config, model_path: str, items: pa.Table, out_uri: str) -> np.ndarray:
    """Catalog embeddings by Ray Data batch inference (actor pool; GPU through config)."""
    import ray.data

    from recsys.runtime import ensure_ray

    ensure_ray()

    class Embed:
        def __init__(self) -> None:
            self.encoder = _encoder(model_path, cfg)

        def __call__(self, batch: pa.Table) -> pa.Table:
            emb = self.encoder.encode_items(batch.column("text").to_pylist(), batch_size=cfg.eval.embed_batch_size)
            return pa.table({"item_id": batch.column("item_id"), "embedding": pa.array(list(emb), pa.list_(pa.float32()))})

    ds = ray.data.from_arrow(items.select(["item_id", "text"])).map_batches(
        Embed,
        batch_format="pyarrow",
        batch_size=max(cfg.eval.embed_batch_size, 256),
        compute=ray.data.ActorPoolStrategy(size=max(1, cfg.eval.embed_actors)),
        # Fractional CPUs: whole-CPU actors starve the read tasks on small machines.
        num_cpus=0.5 if not cfg.train.use_gpu else 1,
        num_gpus=1 if cfg.train.use_gpu else 0,
    )
    table = pa.concat_tables(ray.get(ds.to_arrow_refs()))
    storage.write_parquet(table, storage.join(out_uri, "part-00000.parquet"), cfg.storage)
    order = {i: n for n, i in enumerate(table.column("item_id").to_pylist())}
    emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    return emb[[order[i] for i in items.column("item_id").to_pylist()]].astype(np.float32)


def _rank_popularity(items: pa.Table, queries: list[dict[str, Any]], k: int, exclude: list[set[str]] | None) -> list[list[str]]:
    ids = items.column("item_id").to_pylist()
    pop = items.column("popularity").to_numpy()
    order = [ids[i] for i in np.argsort(-pop, kind="stable")]
    out = []
    for n in range(len(queries)):
        ex = exclude[n] if exclude else set()
        out.append([i for i in order[: k + len(ex)] if i not in ex][:k])
    return out


def _rank_bm25(items: pa.Table, texts: list[str], k: int, exclude: list[set[str]] | None) -> list[list[str]]:
    import bm25s

    ids = items.column("item_id").to_pylist()
    retriever = _bm25_scorer(items)
    extra = max((len(e) for e in exclude), default=0) if exclude else 0
    kk = min(k + extra, len(ids))
    docs, _ = retriever.retrieve(bm25s.tokenize(texts, show_progress=False), k=kk, show_progress=False)
    out = []
    for n, row in enumerate(docs):
        ex = exclude[n] if exclude else set()
        out.append([ids[j] for j in row if ids[j] not in ex][:k])
    return out


def _bm25_scorer(items: pa.Table) -> Any:
    import bm25s

    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(items.column("text").to_pylist(), show_progress=False), show_progress=False)
    return retriever


def _rerank(candidates: list[list[str]], scores: list[np.ndarray]) -> list[list[str]]:
    """Each query's candidates by score, descending (ties keep the candidates' order)."""
    return [[c[j] for j in np.argsort(-s, kind="stable")] for c, s in zip(candidates, scores, strict=True)]


def _rerank_all(
    items: pa.Table, queries: list[dict[str, Any]], texts: list[str], q_emb: dict[str, np.ndarray],
    item_emb: dict[str, np.ndarray], systems: Sequence[str],
) -> dict[str, list[list[str]]]:
    """Re-rank each query's judged items (every judged item, whatever its gain) per system."""
    import bm25s

    pos = {i: n for n, i in enumerate(items.column("item_id").to_pylist())}
    cands = [[i for i in q["relevant"] if i in pos] for q in queries]
    rows = [np.array([pos[i] for i in c], dtype=np.int64) for c in cands]
    out: dict[str, list[list[str]]] = {}
    if "popularity" in systems:
        pop = items.column("popularity").to_numpy().astype(np.float64)
        out["popularity"] = _rerank(cands, [pop[r] for r in rows])
    if "bm25" in systems:
        retriever = _bm25_scorer(items)
        toks = bm25s.tokenize(texts, return_ids=False, show_progress=False)
        out["bm25"] = _rerank(cands, [retriever.get_scores(t)[r] if t else np.zeros(len(r)) for t, r in zip(toks, rows, strict=True)])
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


def _query_texts(queries: list[dict[str, Any]], text_of: dict[str, str], n_hist: int) -> list[str]:
    return [render_user_text(q["query"], [text_of[h] for h in q["history"] if h in text_of], n_hist) for q in queries]


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


def _local_export(cfg: Config) -> str:
    export = paths.export_dir(cfg)
    if not storage.is_remote(export):
        return export
    return str(storage.download_dir(export, tempfile.mkdtemp(prefix="recsys-export-"), cfg.storage))


def _items(cfg: Config) -> pa.Table:
    items = _read_dir(paths.items(cfg), cfg)
    if items is None:
        raise FileNotFoundError(f"no items table at {paths.items(cfg)}: run the prepare job first")
    return items


def build_catalog_index(cfg: Config) -> dict[str, Any]:
    """The serving artefacts alone: catalog embeddings by the exported model, and the index."""
    t0 = time.perf_counter()
    items = _items(cfg)
    export = paths.export_dir(cfg)
    if not storage.exists(storage.join(export, "recsys_model.json"), cfg.storage):
        raise FileNotFoundError(f"no exported model at {export}: run the train job first (or set eval.checkpoint)")
    emb = embed_catalog(cfg, _local_export(cfg), items, paths.embeddings(cfg))
    index = build_index(emb, items.column("item_id").to_pylist(), cfg.eval.index, cfg.eval.exact_max_items)
    index.save(paths.index_dir(cfg), cfg.storage)
    out = {"index": paths.index_dir(cfg), "kind": index.kind, "items": items.num_rows, "dim": int(emb.shape[1]),
           "embeddings": paths.embeddings(cfg), "model": export, "wall_s": round(time.perf_counter() - t0, 1)}
    log.info("index over %d items (%s) written to %s", items.num_rows, index.kind, out["index"])
    return out


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
            encoders["fine_tuned"] = _local_export(cfg)
        else:
            log.warning("fine_tuned skipped: no exported model at %s (run the train job first)", export)

    item_emb: dict[str, np.ndarray] = {}
    timings: dict[str, float] = {}
    for name, path in encoders.items():
        t = time.perf_counter()
        if name == "fine_tuned":
            item_emb[name] = embed_catalog(cfg, path, items, paths.embeddings(cfg))
        else:
            item_emb[name] = _encoder(path, cfg).encode_items(items.column("text").to_pylist(), batch_size=e.embed_batch_size)
        timings[f"embed_catalog/{name}_s"] = round(time.perf_counter() - t, 2)

    metrics: dict[str, dict[str, float]] = {}
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
            rankings["bm25"] = _rank_bm25(items, _query_texts(queries, text_of, cfg.model.user_history_items), kmax, exclude)
        for name, path in encoders.items():
            t = time.perf_counter()
            enc = _encoder(path, cfg)
            q_emb = enc.encode_queries(_query_texts(queries, text_of, enc.user_history_items), batch_size=e.embed_batch_size)
            index = build_index(item_emb[name], items.column("item_id").to_pylist(), e.index, e.exact_max_items)
            rankings[name] = index.search(q_emb, kmax, exclude)[1]
            q_embs[name] = q_emb
            if kind == "next_item" and e.history_pool_items > 0:
                pooled = pooled_history([q["history"] for q in queries], items.column("item_id").to_pylist(),
                                        item_emb[name], e.history_pool_items, e.history_pool_decay)
                rankings[f"{name}+histpool"] = index.search(pooled, kmax, exclude)[1]
            timings[f"rank/{kind}/{name}_s"] = round(time.perf_counter() - t, 2)
        for name, ranked in rankings.items():
            metrics.setdefault(name, {}).update(ranking_metrics(ranked, relevant, ks, prefix))
        if kind == "search" and e.rerank_judged:
            texts = _query_texts(queries, text_of, cfg.model.user_history_items)
            reranked = _rerank_all(items, queries, texts, q_embs, item_emb, e.systems)
            for name, ranked in reranked.items():
                metrics.setdefault(name, {}).update(ranking_metrics(ranked, relevant, ks, f"{e.split}/search_rerank"))

    best = "fine_tuned" if "fine_tuned" in item_emb else next(iter(item_emb), None)
    if best:
        build_index(item_emb[best], items.column("item_id").to_pylist(), e.index, e.exact_max_items).save(paths.index_dir(cfg), cfg.storage)

    names = sorted({n for m in metrics.values() for n in m if not n.endswith("/queries")})
    table = markdown_table(metrics, names)
    note = f"split={e.split}; full ranking over {items.num_rows} items; history items {'excluded' if e.exclude_history else 'NOT excluded'} from rankings"
    markdown = f"## Evaluation ({note})\n\n{table}\n"
    report = {"metrics": metrics, "settings": {"note": note, **to_dict(cfg)["eval"]}, "timings": timings, "index": paths.index_dir(cfg) if best else None, "index_of": best}
    out = paths.eval_dir(cfg)
    storage.write_json(storage.join(out, "report.json"), report, cfg.storage)
    storage.write_bytes(storage.join(out, "report.md"), markdown.encode(), cfg.storage)
    curves = {}
    for s, m in metrics.items():
        for kind in ("next_item", "search"):
            pts = {k: m[f"{e.split}/{kind}/recall@{k}"] for k in ks if f"{e.split}/{kind}/recall@{k}" in m}
            if pts:
                curves[f"{s} ({kind})"] = pts
    storage.write_bytes(storage.join(out, "report.png"), _plot(curves, f"Recall@K, {e.split} split"), cfg.storage)
    log.info("evaluation written to %s in %.1fs", out, time.perf_counter() - t0)
    return {"metrics": metrics, "markdown": markdown, "report_dir": out, "wall_s": round(time.perf_counter() - t0, 1)}

