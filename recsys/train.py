"""Distributed fine-tuning: Ray Train `TorchTrainer` workers running a DeepSpeed ZeRO engine.

    run(cfg) -> summary dict (final loss, steps, examples/s, export path)

Data comes from `ray.train.get_dataset_shard("train")` (Ray Data streams the example shards);
each worker joins item text / duplicate group / popularity from the small items table,
tokenises, and steps a DeepSpeed engine (client torch AdamW, ZeRO stage from the config, gloo on
CPU, nccl on GPU). Every rank reports; every rank saves its DeepSpeed shard into the checkpoint
Ray merges; a re-run or a restarted worker resumes from `ray.train.get_checkpoint()`. At the end
the ZeRO-3 shards are gathered and one consolidated model is exported (HF + sentence-transformers).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import nn

from recsys import paths, storage
from recsys.config import Config, config_from_dict, redacted, to_dict, to_yaml
from recsys.encoder import render_user_text
from recsys.losses import Memory, SampledSoftmaxLoss, item_key
from recsys.runtime import ensure_ray, print_progress
from recsys.validation import headline

log = logging.getLogger(__name__)

STATE_FILE = "recsys_state.json"
DS_TAG = "ds"


class ItemTable:
    """Per-item lookups the collate needs: text, key, duplicate group, log sampling probability."""

    def __init__(self, table: Any, hard_negative_pool: int = 10, seed: int = 0) -> None:
        ids = table.column("item_id").to_pylist()
        texts = table.column("text").to_pylist()
        dups = table.column("dup_group").to_numpy()
        pop = table.column("popularity").to_numpy().astype(np.float64) + 1.0
        logq = np.log(pop / pop.sum())
        self.index = {i: n for n, i in enumerate(ids)}
        self.texts = texts
        self.keys = np.array([item_key(i) for i in ids], dtype=np.int64)
        self.dups = dups.astype(np.int64)
        self.logq = logq.astype(np.float32)
        self.hard_negative_pool = hard_negative_pool
        self._rng = np.random.default_rng(seed)
        self._bm25: Any = None
        self._neighbours: dict[int, np.ndarray] = {}  # item row -> its BM25 neighbours, best first

    @staticmethod
    def load(cfg: Config) -> ItemTable:
        uri = paths.items(cfg)
        fs, path = storage.filesystem(uri, cfg.storage)
        return ItemTable(pq.read_table(path, filesystem=fs), cfg.train.hard_negative_pool, cfg.train.seed)

    def _bm25_neighbours(self, rows: np.ndarray) -> None:
        from recsys.bm25 import BM25Index

        if self._bm25 is None:
            self._bm25 = BM25Index.build(self.texts)
        todo = sorted({int(r) for r in rows} - self._neighbours.keys())
        if not todo:
            return
        # Room for the item itself, its duplicates and history hits on top of the pool.
        k = min(len(self.texts), self.hard_negative_pool + 16)
        docs = self._bm25.retrieve([self.texts[r] for r in todo], k)
        for r, found in zip(todo, docs, strict=True):
            self._neighbours[r] = np.asarray(found, dtype=np.int64)

    def hard_negative_rows(
        self, pos: np.ndarray, history: list[np.ndarray], n: int, rng: np.random.Generator | None = None
    ) -> np.ndarray:
        """(batch, n) item rows: BM25 neighbours of each positive's text, never an accidental hit.

        The positive, its duplicate group and the row's history are excluded (they are what the
        in-batch mask hides too); n are drawn from the best `hard_negative_pool` that remain, so
        the same near-duplicate is not always the negative. Too few neighbours: random items."""
        rng = rng or self._rng
        self._bm25_neighbours(pos)
        out = np.empty((len(pos), n), dtype=np.int64)
        for i, (p, hist) in enumerate(zip(pos, history, strict=True)):
            banned = set(hist.tolist()) | {int(p)}
            ok = [c for c in self._neighbours[int(p)].tolist()
                  if c not in banned and self.dups[c] != self.dups[p]][: self.hard_negative_pool]
            if len(ok) < n:
                rest = np.flatnonzero(self.dups != self.dups[p])
                rest = rest[~np.isin(rest, list(banned | set(ok)))]
                if len(ok) + len(rest) < n:
                    raise ValueError(
                        f"train.hard_negatives={n}: item {p} of the catalog has only {len(ok) + len(rest)} "
                        "items that are neither it, its duplicates nor in the example's history"
                    )
                ok += rng.choice(rest, size=n - len(ok), replace=False).tolist()
            out[i] = rng.choice(ok, size=n, replace=False) if len(ok) > n else ok[:n]
        return out

    def rows(self, item_ids: list[str], where: str) -> np.ndarray:
        missing = [i for i in item_ids if i not in self.index]
        if missing:
            raise KeyError(f"{where}: item ids {missing[:5]} are not in the items table")
        return np.array([self.index[i] for i in item_ids], dtype=np.int64)


def _group_key(batch: dict[str, Any], i: int) -> int:
    """The row's user (next-item) or normalised query (search). A row with neither gets a key of
    its own item, which masks nothing beyond what the same-item mask already does."""
    def col(name: str) -> Any:
        return batch[name][i] if name in batch else None

    kind, user, query = col("kind"), col("user_id"), col("query")
    if kind == "search" and query:
        return item_key("q:" + " ".join(str(query).lower().split()))
    if kind == "next_item" and user:
        return item_key(f"u:{user}")
    return item_key(f"i:{col('item_id')}")


def features(batch: dict[str, Any], items: ItemTable, tokenizer: Any, cfg: Config) -> dict[str, Any]:
    """Examples -> unpadded token ids and loss inputs (runs in the train worker or in Ray Data).

    Token ids stay ragged (one list per row): padding to the batch's longest row happens in
    `to_tensors`, after Ray Data may have re-batched rows from different blocks."""
    m = cfg.model
    pos = items.rows(list(batch["item_id"]), "training example")
    # Rows of one user (next-item) or one query (search) share a group: their positives are
    # accidental hits for each other, never negatives.
    groups = np.array([_group_key(batch, i) for i in range(len(pos))], dtype=np.int64)
    queries, hist_keys, hist_rows = [], [], []
    for query, history in zip(batch["query"], batch["history"], strict=True):
        hist = [h for h in (list(history) if history is not None else []) if h in items.index]
        rows = [items.index[h] for h in hist]
        queries.append(m.query_prefix + render_user_text(query, [items.texts[r] for r in rows], m.user_history_items))
        hist_keys.append(items.keys[rows] if rows else np.zeros(0, dtype=np.int64))
        hist_rows.append(np.asarray(rows, dtype=np.int64))
    q = tokenizer(queries, truncation=True, max_length=m.max_query_tokens)["input_ids"]

    def item_tokens(rows: Any) -> list[list[int]]:  # positives and hard negatives read alike
        return tokenizer([m.item_prefix + items.texts[r] for r in rows], truncation=True, max_length=m.max_item_tokens)["input_ids"]

    d = item_tokens(pos)
    extra: dict[str, Any] = {}
    n_hard = cfg.train.hard_negatives
    if n_hard > 0:
        # Drawn from the batch's own content, so a resumed run mines what the uninterrupted one did.
        rng = np.random.default_rng([cfg.train.seed, int(items.keys[pos].sum() & 0x7FFFFFFF)])
        # The batch's other positives of a row's user / query are accidental hits too.
        same = [np.concatenate([hist_rows[i], pos[(groups == groups[i]) & (np.arange(len(pos)) != i)]])
                for i in range(len(pos))]
        hard = items.hard_negative_rows(pos, same, n_hard, rng)  # (batch, n)
        h = item_tokens(hard.reshape(-1))
        extra["h_ids"] = [h[i * n_hard:(i + 1) * n_hard] for i in range(len(pos))]  # per row: n token lists
        extra["h_logq"] = items.logq[hard]  # (batch, n)
    return extra | {
        "q_ids": q,
        "d_ids": d,
        "weights": np.asarray(batch["weight"], dtype=np.float32),
        "item_keys": items.keys[pos],
        "dup_keys": items.dups[pos],
        "history_keys": hist_keys,
        "group_keys": groups,
        "logq": items.logq[pos],
    }


def _pad(rows: Any, fill: int) -> torch.Tensor:
    width = max(1, max((len(r) for r in rows), default=0))
    out = np.full((len(rows), width), fill, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return torch.as_tensor(out)


def _pad_tokens(rows: Any, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged token ids -> (ids, attention mask), both (len(rows), longest)."""
    return _pad(rows, pad_id), _pad([np.ones(len(r), dtype=np.int64) for r in rows], 0)


def to_tensors(f: dict[str, Any], pad_id: int) -> dict[str, torch.Tensor]:
    """Features (ragged token ids) -> padded tensors and masks for the towers and the loss."""
    q_ids, q_mask = _pad_tokens(f["q_ids"], pad_id)
    d_ids, d_mask = _pad_tokens(f["d_ids"], pad_id)
    out = {
        "q_ids": q_ids,
        "q_mask": q_mask,
        "d_ids": d_ids,
        "d_mask": d_mask,
        "weights": torch.tensor(np.asarray(f["weights"], dtype=np.float32)),
        "item_keys": torch.tensor(np.asarray(f["item_keys"], dtype=np.int64)),
        "dup_keys": torch.tensor(np.asarray(f["dup_keys"], dtype=np.int64)),
        "history_keys": _pad(f["history_keys"], -1),
        "group_keys": torch.tensor(np.asarray(f["group_keys"], dtype=np.int64)),
        "logq": torch.tensor(np.asarray(f["logq"], dtype=np.float32)),
    }
    if "h_ids" in f:
        flat = [t for row in f["h_ids"] for t in row]  # batch * n token lists, row-major
        out["h_ids"], out["h_mask"] = _pad_tokens(flat, pad_id)
        out["h_logq"] = torch.tensor(np.stack([np.asarray(r, dtype=np.float32) for r in f["h_logq"]]))  # (batch, n)
    return out


def collate(batch: dict[str, np.ndarray], items: ItemTable, tokenizer: Any, cfg: Config) -> dict[str, torch.Tensor]:
    """A numpy batch of examples -> tensors (tokenising in the train worker)."""
    return to_tensors(features(batch, items, tokenizer, cfg), tokenizer.pad_token_id or 0)


class Featurize:
    """Ray Data actor for train.tokenize_in=pipeline: tokenise ahead of the train workers."""

    def __init__(self, cfg_dict: dict[str, Any]) -> None:
        from recsys.model import load_tokenizer

        self.cfg = config_from_dict(cfg_dict)
        self.items = ItemTable.load(self.cfg)
        self.tokenizer = load_tokenizer(self.cfg.model)

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        import pyarrow as pa

        f = features(batch, self.items, self.tokenizer, self.cfg)
        ints = pa.list_(pa.int32())
        hard = {
            "h_ids": pa.array(f["h_ids"], pa.list_(ints)),
            "h_logq": pa.array(f["h_logq"].tolist(), pa.list_(pa.float32())),
        } if "h_ids" in f else {}
        return pa.table(hard | {
            "q_ids": pa.array(f["q_ids"], ints),
            "d_ids": pa.array(f["d_ids"], ints),
            "weights": pa.array(f["weights"]),
            "item_keys": pa.array(f["item_keys"]),
            "dup_keys": pa.array(f["dup_keys"]),
            "history_keys": pa.array([h.tolist() for h in f["history_keys"]], pa.list_(pa.int64())),
            "group_keys": pa.array(f["group_keys"]),
            "logq": pa.array(f["logq"]),
        })


class TrainStep(nn.Module):
    """Towers + loss in one module, so DeepSpeed owns every trainable parameter (incl. temperature)."""

    def __init__(self, towers: nn.Module, loss: SampledSoftmaxLoss, memory_size: int = 0) -> None:
        super().__init__()
        self.towers = towers
        self.loss = loss
        # Cross-batch memory: filled from the first step, used as negatives once `use_memory`
        # is set (the training loop sets it after train.memory_start_step).
        self.memory = Memory(memory_size) if memory_size else None
        self.use_memory = False

    def forward(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        q, d = self.towers(b["q_ids"], b["q_mask"], b["d_ids"], b["d_mask"])  # (batch, dim) each
        hard = None
        if "h_ids" in b:
            hard = self.towers.encode_item(b["h_ids"], b["h_mask"]).view(q.shape[0], -1, d.shape[-1])  # (batch, n, dim)
        loss = self.loss(
            q, d, weights=b["weights"], item_keys=b["item_keys"], dup_keys=b["dup_keys"],
            history_keys=b["history_keys"], group_keys=b.get("group_keys"), logq=b["logq"],
            hard_negatives=hard, hard_logq=b.get("h_logq"), memory=self.memory if self.use_memory else None,
        )
        if self.memory is not None and self.training:
            self.memory.add(d, b["item_keys"], b["dup_keys"], b["group_keys"], b["logq"])
        return loss


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices only. Biases, LayerNorm/RMSNorm gains and the
    learnt temperature (all 0- or 1-d) are not pulled towards zero: decaying a norm's gain or
    the temperature changes what the model computes, not how complex it is."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            shape = getattr(p, "ds_shape", p.shape)  # full shape, also under zero.Init partitioning
            (decay if len(shape) >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def deepspeed_config(cfg: Config) -> dict[str, Any]:
    t = cfg.train
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": t.use_gpu}
    return {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16"},
        # We pass torch's AdamW: no C++ op build, and the same optimizer on CPU and GPU.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _lr_lambda(warmup: int, total: int):  # noqa: ANN202
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


def _global_mean(local: float, world: int, device: Any) -> float:
    """The global batch's loss from this rank's mean loss since the last row: each rank's loss is
    its share of the global weighted mean (scaled by the world size, see recsys.losses), so the
    mean over ranks is the loss itself."""
    value = torch.tensor(local, dtype=torch.float32, device=device)
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(value)
        value /= world
    return float(value)


def _all_ranks_digest(digest: bytes, device: Any) -> str:
    """Hex digest over every rank's 8-byte digest (rank order), gathered from all ranks."""
    import torch.distributed as dist

    mine = torch.tensor([int.from_bytes(digest, "little", signed=True)], dtype=torch.int64, device=device)
    if not (dist.is_available() and dist.is_initialized()):
        return hashlib.blake2b(mine.cpu().numpy().tobytes(), digest_size=8).hexdigest()
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, mine)
    return hashlib.blake2b(torch.cat(parts).cpu().numpy().tobytes(), digest_size=8).hexdigest()


def _write_metrics(cfg: Config, rows: list[dict[str, Any]]) -> None:
    body = "".join(json.dumps(r) + "\n" for r in rows)
    storage.write_bytes(paths.metrics_file(cfg), body.encode(), cfg.storage)


def _read_metrics(cfg: Config) -> list[dict[str, Any]]:
    try:
        text = storage.read_bytes(paths.metrics_file(cfg), cfg.storage).decode()
    except (FileNotFoundError, OSError):
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _export(engine: Any, step_module: TrainStep, tokenizer: Any, cfg: Config, rank: int, training: dict[str, Any] | None = None) -> str:
    """Gather (ZeRO-3) full parameters, rebuild a plain fp32 model on rank 0 and export it."""
    import deepspeed

    from recsys.model import build_two_tower, export_model

    out_uri = paths.export_dir(cfg)
    params = list(step_module.towers.parameters())
    ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if cfg.train.zero_stage == 3 else contextlib.nullcontext()
    with ctx:
        if rank == 0:
            state = {k: v.detach().float().cpu().clone() for k, v in step_module.towers.state_dict().items()}
            fresh = build_two_tower(cfg.model, dtype=torch.float32)
            fresh.load_state_dict(state)
            # Replaces the previous run's export at this path (no stale files), with a new model_id.
            export_model(fresh, tokenizer, cfg.model, redacted(cfg), out_uri, cfg.storage, training)
    return out_uri


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import deepspeed
    import ray.train
    from ray.train import Checkpoint

    from recsys.model import build_two_tower, load_tokenizer

    cfg = config_from_dict(config["cfg"])
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if rank == 0:
        print_progress(log)
    torch.manual_seed(t.seed)
    items = ItemTable.load(cfg)
    tokenizer = load_tokenizer(cfg.model)
    pre_tokenized = t.tokenize_in == "pipeline"
    pad_id = tokenizer.pad_token_id or 0
    module = TrainStep(
        build_two_tower(cfg.model),
        SampledSoftmaxLoss(t.temperature, t.learn_temperature, t.gather_negatives, t.logq_correction, t.mask_history,
                           t.mask_duplicates, t.mask_same_group),
        memory_size=t.memory_size,
    )
    optimizer = torch.optim.AdamW(param_groups(module, t.weight_decay), lr=t.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(t.warmup_steps, t.max_steps))
    # Every engine start would otherwise JIT-build a shared-memory op used only for inference.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg)
    )
    device = engine.device

    metrics_rows: list[dict[str, Any]] = []
    # Validation while training: the best evaluation so far (its export is the run's export).
    best: dict[str, Any] = {"metric": float("-inf"), "step": 0, "since": 0}
    stopped = False  # early-stopped: a resumed run that had stopped stays stopped
    validator = None
    if t.eval_every:
        from recsys.validation import Validator

        ids_by_row = sorted(items.index, key=items.index.__getitem__)
        validator = Validator(cfg, ids_by_row, items.texts, rank, world, batch_size=max(t.batch_size, 64))
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            engine.load_checkpoint(d, tag=DS_TAG)
            state = json.loads(Path(d, STATE_FILE).read_text()) if Path(d, STATE_FILE).exists() else {}
            best = state.get("best", best)
            stopped = bool(state.get("stopped"))
        if rank == 0:
            metrics_rows = [r for r in _read_metrics(cfg) if r["step"] <= engine.global_steps]
            log.info("resumed from checkpoint at step %d", engine.global_steps)

    shard = ray.train.get_dataset_shard("train")
    step = start_step = engine.global_steps
    # A resumed attempt walks past the micro-batches the checkpointed steps consumed (same order:
    # same shuffle seeds per epoch), so it continues the data stream instead of training on its
    # head a second time. Skipped batches are neither collated nor tokenised, only read.
    to_skip = skipped = start_step * t.grad_accum
    t_skip = time.perf_counter()
    losses: list[float] = []
    t_wait = 0.0
    t_last = time.perf_counter()
    examples_since = 0
    seen = hashlib.blake2b(digest_size=8)
    epoch = 0
    summary: dict[str, Any] = {}
    while step < t.max_steps and not stopped:
        got_batch = False
        t_fetch = time.perf_counter()
        # The shard's order is deterministic (a seeded global shuffle, order-preserving split:
        # see run), and so is this buffer's for a given seed and epoch: what resume relies on.
        for batch in shard.iter_batches(
            batch_size=t.batch_size, batch_format="numpy", drop_last=True,
            local_shuffle_buffer_size=max(4 * t.batch_size, 256), local_shuffle_seed=t.seed + epoch,
        ):
            got_batch = True
            if to_skip:
                to_skip -= 1
                t_fetch = time.perf_counter()
                if not to_skip:
                    t_last = t_fetch  # examples/s of this attempt's first interval excludes the skip
                    if rank == 0:
                        log.info("resume: skipped %d consumed micro-batches in %.1fs", skipped, t_fetch - t_skip)
                continue
            tensors = to_tensors(batch, pad_id) if pre_tokenized else collate(batch, items, tokenizer, cfg)
            seen.update(tensors["item_keys"].numpy().tobytes())
            seen.update(tensors["weights"].numpy().tobytes())
            b = {k: v.to(device) for k, v in tensors.items()}
            t_wait += time.perf_counter() - t_fetch
            module.use_memory = engine.global_steps >= t.memory_start_step
            loss = engine(b)
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach().float()))
            examples_since += t.batch_size * world
            if engine.micro_steps % t.grad_accum:  # mid-accumulation: no optimizer step yet
                t_fetch = time.perf_counter()
                continue
            step = engine.global_steps
            evaluate_now = validator is not None and (step % t.eval_every == 0 or step == t.max_steps)
            stop_early = improved = False
            if step % t.log_every == 0 or step == t.max_steps or step % t.checkpoint_every == 0 or evaluate_now:
                now = time.perf_counter()
                row = {
                    "step": step,
                    # One collective per logged row, not per micro-step.
                    "loss": _global_mean(float(np.mean(losses)) if losses else float("nan"), world, device),
                    "lr": float(engine.get_lr()[0]),
                    "examples_per_s": examples_since / max(now - t_last, 1e-9),
                    "data_wait_s": t_wait,
                    "temperature": float(module.loss.temperature.detach()),
                    "epoch": epoch,
                    "start_step": start_step,  # > 0: this attempt resumed from a checkpoint
                    "skipped_batches": skipped,  # micro-batches per worker walked past on resume
                    # Digest of every rank's examples since the last row: equal in a resumed and
                    # an uninterrupted run when the data order is what resume assumes.
                    "batch_hash": _all_ranks_digest(seen.digest(), device),
                }
                seen = hashlib.blake2b(digest_size=8)
                if evaluate_now:
                    t_eval = time.perf_counter()
                    scores = validator.score(module.towers, tokenizer, device)
                    value = headline(cfg, scores)
                    if world > 1:  # rank 0's number decides on every rank: the export and a stop are collective
                        v = torch.tensor([value], dtype=torch.float64, device=device)
                        torch.distributed.broadcast(v, 0)
                        value = float(v.item())
                    improved = value > best["metric"]
                    best = {"metric": value, "step": step, "since": 0} if improved else {**best, "since": best["since"] + 1}
                    if improved:  # the export is always the best evaluation's model
                        _export(engine, module, tokenizer, cfg, rank, {"best_step": step, f"valid_{t.eval_metric}": value})
                    stop_early = stopped = bool(t.early_stopping_patience) and best["since"] >= t.early_stopping_patience
                    row.update(scores)
                    row.update({"valid_metric": value, "best_step": best["step"], "best_metric": best["metric"], "stopped_early": stop_early,
                                "eval_s": time.perf_counter() - t_eval})
                    if rank == 0:
                        log.info("step %d: valid %s %.4f (best %.4f at step %d)%s", step, t.eval_metric, value, best["metric"],
                                 best["step"], "; stopping early" if stop_early else "")
                    now = time.perf_counter()  # examples/s of the next interval excludes the evaluation
                losses, examples_since, t_wait, t_last = [], 0, 0.0, now
                if rank == 0:
                    metrics_rows.append(row)
                    _write_metrics(cfg, metrics_rows)
                    log.info("step %d/%d loss %.4f lr %.2e %.1f ex/s data-wait %.2fs", step, t.max_steps, row["loss"], row["lr"], row["examples_per_s"], row["data_wait_s"])
                summary = row
                # Also after a better evaluation: a resumed run then knows the export is that step's.
                if step % t.checkpoint_every == 0 or step == t.max_steps or stop_early or improved:
                    with tempfile.TemporaryDirectory() as tmp:
                        engine.save_checkpoint(tmp, tag=DS_TAG)
                        # Every rank reads the state on resume (the best evaluation so far).
                        Path(tmp, STATE_FILE).write_text(json.dumps({"step": step, "best": best, "stopped": stopped}))
                        if rank == 0:
                            Path(tmp, "config.yaml").write_text(to_yaml(cfg))
                        ray.train.report(row, checkpoint=Checkpoint.from_directory(tmp))
                else:
                    ray.train.report(row)
                if t.crash_at_step and step == t.crash_at_step and ckpt is None and rank == 0:
                    marker = storage.join(paths.run_dir(cfg), "crash_injected")
                    if not storage.exists(marker, cfg.storage):  # once per run, whatever the restarts see
                        storage.write_bytes(marker, b"1", cfg.storage)
                        # Give the controller time to register the last checkpoint, then die hard,
                        # as an OOM kill or a lost node would look to Ray Train.
                        time.sleep(5)
                        log.warning("train.crash_at_step=%d: exiting this worker to exercise recovery", step)
                        os._exit(1)
            if step >= t.max_steps or stop_early:
                break
            t_fetch = time.perf_counter()
        if not got_batch:
            raise ValueError(
                f"worker {rank} got no full batch of {t.batch_size} examples: too few training "
                f"examples for {world} workers; lower train.batch_size or train.num_workers"
            )
        epoch += 1

    if validator is None and not stopped:
        export = _export(engine, module, tokenizer, cfg, rank)
    else:  # written at the best evaluation already (also when a stopped run is re-submitted)
        export = paths.export_dir(cfg)
        summary = {**summary, "best_step": best["step"], "best_metric": best["metric"], "stopped_early": stopped}
    if rank == 0:
        log.info("exported to %s%s", export, f" (the best validation, step {best['step']})" if validator is not None else "")
    ray.train.report({**summary, "export": export, "step": step})


def _ingest_options() -> Any:
    """Train's default ingest options (the DataContext's resource limits and progress setting)
    with preserve_order on. `exclude_resources` is left out: deprecated in Ray 2.60, and copying
    it warns on every run."""
    from ray.data import ExecutionOptions
    from ray.data.context import DataContext

    current = DataContext.get_current().execution_options
    return ExecutionOptions(
        resource_limits=current.resource_limits, verbose_progress=current.verbose_progress, preserve_order=True
    )


def run(cfg: Config) -> dict[str, Any]:
    """The train stage: the text towers (user_tower=text, or the item tower the sequence tower
    will read, sequence.item_tower=fine_tuned), then the sequence tower (user_tower=sequence)."""
    if cfg.model.user_tower == "text":
        return run_text(cfg)
    from recsys import train_sequence

    text = run_text(cfg) if cfg.sequence.item_tower == "fine_tuned" else None
    return {**train_sequence.run(cfg), **({"text_stage": text} if text else {})}


def run_text(cfg: Config) -> dict[str, Any]:
    """Fine-tune on the prepared examples; returns the final metrics and the export location."""
    import ray.data
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t0 = time.perf_counter()
    if cfg.train.tokenize_in not in ("worker", "pipeline"):
        raise ValueError(f"train.tokenize_in={cfg.train.tokenize_in!r}: choose 'worker' or 'pipeline'")
    if cfg.train.hard_negatives < 0 or cfg.train.hard_negative_pool < cfg.train.hard_negatives:
        raise ValueError(
            f"train.hard_negatives={cfg.train.hard_negatives}, train.hard_negative_pool={cfg.train.hard_negative_pool}: "
            "need 0 <= hard_negatives <= hard_negative_pool"
        )
    ensure_ray(cfg=cfg)
    kinds = ["next_item", "search"] if cfg.train.task == "both" else [cfg.train.task]
    files: list[str] = []
    for kind in kinds:
        files += storage.list_files(paths.examples(cfg, kind, "train"), cfg.storage, ".parquet")
    if not files:
        raise FileNotFoundError(
            f"no training examples for task {cfg.train.task!r} under {storage.join(paths.data_dir(cfg), 'examples')}; "
            "run the prepare job first (python -m jobs.prepare)"
        )
    fs, _ = storage.filesystem(cfg.storage.root, cfg.storage)
    ds = ray.data.read_parquet([storage.filesystem(f, cfg.storage)[1] for f in files], filesystem=fs)
    # Examples are written grouped by user (prepare's groupby), and a local shuffle buffer alone
    # would leave one user's or one query's rows side by side in a batch. A seeded global
    # shuffle spreads them, the same permutation in every epoch and attempt (the worker's
    # buffer, seeded by epoch, varies the order between epochs).
    if cfg.train.shuffle == "global":
        ds = ds.random_shuffle(seed=cfg.train.seed)
    if cfg.train.tokenize_in == "pipeline":
        # Tokenise in a Ray Data actor pool, streaming ahead of the workers (CPU work off the
        # training processes: on GPU nodes it overlaps with the GPU's step).
        ds = ds.map_batches(
            Featurize,
            fn_constructor_kwargs={"cfg_dict": to_dict(cfg)},
            batch_format="numpy",
            batch_size=max(64, cfg.train.batch_size),
            compute=ray.data.ActorPoolStrategy(size=max(1, cfg.train.tokenize_actors)),
            num_cpus=cfg.train.tokenize_cpus,
        )
    train_fs, storage_path = storage.train_filesystem(cfg.storage.root, cfg.storage)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": to_dict(cfg)},
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker={
                "CPU": cfg.train.cpus_per_worker,
                **({"GPU": 1} if cfg.train.use_gpu else {}),
                **cfg.train.worker_resources,
            },
        ),
        datasets={"train": ds},
        # Order-preserving execution makes the split deterministic (no locality-driven block
        # assignment), so a resumed attempt sees the same stream and can skip what was consumed.
        dataset_config=DataConfig(execution_options=_ingest_options()),
        run_config=RunConfig(
            name=cfg.train.run_name,
            storage_path=storage_path,
            storage_filesystem=train_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
        ),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    metrics = dict(result.metrics or {})
    rows = _read_metrics(cfg)
    final = rows[-1] if rows else metrics
    summary = {
        "steps": final.get("step"),
        "final_loss": final.get("loss"),
        "first_loss": rows[0]["loss"] if rows else None,
        "examples_per_s": final.get("examples_per_s"),
        "export": paths.export_dir(cfg),
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "resumed_from_step": final.get("start_step"),
        "metrics_file": paths.metrics_file(cfg),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    if cfg.train.eval_every:  # the export is the best validation's model, not the last step's
        summary.update({k: final.get(k, metrics.get(k)) for k in ("best_step", "best_metric", "stopped_early")})
    log.info("training finished: %s", summary)
    return summary


def loss_improved(rows: list[dict[str, Any]], k: int = 2) -> bool:
    """Mean of the last k logged losses below the mean of the first k (for tests and checks)."""
    if len(rows) < 2 * k:
        return False
    first = np.mean([r["loss"] for r in rows[:k]])
    last = np.mean([r["loss"] for r in rows[-k:]])
    return bool(last < first) and math.isfinite(last)
