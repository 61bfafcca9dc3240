"""The serving artefacts of an export: the catalog's embeddings by the exported item tower (Ray
Data batch inference, `embed_catalog`) and the index over them (`build_catalog_index`: dense,
exact or IVF; BM25; the hybrid fusion chosen on the validation split), each recording the
identity of the model that made it, so serving refuses an index of another model.

Evaluation reads embeddings the same way but writes no index: `build_catalog_index` is the only
writer of the serving index (the pipeline's and jobs.index's `index` stage, and the batch job
when the index is missing).
"""

from __future__ import annotations

import logging
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recsys import hybrid, paths, storage
from recsys.config import Config
from recsys.encoder import RECSYS_META, TextEncoder, model_id_at
from recsys.index import build_index
from recsys.items import read_items
from recsys.runtime import Progress

log = logging.getLogger(__name__)


def open_text_encoder(path: str, cfg: Config) -> TextEncoder:
    return TextEncoder.from_model_config(path, cfg.model)


EMBEDDINGS_MODEL_KEY = b"recsys.model_id"  # parquet schema metadata: the model that made the embeddings


def embeddings_model_id(uri: str, cfg: Config) -> str:
    """The model that made the catalog embeddings under `uri` ("" if they record none)."""
    files = storage.list_files(uri, cfg.storage, ".parquet")
    if not files:
        raise FileNotFoundError(f"no catalog embeddings under {uri}")
    fs, _ = storage.filesystem(uri, cfg.storage)
    meta = pq.read_schema(storage.filesystem(files[0], cfg.storage)[1], filesystem=fs).metadata or {}
    return meta.get(EMBEDDINGS_MODEL_KEY, b"").decode()


# eval.embed_actors=0: at most this many actors, each given at least this many items.
AUTO_EMBED_MAX_ACTORS = 8
AUTO_EMBED_MIN_ITEMS = 2048


def embed_actor_count(cfg: Config, n_items: int) -> int:
    """eval.embed_actors, or with 0 (auto) one actor per GPU of the cluster (train.use_gpu), else
    one per 2 logical CPUs: an actor holds 0.5 CPU and Ray sets its OMP_NUM_THREADS to 1, so a
    single actor encodes on one core however many the node has (a local cluster declares 2
    logical CPUs per core, recsys.runtime.ensure_ray). Capped at AUTO_EMBED_MAX_ACTORS and at
    one actor per AUTO_EMBED_MIN_ITEMS items, since each actor loads the model. It counts the
    cluster's resources, not the free ones: a GPU cluster still scaling up (0 GPUs yet) gets 1
    actor, which the autoscaler then places. Ray must be up."""
    if cfg.eval.embed_actors:
        return cfg.eval.embed_actors
    import ray

    resources = ray.cluster_resources()
    slots = int(resources.get("GPU", 0)) if cfg.train.use_gpu else int(resources.get("CPU", 1)) // 2
    return max(1, min(slots, AUTO_EMBED_MAX_ACTORS, -(-n_items // AUTO_EMBED_MIN_ITEMS)))


def embed_catalog(cfg: Config, model_path: str, items: pa.Table, out_uri: str) -> tuple[np.ndarray, str]:
    """Catalog embeddings by Ray Data batch inference (actor pool; GPU through config), in the
    items' order, and the identity of the model that made them. The parquet written to
    `out_uri` (replacing what was there) records that identity in its schema metadata."""
    import ray.data

    from recsys.runtime import ensure_ray

    ensure_ray(cfg=cfg)

    class Embed:
        def __init__(self) -> None:
            self.encoder = open_text_encoder(model_path, cfg)

        def __call__(self, batch: pa.Table) -> pa.Table:
            emb = self.encoder.encode_items(batch.column("text").to_pylist(), batch_size=cfg.eval.embed_batch_size)
            # Each row says which model made it: the actors load the model on their own.
            return pa.table({
                "item_id": batch.column("item_id"),
                "embedding": pa.array(list(emb), pa.list_(pa.float32())),
                "model_id": pa.array([self.encoder.model_id] * batch.num_rows, pa.string()),
            })

    n = items.num_rows
    actors = embed_actor_count(cfg, n)
    # Several blocks, not one: a single block is a single task (extra actors would idle) and
    # its progress jumps from 0 to done.
    per_block = max(256, min(4096, -(-n // (8 * actors))))
    blocks = [items.select(["item_id", "text"]).slice(s, per_block) for s in range(0, n, per_block)]
    ds = ray.data.from_arrow(blocks).map_batches(
        Embed,
        batch_format="pyarrow",
        batch_size=max(cfg.eval.embed_batch_size, 256),
        compute=ray.data.ActorPoolStrategy(size=actors),
        # Fractional CPUs: whole-CPU actors starve the read tasks on small machines.
        num_cpus=0.5 if not cfg.train.use_gpu else 1,
        num_gpus=1 if cfg.train.use_gpu else 0,
    )
    log.info("embedding %d items with %d Ray Data actor(s)", n, actors)
    progress = Progress(n, "embed catalog (Ray Data)", "items")
    parts = []
    for part in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        parts.append(part)
        progress.update(part.num_rows)
    progress.close()
    table = pa.concat_tables(parts)
    if table.num_rows != n:
        raise RuntimeError(f"catalog embedding returned {table.num_rows} rows for {n} items")
    ids = set(table.column("model_id").to_pylist())
    if len(ids) != 1:  # the export was replaced while the actors were loading it
        raise RuntimeError(f"catalog embeddings from {model_path} came from {len(ids)} different models {sorted(ids)}: run again")
    model_id = ids.pop()
    table = table.drop_columns(["model_id"])
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), EMBEDDINGS_MODEL_KEY: model_id.encode()})
    storage.clear_dir(out_uri, cfg.storage)
    storage.write_parquet(table, storage.join(out_uri, "part-00000.parquet"), cfg.storage)
    order = {i: n for n, i in enumerate(table.column("item_id").to_pylist())}
    emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    return emb[[order[i] for i in items.column("item_id").to_pylist()]].astype(np.float32), model_id


def local_export(cfg: Config) -> str:
    """The run's export as a local folder (downloaded to a temporary one when remote)."""
    export = paths.export_dir(cfg)
    if not storage.is_remote(export):
        return export
    return str(storage.download_dir(export, tempfile.mkdtemp(prefix="recsys-export-"), cfg.storage))


def build_catalog_index(cfg: Config) -> dict[str, Any]:
    """The serving artefacts: catalog embeddings by the exported model, and the index over them,
    both recording that model's identity (serving refuses an index of another model). The only
    writer of the serving index: evaluation does not write one."""
    from recsys.evaluate import (  # the fusion is chosen as evaluation scores
        _bm25_scorer,
        choose_hybrid_fusion,
    )

    t0 = time.perf_counter()
    items = read_items(paths.items(cfg), cfg.storage)
    export = paths.export_dir(cfg)
    if not storage.exists(storage.join(export, RECSYS_META), cfg.storage):
        raise FileNotFoundError(f"no exported model at {export}: run the train job first (or set eval.checkpoint)")
    local = local_export(cfg)
    emb, model_id = embed_catalog(cfg, local, items, paths.embeddings(cfg))
    now = model_id_at(export, cfg.storage)
    if model_id != now:  # the export was replaced while the catalog was being embedded
        raise RuntimeError(f"the catalog was embedded by model {model_id}, but the export at {export} is now {now}: run again")
    e = cfg.eval
    index = build_index(emb, items.column("item_id").to_pylist(), e.index, e.exact_max_items, model_id=model_id,
                        nlist=e.ivf_nlist, nprobe=e.ivf_nprobe, filter_exact_max_kept=e.filter_exact_max_kept)
    # Hybrid search's half: BM25 over the same items, and the fusion chosen on validation,
    # published with the dense index so replicas load one consistent folder.
    bm25 = _bm25_scorer(items, cfg)
    fusion, how = choose_hybrid_fusion(cfg, items, open_text_encoder(local, cfg), emb, bm25)
    index.save(paths.index_dir(cfg), cfg.storage, extra=lambda d: hybrid.save_lexical(d, bm25, fusion, how))
    out = {"index": paths.index_dir(cfg), "kind": index.kind, "items": items.num_rows, "dim": int(emb.shape[1]),
           "embeddings": paths.embeddings(cfg), "model": export, "model_id": model_id, "fusion": fusion.describe(),
           "wall_s": round(time.perf_counter() - t0, 1)}
    log.info("index over %d items (%s) by model %s written to %s", items.num_rows, index.kind, model_id, out["index"])
    return out
