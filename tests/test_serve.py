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


@pytest.fixture(scope="module")
def service(ray_cluster, tiny_model, tmp_path_factory):
    from ray import serve

    from serve.app import app_builder

    items_dir = tmp_path_factory.mktemp("items")
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
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"model_uri": tiny_model, "items_uri": str(items_dir), "max_replicas": 1, "replica_cpus": 0.2}
    serve.run(app_builder(args), name="recsys", route_prefix="/")
    serve.run(app_builder({**args, "auth_token_env": "RECSYS_TEST_API_TOKEN"}), name="secured", route_prefix="/secured")
    serve.run(
        app_builder({**args, "max_ongoing_requests": 1, "max_queued_requests": 1, "batching": False}),
        name="tight", route_prefix="/tight",
    )
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
    r = c.post("/search", json={"query": "running shoes", "k": 5})
    assert r.status_code == 200, r.text
    got = [i["item_id"] for i in r.json()["items"]]
    assert got == _offline(service["model"], service["table"], "running shoes", 5)
    f = c.post("/search", json={"query": "coffee", "k": 5, "filters": {"category": "Home > Kitchen", "max_price": 100}})
    assert [i["item_id"] for i in f.json()["items"]] == ["P3"]


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


def test_serve_config_yaml_validates() -> None:
    from ray.serve.schema import ServeDeploySchema

    from serve.app import check_app_config

    text = (REPO / "serve" / "config.yaml").read_text()
    assert text.startswith("# serve run")
    cfg = ServeDeploySchema.model_validate(yaml.safe_load(text))
    app = cfg.applications[0].model_dump(exclude_unset=True)
    served = check_app_config(app)
    assert served["model_uri"] == "runs/local/local/export"
    enc = [d for d in app["deployments"] if d["name"] == "Encoder"][0]
    auto = enc["autoscaling_config"]
    assert auto["min_replicas"] <= auto["max_replicas"]


def test_app_config_puts_uris_only_in_user_config() -> None:
    """What makes a swap in place: the app's args (hashed into its code version) do not change
    with the model; the URIs ride in the Encoder's and Retriever's user_config, and must agree."""
    from serve.app import app_config, check_app_config

    a = app_config({"model_uri": "m1", "items_uri": "it", "index_uri": "ix1"}, name="x")
    b = app_config({"model_uri": "m2", "items_uri": "it", "index_uri": "ix2"}, name="x")
    assert a["args"] == b["args"] and a["import_path"] == b["import_path"]
    assert check_app_config(a) == {"model_uri": "m1", "items_uri": "it", "index_uri": "ix1"}
    assert check_app_config(b)["model_uri"] == "m2"
    mixed = {**a, "deployments": [{**d, "user_config": {**d["user_config"], "model_uri": "m2"}} if d["name"] == "Encoder" else d for d in a["deployments"]]}
    with pytest.raises(ValueError, match="model_uri"):
        check_app_config(mixed)
    with pytest.raises(ValueError, match="both"):
        check_app_config({**a, "deployments": [d for d in a["deployments"] if d["name"] == "Encoder"]})
    with pytest.raises(ValueError, match="names no model_uri"):
        check_app_config({"name": "y", "args": {}})


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


def test_swap_to_a_new_checkpoint_drops_nothing_and_never_mixes_models(service, tmp_path) -> None:
    """Swapping a declaratively deployed app to a new model URI under load: every request is
    answered 200, each answer wholly from one model, the same replicas keep running (an in-place
    reconfigure, not a restart), the new model serves afterwards, and live profiles survive."""
    from ray import serve

    from recsys.encoder import make_tiny_bert
    from recsys.index import build_index
    from serve.app import deploy_args, swap

    model_b = make_tiny_bert(tmp_path / "model-b", seed=1)
    ids, texts = service["table"].column("item_id").to_pylist(), service["table"].column("text").to_pylist()
    build_index(TextEncoder(model_b).encode_items(texts), ids).save(str(tmp_path / "index-b"))
    base = {"model_uri": service["model"], "items_uri": service["items_dir"], "max_replicas": 1, "replica_cpus": 0.2}
    deploy_args(base, name="swap", route_prefix="/swap", timeout_s=180)
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
                r = hc.post("/swap/search", json={"query": query, "k": 8})
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
