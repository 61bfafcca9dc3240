"""The report on a tiny prepared shop with a tiny exported model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from recsys import paths, storage
from recsys.config import load_config

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]


def test_report_on_tiny_model(ray_cluster, tiny_model, tmp_path) -> None:
    from recsys import evaluate
    from recsys.data import prepare
    from recsys.model import build_two_tower, export_model, load_tokenizer

    cfg = load_config(REPO / "jobs/configs/pipeline_tiny.yaml", [f"model.name_or_path={tiny_model}", "eval.ks=[1,5,20]", "eval.rerank_judged=true"])
    cfg.storage.root = str(tmp_path / "root")
    cfg.eval.checkpoint = paths.export_dir(cfg)  # an absolute local path, which must not reach the report
    prepare.run(cfg)
    export_model(build_two_tower(cfg.model), load_tokenizer(cfg.model), cfg.model, {}, paths.export_dir(cfg))
    result = evaluate.run(cfg)
    m = result["metrics"]
    assert set(m) == {"popularity", "bm25", "zero_shot", "fine_tuned", "zero_shot+histpool", "fine_tuned+histpool"}
    for name, system in m.items():
        assert "test/next_item/recall@20" in system
        assert ("test/search/ndcg@5" in system) != name.endswith("+histpool")  # pooling is next-item only
        assert all(0.0 <= v <= 1.0 for k, v in system.items() if not k.endswith("/queries"))
    # The exported tiny model is the same network as zero-shot: identical rankings.
    assert m["fine_tuned"]["test/next_item/recall@20"] == pytest.approx(m["zero_shot"]["test/next_item/recall@20"])
    out = Path(paths.eval_dir(cfg))
    report = json.loads((out / "report.json").read_text())
    assert report["metrics"] == json.loads(json.dumps(m))
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert "| popularity |" in (out / "report.md").read_text()
    _check_per_query_and_significance(out, m, report, result)
    _check_no_machine_paths(report, [str(tmp_path), str(REPO), str(Path.home())])
    assert report["settings"]["checkpoint"] == "tiny/export"
    assert storage.list_files(paths.embeddings(cfg), cfg.storage, ".parquet")
    assert not Path(paths.index_dir(cfg)).exists(), "evaluation writes no serving index (jobs.index does)"


def _check_per_query_and_significance(out: Path, m: dict, report: dict, result: dict) -> None:
    import pyarrow.parquet as pq

    t = pq.read_table(out / "per_query.parquet")
    tasks = set(t.column("task").to_pylist())
    assert tasks == {"test/next_item", "test/search", "test/search_rerank"}
    rows = t.to_pylist()
    for task in tasks:
        for system in {r["system"] for r in rows if r["task"] == task}:
            sel = [r for r in rows if r["task"] == task and r["system"] == system]
            assert [r["query_index"] for r in sel] == list(range(len(sel)))
            assert len({r["query_key"] for r in sel}) == len(sel)  # keys name queries uniquely
            scored = [r for r in sel if r["scored"]]
            assert len(scored) == m[system][f"{task}/queries"]
            for metric in ("ndcg@5", "recall@20", "mrr@1"):
                assert np.mean([r[metric] for r in scored]) == pytest.approx(m[system][f"{task}/{metric}"])
    sig = report["significance"]
    assert sig == json.loads(json.dumps(result["significance"]))
    pairs = {(c["task"], c["metric"], c["system"], c["baseline"]) for c in sig}
    for base in ("popularity", "bm25", "zero_shot"):
        assert ("test/search", "ndcg@5", "fine_tuned", base) in pairs
    # The exported tiny model is the zero-shot network: per query identical, so within noise.
    same = next(c for c in sig if c["task"] == "test/next_item" and c["metric"] == "recall@5"
                and c["system"] == "fine_tuned" and c["baseline"] == "zero_shot")
    assert same["diff"] == 0.0 and same["p_bootstrap"] == 1.0 and same["verdict"] == "within noise"
    summary = result["summary"]
    assert "| system | ndcg@5 | recall@5 | recall@20 | mrr@5 |" in summary and "**" in summary
    assert "report.md" in summary and len(summary.splitlines()) < len(result["markdown"].splitlines()) + 40
    assert "Paired significance" in (out / "report.md").read_text()


def _check_no_machine_paths(report: dict, local: list[str]) -> None:
    """No string in report.json names a place on this machine: reports are committed."""
    def strings(obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                yield k
                yield from strings(v)
        elif isinstance(obj, list):
            for v in obj:
                yield from strings(v)
        elif isinstance(obj, str):
            yield obj

    bad = [s for s in strings(report) if s.startswith("/") or any(p in s for p in local)]
    assert not bad, f"absolute local paths in report.json: {bad}"


def test_committed_reports_carry_no_local_paths() -> None:
    reports = sorted((REPO / "docs" / "results").glob("*/report.json"))
    assert reports
    for f in reports:
        _check_no_machine_paths(json.loads(f.read_text()), ["/work/", "/home/", "/tmp/"])


def test_relative_paths() -> None:
    from recsys.config import Config

    cfg = Config()
    cfg.storage.root = "/srv/runs"
    assert paths.relative(cfg, "/srv/runs/amazon/index") == "amazon/index"
    assert paths.relative(cfg, "/srv/runs/") == "."
    assert paths.relative(cfg, "/srv/other/export") == "../other/export"
    assert paths.relative(cfg, "s3://bucket/model") == "s3://bucket/model"
    assert paths.relative(cfg, "") == ""
    cfg.storage.root = "s3://bucket/runs"
    assert paths.relative(cfg, "s3://bucket/runs/r1/export") == "r1/export"


def test_summary_is_compact_with_best_in_bold() -> None:
    from recsys.evaluate import headline_metrics, summary_table

    assert headline_metrics([10, 50]) == ["ndcg@10", "recall@10", "recall@50", "mrr@10"]
    assert headline_metrics([1, 5, 20]) == ["ndcg@5", "recall@5", "recall@20", "mrr@5"]
    metrics = {s: {f"t/search/{n}": v for n in headline_metrics([10, 50])} | {"t/search/queries": 3.0, "t/search/f1@10": 0.5}
               for s, v in (("bm25", 0.2), ("fine_tuned", 0.3))}
    text = summary_table(metrics, ["t/search"], [10, 50])
    assert text.splitlines() == [
        "t/search (3 queries)", "",
        "| system | ndcg@10 | recall@10 | recall@50 | mrr@10 |", "| --- | ---: | ---: | ---: | ---: |",
        "| bm25 | 0.2000 | 0.2000 | 0.2000 | 0.2000 |",
        "| fine_tuned | **0.3000** | **0.3000** | **0.3000** | **0.3000** |",
    ]


def test_serving_index_is_the_exports_and_refused_for_another_model(ray_cluster, tiny_model, tmp_path) -> None:
    """Issue 14: evaluation without an export writes no index (it used to save the zero-shot
    embeddings as the run's index, which deploy then served beside the export); the index and
    the catalog embeddings record the export's model_id; a model retrained to the same path
    refuses the old index, naming both identities."""
    import pyarrow.parquet as pq

    from recsys import catalog_index, evaluate
    from recsys.data import prepare
    from recsys.encoder import model_id_at
    from recsys.index import IndexModelMismatch, index_model_id, load_index
    from recsys.model import build_two_tower, export_model, load_tokenizer
    from serve.control import app_args

    cfg = load_config(REPO / "jobs/configs/pipeline_tiny.yaml", [f"model.name_or_path={tiny_model}", "eval.systems=[popularity,zero_shot]",
                                                                  f"storage.root={tmp_path / 'root'}"])
    prepare.run(cfg)
    evaluate.run(cfg)
    assert not storage.exists(storage.join(paths.index_dir(cfg), "index.json"), cfg.storage)

    export_model(build_two_tower(cfg.model), load_tokenizer(cfg.model), cfg.model, {}, paths.export_dir(cfg))
    model_a = model_id_at(paths.export_dir(cfg))
    out = catalog_index.build_catalog_index(cfg)
    assert out["model_id"] == model_a == index_model_id(paths.index_dir(cfg))
    assert catalog_index.embeddings_model_id(paths.embeddings(cfg), cfg) == model_a
    (part,) = storage.list_files(paths.embeddings(cfg), cfg.storage, ".parquet")
    assert pq.read_schema(part).metadata[b"recsys.model_id"] == model_a.encode()
    assert app_args(cfg)["index_uri"] == paths.index_dir(cfg)
    # Issue 16: the BM25 index and the fusion chosen on the valid split are published with it.
    from recsys import hybrid

    bm25, fusion, record = hybrid.load_lexical(paths.index_dir(cfg), cfg.storage)
    assert bm25.item_ids == load_index(paths.index_dir(cfg)).ids
    assert record["chosen_on"]["split"] == "valid" and record["chosen_on"]["queries"] > 0
    assert fusion.describe() == out["fusion"] and record["chosen_on"]["grid"][fusion.describe()] == max(record["chosen_on"]["grid"].values())

    # Retrained to the same path: the old index is refused for the new model, before deploying.
    model = build_two_tower(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    export_model(model, load_tokenizer(cfg.model), cfg.model, {}, paths.export_dir(cfg))
    model_b = model_id_at(paths.export_dir(cfg))
    assert model_b != model_a
    for refuse in (lambda: app_args(cfg), lambda: load_index(paths.index_dir(cfg), model_id=model_b)):
        with pytest.raises(IndexModelMismatch) as e:
            refuse()
        assert model_a in str(e.value) and model_b in str(e.value)
    assert catalog_index.build_catalog_index(cfg)["model_id"] == model_b
    assert app_args(cfg)["index_uri"] == paths.index_dir(cfg)


def test_popularity_ranking_exact() -> None:
    import pyarrow as pa

    from recsys.evaluate import _rank_popularity

    items = pa.table({"item_id": ["a", "b", "c"], "popularity": [1, 5, 3]})
    assert _rank_popularity(items, [{}, {}], 2, [set(), {"b"}]) == [["b", "c"], ["c", "a"]]


def test_rerank_judged_orders_each_querys_candidates() -> None:
    from recsys.evaluate import _rerank_all

    items = pa.table({
        "item_id": ["a", "b", "c", "d"],
        "text": ["red running shoe", "blue shoe", "green hat", "red hat"],
        "popularity": [1, 5, 3, 2],
    })
    # Judged: a, c, d (b is not a candidate, however popular or similar).
    queries = [{"query": "red running shoe", "history": [], "judged": {"a": 2.0, "c": 0.0, "d": 1.0}}]
    emb = np.eye(4, dtype=np.float32)
    q = np.array([[0.1, 0.99, 0.9, 0.5]], dtype=np.float32)
    from recsys.config import Config
    from recsys.evaluate import _bm25_scorer

    out = _rerank_all(items, queries, ["red running shoe"], {"m": q}, {"m": emb}, ["popularity", "bm25"], _bm25_scorer(items, Config()))
    assert out["popularity"] == [["c", "d", "a"]]
    assert out["m"] == [["c", "d", "a"]]
    assert out["bm25"][0][0] == "a" and sorted(out["bm25"][0]) == ["a", "c", "d"]


def test_rerank_candidates_are_all_judged_items_gain_zero_included() -> None:
    """Home Depot: judged 1 (gain 0), 2 and 3. The re-rank candidates are all three, so a system
    that puts the irrelevant one first no longer scores a perfect hit rate / NDCG."""
    import datetime as dt

    from recsys.config import DataConfig
    from recsys.data.examples import search_examples
    from recsys.data.real import _event_type
    from recsys.evaluate import _rerank_all, build_queries
    from recsys.metrics import ranking_metrics
    from recsys.schemas import EVENTS_SCHEMA

    t0 = dt.datetime(2026, 6, 1, tzinfo=dt.timezone.utc)
    log = pa.Table.from_pylist(
        [{"user_id": "q1", "session_id": "q1", "timestamp": t0 + dt.timedelta(seconds=n), "event_type": _event_type(rel),
          "query": "cordless drill", "item_id": item, "extra": json.dumps({"relevance": rel, "split": "test"})}
         for n, (item, rel) in enumerate([("P1", 1.0), ("P2", 2.0), ("P3", 3.0)])],
        schema=EVENTS_SCHEMA,
    )
    ex = search_examples(log, DataConfig())  # default min_positive_weight: views are not positives
    (q,) = build_queries(ex.filter(pc.equal(ex["split"], "test")), "search")
    assert q["judged"] == {"P1": 0.0, "P2": 1.0, "P3": 2.0}
    assert q["relevant"] == {"P2": 1.0, "P3": 2.0}  # what the metrics count
    items = pa.table({"item_id": ["P1", "P2", "P3"], "text": ["drill bits", "drill", "cordless drill"], "popularity": [9, 1, 2]})
    emb = np.eye(3, dtype=np.float32)
    out = _rerank_all(items, [q], ["cordless drill"], {"m": np.array([[1.0, 0.5, 0.2]], dtype=np.float32)}, {"m": emb}, ["popularity"])
    assert out["popularity"] == [["P1", "P3", "P2"]] and out["m"] == [["P1", "P2", "P3"]]
    m = ranking_metrics(out["m"], [q["relevant"]], [1, 3], "r")
    assert m["r/hit_rate@1"] == 0.0 and m["r/mrr@3"] == 0.5
    assert m["r/ndcg@3"] < 1.0


def test_query_keys_are_stable_and_unique() -> None:
    import datetime as dt

    from recsys.evaluate import build_queries

    ts = dt.datetime(2026, 6, 1, tzinfo=dt.timezone.utc)
    row = {"kind": "next_item", "user_id": "u1", "query": None, "history": ["a"], "item_id": "b", "weight": 1.0, "timestamp": ts, "relevance": None}
    nxt = build_queries(pa.Table.from_pylist([row, {**row, "item_id": "c"}, row]), "next_item")
    assert [q["key"] for q in nxt] == [json.dumps(["u1", ts.isoformat(), "b"]), json.dumps(["u1", ts.isoformat(), "c"]),
                                       json.dumps(["u1", ts.isoformat(), "b"]) + "#2"]
    srch = build_queries(pa.Table.from_pylist([{**row, "kind": "search", "query": "red shoe"}, {**row, "kind": "search", "query": "red shoe", "item_id": "c"}]), "search")
    assert [q["key"] for q in srch] == [json.dumps(["u1", "red shoe"])]


def test_pooled_history_is_the_decayed_normalised_sum() -> None:
    from recsys.evaluate import pooled_history

    emb = np.array([[1, 0], [0, 1], [1, 1]], dtype=np.float32)
    got = pooled_history([["b", "a", "zzz"], [], ["c", "a", "b"]], ["a", "b", "c"], emb, n=2, decay=0.5)
    want0 = np.array([0.5, 1.0]) / np.linalg.norm([0.5, 1.0])  # b (age 0) + 0.5 * a (age 1); unknown ids skipped
    want2 = np.array([1.5, 1.0]) / np.linalg.norm([1.5, 1.0])  # c + 0.5 * a; b is beyond n=2
    np.testing.assert_allclose(got[0], want0, atol=1e-6)
    np.testing.assert_allclose(got[1], [0, 0])
    np.testing.assert_allclose(got[2], want2, atol=1e-6)


def test_hybrid_system_fuses_bm25_with_the_dense_ranking_chosen_on_valid(ray_cluster, tiny_model, tmp_path) -> None:
    from recsys import evaluate, hybrid
    from recsys.data import prepare

    cfg = load_config(REPO / "jobs/configs/pipeline_tiny.yaml", [f"model.name_or_path={tiny_model}", "train.task=search",
                                                                 "eval.systems=[bm25,zero_shot,hybrid]", "eval.ks=[5,10]"])
    cfg.storage.root = str(tmp_path / "root")
    prepare.run(cfg)
    result = evaluate.run(cfg)
    m = result["metrics"]
    assert set(m) == {"bm25", "zero_shot", "hybrid"}
    report = json.loads((Path(paths.eval_dir(cfg)) / "report.json").read_text())
    how = report["settings"]["hybrid"]
    assert how["dense"] == "zero_shot" and how["chosen_on"]["split"] == "valid" and how["chosen_on"]["queries"] > 0
    grid = how["chosen_on"]["grid"]
    assert len(grid) == 1 + len(hybrid.WEIGHT_GRID) and grid[how["described"]] == max(grid.values())
    pairs = {(c["system"], c["baseline"]) for c in report["significance"] if c["task"] == "test/search"}
    assert {("hybrid", "bm25"), ("hybrid", "zero_shot")} <= pairs
    # A fixed fusion, all dense, over candidates covering the catalog is the dense ranking itself.
    cfg.hybrid.fusion, cfg.hybrid.weight, cfg.hybrid.candidates = "convex", 1.0, 10_000
    fixed = evaluate.run(cfg)["metrics"]
    assert fixed["hybrid"]["test/search/ndcg@10"] == pytest.approx(fixed["zero_shot"]["test/search/ndcg@10"])
    assert fixed["hybrid"]["test/search/recall@10"] == pytest.approx(fixed["zero_shot"]["test/search/recall@10"])
    assert json.loads((Path(paths.eval_dir(cfg)) / "report.json").read_text())["settings"]["hybrid"]["chosen_on"] is None
    cfg.hybrid.fusion, cfg.eval.split = "auto", "valid"
    with pytest.raises(ValueError, match="hybrid.split"):
        evaluate.run(cfg)
