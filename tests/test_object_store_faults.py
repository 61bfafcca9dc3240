"""Issue 18: the S3 server stopped and restarted in the middle of prepare's read, and while a
Serve replica loads its model. Reads retry with backoff (pyarrow's and botocore's own retry
strategies, `storage.s3_max_attempts`); the job finishes with every row accounted for, counted
independently from the files, and the replica comes up serving the model. (Checkpoint uploads:
tests/test_train.py.)"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from bench.faults import fault_when, gets, logging_requests, restart, when
from recsys import paths, storage
from recsys.config import Config, DataConfig

pytestmark = pytest.mark.ray

SHARDS = 24
DOWN_S = 4.0  # past pyarrow's default 3 attempts (~2 s here)
# A starting replica imports torch and transformers before it reads: down long enough to meet it.
LOAD_DOWN_S = 15.0


def _rows_on_disk(files: list[Path]) -> int:
    """The event rows as the server's own files hold them (non-blank lines), read without S3."""
    return sum(sum(1 for line in f.read_bytes().splitlines() if line.strip()) for f in files)


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
