"""Distributed fine-tuning: Ray Train `TorchTrainer` workers running a DeepSpeed ZeRO engine.

    run(cfg) -> summary dict (final loss, steps, examples/s, export path)

Data comes from `ray.train.get_dataset_shard("train")` (Ray Data streams the example shards);
each worker turns them into tensors (recsys.features: the item table's text / duplicate group /
popularity, tokens, hard negatives) and steps a DeepSpeed engine (client torch AdamW, ZeRO stage from the config, gloo on
CPU, nccl on GPU). Every rank reports; every rank saves its DeepSpeed shard into the checkpoint
Ray merges; a re-run or a restarted worker resumes from `ray.train.get_checkpoint()`. At the end
the ZeRO-3 shards are gathered and one consolidated model is exported (HF + sentence-transformers).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from recsys import memory_plan, paths, storage
from recsys.config import Config, config_from_dict, redacted, to_dict, to_yaml
from recsys.features import BatchTokens, Featurize, collate, hard_negatives_for, to_tensors
from recsys.items import ItemTable
from recsys.losses import SampledSoftmaxLoss
from recsys.runtime import checkpoint_upload, ensure_ray, fit_trainer, print_progress
from recsys.stream import Stream, load_consumed
from recsys.train_step import TrainStep, contrastive_step
from recsys.validation import headline

log = logging.getLogger(__name__)

STATE_FILE = "recsys_state.json"
# train.tokenize_in=pipeline: Featurize batches per Ray Data block (see _train_dataset).
FEATURIZE_BLOCK_BATCHES = 4
DS_TAG = "ds"


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices only. Biases, LayerNorm/RMSNorm gains and the
    learnt temperature (all 0- or 1-d) are not pulled towards zero: decaying a norm's gain or
    the temperature changes what the model computes, not how complex it is."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            shape = getattr(p, "ds_shape", p.shape)  # full shape, also under zero.Init partitioning
            (decay if len(shape) >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # No empty group (LoRA + projection: every trainable tensor is a matrix): ZeRO-3 drops it
    # from the optimizer, and the LR scheduler built over both groups then fails at its first step.
    return [g for g in groups if g["params"]]


def deepspeed_config(cfg: Config, load_universal: bool = False) -> dict[str, Any]:
    """`load_universal`: the checkpoint to load is a universal one (`_to_universal`), which
    ZeRO re-partitions for any worker count."""
    t = cfg.train
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": t.use_gpu}
    return {
        "train_micro_batch_size_per_gpu": t.batch_size,
        # A gradient-cached contrastive batch is several engine micro-steps (recsys.train_step).
        "gradient_accumulation_steps": t.grad_accum * t.micro_batches,
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16"},
        # We pass torch's AdamW: no C++ op build, and the same optimizer on CPU and GPU.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        **({"checkpoint": {"load_universal": True}} if load_universal else {}),
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


def _write_metrics(cfg: Config, rows: list[dict[str, Any]], uri: str | None = None) -> None:
    """Rank 0's metric rows as JSONL at `uri` (default: the train run's metrics file)."""
    body = "".join(json.dumps(r) + "\n" for r in rows)
    storage.write_bytes(uri or paths.metrics_file(cfg), body.encode(), cfg.storage)


def _read_metrics(cfg: Config, uri: str | None = None) -> list[dict[str, Any]]:
    try:
        text = storage.read_bytes(uri or paths.metrics_file(cfg), cfg.storage).decode()
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


@dataclass
class _RunState:
    """What survives a restart besides the DeepSpeed state: the best validation so far (its
    export is the run's export), whether the run stopped early, and rank 0's metric rows."""

    best: dict[str, Any] = field(default_factory=lambda: {"metric": float("-inf"), "step": 0, "since": 0})
    stopped: bool = False  # early-stopped: a resumed run that had stopped stays stopped
    rows: list[dict[str, Any]] = field(default_factory=list)
    # The epoch to resume in and the rows every rank consumed in it (recsys.stream.load_consumed).
    stream: tuple[int, dict[int, Any]] = (0, {})


class _Meter:
    """The figures a logged row reports about the micro-steps since the previous row."""

    def __init__(self) -> None:
        self.restart()
        self.seen = hashlib.blake2b(digest_size=8)

    def restart(self) -> None:
        self.losses: list[float] = []
        self.examples = 0
        self.wait = 0.0
        self.t_last = time.perf_counter()

    def add(self, tensors: dict[str, torch.Tensor], wait_s: float) -> None:
        self.seen.update(tensors["item_keys"].numpy().tobytes())
        self.seen.update(tensors["weights"].numpy().tobytes())
        self.wait += wait_s

    def row(self, step: int, engine: Any, module: TrainStep, world: int, **extra: Any) -> dict[str, Any]:
        """The row, with its collectives (every rank calls it at the same steps), then a restart."""
        now = time.perf_counter()
        with torch.no_grad():  # read through the module (ZeRO-3 fetches it), no graph
            temperature = float(module.loss.temperature)
        row = {
            "step": step,
            # One collective per logged row, not per micro-step.
            "loss": _global_mean(float(np.mean(self.losses)) if self.losses else float("nan"), world, engine.device),
            "lr": float(engine.get_lr()[0]),
            "examples_per_s": self.examples / max(now - self.t_last, 1e-9),
            "data_wait_s": self.wait,
            "temperature": temperature,
            **extra,
            # Digest of every rank's examples since the last row: equal in a resumed and an
            # uninterrupted run when the data order is what resume assumes.
            "batch_hash": _all_ranks_digest(self.seen.digest(), engine.device),
        }
        self.seen = hashlib.blake2b(digest_size=8)
        self.restart()
        return row


@contextlib.contextmanager
def _zero3_construction(cfg: Config) -> Iterator[None]:
    """Under ZeRO-3, models built inside are partitioned while they are built: transformers'
    `from_pretrained` runs under `deepspeed.zero.Init` and loads each weight straight into its
    partitions (HfDeepSpeedConfig / is_deepspeed_zero3_enabled), so no rank ever holds a full
    copy of the weights. Other stages: a no-op (every rank holds the model anyway)."""
    if cfg.train.zero_stage != 3:
        yield
        return
    import deepspeed
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    # zero.Init starts DeepSpeed's comm backend, which otherwise JIT-builds (and waits on a file
    # lock for) a shared-memory op used only for inference, as deepspeed.initialize would.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    keep = HfDeepSpeedConfig(deepspeed_config(cfg))  # transformers holds only a weak reference to it
    try:
        yield
    finally:
        # Models built later in this process (the export's plain copy on rank 0 alone) must not
        # be partitioned: zero.Init is collective.
        unset_hf_deepspeed_config()
        del keep


def build_towers(cfg: Config) -> nn.Module:
    """The two towers as training builds them (partitioned at construction under ZeRO-3)."""
    from recsys.model import build_two_tower

    if cfg.model.attn_implementation == "flash_attention_2" and not cfg.train.use_gpu:
        raise ValueError("model.attn_implementation=flash_attention_2 needs train.use_gpu=true (flash-attn runs on CUDA only); use sdpa on CPU")
    with _zero3_construction(cfg):
        return build_two_tower(cfg.model)


def _engine(cfg: Config, load_universal: bool = False) -> tuple[TrainStep, Any]:
    """The towers and the loss in one module, wrapped by a DeepSpeed engine (torch AdamW, linear
    warm-up and decay). Only parameters that require gradients get optimizer states (with LoRA:
    the adapters, the projection and a learnt temperature; `param_groups`)."""
    import deepspeed

    t = cfg.train
    module = TrainStep(
        build_towers(cfg),
        SampledSoftmaxLoss(t.temperature, t.learn_temperature, t.gather_negatives, t.logq_correction, t.mask_history,
                           t.mask_duplicates, t.mask_same_group),
        memory_size=t.memory_size,
        dropout=t.dropout,
    )
    if t.zero_stage == 3 and t.precision != "fp32":
        # zero.Init gave from_pretrained's weights the engine's dtype, but what is built beside
        # them (the projection, LoRA adapters, a learnt temperature) is fp32, and ZeRO-3 keeps it
        # so (ZeRO-0-2 cast the whole module): a bf16 hidden state then met an fp32 projection
        # weight. The optimizer keeps fp32 masters of them, as of every other weight.
        dtype = torch.bfloat16 if t.precision == "bf16" else torch.float16
        for p in module.parameters():
            if not hasattr(p, "ds_id") and p.is_floating_point():
                p.data = p.data.to(dtype)
    optimizer = torch.optim.AdamW(param_groups(module, t.weight_decay), lr=t.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(t.warmup_steps, t.max_steps))
    # Every engine start would otherwise JIT-build a shared-memory op used only for inference.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, load_universal))
    return module, engine


def _checkpoint_state(state_file: str) -> dict[str, Any]:
    """The small state file of `ray.train.get_checkpoint()`, read alone ({}: no checkpoint)."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return {}
    try:
        with ckpt.filesystem.open_input_stream(f"{ckpt.path}/{state_file}") as f:
            return json.loads(f.read())
    except (FileNotFoundError, OSError):
        return {}


def resume_layout(state_file: str, world: int, rows: int, grad_accum: int, zero_stage: int, rank: int,
                  rows_key: str) -> bool:
    """Whether the checkpoint to resume was written by another worker count, so ZeRO's
    partitions are re-cut from a universal checkpoint (ZeRO-0 checkpoints are whole on every
    rank and load as they are). Rank 0 warns of what a changed layout changes: the global batch
    (`world` x `rows` per worker x `grad_accum`), with the `rows_key` setting that keeps it.
    The data needs nothing here: recsys.stream walks past the consumed rows in any layout."""
    saved = _checkpoint_state(state_file)
    old_world = saved.get("world")
    if old_world is None:  # no checkpoint, or one from before the layout was recorded
        return False
    old_global = saved.get("examples_per_step")
    new_global = world * rows * grad_accum
    if rank == 0 and (old_world != world or (old_global and old_global != new_global)):
        keep = (f"; {rows_key}={old_global // (world * grad_accum)} keeps it"
                if old_global and old_global % (world * grad_accum) == 0 else "")
        log.warning("resuming with %d workers a run checkpointed by %d%s: the global batch is %d examples, was %s%s",
                    world, old_world, " (ZeRO's partitions re-cut from a universal checkpoint)" if old_world != world and zero_stage
                    else "", new_global, old_global or "not recorded", keep if old_global != new_global else "")
    return old_world != world and zero_stage > 0


def _to_universal(d: str, out: str) -> None:
    """DeepSpeed's own converter (deepspeed.checkpoint.ds_to_universal) from the ZeRO checkpoint
    in `d` (every rank's partitions) to a universal one in `out`/DS_TAG: per-parameter fp32
    weights and Adam moments that ZeRO re-partitions for another worker count. In-process
    (one extract / merge worker): a Ray worker should not fork a process pool."""
    from unittest import mock

    from deepspeed.checkpoint import ds_to_universal

    argv = ["ds_to_universal", "--input_folder", str(Path(d, DS_TAG)), "--output_folder", str(Path(out, DS_TAG)),
            "--num_extract_workers", "1", "--num_merge_workers", "1", "--inject_missing_state"]
    with mock.patch.object(sys, "argv", argv):
        ds_to_universal.main(ds_to_universal.parse_arguments())


def load_engine_checkpoint(engine: Any, d: str, universal: bool) -> None:
    """Load the DeepSpeed checkpoint in `d` into the engine; `universal`: it was written by another
    worker count, so each rank converts it (`_to_universal`, into its own folder: ranks on other
    nodes share no disk) and loads that."""
    if universal:
        with tempfile.TemporaryDirectory(prefix="recsys-universal-") as uni:
            _to_universal(d, uni)
            engine.load_checkpoint(uni, tag=DS_TAG)
    else:
        engine.load_checkpoint(d, tag=DS_TAG)


def _resume(engine: Any, cfg: Config, rank: int, universal: bool = False) -> _RunState:
    """Load `ray.train.get_checkpoint()` into the engine (every rank its shard) and the run state.
    `universal`: the checkpoint was written by another worker count; each rank converts it
    (`_to_universal`, into its own folder: ranks on other nodes share no disk) and loads that."""
    import ray.train

    state = _RunState()
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return state
    with ckpt.as_directory() as d:
        load_engine_checkpoint(engine, d, universal)
        saved = json.loads(Path(d, STATE_FILE).read_text()) if Path(d, STATE_FILE).exists() else {}
        state.stream = load_consumed(d)
    state.best = saved.get("best", state.best)
    state.stopped = bool(saved.get("stopped"))
    if rank == 0:
        state.rows = [r for r in _read_metrics(cfg) if r["step"] <= engine.global_steps]
        log.info("resumed from checkpoint at step %d", engine.global_steps)
    return state


def _validate(validator: Any, engine: Any, module: TrainStep, tokenizer: Any, cfg: Config, state: _RunState,
              step: int, rank: int, world: int) -> tuple[dict[str, Any], bool]:
    """Score the validation split; a better score exports the model (the run's export is always
    the best evaluation's). Returns the row's additions and whether it improved."""
    t = cfg.train
    t_eval = time.perf_counter()
    scores = validator.score(module.towers, tokenizer, engine.device)
    value = headline(cfg, scores)
    if world > 1:  # rank 0's number decides on every rank: the export and a stop are collective
        v = torch.tensor([value], dtype=torch.float64, device=engine.device)
        torch.distributed.broadcast(v, 0)
        value = float(v.item())
    best = state.best
    improved = value > best["metric"]
    state.best = {"metric": value, "step": step, "since": 0} if improved else {**best, "since": best["since"] + 1}
    if improved:
        _export(engine, module, tokenizer, cfg, rank, {"best_step": step, f"valid_{t.eval_metric}": value})
    state.stopped = bool(t.early_stopping_patience) and state.best["since"] >= t.early_stopping_patience
    if rank == 0:
        log.info("step %d: valid %s %.4f (best %.4f at step %d)%s", step, t.eval_metric, value, state.best["metric"],
                 state.best["step"], "; stopping early" if state.stopped else "")
    return {**scores, "valid_metric": value, "best_step": state.best["step"], "best_metric": state.best["metric"],
            "stopped_early": state.stopped, "eval_s": time.perf_counter() - t_eval}, improved


def _report(engine: Any, row: dict[str, Any], cfg: Config, state: _RunState, rank: int, world: int, checkpoint: bool,
            stream: Stream) -> None:
    """Every rank reports the row; with `checkpoint`, every rank saves its DeepSpeed shard, the
    rows it consumed and the run state into the checkpoint Ray Train merges (rank 0 adds the
    resolved config)."""
    import ray.train
    from ray.train import Checkpoint

    if rank == 0:
        state.rows.append(row)
        _write_metrics(cfg, state.rows)
        log.info("step %d/%d loss %.4f lr %.2e %.1f ex/s data-wait %.2fs", row["step"], cfg.train.max_steps, row["loss"], row["lr"],
                 row["examples_per_s"], row["data_wait_s"])
    if not checkpoint:
        ray.train.report(row)
        return
    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag=DS_TAG)
        stream.save(tmp)
        # Every rank reads the state on resume (the best evaluation so far).
        # `world`: a resume with another worker count knows to re-cut ZeRO's partitions (and
        # `examples_per_step` what keeps the global batch).
        Path(tmp, STATE_FILE).write_text(json.dumps({"step": row["step"], "best": state.best, "stopped": state.stopped, "world": world,
                                                     "examples_per_step": world * cfg.train.rows_per_batch * cfg.train.grad_accum}))
        if rank == 0:
            Path(tmp, "config.yaml").write_text(to_yaml(cfg))
        ray.train.report(row, checkpoint=Checkpoint.from_directory(tmp), checkpoint_upload_fn=checkpoint_upload(cfg))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train

    from recsys.model import load_tokenizer

    cfg = config_from_dict(config["cfg"])
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if rank == 0:
        print_progress(log)
    torch.manual_seed(t.seed)
    items = ItemTable.load(cfg)
    negatives = hard_negatives_for(items, cfg)
    tokenizer = load_tokenizer(cfg.model)
    pad_id = tokenizer.pad_token_id or 0
    tokens = BatchTokens(items, tokenizer, cfg.model)  # train.tokenize_in=worker's caches, across batches
    universal = resume_layout(STATE_FILE, world, t.rows_per_batch, t.grad_accum, t.zero_stage, rank,
                              "train.contrastive_batch" if t.contrastive_batch else "train.batch_size")
    module, engine = _engine(cfg, load_universal=universal)
    validator = None
    if t.eval_every:
        from recsys.validation import Validator

        validator = Validator(cfg, items.ids, items.texts, rank, world, batch_size=max(t.batch_size, 64))
    state = _resume(engine, cfg, rank, universal=universal)
    step = start_step = engine.global_steps
    # Pre-tokenised batches are padded into tensors in Ray's fetch threads, during the step before;
    # tokenising in the worker stays on this thread (the tokenizer is also used by validation here).
    pad = functools.partial(to_tensors, pad_id=pad_id, padding_side=tokenizer.padding_side) if t.tokenize_in == "pipeline" else None
    stream = Stream(ray.train.get_dataset_shard("train"), t.rows_per_batch, t.seed, rank, resume=state.stream, owner=rank == 0,
                    prepare=pad, too_small=f"worker {rank} got no full batch of {t.rows_per_batch} examples: too few training examples for "
                              f"{world} workers; lower train.batch_size (train.contrastive_batch) or train.num_workers")
    batches = iter(stream)
    meter = _Meter()
    summary: dict[str, Any] = {}
    while step < t.max_steps and not state.stopped:
        t_fetch = time.perf_counter()
        epoch, batch = next(batches)
        if start_step and step == start_step and not meter.losses:
            # The first batch after a resume's skip: examples/s and data wait exclude the skip.
            meter.restart()
            t_fetch = time.perf_counter()
        tensors = batch if pad is not None else collate(batch, items, tokenizer, cfg, negatives, tokens)
        b = {k: v.to(engine.device) for k, v in tensors.items()}
        meter.add(tensors, time.perf_counter() - t_fetch)

        module.use_memory = engine.global_steps >= t.memory_start_step
        meter.losses.append(contrastive_step(engine, module, b, t.batch_size))
        meter.examples += t.rows_per_batch * world
        if engine.global_steps == step:  # mid-accumulation: no optimizer step yet
            continue

        step = engine.global_steps
        evaluate_now = validator is not None and (step % t.eval_every == 0 or step == t.max_steps)
        checkpoint_now = step % t.checkpoint_every == 0 or step == t.max_steps
        if not (step % t.log_every == 0 or checkpoint_now or evaluate_now):
            continue
        # start_step > 0: this attempt resumed from a checkpoint; skipped_rows: consumed examples this
        # worker's shard held, walked past on resume.
        row = meter.row(step, engine, module, world, epoch=epoch, start_step=start_step, skipped_rows=stream.skipped_rows)
        improved = False
        if evaluate_now:
            scores, improved = _validate(validator, engine, module, tokenizer, cfg, state, step, rank, world)
            row.update(scores)
            meter.restart()  # examples/s of the next interval excludes the evaluation
        # Also after a better evaluation: a resumed run then knows the export is that step's.
        _report(engine, row, cfg, state, rank, world, checkpoint=checkpoint_now or state.stopped or improved, stream=stream)
        summary = row
    batches.close()

    if validator is None and not state.stopped:
        export = _export(engine, module, tokenizer, cfg, rank)
    else:  # written at the best evaluation already (also when a stopped run is re-submitted)
        export = paths.export_dir(cfg)
        summary = {**summary, "best_step": state.best["step"], "best_metric": state.best["metric"], "stopped_early": state.stopped}
    if rank == 0:
        log.info("exported to %s%s", export, f" (the best validation, step {state.best['step']})" if validator is not None else "")
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


def _train_dataset(cfg: Config, read_args: dict[str, Any] | None = None,
                   featurize_args: dict[str, Any] | None = None) -> Any:
    """The training examples as the workers' `train` dataset: the task's example shards read with
    Ray Data, globally shuffled (train.shuffle=global), tokenised by a Featurize actor pool when
    train.tokenize_in=pipeline. Ray must be up. `read_args` / `featurize_args` are merged into
    read_parquet's / map_batches' arguments (bench.train_ingest tunes them; training passes none)."""
    import ray.data

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
    ds = ray.data.read_parquet([storage.filesystem(f, cfg.storage)[1] for f in files], **({"filesystem": fs} | (read_args or {})))
    # Examples are written grouped by user (prepare's groupby), and a local shuffle buffer alone
    # would leave one user's or one query's rows side by side in a batch. A seeded global
    # shuffle spreads them, the same permutation in every epoch and attempt (the worker's
    # buffer, seeded by epoch, varies the order between epochs).
    if cfg.train.shuffle == "global":
        ds = ds.random_shuffle(seed=cfg.train.seed)
    if cfg.train.tokenize_in == "pipeline":
        # Tokenise in a Ray Data actor pool, streaming ahead of the workers (CPU work off the
        # training processes: on GPU nodes it overlaps with the GPU's step).
        args = {
            "fn_constructor_kwargs": {"cfg_dict": to_dict(cfg)},
            "batch_format": "numpy",
            "batch_size": max(64, cfg.train.batch_size),
            "compute": ray.data.ActorPoolStrategy(size=max(1, cfg.train.tokenize_actors)),
            "num_cpus": cfg.train.tokenize_cpus,
        } | (featurize_args or {})
        # A block is one actor task, and its output leaves the actor only when the task ends (or
        # at Ray's 128 MiB block size). Ray 2.60 reads small example files in one task as blocks
        # of up to 128 MiB: on 1M rows that was 2 blocks of 500k, one actor of 2 sat idle and the
        # first batch came after 209 s (docs/results.md, "Training data path"). Blocks of a few
        # batches keep every actor busy and the first batch seconds away; the repartition
        # streams (no shuffle) and keeps the order under preserve_order, which training sets.
        ds = ds.repartition(target_num_rows_per_block=FEATURIZE_BLOCK_BATCHES * args["batch_size"])
        ds = ds.map_batches(Featurize, **args)
    return ds


def run_text(cfg: Config) -> dict[str, Any]:
    """Fine-tune on the prepared examples; returns the final metrics and the export location."""
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
    # Before anything starts: the per-device memory plan, printed, and a run that cannot fit
    # refused with the settings that would make it fit (train.memory_check).
    memory_plan.check(cfg)
    ensure_ray(cfg=cfg)
    ds = _train_dataset(cfg)
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
    result = fit_trainer(trainer)
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
