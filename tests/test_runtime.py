"""What Ray workers are told about the Hugging Face Hub: offline only when the model is local."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recsys.config import load_config
from recsys.runtime import hub_offline, worker_env

REPO = Path(__file__).resolve().parents[1]


def _cfg(name: str):  # noqa: ANN202
    return load_config(None, [f"model.name_or_path={name}"])


def test_hub_id_is_not_forced_offline_and_local_models_are(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    hub = load_config(REPO / "jobs/configs/train_cluster.yaml")
    assert hub.model.name_or_path == "BAAI/bge-base-en-v1.5"
    assert "HF_HUB_OFFLINE" not in worker_env(hub)
    assert "HF_HUB_OFFLINE" not in worker_env(None), "no config: nothing forced"
    for local in ("bundled", "tiny-random", str(tmp_path)):
        assert worker_env(_cfg(local))["HF_HUB_OFFLINE"] == "1", local


def test_users_own_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert worker_env(_cfg("bundled"))["HF_HUB_OFFLINE"] == "0"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_offline(_cfg("BAAI/bge-base-en-v1.5")) == "1"


@pytest.mark.ray
def test_ray_workers_of_a_hub_id_run_can_reach_the_hub() -> None:
    """The real thing: a fresh local cluster started for the cluster config's hub model; its
    workers must not see HF_HUB_OFFLINE=1 (they did, for every model, before)."""
    code = (
        "import os, ray\n"
        "from recsys.config import load_config\n"
        "from recsys.runtime import ensure_ray\n"
        "ensure_ray(num_cpus=1, cfg=load_config('jobs/configs/train_cluster.yaml'))\n"
        "print('DRIVER', os.environ.get('HF_HUB_OFFLINE'))\n"
        "print('WORKER', ray.get(ray.remote(lambda: os.environ.get('HF_HUB_OFFLINE')).remote()))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "RAY_ADDRESS")}
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "DRIVER None" in r.stdout and "WORKER None" in r.stdout, r.stdout


@pytest.mark.ray
def test_workers_reach_this_clusters_state_api(ray_cluster: None) -> None:
    """Ray Train's PlacementGroupCleaner asks the State API, from a worker, every second whether
    the train controller lives. Without a dashboard on the local cluster every ask failed and
    logged "Failed to query Ray Train Controller actor state" (84 times in a 2-minute tiny
    training); with other Ray instances on the machine it asked the wrong one, or none."""
    import ray

    @ray.remote(num_cpus=0)
    class Probe:
        def state_of(self, actor_id: str) -> str:
            from ray.util.state import get_actor

            return get_actor(actor_id, timeout=10).state

    probe = Probe.remote()
    assert ray.get(probe.state_of.remote(probe._actor_id.hex()), timeout=60) == "ALIVE"
    ray.kill(probe)


def test_an_s3_model_is_read_with_the_run_s_storage_settings_and_old_copies_go(s3_server, tiny_model, tmp_path, monkeypatch) -> None:
    """An s3:// model.name_or_path (pretrain's adapted encoder on an S3 root) with the endpoint
    and keys given only in the config: storage_env hands them to what copies the model, and a
    re-written model replaces the older local copy instead of piling up beside it."""
    from recsys import storage
    from recsys.encoder import resolve_model_path
    from recsys.runtime import storage_env

    uri = "s3://test/runtime-models/tiny"
    st = s3_server.storage_config(uri)
    storage.upload_dir(tiny_model, uri, st)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(key, raising=False)
    cfg = load_config(None, [f"storage.root={uri}", f"storage.s3_endpoint={st.s3_endpoint}",
                             f"storage.s3_access_key={st.s3_access_key}", f"storage.s3_secret_key={st.s3_secret_key}"])
    env = storage_env(cfg)
    assert env["AWS_ENDPOINT_URL"] == st.s3_endpoint and env["AWS_DEFAULT_REGION"] == "us-east-1"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    first = Path(resolve_model_path(uri, cache_dir=tmp_path))
    assert (first / "config.json").is_file()
    assert Path(resolve_model_path(uri, cache_dir=tmp_path)) == first  # cached
    hours_ago = time.time() - 7200
    os.utime(first, (hours_ago, hours_ago))
    storage.write_bytes(storage.join(uri, "extra.txt"), b"re-written", st)
    second = Path(resolve_model_path(uri, cache_dir=tmp_path))
    assert second != first and (second / "extra.txt").read_text() == "re-written"
    assert not first.exists(), "the outdated copy is removed"
    # A copy made within the grace time stays: a process on the node may still be loading it.
    storage.write_bytes(storage.join(uri, "extra.txt"), b"again", st)
    third = Path(resolve_model_path(uri, cache_dir=tmp_path))
    assert third != second and second.exists() and third.exists()


def test_a_successful_fit_deletes_checkpoint_folders_ray_never_registered(ray_cluster, s3_storage) -> None:
    """A half-written checkpoint folder (an attempt that died mid-upload) on S3 is never
    registered and `num_to_keep` pruning never sees it: fit_trainer removes it once the run
    succeeds, and keeps exactly the checkpoints Ray registered."""
    import pyarrow.fs as pafs
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from recsys import storage
    from recsys.runtime import fit_trainer

    def three_checkpoints(config: dict) -> None:  # nested: Ray's workers cannot import this module
        import tempfile

        import ray.train

        for step in range(3):
            with tempfile.TemporaryDirectory() as d:
                Path(d, "step.txt").write_text(str(step))
                ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(d))

    fs, root = storage.train_filesystem(s3_storage.root, s3_storage)
    orphan = "checkpoint_2026-01-01_00-00-00.000000"
    storage.write_bytes(f"{s3_storage.root}/run/{orphan}/model.safetensors", b"half", s3_storage)
    storage.write_bytes(f"{s3_storage.root}/run/not_a_checkpoint/keep.txt", b"ours", s3_storage)
    trainer = TorchTrainer(
        three_checkpoints,
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="run", storage_path=root, storage_filesystem=fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    result = fit_trainer(trainer)
    assert result.error is None
    def folders_now() -> set[str]:
        fs.handler.fs.invalidate_cache()  # s3fs caches listings in this process
        return {i.base_name for i in fs.get_file_info(pafs.FileSelector(f"{root}/run")) if i.type == pafs.FileType.Directory}

    folders = folders_now()
    registered = {c.path.rstrip("/").rsplit("/", 1)[-1] for c, _ in result.best_checkpoints}
    assert len(registered) == 2 and orphan not in registered
    assert {f for f in folders if f.startswith("checkpoint_")} == registered, "the orphan is gone, the kept ones stay"
    assert "not_a_checkpoint" in folders, "only checkpoint folders are touched"
    with result.checkpoint.as_directory() as d:
        assert Path(d, "step.txt").read_text() == "2"

    # Resubmitted with a lower keep count and nothing new to save (a finished run): Ray still
    # holds both registered checkpoints in its snapshot, though best_checkpoints lists one.
    def no_checkpoint(config: dict) -> None:
        import ray.train

        ray.train.report({"step": 3})

    again = fit_trainer(TorchTrainer(
        no_checkpoint,
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="run", storage_path=root, storage_filesystem=fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
    ))
    assert again.error is None
    after = folders_now()
    assert registered <= after, "a checkpoint Ray still has registered was deleted"
