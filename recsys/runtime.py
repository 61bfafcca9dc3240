"""Ray start-up shared by every job: join the cluster a job was submitted to, or start a local one."""

from __future__ import annotations

import logging
import os
from typing import Any

from recsys.storage import S3_COMPAT_ENV

log = logging.getLogger(__name__)

# Settings measured on small machines (see docs): one parquet footer actor instead of 32, and no
# DeepSpeed shared-memory inference op build at every engine start.
RAY_ENV_DEFAULTS = {
    "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
    **S3_COMPAT_ENV,
}

_PASS_THROUGH = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "RECSYS_CACHE",
)


def worker_env() -> dict[str, str]:
    env = {k: os.environ.get(k, v) for k, v in RAY_ENV_DEFAULTS.items()}
    env.update({k: os.environ[k] for k in _PASS_THROUGH if k in os.environ})
    return env


def ensure_ray(num_cpus: int | None = None, **kwargs: Any) -> None:
    """Connect to Ray once per process.

    Under `ray job submit` RAY_ADDRESS points at the cluster; otherwise a private local cluster
    is started (address="local"), so a laptop never joins some other cluster by accident.
    """
    import ray

    for k, v in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or "local"
    init_kwargs: dict[str, Any] = {
        "address": address,
        "runtime_env": {"env_vars": worker_env()},
        "log_to_driver": True,
    }
    if address == "local":
        # More logical CPUs than train workers take, or Ray Data's read tasks starve (see docs).
        init_kwargs["num_cpus"] = num_cpus or max(4, (os.cpu_count() or 2) * 2)
        init_kwargs["include_dashboard"] = False
    init_kwargs.update(kwargs)
    log.info("ray.init(address=%s)", address)
    ray.init(**init_kwargs)
