"""Memory plan vs measured peak memory vs DeepSpeed's own estimator, on this CPU machine.

    python -m bench.memory_plan [--only NAME ...] [--steps 1] [--json out.json]
    python -m bench.memory_plan --examples      # the plans printed in docs/cluster.md (no run)

Each configuration runs in a fresh subprocess: a single-process DeepSpeed engine built as
training builds it (recsys.train._engine: TrainStep, torch AdamW, recsys.train.deepspeed_config),
one warm-up contrastive batch (optimizer state and ZeRO's buffers exist from then on), then
`--steps` measured ones through recsys.train_step.contrastive_step. Models are tiny randomly
initialised BERTs (recsys.encoder.make_tiny_bert, MiniLM's 30522-token vocabulary) and a Qwen2
built from transformers.Qwen2Config in code, wide enough that their memory dominates allocator
noise. Batches are synthetic (bench.grad_cache_memory.synthetic_batch): every micro-batch padded
to the full query/item length, as the plan assumes.

Measured = peak resident set (VmHWM) during the measured steps minus the resident set before the
model was built (torch, transformers and DeepSpeed imported, the process group up): the model
states, the buffers, the activations and the loss. The baseline is taken after a throw-away
engine of the same architecture and ZeRO stage, one layer of hidden size 32, has trained one
batch and been destroyed: what a process pays once whatever the model's size is not the
model's. Without it the measured peak carried ~150 MiB of transformers' modeling code
(importing transformers.models.bert.modeling_bert alone adds 150 MiB of RSS), ~46 MiB of
modules DeepSpeed imports lazily when it builds a ZeRO optimizer (its op builders with
setuptools/distutils, triton and MoE helpers) and ~30 MiB of kernel code pages and thread
state first touched by the first backward and optimizer step; the same ~75 MiB over the
tensors held after the warm-up in every ZeRO-1-3 case, BERT or Qwen2, fp32 or bf16.
VmHWM is reset (/proc/self/clear_refs) after the warm-up, so the engine's build (ZeRO-1/2 flatten a copy of the weights) does not count; the
build's own peak is printed too. The children run with MALLOC_MMAP_THRESHOLD_ fixed, so a freed
tensor's pages go back to the kernel (glibc would otherwise keep them, and the peak would carry
earlier steps' garbage).

Plan = recsys.memory_plan.plan(cfg).total for the same config (CPU rules: the reduce bucket's
untouched pages and "offloaded" states count as host memory). DeepSpeed = its
estimate_zero2/3_model_states_mem_needs (GPU memory, no offload) next to the plan's model
states; DeepSpeed's formulas assume 16-bit parameters, so they apply to the bf16 rows only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MMAP_THRESHOLD = 128 * 1024
MIB = 1024**2


@dataclass(frozen=True)
class Case:
    name: str
    model: str  # "bert:HIDDEN:LAYERS" or "qwen2:HIDDEN:LAYERS"
    zero: int
    precision: str
    batch: int
    query_len: int = 64
    item_len: int = 64
    checkpointing: bool = False


CASES = (
    Case("bert fp32 z0", "bert:512:4", 0, "fp32", 16),
    Case("bert fp32 z1", "bert:512:4", 1, "fp32", 16),
    Case("bert fp32 z2", "bert:512:4", 2, "fp32", 16),
    Case("bert fp32 z2 b32", "bert:512:4", 2, "fp32", 32),
    Case("bert fp32 z2 ckpt b32", "bert:512:4", 2, "fp32", 32, checkpointing=True),
    Case("bert bf16 z2", "bert:512:4", 2, "bf16", 16),
    Case("bert fp32 z3", "bert:512:4", 3, "fp32", 16),
    Case("bert bf16 z3", "bert:512:4", 3, "bf16", 16),
    Case("qwen2 fp32 z2", "qwen2:512:4", 2, "fp32", 16),
    Case("qwen2 bf16 z3", "qwen2:512:4", 3, "bf16", 16),
)


def _status() -> dict[str, int]:
    from bench.grad_cache_memory import _status as status

    return status()


def build_model(spec: str, root: Path) -> str:
    """A model folder for `spec` (cached under `root`): tiny BERT or a Qwen2 from Qwen2Config."""
    kind, hidden, layers = spec.split(":")
    path = root / spec.replace(":", "-")
    if kind == "bert":
        from recsys.encoder import make_tiny_bert

        return make_tiny_bert(path, hidden=int(hidden), layers=int(layers))
    if (path / "config.json").exists():
        return str(path)
    import torch
    from transformers import Qwen2Config, Qwen2Model

    torch.manual_seed(0)
    h = int(hidden)
    cfg = Qwen2Config(vocab_size=30522, hidden_size=h, num_hidden_layers=int(layers), num_attention_heads=8,
                      num_key_value_heads=4, intermediate_size=3 * h, max_position_embeddings=512,
                      layer_types=["full_attention"] * int(layers))
    Qwen2Model(cfg).save_pretrained(path)
    return str(path)


def _config(case: Case, model_path: str) -> Any:
    from recsys.config import load_config

    return load_config(None, [
        f"model.name_or_path={model_path}", f"train.precision={case.precision}", f"train.zero_stage={case.zero}",
        f"train.batch_size={case.batch}", "train.contrastive_batch=0", "train.num_workers=1",
        f"model.max_query_tokens={case.query_len}", f"model.max_item_tokens={case.item_len}",
        "train.max_steps=1000", "train.warmup_steps=0", "train.use_gpu=false", "train.memory_check=off",
        *(["model.gradient_checkpointing=true"] if case.checkpointing and _has_field("gradient_checkpointing") else []),
    ])


def _has_field(name: str) -> bool:
    from recsys.config import ModelConfig

    return name in ModelConfig.model_fields


def _estimate(case: Case, model_path: str) -> dict[str, Any]:
    """The plan for this case and DeepSpeed's estimators (this process: no engine)."""
    import dataclasses

    from recsys import memory_plan
    from recsys.config import load_config  # noqa: F401  (config import before deepspeed's)

    cfg = _config(case, model_path)
    s = memory_plan.settings_of(cfg)
    if case.checkpointing and not s.checkpointing:  # before model.gradient_checkpointing exists
        s = dataclasses.replace(s, checkpointing=True)
    p = memory_plan._plan(s)
    out = {"plan_mib": p.total / MIB, "plan_states_mib": p.model_states / MIB, "plan_buffers_mib": p.buffers / MIB,
           "plan_act_mib": (p.activations + p.logits) / MIB, "params": p.total_params, "ds_mib": None}
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if case.zero == 3:
        _, gpu, _ = estimate_zero3_model_states_mem_needs(p.total_params, s.arch.largest_module, 1, 1, cpu_offload=False)
        out["ds_mib"] = gpu / MIB
        out["plan_ds_scope_mib"] = (p.model_states + 2 * s.b * s.arch.largest_module) / MIB  # + gathered largest layer
    elif case.zero in (1, 2):
        _, gpu = estimate_zero2_model_states_mem_needs(p.total_params, 1, 1, cpu_offload=False)
        out["ds_mib"] = gpu / MIB
        out["plan_ds_scope_mib"] = p.model_states / MIB
    return out


def measure(case: Case, model_path: str, steps: int, threads: int, warm_path: str | None = None) -> dict[str, Any]:
    """In this process (a fresh one, with the distributed env set). `warm_path`: the throw-away
    model trained before the baseline (None: no warm-up, the baseline right after the imports)."""
    import gc

    import deepspeed  # noqa: F401  (imported before the baseline: its import is not the model's)
    import torch
    import torch.distributed as dist

    from bench.grad_cache_memory import _Peak, synthetic_batch
    from recsys.train import _engine
    from recsys.train_step import contrastive_step

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = _config(case, model_path)
    batches = [synthetic_batch(case.batch, case.batch, case.query_len, case.item_len, seed) for seed in range(steps + 1)]
    if not dist.is_initialized():  # the process group's own memory is not the model's either
        dist.init_process_group("gloo")
    if warm_path:  # the process's one-time costs (module docstring) go into the baseline
        warm_cfg = _config(case, warm_path)
        warm_module, warm_engine = _engine(warm_cfg)
        contrastive_step(warm_engine, warm_module, synthetic_batch(2, 2, 16, 16, 0), warm_cfg.train.batch_size)
        warm_engine.destroy()
        del warm_module, warm_engine
        gc.collect()
    baseline = _status()["VmRSS"]
    module, engine = _engine(cfg)
    if case.checkpointing and not getattr(cfg.model, "gradient_checkpointing", False):
        for enc in (module.towers.query_encoder, module.towers.item_encoder):
            if enc is not None:
                enc.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    built = _status()
    contrastive_step(engine, module, batches[0], cfg.train.batch_size)
    warm = _status()
    peak = _Peak()
    for b in batches[1:]:
        contrastive_step(engine, module, b, cfg.train.batch_size)
    step_peak = peak.kib()
    out = {
        "measured_mib": (step_peak - baseline) / 1024, "build_peak_mib": (built["VmHWM"] - baseline) / 1024,
        "warm_peak_mib": (warm["VmHWM"] - baseline) / 1024, "resident_mib": (warm["VmRSS"] - baseline) / 1024,
        "baseline_mib": baseline / 1024, "method": peak.method,
    }
    engine.destroy()
    return out


def _child(args: argparse.Namespace) -> None:
    case = Case(**json.loads(args.child))
    out = measure(case, args.model_path, args.steps, args.threads, args.warm_path)
    Path(args.result).write_text(json.dumps(out))
    sys.stdout.flush()
    os._exit(0)  # skip torch's teardown (a joinable-thread SIGABRT, see tests/test_losses.py)


def warm_spec(spec: str) -> str:
    """The throw-away model of `spec`'s architecture that warms the process before the baseline."""
    return spec.split(":")[0] + ":32:1"


def run_one(case: Case, model_path: str, args: argparse.Namespace, log: Path, warm_path: str | None = None) -> dict[str, Any]:
    from recsys.storage import free_port

    env = {
        **os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
        "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
    }
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp, "result.json")
        cmd = [sys.executable, "-m", "bench.memory_plan", "--child", json.dumps(asdict(case)), "--model-path", model_path,
               "--result", str(result), "--steps", str(args.steps), "--threads", str(args.threads),
               *(["--warm-path", warm_path] if warm_path else [])]
        with log.open("a") as f:
            f.write(f"\n=== {case} ===\n")
            f.flush()
            rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=args.timeout).returncode
        if rc != 0 or not result.exists():
            raise SystemExit(f"{case.name}: child exited {rc} without a result; see {log}")
        return json.loads(result.read_text())


def table(rows: list[tuple[Case, dict[str, Any]]]) -> str:
    lines = [
        "| config | params | micro-batch x tokens | measured MiB | plan MiB | plan / measured | build peak MiB "
        "| plan model states MiB | DeepSpeed estimate MiB | plan / DeepSpeed |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c, r in rows:
        ds = r.get("ds_mib")
        ds_cell = "" if ds is None else f"{ds:.0f}{'' if c.precision != 'fp32' else ' (16-bit)'}"
        ds_ratio = "" if ds is None else f"{r['plan_ds_scope_mib'] / ds:.2f}"
        lines.append(
            f"| {c.name} | {r['params'] / 1e6:.1f}M | {c.batch} x {c.query_len}+{c.item_len} | {r['measured_mib']:.0f} "
            f"| {r['plan_mib']:.0f} | {r['plan_mib'] / r['measured_mib']:.2f} | {r['build_peak_mib']:.0f} "
            f"| {r.get('plan_ds_scope_mib', r['plan_states_mib']):.0f} | {ds_cell} | {ds_ratio} |")
    return "\n".join(lines)


def examples() -> str:
    """The plans of docs/cluster.md: a Qwen3-0.6B-shaped decoder with LoRA r=16 and bert-base, on
    8 x 80 GB GPUs, bf16, micro-batch 32, 128 query and item tokens (configs built in code, no hub)."""
    import dataclasses

    from transformers import BertConfig, Qwen3Config

    from recsys import memory_plan
    from recsys.config import load_config

    common = ["train.use_gpu=true", "train.num_workers=8", "train.precision=bf16", "train.batch_size=32",
              "model.max_query_tokens=128", "model.max_item_tokens=128", "train.device_memory_gib=80"]
    qwen = memory_plan.describe_config(Qwen3Config(
        hidden_size=1024, num_hidden_layers=28, intermediate_size=3072, vocab_size=151669, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, layer_types=["full_attention"] * 28))
    s = memory_plan.settings_of(load_config(None, [*common, "train.zero_stage=3"]), qwen)
    lora = memory_plan.Lora(r=16, alpha=32, dropout=0.05, target_modules=tuple(qwen.linear_suffixes()))
    a = memory_plan._plan(dataclasses.replace(s, lora=lora))
    full = memory_plan._plan(s)
    bert = memory_plan.describe_config(BertConfig())
    b = memory_plan.plan(load_config(None, [*common, "train.zero_stage=2"]), bert)
    return "\n\n".join([a.table(), "the same decoder fully fine-tuned:\n" + full.table(), b.table()])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", default=None, help="case names to run (default: all)")
    p.add_argument("--steps", type=int, default=1, help="measured contrastive batches after one warm-up")
    p.add_argument("--threads", type=int, default=2, help="torch threads per child")
    p.add_argument("--timeout", type=float, default=300, help="seconds per configuration")
    p.add_argument("--models", default=None, help="where the tiny models are written (default: a temp dir)")
    p.add_argument("--log", default=None, help="children's output (default: a temp file)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--examples", action="store_true", help="print the plans of docs/cluster.md and exit")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--model-path", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--warm-path", default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-warm-up", action="store_true",
                   help="take the baseline right after the imports (the process's one-time costs count as the model's)")
    args = p.parse_args(argv)
    if args.child:
        _child(args)
        return
    if args.examples:
        print(examples())
        return
    cases = [c for c in CASES if args.only is None or c.name in args.only]
    if not cases:
        raise SystemExit(f"--only: no such case; cases: {', '.join(c.name for c in CASES)}")
    root = Path(args.models or tempfile.mkdtemp(prefix="memory-plan-models-"))
    log = Path(args.log) if args.log else Path(tempfile.mkstemp(prefix="memory_plan-", suffix=".log")[1])
    t0 = time.perf_counter()
    rows = []
    for c in cases:
        path = build_model(c.model, root)
        warm = None if args.no_warm_up else build_model(warm_spec(c.model), root)
        r = {**_estimate(c, path), **run_one(c, path, args, log, warm)}
        rows.append((c, r))
        print(f"{c.name}: measured {r['measured_mib']:.0f} MiB, plan {r['plan_mib']:.0f} MiB "
              f"({r['plan_mib'] / r['measured_mib']:.2f}x)", file=sys.stderr, flush=True)
    print(f"\n1 process, {args.threads} torch threads, {args.steps} measured contrastive batch(es) after 1 warm-up; "
          f"measured = {rows[0][1]['method']} above the pre-model RSS; wall {time.perf_counter() - t0:.0f} s\n")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([{**asdict(c), **r} for c, r in rows], indent=1))


if __name__ == "__main__":
    main()
