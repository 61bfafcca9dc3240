"""Shared fixtures: a real S3-compatible server, a private local Ray cluster, a tiny BERT."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from recsys.config import StorageConfig
from recsys.storage import LocalS3Server

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalS3Server]:
    """rclone serve s3 on a free loopback port; stopped by its own PID at the end."""
    server = LocalS3Server(root=tmp_path_factory.mktemp("s3"))
    server.start()
    server.make_bucket("test")
    old = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    try:
        yield server
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture()
def s3_storage(s3_server: LocalS3Server, request: pytest.FixtureRequest) -> StorageConfig:
    """A StorageConfig rooted at a fresh prefix of the test bucket."""
    return s3_server.storage_config(f"s3://test/{request.node.name}")


@pytest.fixture(scope="session")
def ray_cluster(s3_server: LocalS3Server) -> Iterator[None]:
    """One private local Ray cluster for the whole session (ray.init costs ~4 s).

    Depends on s3_server so the S3 settings are in the environment Ray's workers inherit.
    """
    import ray

    from recsys.runtime import ensure_ray

    os.environ.pop("RAY_ADDRESS", None)
    # Serve's auth test reads its bearer token from the replicas' environment, as in a cluster.
    os.environ["RECSYS_TEST_API_TOKEN"] = "s3cret"
    ensure_ray(num_cpus=4)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Path of a tiny randomly initialised BERT (with the MiniLM vocabulary)."""
    from recsys.encoder import make_tiny_bert

    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_decoder(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Path of a tiny randomly initialised Qwen2-architecture decoder (a decoder-style tokenizer
    over the MiniLM vocabulary: no pad token, no EOS added; see recsys.encoder.make_tiny_decoder)."""
    from recsys.encoder import make_tiny_decoder

    return make_tiny_decoder(tmp_path_factory.mktemp("tiny-decoder") / "qwen2")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


# A small sequence user tower (recsys.sequence): every settings key its constructor reads.
TINY_SEQUENCE = {
    "dim": 16, "layers": 1, "heads": 2, "ffn_dim": 32, "dropout": 0.0, "attention": "bidirectional", "max_len": 8,
    "adaptor": "moe", "experts": 2, "adaptor_dropout": 0.0, "item_ids": True,
}


@pytest.fixture(scope="session")
def attach_random_tower():
    """attach(export_dir, item_ids, seed=0) -> model_id: a randomly initialised sequence tower
    attached to a local export (every item but the last gets an ID embedding: one cold item)."""
    import torch

    from recsys.encoder import TextEncoder
    from recsys.sequence import SequenceTower, attach_sequence_tower

    def attach(export_dir: str | Path, item_ids: list[str], seed: int = 0, **settings: object) -> str:
        torch.manual_seed(seed)
        with_ids = list(item_ids)[:-1]
        tower = SequenceTower({**TINY_SEQUENCE, **settings}, TextEncoder(str(export_dir)).dim, len(with_ids))
        return attach_sequence_tower(export_dir, tower, {i: n + 1 for n, i in enumerate(with_ids)})

    return attach
