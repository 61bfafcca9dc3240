"""Issue 18: the S3 server stopped and restarted in the middle of prepare's read, and while a
Serve replica loads its model. Reads retry with backoff (pyarrow's and botocore's own retry
strategies, `storage.s3_max_attempts`); the job finishes with every row accounted for, counted
independently from the files, and the replica comes up serving the model. (Checkpoint uploads:
tests/test_train.py.)"""

from __future__ import annotations

import collections
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from bench.faults import fault_when, gets, logging_requests, restart, when
from recsys import paths, storage
from recsys.config import Config, DataConfig

pytestmark = pytest.mark.ray

SHARDS = 24
DOWN_S = 4.0  # past pyarrow's default 3 attempts (~2 s here)
# A starting replica imports torch and transformers before it reads: down long enough to meet it.
LOAD_DOWN_S = 15.0
# Longer than the retries: with s3_max_attempts=2 a read gives up within a couple of seconds.
LONG_DOWN_S = 30.0


def _rows_on_disk(files: list[Path]) -> int:
    """The event rows as the server's own files hold them (non-blank lines), read without S3."""
    return sum(sum(1 for line in f.read_bytes().splitlines() if line.strip()) for f in files)


@pytest.mark.slow  # 25-65 s here; the default suite is kept near 15 minutes
def test_prepare_finishes_when_the_object_store_restarts_mid_read(ray_cluster: None, s3_server, s3_storage) -> None:  # noqa: ANN001
    from recsys.data.prepare import run

    cfg = Config(storage=s3_storage)
    cfg.data = DataConfig(source="synthetic", synthetic_users=150, synthetic_items=60, synthetic_shards=SHARDS,
                          synthetic_bad_row_share=0.02)
    bucket, prefix = s3_storage.root[len("s3://"):].split("/", 1)
    events_dir = Path(s3_server.root) / bucket / prefix / "raw" / "events"
    offset = logging_requests(s3_server)

    def shard_gets() -> int:
        return gets(s3_server, bucket, f"{prefix}/raw/events/part-", offset)

    def mid_read() -> dict[str, int] | None:
        # The job writes the raw shards, then reads them twice (the row count and the read):
        # the server goes down once a quarter of the shard reads are done.
        n = shard_gets()
        return {"shard_gets": n} if n >= SHARDS // 2 else None

    try:
        with fault_when(mid_read, lambda: restart(s3_server, down_s=DOWN_S)) as outage:
            manifest = run(cfg)
    finally:
        s3_server.log_requests = False
    assert outage.error is None, outage.error
    assert outage.down_at, "the server was never stopped"
    assert outage.up_at - outage.down_at >= DOWN_S
    # The fault landed in the middle of the read: the shards were fetched more often after it.
    assert shard_gets() >= 2 * SHARDS > outage.seen["shard_gets"], (shard_gets(), outage.seen)
    c = manifest["counts"]
    on_disk = _rows_on_disk(sorted(events_dir.glob("part-*.jsonl")))
    assert c["rows_in"] == c["rows_kept"] + c["rows_quarantined"] == on_disk == manifest["source"]["synthetic"]["events"]
    assert c["rows_in_files"] == on_disk and c["event_files"] == SHARDS
    assert c["rows_quarantined"] > 0
    # The manifest the job published is whole and is the one read back.
    assert json.loads(storage.read_bytes(paths.manifest(cfg), cfg.storage))["counts"] == c



@pytest.mark.slow
def test_prepare_outlasted_by_an_outage_stops_naming_the_read_and_a_rerun_finishes(ray_cluster: None, s3_server, s3_storage) -> None:  # noqa: ANN001
    """The store goes down for 30 s mid-read with s3_max_attempts=2 (retries over in ~2 s): the
    job stops with an error naming the object store and what it was reading, publishes no
    manifest, and the same job run again once the store is back accounts for every row."""
    from recsys.data.prepare import run

    st = s3_storage.model_copy(update={"s3_max_attempts": 2})
    cfg = Config(storage=st)
    cfg.data = DataConfig(source="synthetic", synthetic_users=150, synthetic_items=60, synthetic_shards=SHARDS,
                          synthetic_bad_row_share=0.02)
    bucket, prefix = st.root[len("s3://"):].split("/", 1)
    offset = logging_requests(s3_server)

    def mid_read() -> dict[str, int] | None:
        n = gets(s3_server, bucket, f"{prefix}/raw/events/part-", offset)
        return {"shard_gets": n} if n >= SHARDS // 2 else None

    error: BaseException | None = None
    try:
        with fault_when(mid_read, lambda: restart(s3_server, down_s=LONG_DOWN_S, hard=True), join_s=120) as outage:
            try:
                run(cfg)
            except Exception as e:  # noqa: BLE001 - asserted below
                error = e
    finally:
        s3_server.log_requests = False
    assert outage.error is None, outage.error
    assert outage.down_at, "the server was never stopped"
    assert error is not None, "the job finished through an outage past its retries"
    text = str(error)
    assert "NETWORK_CONNECTION" in text or "connect" in text.lower(), text[:2000]
    assert f"{prefix}/raw/events" in text or "events" in text, text[:2000]
    assert not storage.exists(paths.manifest(cfg), st), "a failed job published a manifest"

    manifest = run(cfg)
    c = manifest["counts"]
    events_dir = Path(s3_server.root) / bucket / prefix / "raw" / "events"
    on_disk = _rows_on_disk(sorted(events_dir.glob("part-*.jsonl")))
    assert c["rows_in"] == c["rows_kept"] + c["rows_quarantined"] == on_disk == manifest["source"]["synthetic"]["events"]


@pytest.mark.slow  # 25-65 s here; the default suite is kept near 15 minutes
def test_a_replica_loads_its_model_while_the_object_store_restarts(ray_cluster: None, s3_server, s3_storage, tiny_model, tmp_path) -> None:  # noqa: ANN001
    import httpx
    import numpy as np
    from ray import serve
    from test_serve import TITLES, _export_tiny, _write_items

    from recsys.encoder import TextEncoder
    from serve.control import deploy_args

    export, items_dir = tmp_path / "export", tmp_path / "items"
    items_dir.mkdir()
    _export_tiny(tiny_model, export)
    table = _write_items(items_dir)
    model_uri, items_uri = storage.join(s3_storage.root, "export"), storage.join(s3_storage.root, "items")
    storage.upload_dir(export, model_uri, s3_storage)
    storage.upload_dir(items_dir, items_uri, s3_storage)
    bucket, prefix = s3_storage.root[len("s3://"):].split("/", 1)
    offset = logging_requests(s3_server)
    import ray
    from ray.util.state import list_actors

    address = ray.get_runtime_context().gcs_address

    def replicas() -> list:
        return list_actors(address=address, filters=[("class_name", "=", "ServeReplica:s3-restart:Ingress")])

    def loading() -> dict[str, int] | None:
        # The replica's actor exists: it is starting, and its first act is to load the model
        # (the deploy's own reads of the export, on the driver, are over by then).
        return {"export_gets_before": gets(s3_server, bucket, f"{prefix}/export/", offset)} if replicas() else None

    port = storage.free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"model_uri": model_uri, "items_uri": items_uri, "s3_endpoint": s3_storage.s3_endpoint,
            "max_replicas": 1, "replica_cpus": 0.2}
    done = threading.Event()
    watcher, outage = when(loading, lambda: restart(s3_server, down_s=LOAD_DOWN_S), done, poll_s=0.1)
    try:
        deploy_args(args, name="s3-restart", route_prefix="/s3-restart", timeout_s=300)
        done.set()
        watcher.join(timeout=60)
        assert outage.error is None, outage.error
        assert outage.down_at, "the server was never stopped"
        body = {"query": "trail running shoes", "item_ids": [t[0] for t in TITLES]}
        r = httpx.post(f"http://127.0.0.1:{port}/s3-restart/score", json=body, timeout=60)
        assert r.status_code == 200, r.text
        enc = TextEncoder(str(export))
        want = enc.encode_items(table.column("text").to_pylist()) @ enc.encode_queries([body["query"]])[0]
        np.testing.assert_allclose(r.json()["scores"], want, atol=1e-5)
        # The replica read the export once the server was back, and came up once: none failed
        # to load and was replaced.
        assert gets(s3_server, bucket, f"{prefix}/export/", offset) > outage.seen["export_gets_before"]
        assert [a.state for a in replicas()] == ["ALIVE"], replicas()
    finally:
        done.set()
        s3_server.log_requests = False
        serve.shutdown()  # the next module starts Serve with its own HTTP port



@pytest.mark.slow
def test_a_swap_during_an_outage_longer_than_the_retries_keeps_the_old_model_serving(  # noqa: ANN001
        ray_cluster: None, s3_server, s3_storage, tiny_model, tmp_path) -> None:
    """The store goes down (SIGKILL, for 30 s, past the retries) as the replicas (two) start reading
    the new model. Serve restarts a replica whose reconfigure raises, and a restarted one cannot load
    while the store is down: that turned a failed swap into an outage. Now the replica keeps
    serving the old model, the swap raises naming the model and the store's error and declares
    the app back to the old model, every request is answered by the old model, the replica is
    the same one, and a swap once the store is back serves the new model."""
    import httpx
    import numpy as np
    from ray import serve
    from test_serve import TITLES, _export_tiny, _replica_ids, _write_items

    from recsys.encoder import TextEncoder
    from serve.control import deploy_args, swap

    root = s3_storage.root
    items_dir = tmp_path / "items"
    items_dir.mkdir()
    table = _write_items(items_dir)
    uris = {}
    for name, perturb in (("export-a", 0.0), ("export-b", 0.05)):
        _export_tiny(tiny_model, tmp_path / name, perturb=perturb)
        uris[name] = storage.join(root, name)
        storage.upload_dir(tmp_path / name, uris[name], s3_storage)
    for name in ("items-a", "items-b"):  # b: the swap reads a catalog too, after loading the model
        uris[name] = storage.join(root, name)
        storage.upload_dir(items_dir, uris[name], s3_storage)
    body = {"query": "trail running shoes", "item_ids": [t[0] for t in TITLES]}
    want = {}
    for name in ("export-a", "export-b"):
        enc = TextEncoder(str(tmp_path / name))
        want[name] = enc.encode_items(table.column("text").to_pylist()) @ enc.encode_queries([body["query"]])[0]
    assert not np.allclose(want["export-a"], want["export-b"], atol=1e-4)

    port = storage.free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = "s3-swap"
    args = {"model_uri": uris["export-a"], "items_uri": uris["items-a"], "s3_endpoint": s3_storage.s3_endpoint,
            "s3_max_attempts": 2, "min_replicas": 2, "max_replicas": 2, "replica_cpus": 0.2}
    answers: list[tuple[float, int, Any]] = []
    stop = threading.Event()

    def hammer() -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as hc:
            while not stop.is_set():
                r = hc.post(f"/{app}/score", json=body)
                answers.append((time.monotonic(), r.status_code, r.json()["scores"] if r.status_code == 200 else r.text[:300]))
                time.sleep(0.05)

    bucket, prefix = root[len("s3://"):].split("/", 1)
    try:
        deploy_args(args, name=app, route_prefix=f"/{app}", timeout_s=300)
        replicas = _replica_ids(app)
        offset = logging_requests(s3_server)

        def reading_b() -> dict[str, int] | None:
            # The driver reads b's recsys_model.json once; each replica reads it, then the weights.
            n = gets(s3_server, bucket, f"{prefix}/export-b/", offset)
            return {"export_b_gets": n} if n >= 3 else None

        threads = [threading.Thread(target=hammer) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        t0 = time.monotonic()
        error: BaseException | None = None
        with fault_when(reading_b, lambda: restart(s3_server, down_s=LONG_DOWN_S, hard=True), poll_s=0.005, join_s=120) as outage:
            try:
                swap(app, uris["export-b"], items_uri=uris["items-b"], timeout_s=120)
            except Exception as e:  # noqa: BLE001 - asserted below
                error = e
            t_raised = time.monotonic()
            # Declared back to the model it serves: nothing left to load or retry, with the store
            # still down (the rollback reaches the replica as a reconfigure, just after the raise).
            ingress = serve.get_deployment_handle("Ingress", app)
            deadline = time.monotonic() + 10
            while (info := ingress.info.remote().result(timeout_s=30))["load_error"] is not None and time.monotonic() < deadline:
                time.sleep(0.2)
            still_down = not s3_server.proc
            # Traffic through the rest of the outage: still the old model.
        t_up = time.monotonic()
        time.sleep(2.0)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        assert outage.error is None, outage.error
        assert outage.down_at, "the server was never stopped"
        assert error is not None and type(error).__name__ == "ModelLoadFailed", repr(error)
        assert uris["export-b"] in str(error) and "rolled back" in str(error), str(error)
        assert t_raised - t0 < LONG_DOWN_S, "the swap failed fast, not at its timeout or the store's return"
        codes = collections.Counter(code for _, code, _ in answers)
        assert codes == {200: len(answers)}, (codes, [a for a in answers if a[1] != 200][:3])
        during = [a for a in answers if outage.down_at <= a[0] <= outage.up_at]
        assert len(during) > 20, "requests were sent during the outage"
        for _, _, scores in answers:
            np.testing.assert_allclose(scores, want["export-a"], atol=1e-5)
        assert _replica_ids(app) == replicas, "no replica was restarted"
        assert still_down and info["load_error"] is None and info["model_uri"] == uris["export-a"], info
        details = _app_user_config(app)
        assert details["model_uri"] == uris["export-a"], details
        assert t_up >= outage.up_at

        # The store is back: the same swap now serves the new model.
        swap(app, uris["export-b"], items_uri=uris["items-b"], timeout_s=120)
        r = httpx.post(f"http://127.0.0.1:{port}/{app}/score", json=body, timeout=60)
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["scores"], want["export-b"], atol=1e-5)
    finally:
        stop.set()
        s3_server.log_requests = False
        serve.shutdown()


def _app_user_config(app: str) -> dict[str, Any]:
    from ray.serve.context import _get_global_client

    deployed = _get_global_client().get_serve_details()["applications"][app]["deployed_app_config"]
    return next(d for d in deployed["deployments"] if d["name"] == "Ingress")["user_config"]
