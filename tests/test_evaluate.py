"""The report on a tiny prepared shop with a tiny exported model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from recsys import paths, storage
from recsys.config import load_config

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]


def test_report_on_tiny_model(ray_cluster, tiny_model, tmp_path) -> None:
    from recsys import evaluate
    from recsys.data import prepare
    from recsys.model import build_two_tower, export_model, load_tokenizer

    cfg = load_config(REPO / "jobs/configs/pipeline_tiny.yaml", [f"model.name_or_path={tiny_model}", "eval.ks=[1,5,20]"])
    cfg.storage.root = str(tmp_path / "root")
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
    assert storage.list_files(paths.embeddings(cfg), cfg.storage, ".parquet")
    assert (Path(paths.index_dir(cfg)) / "index.json").exists()


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
    queries = [{"query": "red running shoe", "history": [], "relevant": {"a": 2.0, "c": 0.0, "d": 1.0}}]
    emb = np.eye(4, dtype=np.float32)
    q = np.array([[0.1, 0.99, 0.9, 0.5]], dtype=np.float32)
    out = _rerank_all(items, queries, ["red running shoe"], {"m": q}, {"m": emb}, ["popularity", "bm25"])
    assert out["popularity"] == [["c", "d", "a"]]
    assert out["m"] == [["c", "d", "a"]]
    assert out["bm25"][0][0] == "a" and sorted(out["bm25"][0]) == ["a", "c", "d"]


def test_pooled_history_is_the_decayed_normalised_sum() -> None:
    from recsys.evaluate import pooled_history

    emb = np.array([[1, 0], [0, 1], [1, 1]], dtype=np.float32)
    got = pooled_history([["b", "a", "zzz"], [], ["c", "a", "b"]], ["a", "b", "c"], emb, n=2, decay=0.5)
    want0 = np.array([0.5, 1.0]) / np.linalg.norm([0.5, 1.0])  # b (age 0) + 0.5 * a (age 1); unknown ids skipped
    want2 = np.array([1.5, 1.0]) / np.linalg.norm([1.5, 1.0])  # c + 0.5 * a; b is beyond n=2
    np.testing.assert_allclose(got[0], want0, atol=1e-6)
    np.testing.assert_allclose(got[1], [0, 0])
    np.testing.assert_allclose(got[2], want2, atol=1e-6)
