"""The demo's last step: run the app on the demo model, send real HTTP requests, shut down."""

from __future__ import annotations

import json
from typing import Any

import httpx

from recsys.config import Config
from recsys.storage import free_port


def _show(title: str, items: list[dict[str, Any]]) -> None:
    print(f"\n{title}")
    for n, it in enumerate(items, 1):
        print(f"  {n}. {it['item_id']}  {it['score']:.3f}  {it.get('title')}  [{it.get('category')}]")


def serve_demo(cfg: Config) -> dict[str, Any]:
    from ray import serve

    from serve.app import app_builder
    from serve.control import app_args

    port = free_port()
    # The run's artefacts as jobs.deploy would serve them: the index (with its BM25 index and the
    # hybrid fusion chosen on the valid split) when the recommend step built one.
    args = {**app_args(cfg), "min_replicas": 1, "max_replicas": 1, "replica_cpus": 0.5, "encoder_gpus": 0.0,
            "auth_token": "", "auth_token_env": ""}  # the demo's requests carry no token
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    answers: dict[str, Any] = {}
    try:
        serve.run(app_builder(args), name="recsys", route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
            print("readyz:", c.get("/readyz").json())
            for q in ("trail running shoe", "espresso machine", "memory foam dog bed"):
                body = c.post("/search", json={"query": q, "k": 3}).json()
                r = body["items"]
                _show(f"POST /search {{query: {q!r}}}  (mode {body['mode']})", r)
                answers[f"search:{q}"] = [i["item_id"] for i in r]
            cheap = c.post("/search", json={"query": "coffee", "k": 3, "filters": {"category": "Home > Kitchen", "max_price": 40}}).json()["items"]
            _show("POST /search {query: 'coffee', filters: Home > Kitchen, max_price 40}", cheap)
            first = cheap[0]["item_id"] if cheap else answers["search:espresso machine"][0]
            ev = c.post("/events", json={"user_id": "demo-user", "events": [{"item_id": first, "event_type": "click"}]}).json()
            print("\nPOST /events", json.dumps(ev))
            rec = c.post("/recommend", json={"user_id": "demo-user", "k": 3}).json()["items"]
            _show(f"POST /recommend {{user_id: demo-user}} after a click on {first}", rec)
            c.post("/events", json={"user_id": "demo-user", "events": [{"item_id": rec[0]["item_id"], "event_type": "purchase"}]})
            rec2 = c.post("/recommend", json={"user_id": "demo-user", "k": 3}).json()["items"]
            _show(f"POST /recommend after purchasing {rec[0]['item_id']} (excluded now)", rec2)
            bad = c.post("/search", json={"query": "", "k": 3})
            print(f"\nbad input -> {bad.status_code} {bad.json()}")
            answers["recommend"] = [i["item_id"] for i in rec]
    finally:
        serve.shutdown()
    print("\nServe shut down.")
    return answers
