"""The batch recommendation job (jobs.recommend): its ranking, its inputs, its accounting.

Unit tests of the pure parts (request parsing, latest histories, the shared top-k), then the job
through a real local Ray cluster and the real S3 server on a tiny prepared shop with a tiny
exported model. The comparison with the Serve app over HTTP is in tests/test_serve.py, which
has the running app.
"""

from __future__ import annotations

import collections
import datetime as dt
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys import paths, storage
from recsys.config import ConfigError, load_config
from recsys.recommend import (
    OUTPUT_SCHEMA,
    REQUEST_SCHEMA,
    SUMMARY_FILE,
    latest_histories,
    parse_requests,
)
from recsys.retrieval import FilterFields, filter_mask, search

REPO = Path(__file__).resolve().parents[1]


# ---- the shared ranking -----------------------------------------------------------------------


def _brute_force(emb: np.ndarray, q: np.ndarray, k: int, keep: np.ndarray, exclude: set[int]) -> list[int]:
    scores = emb @ q
    order = sorted((i for i in range(len(emb)) if keep[i] and i not in exclude), key=lambda i: (-float(scores[i]), i))
    return order[:k]


def test_search_is_exact_with_filters_exclusions_and_ties() -> None:
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(50, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)  # unit vectors: each is its own best match
    emb[[10, 20, 30, 40]] = emb[3]  # exact ties: position order decides, also at the cut-off
    q = rng.normal(size=(4, 8)).astype(np.float32)
    q[0] = emb[3] * 5  # items 3, 10, 20, 30, 40 are query 0's best, all with the same score
    fields = FilterFields.from_rows(
        [{"category": "Home > Kitchen" if i % 2 else "Sports", "brand": "Acme" if i % 3 else None,
          "price": None if i == 7 else float(i)} for i in range(50)]
    )
    keep = filter_mask(fields, {"category": "home > KITCHEN", "min_price": 5, "max_price": 45})
    assert keep.sum() == len([i for i in range(50) if i % 2 and 5 <= i <= 45 and i != 7])
    exclude = [set(), {5, 9}, set(), set(range(50))]
    got = search(emb, q, 6, keep, exclude)
    for row, (top, scores) in enumerate(got):
        assert list(top) == _brute_force(emb, q[row], 6, keep, exclude[row])
        np.testing.assert_allclose(scores, emb[top] @ q[row], rtol=1e-5)
    # argpartition alone (Serve's ranking before) returned [3, 10, 30] here.
    assert list(search(emb, q[:1], 3)[0][0]) == [3, 10, 20], "equal scores at the cut: catalog order"
    assert len(got[3][0]) == 0  # everything excluded: nothing, not an error
    brand = filter_mask(fields, {"brand": "ACME"})
    assert brand.sum() == len([i for i in range(50) if i % 3])
    with pytest.raises(ValueError, match="unknown filter"):
        filter_mask(fields, {"colour": "red"})


# ---- requests ---------------------------------------------------------------------------------


def _raw(**row: object) -> dict:
    base = {"user_id": None, "query": None, "extra": None, "_source": "f.jsonl", "_type_error": None, "_raw": None}
    return {**base, **row}


def test_parse_requests_keeps_every_row_with_its_reason() -> None:
    rows = [
        _raw(user_id="u1"),
        _raw(extra=json.dumps({"history": ["a", "b"], "request_id": 7})),
        _raw(query=" shoes ", extra=json.dumps({"exclude": ["x"]})),
        _raw(extra=json.dumps({"history": "a b  c"})),  # CSV: ids separated by spaces
        _raw(extra=json.dumps({"history": '["a", "b"]'})),  # CSV: a JSON array as text
        _raw(_type_error="unparsable JSON: Expecting value", _raw="{broken"),
        _raw(_type_error="user_id has JSON type int: 5"),
        _raw(extra=json.dumps({"history": ["a", 3]})),
        _raw(extra=json.dumps({"history": {"a": 1}})),
        _raw(user_id="  ", query=""),
        _raw(),
    ]
    t = parse_requests(pa.Table.from_pylist(rows))
    assert t.schema.equals(REQUEST_SCHEMA) and t.num_rows == len(rows)
    out = t.to_pylist()
    assert [r["error"] for r in out] == [None] * 5 + ["unparsable", "bad_type", "bad_type", "bad_type", "empty_request", "empty_request"]
    assert out[1]["history"] == ["b", "a"], "the file's history is oldest first; requests carry newest first"
    assert out[1]["request_id"] == "7"
    assert out[2]["query"] == "shoes" and out[2]["exclude"] == ["x"]
    assert out[3]["history"] == ["c", "b", "a"] and out[4]["history"] == ["b", "a"]
    assert "{broken" in out[5]["error_detail"] and "history[1]" in out[7]["error_detail"]
    assert "dict" in out[8]["error_detail"]


def test_latest_histories_take_each_users_newest_example() -> None:
    ts = [dt.datetime(2024, 1, d, tzinfo=dt.timezone.utc) for d in range(1, 6)]
    ex = pa.table({
        "kind": ["next_item", "next_item", "search", "next_item", "next_item", "next_item"],
        "user_id": ["u2", "u2", "u2", "u1", "u1", None],
        "history": [["a"], ["b", "a"], ["b", "a"], ["x"], ["y", "x", "y"], ["z"]],
        "item_id": ["b", "c", "d", "y", "z", "q"],
        "timestamp": pa.array([ts[0], ts[1], ts[3], ts[0], ts[2], ts[4]], pa.timestamp("ms", tz="UTC")),
    })
    users = latest_histories(ex, max_history=3).to_pylist()
    assert [u["user_id"] for u in users] == ["u1", "u2"]  # no row for a null user
    assert users[0]["history"] == ["z", "y", "x"]  # newest item first, repeats dropped
    assert users[1]["history"] == ["d", "b", "a"]  # the search example is u2's newest
    assert sorted(users[0]["seen"]) == ["x", "y", "z"] and sorted(users[1]["seen"]) == ["a", "b", "c", "d"]
    assert latest_histories(ex, max_history=1).to_pylist()[0]["history"] == ["z"]


def test_recommend_config_is_checked() -> None:
    cfg = load_config(None, ["recommend.k=20", "recommend.min_price=5", "recommend.input_uri=req.jsonl"])
    assert cfg.recommend.k == 20 and cfg.recommend.min_price == 5.0
    assert cfg.recommend.input_uri == str(Path("req.jsonl").absolute())
    for bad, needle in [("recommend.kk=3", "did you mean recommend.k"), ("recommend.k=0", "recommend.k"),
                        ("recommend.build_index=sometimes", "recommend.build_index")]:
        with pytest.raises(ConfigError, match=needle):
            load_config(None, [bad])
    with pytest.raises(ConfigError, match="min_price"):
        load_config(None, ["recommend.min_price=50", "recommend.max_price=10"])
    demo = load_config(REPO / "jobs/configs/demo.yaml")
    assert demo.recommend.k >= 1


# ---- the job, on a tiny shop in the S3 store ------------------------------------------------------


@pytest.fixture(scope="module")
def shop(ray_cluster, s3_server, tiny_model):
    """A tiny prepared shop and a tiny export, in the S3 store (no index yet)."""
    from recsys.data import prepare
    from recsys.model import build_two_tower, export_model, load_tokenizer

    cfg = load_config(REPO / "jobs/configs/pipeline_tiny.yaml", [f"model.name_or_path={tiny_model}"])
    cfg.storage = s3_server.storage_config("s3://test/recommend-shop")
    prepare.run(cfg)
    export_model(build_two_tower(cfg.model), load_tokenizer(cfg.model), cfg.model, {}, paths.export_dir(cfg), cfg.storage)
    return cfg


def _output(cfg, uri: str | None = None) -> pa.Table:
    uri = uri or paths.recommendations(cfg)
    files = storage.list_files(uri, cfg.storage, ".parquet")
    fs, _ = storage.filesystem(uri, cfg.storage)
    return pa.concat_tables([pq.read_table(storage.filesystem(f, cfg.storage)[1], filesystem=fs) for f in files])


def _cfg(shop, **recommend):
    """The shop's config with these recommend.* fields (checked as the config checks them)."""
    cfg = shop.model_copy(deep=True)
    for key, value in recommend.items():
        setattr(cfg.recommend, key, value)
    return cfg


def _export_id(cfg) -> str:
    from recsys.encoder import model_id_at

    return model_id_at(paths.export_dir(cfg), cfg.storage)


def test_every_user_of_the_shop_gets_top_k_from_the_built_index(shop) -> None:
    from recsys import recommend
    from recsys.index import index_model_id

    cfg = _cfg(shop, k=5, actors=2, batch_size=16)
    users = recommend.shop_users(cfg)
    assert not storage.exists(storage.join(paths.index_dir(cfg), "index.json"), cfg.storage)
    summary = recommend.run(cfg)
    model_id = _export_id(cfg)
    # The index did not exist: it was built first, by this model.
    assert index_model_id(paths.index_dir(cfg), cfg.storage) == model_id == summary["model_id"]
    out = _output(cfg)
    assert out.schema.equals(OUTPUT_SCHEMA)
    assert summary["rows_in"] == summary["rows_out"] == out.num_rows == users.num_rows
    assert summary["ranked"] == out.num_rows and summary["errors"] == {}
    rows = sorted(out.to_pylist(), key=lambda r: r["user_id"])
    assert [r["user_id"] for r in rows] == users.column("user_id").to_pylist()
    seen = dict(zip(users.column("user_id").to_pylist(), users.column("seen").to_pylist(), strict=True))
    for r in rows:
        assert len(r["item_ids"]) == 5 and r["scores"] == sorted(r["scores"], reverse=True)
        assert not set(r["item_ids"]) & set(seen[r["user_id"]]), "exclude_history: nothing the user engaged with"
        assert r["model_id"] == model_id and r["source"] == "shop" and r["error"] is None
    # The actor pool ranks exactly as the same code in one process, batch boundaries aside.
    local = recommend.rank_in_process(cfg, recommend.shop_requests(users)).to_pylist()
    by_user = {r["user_id"]: r for r in rows}
    for r in local:
        assert r["item_ids"] == by_user[r["user_id"]]["item_ids"]
        np.testing.assert_allclose(r["scores"], by_user[r["user_id"]]["scores"], atol=1e-5)
    stored = storage.read_json(storage.join(paths.recommendations(cfg), SUMMARY_FILE), cfg.storage)
    assert stored["status"] == "done" and stored["rows_out"] == out.num_rows


def test_a_file_of_requests_rows_in_equal_rows_out_with_reasons(shop, tmp_path) -> None:
    """JSONL with good and malformed rows: every row comes out, the malformed ones with their
    reason; filters hold; a user_id alone gets that user's history; the job's own entrypoint."""
    from jobs.recommend import main
    from recsys import recommend

    users = recommend.shop_users(shop)
    u0, hist0 = users.column("user_id")[0].as_py(), users.column("history")[0].as_py()
    items = pq.read_table(storage.filesystem(paths.items(shop), shop.storage)[1],
                          filesystem=storage.filesystem(paths.items(shop), shop.storage)[0])
    ids = items.column("item_id").to_pylist()
    cat = items.column("category")[0].as_py().split(" > ")[0]
    lines = [
        json.dumps({"user_id": u0, "request_id": "r-user"}),
        json.dumps({"history": ids[:3], "request_id": "r-hist"}),
        json.dumps({"query": "running shoes", "request_id": "r-query"}),
        json.dumps({"history": [ids[4], "NO-SUCH-ITEM"], "query": "tent", "exclude": [ids[5]], "request_id": "r-mixed"}),
        "{this is not json",
        json.dumps({"history": "P1", "user_id": 42}),
        json.dumps({"history": [1, 2]}),
        json.dumps({"request_id": "r-empty"}),
        json.dumps({"user_id": "nobody-knows-me"}),
        json.dumps({"history": ["NO-SUCH-ITEM"]}),
        "",  # a blank line is not a request
    ]
    local = tmp_path / "requests.jsonl"
    local.write_text("\n".join(lines) + "\n")
    uri = "s3://test/recommend-requests/requests.jsonl"
    storage.write_bytes(uri, local.read_bytes(), shop.storage)
    out_uri = "s3://test/recommend-out/file"
    st = shop.storage
    summary = main([
        "--config", str(REPO / "jobs/configs/pipeline_tiny.yaml"), "--s3-dir", "none",
        f"storage.root={st.root}", f"storage.s3_endpoint={st.s3_endpoint}", f"storage.s3_access_key={st.s3_access_key}",
        f"storage.s3_secret_key={st.s3_secret_key}", f"model.name_or_path={shop.model.name_or_path}",
        f"recommend.input_uri={uri}", f"recommend.output_uri={out_uri}", "recommend.k=4", f"recommend.category={cat.lower()}",
    ])
    assert summary["rows_in"] == summary["rows_out"] == 10
    assert summary["errors"] == {"unparsable": 1, "bad_type": 2, "empty_request": 1, "unknown_user": 1, "unknown_items": 1}
    assert summary["ranked"] == 4
    out = {r["request_id"]: r for r in _output(shop, out_uri).to_pylist() if r["request_id"]}
    category = dict(zip(ids, items.column("category").to_pylist(), strict=True))
    for rid in ("r-user", "r-hist", "r-query", "r-mixed"):
        r = out[rid]
        assert r["error"] is None and 1 <= len(r["item_ids"]) <= 4, r
        assert all(category[i].lower().startswith(cat.lower()) for i in r["item_ids"]), "category filter"
    assert not set(out["r-hist"]["item_ids"]) & set(ids[:3]), "its own history excluded"
    assert not set(out["r-user"]["item_ids"]) & set(hist0)
    assert out["r-mixed"]["unknown_item_ids"] == ["NO-SUCH-ITEM"] and ids[5] not in out["r-mixed"]["item_ids"]
    assert out["r-empty"]["error"] == "empty_request"
    # A user alone is ranked exactly as the shop-wide job ranks that user.
    same = recommend.rank_in_process(_cfg(shop, k=4, category=cat.lower()),
                                     [{"user_id": u0, "source": "shop"}]).to_pylist()[0]
    assert same["item_ids"] == out["r-user"]["item_ids"]


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_parquet_and_csv_requests(shop, tmp_path, fmt) -> None:
    from recsys import recommend

    ids = recommend.shop_users(shop).column("history")[0].as_py()
    path = tmp_path / f"requests.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.table({"history": pa.array([ids[:2], None, ids[:1]], pa.list_(pa.string())),
                                 "query": ["", "blue shoes", None], "user_id": pa.array([None, None, 5], pa.int64())}), path)
        want = {None: 2, "bad_type": 1}  # an integer user_id column: each non-null value is flagged
    else:
        path.write_text(f'history,query\n"{ids[0]} {ids[1]}",\n,blue shoes\n"[""{ids[0]}""]",tent,extra-field\n')
        want = {None: 2, "unparsable": 1}  # a row with more fields than the header
    cfg = _cfg(shop, input_uri=str(path), output_uri=str(tmp_path / "out"))
    summary = recommend.run(cfg)
    out = _output(cfg, str(tmp_path / "out")).to_pylist()
    assert summary["rows_in"] == summary["rows_out"] == len(out) == 3
    assert dict(collections.Counter(r["error"] for r in out)) == want


def test_an_index_of_another_model_is_refused_or_rebuilt(shop, tiny_model, tmp_path) -> None:
    from recsys import recommend
    from recsys.encoder import TextEncoder, make_tiny_bert
    from recsys.index import IndexModelMismatch, build_index, index_model_id

    other = TextEncoder(make_tiny_bert(tmp_path / "other", seed=3))
    items = pq.read_table(storage.filesystem(paths.items(shop), shop.storage)[1],
                          filesystem=storage.filesystem(paths.items(shop), shop.storage)[0])
    stale = build_index(other.encode_items(items.column("text").to_pylist()), items.column("item_id").to_pylist(), model_id=other.model_id)
    cfg = _cfg(shop, build_index="never", output_uri=str(tmp_path / "out"))
    stale_uri = "s3://test/recommend-shop-stale/index"
    stale.save(stale_uri, cfg.storage)
    cfg.serve.index_uri = stale_uri
    with pytest.raises(IndexModelMismatch, match=other.model_id):
        recommend.run(cfg)  # an index named by serve.index_uri is never rebuilt
    cfg.serve.index_uri = ""
    stale.save(paths.index_dir(cfg), cfg.storage)
    with pytest.raises(FileNotFoundError, match="recommend.build_index=auto"):
        recommend.run(cfg)
    cfg.recommend.build_index = "auto"
    assert recommend.run(cfg)["ranked"] > 0
    assert index_model_id(paths.index_dir(cfg), cfg.storage) == _export_id(cfg)


def test_a_one_file_input_reaches_every_actor(shop, tmp_path) -> None:
    """A file read as one block was one actor task: a second actor idled (the benchmark measured
    2 actors at 0.72x of 1). The requests now come in blocks of one batch, streaming."""
    from recsys.recommend import request_dataset

    pq.write_table(pa.table({"query": [f"query {i}" for i in range(40)]}), tmp_path / "requests.parquet")
    ds, rows_in, _ = request_dataset(_cfg(shop, input_uri=str(tmp_path / "requests.parquet"), batch_size=16), None)
    assert rows_in == 40
    blocks = ds.materialize()
    assert blocks.num_blocks() == 3 and blocks.count() == 40


def test_an_export_with_a_sequence_tower_ranks_histories_by_it(shop, tmp_path, attach_random_tower) -> None:
    """Issue 15: the job over an export (in the S3 store) with a sequence user tower: rows
    without a query (a shop user, a history) are ranked by the tower over the run's index (built
    first, by jobs.index's code) exactly as computed here with the SequenceModel; a row with a
    query keeps the text path."""
    from recsys import recommend
    from recsys.encoder import TextEncoder, render_user_text
    from recsys.index import load_index
    from recsys.model import build_two_tower, export_model, load_tokenizer
    from recsys.retrieval import align_embeddings
    from recsys.sequence import load_sequence_tower

    cfg = _cfg(shop, k=4, output_uri=str(tmp_path / "out"))
    cfg.train.run_name = "sequence"  # its own export and index beside the shop's data
    local = tmp_path / "export"
    export_model(build_two_tower(cfg.model), load_tokenizer(cfg.model), cfg.model, {}, local)
    items = pq.read_table(storage.filesystem(paths.items(cfg), cfg.storage)[1], filesystem=storage.filesystem(paths.items(cfg), cfg.storage)[0])
    ids, texts = items.column("item_id").to_pylist(), items.column("text").to_pylist()
    model_id = attach_random_tower(local, ids, seed=1)
    storage.upload_dir(local, paths.export_dir(cfg), cfg.storage)
    users = recommend.shop_users(cfg)
    u0, hist0, seen0 = (users.column(c)[0].as_py() for c in ("user_id", "history", "seen"))
    requests = [{"user_id": u0, "request_id": "user"}, {"history": ids[:3], "request_id": "history"},
                {"history": ids[:3], "query": "running shoes", "request_id": "query"}]
    cfg.recommend.input_uri = str(tmp_path / "requests.jsonl")
    (tmp_path / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in requests))
    summary = recommend.run(cfg)
    assert summary["ranked"] == 3 and summary["model_id"] == model_id
    out = {r["request_id"]: r for r in _output(cfg, str(tmp_path / "out")).to_pylist()}

    index = load_index(paths.index_dir(cfg), cfg.storage, model_id=model_id)
    emb = align_embeddings(index.ids, index.emb, ids, "the run's index")
    model = load_sequence_tower(local)
    vectors = model.item_vectors(emb, ids)
    pos = {i: n for n, i in enumerate(ids)}

    def top(scores: np.ndarray, exclude: set[str]) -> list[str]:
        return [ids[i] for i in sorted((i for i in range(len(ids)) if ids[i] not in exclude), key=lambda i: (-float(scores[i]), i))[:4]]

    history = ids[:3][::-1]  # newest first
    for rid, hist, exclude in (("user", hist0, set(seen0) | set(hist0)), ("history", history, set(history))):
        scores = vectors @ model.encode_users([[pos[h] for h in hist]], emb, ids)[0]
        assert out[rid]["item_ids"] == top(scores, exclude), rid
        np.testing.assert_allclose(out[rid]["scores"], [scores[pos[i]] for i in out[rid]["item_ids"]], atol=1e-5)
    enc = TextEncoder(str(local))
    q = enc.encode_queries([render_user_text("running shoes", [texts[pos[h]] for h in history], enc.user_history_items)])[0]
    assert out["query"]["item_ids"] == top(emb @ q, set(history)), "a query keeps the text towers"
