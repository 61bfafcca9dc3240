"""Real HTTP against the Ray Serve app on a local Ray cluster (tiny BERT, tiny catalog)."""

from __future__ import annotations

import collections
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from recsys.encoder import TextEncoder, render_user_text
from recsys.schemas import ITEMS_SCHEMA
from recsys.storage import free_port

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]
TITLES = [
    ("P1", "Stridex Lightweight Running Shoe - Red", "Sports > Running > Shoes", 80.0),
    ("P2", "Stridex Cushioned Trail Running Shoe - Blue", "Sports > Running > Shoes", 95.0),
    ("P3", "Brewmont Glass French Press", "Home > Kitchen > Coffee", 30.0),
    ("P4", "Caffelo Programmable Espresso Machine", "Home > Kitchen > Coffee", 250.0),
    ("P5", "Pawsome Memory Foam Dog Bed", "Pets > Dogs > Beds", 60.0),
    ("P6", "Sitwell Mesh Ergonomic Office Chair", "Office > Furniture > Chairs", 180.0),
    ("P7", "Greenflow Expandable Garden Hose 50 ft", "Garden > Watering > Hoses", 40.0),
    ("P8", "Trailhaven Ultralight Backpacking Tent", "Outdoors > Camping > Shelter", 220.0),
]


def _write_items(items_dir: Path) -> pa.Table:
    table = pa.table(
        {
            "item_id": [t[0] for t in TITLES],
            "title": [t[1] for t in TITLES],
            "brand": [t[1].split()[0] for t in TITLES],
            "category": [t[2] for t in TITLES],
            "price": [t[3] for t in TITLES],
            "text": [f"{t[1]}. Category: {t[2]}" for t in TITLES],
            "dup_group": list(range(len(TITLES))),
            "popularity": [1] * len(TITLES),
        },
        schema=ITEMS_SCHEMA,
    )
    pq.write_table(table, items_dir / "part-00000.parquet")
    return table


@pytest.fixture(scope="module")
def service(ray_cluster, tiny_model, tmp_path_factory):
    from ray import serve

    from serve.app import app_builder

    items_dir = tmp_path_factory.mktemp("items")
    table = _write_items(items_dir)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"model_uri": tiny_model, "items_uri": str(items_dir), "max_replicas": 1, "replica_cpus": 0.2}
    serve.run(app_builder(args), name="recsys", route_prefix="/")
    serve.run(app_builder({**args, "auth_token_env": "RECSYS_TEST_API_TOKEN"}), name="secured", route_prefix="/secured")
    serve.run(
        app_builder({**args, "max_ongoing_requests": 1, "max_queued_requests": 1, "batching": False}),
        name="tight", route_prefix="/tight",
    )
    serve.run(app_builder({**args, "retriever": "deployment"}), name="split", route_prefix="/split")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    yield {"client": client, "model": tiny_model, "table": table, "items_dir": str(items_dir), "port": port}
    client.close()
    serve.shutdown()


def _offline(model: str, table: pa.Table, text: str, k: int, exclude=()) -> list[str]:
    enc = TextEncoder(model)
    q = enc.encode_queries([text])[0]
    emb = enc.encode_items(table.column("text").to_pylist())
    ids = table.column("item_id").to_pylist()
    order = sorted(range(len(ids)), key=lambda i: (-float(emb[i] @ q), i))
    return [ids[i] for i in order if ids[i] not in exclude][:k]


def test_health_ready_and_openapi(service) -> None:
    c = service["client"]
    assert c.get("/healthz").json() == {"status": "ok"}
    ready = c.get("/readyz")
    assert ready.status_code == 200 and ready.json()["items"] == len(TITLES)
    assert "/search" in c.get("/openapi.json").json()["paths"]


def test_search_matches_offline_and_filters(service) -> None:
    c = service["client"]
    r = c.post("/search", json={"query": "running shoes", "k": 5, "mode": "dense"})
    assert r.status_code == 200, r.text
    got = [i["item_id"] for i in r.json()["items"]]
    assert got == _offline(service["model"], service["table"], "running shoes", 5)
    f = c.post("/search", json={"query": "coffee", "k": 5, "filters": {"category": "Home > Kitchen", "max_price": 100}})
    assert [i["item_id"] for i in f.json()["items"]] == ["P3"]


def _fused_offline(model: str, table: pa.Table, text: str, k: int, fusion, keep=None) -> list[tuple[str, float]]:
    from recsys import hybrid
    from recsys.bm25 import BM25Index

    enc = TextEncoder(model)
    dense = enc.encode_items(table.column("text").to_pylist()) @ enc.encode_queries([text])[0]
    lexical = BM25Index.build(table.column("text").to_pylist()).scores(text)
    allowed = np.ones(len(dense), dtype=bool) if keep is None else keep
    top, scores = hybrid.fuse(dense, lexical, allowed, k, fusion)
    ids = table.column("item_id").to_pylist()
    return [(ids[i], float(s)) for i, s in zip(top, scores, strict=True)]


def test_one_hop_by_default_and_a_separate_retriever_answers_the_same(service) -> None:
    """Issue 17: the default app is the Ingress replica (encoder + catalog) and the profile
    store, no Encoder or Retriever hop; `retriever: deployment` adds the Retriever, and every
    endpoint answers exactly as the one-hop app does."""
    from ray.serve.context import _get_global_client

    apps = _get_global_client().get_serve_details()["applications"]
    assert set(apps["recsys"]["deployments"]) == {"Ingress", "Profiles"}
    assert set(apps["split"]["deployments"]) == {"Ingress", "Retriever", "Profiles"}
    c = service["client"]
    calls = [
        ("/search", {"query": "coffee maker", "k": 4, "mode": "dense"}),
        ("/search", {"query": "running shoe", "k": 4, "mode": "hybrid", "filters": {"max_price": 100}}),
        ("/search", {"query": "tent", "k": 4, "mode": "lexical"}),
        ("/recommend", {"recent_item_ids": ["P3", "P1"], "k": 4}),
        ("/score", {"query": "dog bed", "item_ids": ["P5", "P6"]}),
        ("/score", {"recent_item_ids": ["P7"], "item_ids": ["P5", "P8"]}),
    ]
    for path, body in calls:
        one, split = c.post(path, json=body), c.post("/split" + path, json=body)
        assert one.status_code == split.status_code == 200, (path, one.text, split.text)
        assert one.json() == split.json(), (path, one.json(), split.json())
    assert c.post("/split/recommend", json={"recent_item_ids": ["nope"], "k": 3}).status_code == 404
    assert c.get("/split/readyz").json()["items"] == len(TITLES)


def test_an_onnx_encoder_backend_serves_the_same_ranking(service) -> None:
    """Issue 17: `encoder_backend: onnx` runs the same weights through onnxruntime in the
    replica; the served ranking and scores equal the torch app's (and the offline ones)."""
    from ray import serve

    from serve.app import app_builder

    args = {"model_uri": service["model"], "items_uri": service["items_dir"], "max_replicas": 1, "replica_cpus": 0.2,
            "encoder_backend": "onnx"}
    serve.run(app_builder(args), name="onnx", route_prefix="/onnx")
    try:
        c = service["client"]
        for q in ("trail running shoes", "espresso", "dog bed for a large dog"):
            body = {"query": q, "k": 8, "mode": "dense"}
            torch_items, onnx_items = c.post("/search", json=body).json()["items"], c.post("/onnx/search", json=body).json()["items"]
            assert [i["item_id"] for i in onnx_items] == [i["item_id"] for i in torch_items] == _offline(service["model"], service["table"], q, 8)
            np.testing.assert_allclose([i["score"] for i in onnx_items], [i["score"] for i in torch_items], atol=1e-5)
        info = serve.get_deployment_handle("Ingress", "onnx").info.remote().result(timeout_s=30)
        assert info["encoder_backend"] == "onnx", info
    finally:
        serve.delete("onnx")


def test_search_modes_lexical_and_hybrid_match_offline(service, tmp_path) -> None:
    """Issue 16: `mode` picks dense, lexical (BM25) or hybrid (both fused); the default is the
    config's (hybrid). Without a saved BM25 index the replica builds one and fuses by RRF; with
    one saved beside the index (jobs.index), it uses that index's fusion."""
    from ray import serve

    from recsys import hybrid
    from recsys.bm25 import BM25Index
    from recsys.index import build_index
    from serve.app import app_builder

    c, table, model = service["client"], service["table"], service["model"]
    query = "running shoe coffee"
    lex = c.post("/search", json={"query": query, "k": 8, "mode": "lexical"})
    assert lex.status_code == 200 and lex.json()["mode"] == "lexical"
    bm25 = BM25Index.build(table.column("text").to_pylist()).scores(query)
    want = sorted((i for i in range(len(TITLES)) if bm25[i] > 0), key=lambda i: (-bm25[i], i))
    assert [h["item_id"] for h in lex.json()["items"]] == [TITLES[i][0] for i in want]  # only token matches
    default = c.post("/search", json={"query": query, "k": 5})
    assert default.json()["mode"] == "hybrid"
    _same(_ranked(default.json()["items"]), _fused_offline(model, table, query, 5, hybrid.Fusion()))
    cheap = c.post("/search", json={"query": query, "k": 5, "filters": {"max_price": 90}}).json()["items"]
    _same(_ranked(cheap), _fused_offline(model, table, query, 5, hybrid.Fusion(), keep=np.array([t[3] <= 90 for t in TITLES])))
    assert {"dense_score", "lexical_score"} <= set(default.json()["items"][0])

    # A saved index carries its BM25 index and fusion: the replica serves exactly that fusion.
    enc = TextEncoder(model)
    ids, texts = table.column("item_id").to_pylist(), table.column("text").to_pylist()
    fusion = hybrid.Fusion("convex", 0.2, candidates=3)
    build_index(enc.encode_items(texts), ids, model_id=enc.model_id).save(
        str(tmp_path / "index"), extra=lambda d: hybrid.save_lexical(d, BM25Index.build(texts, ids), fusion, {"chosen_on": None}))
    args = {"model_uri": model, "items_uri": service["items_dir"], "index_uri": str(tmp_path / "index"), "max_replicas": 1,
            "replica_cpus": 0.2, "search_mode": "lexical"}
    serve.run(app_builder(args), name="fused", route_prefix="/fused")
    try:
        assert c.post("/fused/search", json={"query": query, "k": 5}).json()["mode"] == "lexical"  # the app's default
        r = c.post("/fused/search", json={"query": query, "k": 5, "mode": "hybrid"})
        _same(_ranked(r.json()["items"]), _fused_offline(model, table, query, 5, fusion))
        assert _ranked(r.json()["items"]) != _ranked(default.json()["items"]), "the saved fusion must differ from RRF here"
    finally:
        serve.delete("fused")


def test_recommend_matches_offline_and_events_change_it(service) -> None:
    c = service["client"]
    r = c.post("/recommend", json={"recent_item_ids": ["P3", "P4"], "k": 4})
    assert r.status_code == 200, r.text
    text = render_user_text(None, [service["table"].column("text")[i].as_py() for i in (3, 2)], 10)
    assert [i["item_id"] for i in r.json()["items"]] == _offline(service["model"], service["table"], text, 4)

    assert c.post("/recommend", json={"user_id": "new-user", "k": 3}).status_code == 404
    ev = c.post("/events", json={"user_id": "u1", "events": [{"item_id": "P5", "event_type": "click"}]})
    assert ev.status_code == 200 and ev.json()["history_length"] == 1
    first = [i["item_id"] for i in c.post("/recommend", json={"user_id": "u1", "k": 8}).json()["items"]]
    c.post("/events", json={"user_id": "u1", "events": [{"item_id": "P8", "event_type": "purchase"}]})
    after = [i["item_id"] for i in c.post("/recommend", json={"user_id": "u1", "k": 8}).json()["items"]]
    assert "P8" in first and "P8" not in after  # just bought: excluded
    text2 = render_user_text(None, [service["table"].column("text")[i].as_py() for i in (7, 4)], 10)
    assert after == _offline(service["model"], service["table"], text2, 8, exclude={"P8"})
    incl = c.post("/recommend", json={"user_id": "u1", "k": 8, "include_purchased": True}).json()["items"]
    assert "P8" in [i["item_id"] for i in incl]


def test_score_one_per_item(service) -> None:
    c = service["client"]
    r = c.post("/score", json={"query": "dog bed", "item_ids": ["P5", "P1"]})
    assert r.status_code == 200 and len(r.json()["scores"]) == 2
    enc = TextEncoder(service["model"])
    q = enc.encode_queries(["dog bed"])[0]
    emb = enc.encode_items([service["table"].column("text")[i].as_py() for i in (4, 0)])
    np.testing.assert_allclose(r.json()["scores"], emb @ q, atol=1e-5)


@pytest.mark.parametrize(
    "path,body,status,needle",
    [
        ("/search", "{not json", 422, "json"),
        ("/search", {"k": 3}, 422, "query"),
        ("/search", {"query": "x", "k": 0}, 422, "k"),
        ("/search", {"query": "x", "k": 5000}, 422, "k"),
        ("/search", {"query": "   "}, 422, "empty"),
        ("/search", {"query": "x" * 1001}, 422, "query"),
        ("/search", {"query": "x", "mode": "semantic"}, 422, "mode"),
        ("/score", {"query": "x", "item_ids": ["P1", "NOPE"]}, 404, "NOPE"),
        ("/score", {"query": "x", "item_ids": ["P1"] * 1001}, 422, "item_ids"),
        ("/recommend", {"k": 3}, 422, "user_id"),
        ("/events", {"user_id": "u", "events": [{"item_id": "P1", "event_type": "teleport"}]}, 422, "event_type"),
    ],
)
def test_bad_input_gets_4xx_with_a_message(service, path, body, status, needle) -> None:
    c = service["client"]
    if isinstance(body, str):
        r = c.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = c.post(path, json=body)
    assert r.status_code == status, r.text
    assert needle.lower() in r.text.lower()
    assert c.get("/readyz").status_code == 200  # the replicas survived


def test_auth_when_a_token_is_set(service) -> None:
    c = service["client"]
    assert c.post("/secured/search", json={"query": "tent"}).status_code == 401
    ok = c.post("/secured/search", json={"query": "tent"}, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    assert c.get("/secured/healthz").status_code == 200


def test_hostile_requests_get_a_4xx_naming_the_problem_and_never_a_5xx(service) -> None:
    """Issue 18: 1,000 malformed, oversized or odd requests (bench/hostile_http.py; 10,000 in
    docs/reliability.md): each malformed one gets a 4xx whose body names the problem, each odd but
    valid one a 200, none a 5xx, the body size limit holds, and no replica restarts."""
    import asyncio

    from bench.hostile_http import MAX_BODY_BYTES as BENCH_LIMIT
    from bench.hostile_http import auth_requests, hostile_requests, send_all
    from serve.schemas import MAX_BODY_BYTES

    assert BENCH_LIMIT == MAX_BODY_BYTES
    before = _replica_ids("recsys")
    requests = hostile_requests(1000, seed=1)
    assert len({h.kind for h in requests}) >= 20
    out = asyncio.run(send_all(str(service["client"].base_url), requests))
    assert not out["wrong"], out["wrong"][:10]
    assert not [k for k in out["status"] if k >= 500]
    assert out["by_kind"]["body over the size limit"].keys() == {413}
    assert out["by_kind"]["extra field"].keys() == {422}
    assert _replica_ids("recsys") == before, "no replica restarted"
    c = service["client"]
    for headers, right in auth_requests(60, seed=2):
        r = c.post("/secured/search", json={"query": "tent", "k": 2}, headers=headers)
        assert r.status_code == (200 if right else 401), (headers, r.status_code, r.text[:200])


def test_serve_config_yaml_validates() -> None:
    from ray.serve.schema import ServeDeploySchema

    from serve.control import check_app_config

    text = (REPO / "serve" / "config.yaml").read_text()
    assert text.startswith("# RAY_SERVE_ENABLE_HA_PROXY=1 serve run")
    cfg = ServeDeploySchema.model_validate(yaml.safe_load(text))
    app = cfg.applications[0].model_dump(exclude_unset=True)
    served = check_app_config(app)
    assert served["model_uri"] == "runs/local/local/export"
    enc = [d for d in app["deployments"] if d["name"] == "Ingress"][0]
    auto = enc["autoscaling_config"]
    assert auto["min_replicas"] <= auto["max_replicas"]


def test_app_config_puts_uris_only_in_user_config() -> None:
    """What makes a swap in place: the app's args (hashed into its code version) do not change
    with the model; the URIs ride in the Ingress's user_config (and a separate Retriever's, which
    must agree)."""
    from serve.control import app_config, check_app_config

    a = app_config({"model_uri": "m1", "items_uri": "it", "index_uri": "ix1"}, name="x")
    b = app_config({"model_uri": "m2", "items_uri": "it", "index_uri": "ix2"}, name="x")
    assert a["args"] == b["args"] and a["import_path"] == b["import_path"]
    assert [d["name"] for d in a["deployments"]] == ["Ingress"], "one hop: the replica holds the catalog"
    assert check_app_config(a) == {"model_uri": "m1", "items_uri": "it", "index_uri": "ix1"}
    assert check_app_config(b)["model_uri"] == "m2"
    split = app_config({"model_uri": "m1", "items_uri": "it", "index_uri": "ix1", "retriever": "deployment"}, name="x")
    assert [d["name"] for d in split["deployments"]] == ["Ingress", "Retriever"]
    assert check_app_config(split)["index_uri"] == "ix1"
    mixed = {**split, "deployments": [{**d, "user_config": {**d["user_config"], "model_uri": "m2"}} if d["name"] == "Ingress" else d
                                      for d in split["deployments"]]}
    with pytest.raises(ValueError, match="model_uri"):
        check_app_config(mixed)
    with pytest.raises(ValueError, match="Retriever's user_config the same URIs"):
        check_app_config({**split, "deployments": [d for d in split["deployments"] if d["name"] == "Ingress"]})
    with pytest.raises(ValueError, match="not 'deployment'"):
        check_app_config({**a, "deployments": split["deployments"]})
    with pytest.raises(ValueError, match="names no model_uri"):
        check_app_config({"name": "y", "args": {}})


def test_no_object_store_secret_reaches_the_args_or_the_serve_config(tmp_path, monkeypatch) -> None:
    """Issue 17: the replicas read S3 keys from their environment; neither the app's args
    (app_args) nor the declarative Serve config (app_config, runtime_env included) carries them."""
    import json

    import ray

    from recsys.config import load_config
    from serve.control import app_args, app_config

    secret = "sEcReT-kEy-1234567890"
    cfg = load_config(None, [f"storage.root={tmp_path}", "storage.s3_endpoint=http://127.0.0.1:9", "storage.s3_access_key=AKEY",
                             f"storage.s3_secret_key={secret}", f"serve.model_uri={tmp_path / 'm'}", f"serve.items_uri={tmp_path / 'i'}"])
    monkeypatch.setattr("recsys.encoder.model_id_at", lambda uri, cfg: "mid")
    args = app_args(cfg)
    assert secret not in json.dumps(args) and "AKEY" not in json.dumps(args)
    assert args["s3_endpoint"] == "http://127.0.0.1:9", "the endpoint is not a secret: it travels"

    class Ctx:
        runtime_env = {"env_vars": {"AWS_SECRET_ACCESS_KEY": secret, "AWS_ACCESS_KEY_ID": "AKEY", "RECSYS_API_TOKEN": "api-token-value-987", "HF_HUB_OFFLINE": "1"}}

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: Ctx())
    app = app_config(args, model_id="mid")
    text = json.dumps(app)
    with pytest.raises(ValueError, match="auth_token_env"):
        app_config({**args, "auth_token": "api-token-value-987"}, model_id="mid")
    assert secret not in text and "AKEY" not in text and "api-token-value-987" not in text, text
    assert app["runtime_env"]["env_vars"] == {"HF_HUB_OFFLINE": "1"}


def test_overload_gets_503_with_retry_after(service) -> None:
    import concurrent.futures as cf

    url = str(service["client"].base_url)
    long_query = " ".join(["espresso machine with milk frother"] * 20)

    def one(_: int) -> httpx.Response:
        with httpx.Client(base_url=url, timeout=60) as c:
            return c.post("/tight/search", json={"query": long_query, "k": 3})

    with cf.ThreadPoolExecutor(24) as pool:
        responses = list(pool.map(one, range(24)))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, codes
    rejected = [r for r in responses if r.status_code == 503]
    assert rejected and 200 in codes, codes
    assert all(r.headers.get("retry-after") for r in rejected), [(r.text[:150], dict(r.headers)) for r in rejected if not r.headers.get("retry-after")][:2]
    assert service["client"].get("/tight/readyz").status_code == 200


def _replica_ids(app: str) -> dict[str, set[str]]:
    from ray.serve.context import _get_global_client

    deps = _get_global_client().get_serve_details()["applications"][app]["deployments"]
    return {n: {r["replica_id"] for r in d["replicas"]} for n, d in deps.items()}


@pytest.mark.parametrize("retriever", ["in_replica", "deployment"])
def test_swap_to_a_new_checkpoint_drops_nothing_and_never_mixes_models(service, tmp_path, retriever) -> None:
    """Swapping a declaratively deployed app to a new model URI under load: every request is
    answered 200, each answer wholly from one model, the same replicas keep running (an in-place
    reconfigure, not a restart), the new model serves afterwards, and live profiles survive. With
    a separate Retriever the two sides switch at different moments: the model mismatch crosses a
    deployment handle and must be retried, not answered."""
    from ray import serve

    from recsys.encoder import make_tiny_bert
    from recsys.index import build_index
    from serve.control import deploy_args, swap

    model_b = make_tiny_bert(tmp_path / "model-b", seed=1)
    ids, texts = service["table"].column("item_id").to_pylist(), service["table"].column("text").to_pylist()
    enc_b = TextEncoder(model_b)
    build_index(enc_b.encode_items(texts), ids, model_id=enc_b.model_id).save(str(tmp_path / "index-b"))
    base = {"model_uri": service["model"], "items_uri": service["items_dir"], "max_replicas": 1, "replica_cpus": 0.2, "retriever": retriever}
    deploy_args(base, name="swap", route_prefix="/swap", timeout_s=180)
    assert ("Retriever" in _replica_ids("swap")) == (retriever == "deployment")
    c = service["client"]
    assert c.post("/swap/events", json={"user_id": "u-swap", "events": [{"item_id": "P1", "event_type": "click"}]}).status_code == 200
    query = "trail running shoes"
    old = _offline(service["model"], service["table"], query, 8)
    new = _offline(model_b, service["table"], query, 8)
    assert old != new, "the two models must rank differently for this test to see the swap"
    replicas_before = _replica_ids("swap")

    answers: list[tuple[float, int, list[str] | str]] = []
    stop = threading.Event()

    def hammer() -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{service['port']}", timeout=60) as hc:
            while not stop.is_set():
                r = hc.post("/swap/search", json={"query": query, "k": 8, "mode": "dense"})
                ok = r.status_code == 200
                answers.append((time.monotonic(), r.status_code, [i["item_id"] for i in r.json()["items"]] if ok else r.text[:300]))

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        t0 = time.monotonic()
        swap("swap", model_b, index_uri=str(tmp_path / "index-b"), timeout_s=180)
        t1 = time.monotonic()
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join()
    statuses = collections.Counter(code for _, code, _ in answers)
    failed = [a for a in answers if a[1] != 200]
    assert not failed, (statuses, failed[:3])
    during = [a for a in answers if t0 <= a[0] <= t1]
    assert during, "no request was in flight during the swap"
    assert all(a[2] in (old, new) for a in answers), "every answer comes wholly from one model"
    assert answers[-1][2] == new and c.get("/swap/readyz").json()["model"] == model_b
    assert _replica_ids("swap") == replicas_before, "a swap reconfigures the running replicas in place"
    rec = c.post("/swap/recommend", json={"user_id": "u-swap", "k": 3})
    assert rec.status_code == 200, "the live profile outlived the model swap"
    serve.delete("swap")


def _export_tiny(tiny_model: str, out: Path, perturb: float = 0.0) -> None:
    """The tiny BERT exported as a two-tower model; `perturb` nudges the weights like a retraining."""
    import torch

    from recsys.config import ModelConfig
    from recsys.model import build_two_tower, export_model, load_tokenizer

    mcfg = ModelConfig(name_or_path=tiny_model, max_item_tokens=32)
    torch.manual_seed(0)
    model = build_two_tower(mcfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(perturb * torch.randn_like(p))
    export_model(model, load_tokenizer(mcfg), mcfg, {}, out)


def test_an_index_of_another_model_is_refused_naming_both(tiny_model, tmp_path) -> None:
    """Issue 14: the Retriever (and deploy, before deploying anything) refuses catalog embeddings
    made by another model, instead of serving scores of one model's queries against another's items."""
    from recsys.encoder import make_tiny_bert
    from recsys.index import IndexModelMismatch, build_index
    from serve.catalog import load_catalog
    from serve.control import deploy_args
    from serve.schemas import AppArgs

    (tmp_path / "items").mkdir()
    table = _write_items(tmp_path / "items")
    items_dir = str(tmp_path / "items")
    model_b = make_tiny_bert(tmp_path / "model-b", seed=1)
    enc_a, enc_b = TextEncoder(tiny_model), TextEncoder(model_b)
    ids, texts = table.column("item_id").to_pylist(), table.column("text").to_pylist()
    build_index(enc_a.encode_items(texts), ids, model_id=enc_a.model_id).save(str(tmp_path / "index-a"))
    build_index(enc_a.encode_items(texts), ids).save(str(tmp_path / "index-anon"))  # records no model
    args = {"model_uri": model_b, "items_uri": items_dir, "index_uri": str(tmp_path / "index-a")}
    for refuse in (lambda: load_catalog(AppArgs(), model_b, items_dir, str(tmp_path / "index-a")), lambda: deploy_args(args)):
        with pytest.raises(IndexModelMismatch) as e:
            refuse()
        assert enc_a.model_id in str(e.value) and enc_b.model_id in str(e.value)
    with pytest.raises(IndexModelMismatch, match="does not record"):
        load_catalog(AppArgs(), tiny_model, items_dir, str(tmp_path / "index-anon"))
    catalog = load_catalog(AppArgs(), tiny_model, items_dir, str(tmp_path / "index-a"))
    assert catalog.model_id == enc_a.model_id


def test_an_index_over_more_items_than_the_catalog_serves_the_catalog(tiny_model, tmp_path) -> None:
    """An index built over a larger item table (with its BM25) serves exactly the catalog's
    items: the dense index and BM25 are rebuilt over them at load, both in catalog order (the
    BM25 check used to refuse this case after the dense index had been rebuilt)."""
    from recsys import hybrid
    from recsys.bm25 import BM25Index
    from recsys.index import build_index
    from serve.catalog import load_catalog
    from serve.schemas import AppArgs

    (tmp_path / "items").mkdir()
    table = _write_items(tmp_path / "items")
    ids, texts = table.column("item_id").to_pylist(), table.column("text").to_pylist()
    more_ids, more_texts = ["X1", *reversed(ids), "X2"], ["extra item one", *reversed(texts), "extra item two"]
    enc = TextEncoder(tiny_model)
    index = build_index(enc.encode_items(more_texts), more_ids, model_id=enc.model_id)
    fusion = hybrid.Fusion(method="convex", weight=0.3)
    index.save(str(tmp_path / "index"), extra=lambda d: hybrid.save_lexical(d, BM25Index.build(more_texts, more_ids), fusion, {}))
    c = load_catalog(AppArgs(), tiny_model, str(tmp_path / "items"), str(tmp_path / "index"))
    assert c.ann.ids == ids and c.lexical.item_ids == ids and c.fusion == fusion
    q = enc.encode_queries(["espresso machine"])[0]
    assert [r["item_id"] for r in c.search(q, 8, None, None, enc.model_id)] == _offline(tiny_model, table, "espresso machine", 8)
    assert {r["item_id"] for r in c.search_hybrid(q, "espresso machine", 8, None, enc.model_id)} <= set(ids)


def test_a_restarted_replica_refuses_weights_re_exported_since_the_deploy(tiny_model, tmp_path) -> None:
    """The user_config names the deployed model's identity: a replica (re)starting after the
    export at that path was replaced does not serve the new weights beside the old catalog."""
    import asyncio

    from serve.app import Ingress, Retriever

    _export_tiny(tiny_model, tmp_path / "export")
    deployed = TextEncoder(str(tmp_path / "export")).model_id
    _export_tiny(tiny_model, tmp_path / "export", perturb=0.01)  # retrained, not yet deployed
    (tmp_path / "items").mkdir()
    _write_items(tmp_path / "items")
    uc = {"model_uri": str(tmp_path / "export"), "items_uri": str(tmp_path / "items"), "index_uri": "", "model_id": deployed}
    wrapped = Ingress.func_or_class  # serve.ingress's ASGI subclass: its own __init__ is async
    ingress = wrapped.__new__(wrapped)
    super(wrapped, ingress).__init__(None, {})
    for replica in (ingress, Retriever.func_or_class({})):
        with pytest.raises(ValueError, match=f"deployed with model {deployed}"):
            asyncio.run(replica.reconfigure(uc))


def test_redeploy_of_the_same_path_with_new_weights_serves_them(service, tmp_path) -> None:
    """Issue 14: retrain, export to the same path, deploy again: the service must answer with
    the new weights (it used to see an unchanged path, do nothing and report success)."""
    from ray import serve

    from serve.control import deploy_args

    export = tmp_path / "export"
    items = [t[0] for t in TITLES]
    body = {"query": "trail running shoes", "item_ids": items}

    def offline() -> np.ndarray:
        enc = TextEncoder(str(export))
        return enc.encode_items(service["table"].column("text").to_pylist()) @ enc.encode_queries([body["query"]])[0]

    _export_tiny(service["model"], export)
    args = {"model_uri": str(export), "items_uri": service["items_dir"], "max_replicas": 1, "replica_cpus": 0.2}
    c = service["client"]
    try:
        deploy_args(args, name="redeploy", route_prefix="/redeploy", timeout_s=180)
        old = np.array(c.post("/redeploy/score", json=body).json()["scores"])
        np.testing.assert_allclose(old, offline(), atol=1e-5)
        _export_tiny(service["model"], export, perturb=0.05)
        new_offline = offline()
        assert not np.allclose(old, new_offline, atol=1e-3), "the retrained weights must score differently"
        deploy_args(args, name="redeploy", route_prefix="/redeploy", timeout_s=180)
        r = c.post("/redeploy/score", json=body)
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["scores"], new_offline, atol=1e-5)
        assert c.get("/redeploy/readyz").json()["model_id"] == TextEncoder(str(export)).model_id
    finally:
        serve.delete("redeploy")


def test_the_batch_job_answers_as_the_served_app(service, tmp_path) -> None:
    """Issue 21: jobs.recommend's top-k for a file of searches and histories equals the running
    app's answers over HTTP for the same inputs: same model, user text, index, filters and
    exclusions (one ranking function, recsys.retrieval.search, serves both)."""
    import json

    from recsys import recommend
    from recsys.config import load_config
    from recsys.index import build_index

    enc = TextEncoder(service["model"])
    table = service["table"]
    build_index(enc.encode_items(table.column("text").to_pylist()), table.column("item_id").to_pylist(),
                model_id=enc.model_id).save(str(tmp_path / "index"))
    requests = [
        ({"query": "running shoes"}, "/search", {"query": "running shoes", "mode": "dense"}),
        ({"query": "coffee"}, "/search", {"query": "coffee", "mode": "dense"}),
        ({"history": ["P3", "P4"]}, "/recommend", {"recent_item_ids": ["P3", "P4"]}),
        # The app's live profile (a click, then a purchase, which it excludes) as a file row.
        ({"history": ["P5", "P8"], "exclude": ["P8"]}, "/recommend", {"user_id": "u-batch"}),
    ]
    (tmp_path / "requests.jsonl").write_text("".join(json.dumps({**row, "request_id": str(n)}) + "\n" for n, (row, _, _) in enumerate(requests)))
    c = service["client"]
    events = [{"item_id": "P5", "event_type": "click", "timestamp": 1}, {"item_id": "P8", "event_type": "purchase", "timestamp": 2}]
    assert c.post("/events", json={"user_id": "u-batch", "events": events}).status_code == 200
    filters = {"min_price": 35.0}
    served = []
    for _, path, body in requests:
        r = c.post(path, json={**body, "k": 5, "filters": filters})
        assert r.status_code == 200, r.text
        served.append(r.json()["items"])
    assert "P8" not in [i["item_id"] for i in served[3]] and all(i["price"] >= 35 for s in served for i in s)

    cfg = load_config(None, [
        f"storage.root={tmp_path / 'root'}", f"serve.model_uri={service['model']}", f"serve.items_uri={service['items_dir']}",
        f"serve.index_uri={tmp_path / 'index'}", f"recommend.input_uri={tmp_path / 'requests.jsonl'}", "recommend.k=5",
        "recommend.min_price=35", "recommend.exclude_history=false", "recommend.cpus_per_actor=0.2",
    ])
    summary = recommend.run(cfg)
    assert summary["rows_out"] == summary["ranked"] == len(requests) and summary["model_id"] == enc.model_id
    out = pq.read_table(tmp_path / "root" / "train" / "recommendations").to_pylist()
    by_id = {int(r["request_id"]): r for r in out}
    for n, items in enumerate(served):
        assert by_id[n]["item_ids"] == [i["item_id"] for i in items], (requests[n], by_id[n]["item_ids"], items)
        np.testing.assert_allclose(by_id[n]["scores"], [i["score"] for i in items], atol=1e-5)


def _sequence_top(export: Path, emb: np.ndarray, ids: list[str], history: list[str], k: int, exclude=(), keep=None) -> list[tuple[str, float]]:
    """The sequence tower's ranking computed here, directly (history newest first): the user
    vector over the catalog's text embeddings `emb`, scores against its item vectors, sorted."""
    from recsys.sequence import load_sequence_tower

    model = load_sequence_tower(export)
    u = model.encode_users([[ids.index(h) for h in history]], emb, ids)[0]
    scores = model.item_vectors(emb, ids) @ u
    order = sorted((i for i in range(len(ids)) if ids[i] not in exclude and (keep is None or keep(i))), key=lambda i: (-float(scores[i]), i))
    return [(ids[i], float(scores[i])) for i in order[:k]]


def _ranked(items: list[dict]) -> list[tuple[str, float]]:
    return [(i["item_id"], i["score"]) for i in items]


def _same(got: list[tuple[str, float]], want: list[tuple[str, float]]) -> None:
    assert [i for i, _ in got] == [i for i, _ in want], (got, want)
    np.testing.assert_allclose([s for _, s in got], [s for _, s in want], atol=1e-5)


def test_an_export_with_a_sequence_tower_recommends_by_it(service, tmp_path, attach_random_tower) -> None:
    """Issue 15: with a sequence user tower in the export, /recommend and /score (no query) rank
    by that tower over the index's embeddings of the history (request ids + live profile), /search
    keeps the text towers, the batch job ranks as the app does, and a swap to a model without the
    tower goes back to the text path (and forward again)."""
    from ray import serve

    from recsys import recommend
    from recsys.config import load_config
    from recsys.index import build_index
    from serve.control import deploy_args, swap

    table = service["table"]
    ids, texts = table.column("item_id").to_pylist(), table.column("text").to_pylist()
    plain, seq = tmp_path / "plain", tmp_path / "seq"
    _export_tiny(service["model"], plain)
    _export_tiny(service["model"], seq)
    attach_random_tower(seq, ids)
    emb = {}
    for export in (plain, seq):
        enc = TextEncoder(str(export))
        emb[export] = enc.encode_items(texts)
        build_index(emb[export], ids, model_id=enc.model_id).save(str(export) + "-index")
    assert TextEncoder(str(plain)).model_id != TextEncoder(str(seq)).model_id
    c = service["client"]

    def user_tower() -> str:
        return serve.get_deployment_handle("Ingress", "seq").info.remote().result(timeout_s=30)["user_tower"]

    def rec(body: dict) -> list[tuple[str, float]]:
        r = c.post("/seq/recommend", json=body)
        assert r.status_code == 200, r.text
        return _ranked(r.json()["items"])

    args = {"model_uri": str(seq), "items_uri": service["items_dir"], "index_uri": f"{seq}-index", "max_replicas": 1, "replica_cpus": 0.2}
    try:
        deploy_args(args, name="seq", route_prefix="/seq", timeout_s=180)
        e = emb[seq]
        # Request ids are oldest first; the tower reads newest first.
        _same(rec({"recent_item_ids": ["P3", "P4"], "k": 5}), _sequence_top(seq, e, ids, ["P4", "P3"], 5))
        assert user_tower() == "sequence"
        text_way = _offline(str(seq), table, render_user_text(None, [texts[3], texts[2]], 10), 5)
        assert [i for i, _ in rec({"recent_item_ids": ["P3", "P4"], "k": 5})] != text_way, "the two towers must rank differently here"

        # The live profile: each event changes the next answer at once.
        assert c.post("/seq/events", json={"user_id": "u-seq", "events": [{"item_id": "P5", "event_type": "click", "timestamp": 1}]}).status_code == 200
        first = rec({"user_id": "u-seq", "k": 8})
        _same(first, _sequence_top(seq, e, ids, ["P5"], 8))
        assert c.post("/seq/events", json={"user_id": "u-seq", "events": [{"item_id": "P1", "event_type": "add_to_cart", "timestamp": 2}]}).status_code == 200
        second = rec({"user_id": "u-seq", "k": 8})
        _same(second, _sequence_top(seq, e, ids, ["P1", "P5"], 8))
        assert second != first, "a new /events entry changes the next answer"
        # Request ids first, then the profile's (as the text path merges them); purchases excluded.
        assert c.post("/seq/events", json={"user_id": "u-seq", "events": [{"item_id": "P8", "event_type": "purchase", "timestamp": 3}]}).status_code == 200
        merged = rec({"user_id": "u-seq", "recent_item_ids": ["P2", "P5"], "k": 8, "filters": {"min_price": 35.0}})
        _same(merged, _sequence_top(seq, e, ids, ["P5", "P2", "P8", "P1"], 8, exclude={"P8"}, keep=lambda i: TITLES[i][3] >= 35))
        r = c.post("/seq/score", json={"user_id": "u-seq", "item_ids": ["P6", "P1"]})
        assert r.status_code == 200, r.text
        by_id = dict(_sequence_top(seq, e, ids, ["P8", "P1", "P5"], len(ids)))
        np.testing.assert_allclose(r.json()["scores"], [by_id["P6"], by_id["P1"]], atol=1e-5)
        assert c.post("/seq/recommend", json={"user_id": "nobody", "k": 3}).status_code == 404
        # Search is the text towers' still.
        s = c.post("/seq/search", json={"query": "running shoes", "k": 5, "mode": "dense"})
        assert [i["item_id"] for i in s.json()["items"]] == _offline(str(seq), table, "running shoes", 5)

        # The batch job ranks a history (no query) by the tower as the app does, a query by text.
        cfg = load_config(None, [
            f"storage.root={tmp_path / 'root'}", f"serve.model_uri={seq}", f"serve.items_uri={service['items_dir']}",
            f"serve.index_uri={seq}-index", "recommend.k=5", "recommend.min_price=35", "recommend.exclude_history=false",
        ])
        rows = [{"history": ["P4", "P3"], "source": "t"}, {"history": ["P5", "P2", "P8", "P1"], "exclude": ["P8"], "source": "t"},
                {"query": "running shoes", "source": "t"}]
        batch = recommend.rank_in_process(cfg, rows).to_pylist()
        served = [rec({"recent_item_ids": ["P3", "P4"], "k": 5, "filters": {"min_price": 35.0}}), merged[:5],
                  _ranked(c.post("/seq/search", json={"query": "running shoes", "k": 5, "mode": "dense", "filters": {"min_price": 35.0}}).json()["items"])]
        for got, want in zip(batch, served, strict=True):
            assert got["error"] is None, got
            _same(list(zip(got["item_ids"], got["scores"], strict=True)), want)

        # A swap to a model without the tower goes back to the text path, and forward again.
        swap("seq", str(plain), index_uri=f"{plain}-index", timeout_s=180)
        assert user_tower() == "text"
        text_now = _offline(str(plain), table, render_user_text(None, [texts[3], texts[2]], 10), 5)
        assert [i for i, _ in rec({"recent_item_ids": ["P3", "P4"], "k": 5})] == text_now
        swap("seq", str(seq), index_uri=f"{seq}-index", timeout_s=180)
        assert user_tower() == "sequence"
        _same(rec({"user_id": "u-seq", "k": 8, "include_purchased": True}), _sequence_top(seq, e, ids, ["P8", "P1", "P5"], 8))
    finally:
        serve.delete("seq")
