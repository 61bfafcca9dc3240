"""Where each artefact of a run lives under `storage.root` (a local path or an s3:// / gs:// URI).

    <root>/raw/events/part-*.{parquet,jsonl,csv}   raw logs (synthetic / real-data loaders write here)
    <root>/raw/catalog/part-*.*                      raw catalog
    <root>/data/manifest.json                        counts, schemas, config, quarantine summary
    <root>/data/quarantine/part-*.parquet            rejected rows with their reason (QUARANTINE_SCHEMA)
    <root>/data/items/part-*.parquet                 prepared catalog (ITEMS_SCHEMA)
    <root>/data/duplicates.parquet                   item_id -> dup_group for groups of size > 1
    <root>/data/examples/<kind>/<split>/*.parquet    training examples (EXAMPLES_SCHEMA)
    <root>/<run>/checkpoint_*/                       Ray Train checkpoints (DeepSpeed shards)
    <root>/<run>/export/                             consolidated model: HF + sentence-transformers
    <root>/<run>/metrics.jsonl                       training metrics written by rank 0
    <root>/<run>/embeddings/part-*.parquet           catalog embeddings (item_id, embedding)
    <root>/<run>/index/                              retrieval index over the catalog embeddings
    <root>/<run>/eval/report.{json,md,png}           evaluation report
    <root>/<run>/recommendations/*.parquet           batch top-k per user / request (jobs.recommend)
    <root>/<pretrain.run_name>/model/                 the MLM-adapted encoder (jobs.pretrain)
"""

from __future__ import annotations

import os
from typing import Any

from recsys.config import Config
from recsys.storage import is_remote, join


def raw_events(cfg: Config) -> str:
    return cfg.data.events_uri or join(cfg.storage.root, "raw", "events")


def raw_catalog(cfg: Config) -> str:
    return cfg.data.catalog_uri or join(cfg.storage.root, "raw", "catalog")


def data_dir(cfg: Config) -> str:
    return join(cfg.storage.root, "data")


def manifest(cfg: Config) -> str:
    return join(data_dir(cfg), "manifest.json")


def quarantine(cfg: Config) -> str:
    return join(data_dir(cfg), "quarantine")


def items(cfg: Config) -> str:
    return join(data_dir(cfg), "items")


def duplicates(cfg: Config) -> str:
    return join(data_dir(cfg), "duplicates.parquet")


def examples(cfg: Config, kind: str, split: str) -> str:
    return join(data_dir(cfg), "examples", kind, split)


def run_dir(cfg: Config) -> str:
    return join(cfg.storage.root, cfg.train.run_name)


def export_dir(cfg: Config) -> str:
    return cfg.eval.checkpoint or join(run_dir(cfg), "export")


def metrics_file(cfg: Config) -> str:
    return join(run_dir(cfg), "metrics.jsonl")


def embeddings(cfg: Config) -> str:
    return join(run_dir(cfg), "embeddings")


def index_dir(cfg: Config) -> str:
    return join(run_dir(cfg), "index")


def eval_dir(cfg: Config) -> str:
    return join(run_dir(cfg), "eval")


def pretrain_dir(cfg: Config) -> str:
    """Domain-adaptive pretraining's run (checkpoints, metrics.jsonl): <root>/<pretrain.run_name>."""
    return join(cfg.storage.root, cfg.pretrain.run_name)


def pretrained(cfg: Config) -> str:
    """The adapted encoder jobs.pretrain writes (HF model without MLM head + tokenizer), which
    the train stage reads as model.name_or_path."""
    return cfg.pretrain.output_uri or join(pretrain_dir(cfg), "model")


def recommendations(cfg: Config) -> str:
    return cfg.recommend.output_uri or join(run_dir(cfg), "recommendations")


def relative(cfg: Config, uri: str) -> str:
    """`uri` relative to `storage.root` ("." for the root itself), for records that travel
    between machines (reports are committed): no absolute local path of this machine in them.

    A remote URI outside the root is kept as it is (it names the same object everywhere); a
    local path outside a local root becomes relative to the root ("../elsewhere"), and outside
    a remote root relative to the current directory. Empty stays empty.
    """
    if not uri:
        return uri
    root = cfg.storage.root.rstrip("/")
    target = uri.rstrip("/")
    if target == root:
        return "."
    if target.startswith(root + "/"):
        return target[len(root) + 1 :]
    if is_remote(uri):
        return uri
    return os.path.relpath(target, root if not is_remote(root) else os.getcwd())


def relative_all(obj: Any, cfg: Config) -> Any:
    """Every string in a record (nested dicts and lists) naming a path under storage.root, made
    relative to it (see `relative`): for reports and summaries that are committed."""
    root = cfg.storage.root.rstrip("/")
    if isinstance(obj, dict):
        return {k: relative_all(v, cfg) for k, v in obj.items()}
    if isinstance(obj, list):
        return [relative_all(v, cfg) for v in obj]
    if isinstance(obj, str) and (obj == root or obj.startswith(root + "/")):
        return relative(cfg, obj)
    return obj
