"""Gradient cache: peak memory of a contrastive step vs the micro-batch and the contrastive batch.

    python -m bench.grad_cache_memory [--model bundled] [--configs 2:32 2:256 2:1024/32 ...]
                                      [--query-len 32] [--item-len 32] [--steps 2] [--jobs 1] [--quick]

Each configuration runs in a fresh subprocess, so its peak is its own: a single-process DeepSpeed
engine built as training builds it (recsys.train._engine: TrainStep, torch AdamW, the scheduler,
recsys.train.deepspeed_config), fp32, then one warm-up contrastive batch of short texts (AdamW's
state and ZeRO's buffers, sized by the parameters, exist from then on), then `--steps` measured
ones through
recsys.train_step.contrastive_step. A configuration is `Z:B` (ZeRO stage Z, contrastive batch B
in one graph: no cache) or `Z:B/M` (contrastive batch B through the gradient cache in
micro-batches of M rows). Batches are synthetic token ids: every text padded to its tower's
length, lengths drawn in [len/2, len] with the first row of each micro-batch at full length, so
every micro-batch has the same padded shape.

Memory is the resident set (RSS), because on CPU that is what runs out. Peak: the kernel's high
water mark VmHWM from /proc/self/status, reset to the current RSS just before the measured steps
by writing 5 to /proc/self/clear_refs (so neither the engine's build nor the warm-up counts).
ru_maxrss cannot be reset and would report the build's or warm-up's peak; sampling VmRSS from a
thread can miss short spikes (it is the fallback where clear_refs is not writable). "Above
baseline" = VmHWM during the measured steps minus VmRSS after the warm-up step. glibc's malloc
keeps freed memory for reuse once its adaptive mmap threshold has grown, which would let the
warm-up step's activations sit in the baseline: the children run with MALLOC_MMAP_THRESHOLD_
fixed at 128 KiB, so every large tensor is mmapped and its pages go back to the kernel when it
is freed. The peak is also split, by reading and resetting VmHWM around every `engine.step`,
into encoding (the no-graph forwards, the loss, the re-encoding with its backward: what grows
with rows) and `engine.step` (ZeRO's gradient reduction and AdamW: a cost of the parameters).
`--jobs N` runs N configurations at once: each peak stays its process's own, timings share the CPU.

Prints one table: peak above baseline (MiB), the ratio to the no-cache run at the same
micro-batch (and at the same contrastive batch where there is one), seconds per contrastive
batch and examples/s. Timings are indicative on a shared machine; memory is the point.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

DEFAULT_CONFIGS = (
    "2:32", "2:64", "2:128", "2:256",  # no cache: the micro-batch is the contrastive batch (512: ~6 GiB)
    "2:64/32", "2:256/32", "2:1024/32",  # cache, micro-batch 32
    "2:16", "2:256/16",  # cache, micro-batch 16 (and its no-cache reference)
    "3:32", "3:256/32",  # ZeRO-3
)
QUICK_CONFIGS = ("2:4", "2:16/4", "3:16/4")
MMAP_THRESHOLD = 128 * 1024


@dataclass(frozen=True)
class Spec:
    zero: int
    batch: int  # rows in one contrastive batch (this worker's)
    micro: int  # rows per micro-batch (= batch without the cache)

    @property
    def cached(self) -> bool:
        return self.micro < self.batch

    @classmethod
    def parse(cls, text: str) -> Spec:
        m = re.fullmatch(r"([0-3]):(\d+)(?:/(\d+))?", text.strip())
        if not m:
            raise SystemExit(f"--configs: {text!r} is not ZERO:BATCH or ZERO:BATCH/MICRO (e.g. 2:256 or 2:1024/32)")
        zero, batch = int(m[1]), int(m[2])
        micro = int(m[3]) if m[3] else batch
        if batch < 2 or micro < 1 or batch % micro:
            raise SystemExit(f"--configs: {text!r}: need BATCH >= 2 and BATCH a multiple of MICRO")
        return cls(zero, batch, micro)

    def label(self) -> str:
        return f"cache, micro {self.micro}" if self.cached else "no cache"


def _status() -> dict[str, int]:
    """VmRSS / VmHWM of this process in KiB."""
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"^{k}:\s+(\d+) kB", text, re.M)[1]) for k in ("VmRSS", "VmHWM")}


class _Peak:
    """Peak RSS over a region: VmHWM reset through clear_refs, else a 1 ms VmRSS sampler."""

    def __init__(self) -> None:
        try:
            _reset_hwm()
            self.method = "VmHWM (clear_refs reset)"
            self.resettable = True
            self._thread = None
        except OSError:
            self.method = "VmRSS sampled every 1 ms"
            self.resettable = False
            self._max = _status()["VmRSS"]
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._max = max(self._max, _status()["VmRSS"])

    def kib(self) -> int:
        if self._thread is None:
            return _status()["VmHWM"]
        self._stop.set()
        self._thread.join()
        return max(self._max, _status()["VmRSS"])


class _Phases:
    """Splits the peak between encoding (forwards, loss, backward: what grows with the rows) and
    `engine.step` (ZeRO's reduction and, at the accumulation boundary, AdamW: a fixed cost of the
    parameter count) by reading and resetting VmHWM around every engine.step call."""

    def __init__(self, engine: Any, baseline_kib: int) -> None:
        self.encode_kib = self.step_kib = 0
        self._baseline = baseline_kib
        step = engine.step

        def timed_step(*a: Any, **k: Any) -> Any:
            self.encode_kib = max(self.encode_kib, _status()["VmHWM"] - self._baseline)
            _reset_hwm()
            out = step(*a, **k)
            self.step_kib = max(self.step_kib, _status()["VmHWM"] - self._baseline)
            _reset_hwm()
            return out

        engine.step = timed_step


def _reset_hwm() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _texts(g: Any, rows: int, length: int, micro: int) -> tuple[Any, Any]:
    import torch

    lengths = torch.randint(max(2, length // 2), length + 1, (rows,), generator=g)
    lengths[::micro] = length  # every micro-batch pads to the full length
    ids = torch.randint(1000, 20000, (rows, length), generator=g)
    ids[:, 0] = 101  # [CLS]
    pos = torch.arange(length)[None, :]
    ids[pos == (lengths[:, None] - 1)] = 102  # [SEP]
    mask = (pos < lengths[:, None]).long()
    return ids * mask, mask


def synthetic_batch(rows: int, micro: int, query_len: int, item_len: int, seed: int) -> dict[str, Any]:
    """One worker's contrastive batch as recsys.features.to_tensors lays it out."""
    import torch

    g = torch.Generator().manual_seed(seed)
    q_ids, q_mask = _texts(g, rows, query_len, micro)
    d_ids, d_mask = _texts(g, rows, item_len, micro)
    keys = torch.arange(rows) + seed * rows
    return {
        "q_ids": q_ids, "q_mask": q_mask, "d_ids": d_ids, "d_mask": d_mask,
        "weights": torch.ones(rows), "item_keys": keys, "dup_keys": keys.clone(), "group_keys": keys.clone(),
        "history_keys": torch.full((rows, 10), -1, dtype=torch.long),
        "logq": torch.rand(rows, generator=g).clamp_min(1e-6).log(),
    }


def measure(spec: Spec, model: str, query_len: int, item_len: int, steps: int, threads: int, warmup_len: int) -> dict[str, Any]:
    """In this process (a fresh one, with the distributed env set): build, warm up, measure."""
    import torch
    import torch.distributed as dist

    from recsys.config import load_config
    from recsys.train import _engine
    from recsys.train_step import contrastive_step

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = load_config(None, [
        f"model.name_or_path={model}", "train.precision=fp32", f"train.zero_stage={spec.zero}",
        f"train.batch_size={spec.micro}", f"train.contrastive_batch={spec.batch if spec.cached else 0}",
        "train.max_steps=1000", "train.warmup_steps=0",
    ])
    t = cfg.train
    assert t.rows_per_batch == spec.batch and t.micro_batches == spec.batch // spec.micro
    module, engine = _engine(cfg)
    # The warm-up batch only has to reach an accumulation boundary (AdamW's state, ZeRO's
    # buffers exist from then on, sized by the parameters): short texts make it cheap.
    batches = [synthetic_batch(spec.batch, spec.micro, warmup_len, warmup_len, 0)]
    batches += [synthetic_batch(spec.batch, spec.micro, query_len, item_len, seed) for seed in range(1, steps + 1)]
    built_kib = _status()["VmRSS"]
    contrastive_step(engine, module, batches[0], t.batch_size)  # warm-up
    baseline_kib = _status()["VmRSS"]
    peak = _Peak()
    phases = _Phases(engine, baseline_kib) if peak.resettable else None
    times, losses = [], []
    for b in batches[1:]:
        start = time.perf_counter()
        losses.append(contrastive_step(engine, module, b, t.batch_size))
        times.append(time.perf_counter() - start)
    peak_kib = peak.kib() if phases is None else baseline_kib + max(phases.encode_kib, phases.step_kib, _status()["VmHWM"] - baseline_kib)
    assert engine.global_steps == steps + 1, f"{engine.global_steps} optimizer steps for {steps + 1} contrastive batches"
    out = {
        "built_mib": built_kib / 1024, "baseline_mib": baseline_kib / 1024, "peak_mib": (peak_kib - baseline_kib) / 1024,
        "s_per_batch": sum(times) / len(times), "losses": losses, "method": peak.method,
        "micro_steps": t.micro_batches, "accum": engine.gradient_accumulation_steps(),
        "encode_mib": None if phases is None else phases.encode_kib / 1024,
        "step_mib": None if phases is None else phases.step_kib / 1024,
    }
    engine.destroy()
    if dist.is_initialized():
        dist.destroy_process_group()
    return out


def _child(args: argparse.Namespace) -> None:
    spec = Spec.parse(args.child)
    out = measure(spec, args.model, args.query_len, args.item_len, args.steps, args.threads, args.warmup_len)
    Path(args.result).write_text(json.dumps(out))
    sys.stdout.flush()
    os._exit(0)  # skip torch's teardown (a joinable-thread SIGABRT, see tests/test_losses.py)


def run_one(spec: Spec, args: argparse.Namespace, log: Path) -> dict[str, Any]:
    from recsys.storage import free_port

    env = {
        **os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
        "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
    }
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp, "result.json")
        cmd = [sys.executable, "-m", "bench.grad_cache_memory", "--child", f"{spec.zero}:{spec.batch}/{spec.micro}",
               "--result", str(result), "--model", args.model, "--query-len", str(args.query_len),
               "--item-len", str(args.item_len), "--steps", str(args.steps), "--threads", str(args.threads),
               "--warmup-len", str(args.warmup_len)]
        child_log = log.with_name(f"{log.stem}-z{spec.zero}-b{spec.batch}-m{spec.micro}.log")
        with child_log.open("w") as f:
            try:
                rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=args.timeout).returncode
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"{spec}: killed after --timeout {args.timeout:.0f} s; see {child_log}") from None
        if rc != 0 or not result.exists():
            raise RuntimeError(f"{spec}: child exited {rc} without a result; see {child_log}")
        return json.loads(result.read_text())


def _ratio(value: float, ref: float | None) -> str:
    return "" if ref is None else f"{value / ref:.2f}"


def _mib(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def _table(results: list[tuple[Spec, dict[str, Any]]]) -> str:
    ref = {(s.zero, s.batch): r["peak_mib"] for s, r in results if not s.cached}
    lines = [
        "| ZeRO | run | contrastive batch | micro-batch | engine micro-steps | baseline RSS MiB | peak above baseline MiB "
        "| / no cache, same micro-batch | / no cache, same contrastive batch | encoding phase peak MiB | engine.step phase peak MiB "
        "| s / contrastive batch | examples/s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s, r in results:
        peak = r["peak_mib"]
        same_batch = _ratio(peak, ref.get((s.zero, s.batch))) if s.cached else ""
        lines.append(
            f"| {s.zero} | {s.label()} | {s.batch} | {s.micro} | {r['micro_steps']} | {r['baseline_mib']:.0f} | {peak:.1f} "
            f"| {_ratio(peak, ref.get((s.zero, s.micro)))} | {same_batch} | {_mib(r['encode_mib'])} | {_mib(r['step_mib'])} "
            f"| {r['s_per_batch']:.3g} | {s.batch / r['s_per_batch']:.3g} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model.name_or_path (default bundled; tiny-random with --quick)")
    p.add_argument("--configs", nargs="+", default=None,
                   help="ZERO:BATCH (no cache) or ZERO:BATCH/MICRO (gradient cache); default: " + " ".join(DEFAULT_CONFIGS))
    p.add_argument("--query-len", type=int, default=None, help="query tokens (default 32; 8 with --quick)")
    p.add_argument("--item-len", type=int, default=None, help="item tokens (default 32; 8 with --quick)")
    p.add_argument("--steps", type=int, default=2, help="measured contrastive batches after one warm-up batch")
    p.add_argument("--threads", type=int, default=2, help="torch threads per child")
    p.add_argument("--warmup-len", type=int, default=4, help="tokens per text of the (unmeasured) warm-up batch")
    p.add_argument("--jobs", type=int, default=1,
                   help="configurations run at once (each its own process: peaks stay their own, timings share the CPU)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    p.add_argument("--log", default=None, help="children's output go next to this path (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--quick", action="store_true", help="tiny random BERT, tiny batches: a smoke run")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.model = args.model or ("tiny-random" if args.quick else "bundled")
    args.query_len = args.query_len or (8 if args.quick else 32)
    args.item_len = args.item_len or (8 if args.quick else 32)
    if args.child:
        _child(args)
        return
    if args.steps < 1:
        raise SystemExit("--steps: need at least 1 measured step")
    if not (2 <= min(args.query_len, args.item_len) and max(args.query_len, args.item_len) <= 512):
        raise SystemExit("--query-len / --item-len: need 2..512 tokens (the encoder's positions)")
    specs = [Spec.parse(c) for c in (args.configs or (QUICK_CONFIGS if args.quick else DEFAULT_CONFIGS))]
    # A cached run's ratio needs the no-cache run at its micro-batch: add it where missing.
    for s in list(specs):
        if s.cached and Spec(s.zero, s.micro, s.micro) not in specs:
            specs.insert(specs.index(s), Spec(s.zero, s.micro, s.micro))
    log = Path(args.log) if args.log else Path(tempfile.mkdtemp(prefix="grad_cache_memory-"), "run.log")
    print(f"children's logs: {log.parent}/{log.stem}-*.log", file=sys.stderr)
    done: dict[Spec, dict[str, Any]] = {}
    failed: list[str] = []
    t0 = time.perf_counter()
    # Biggest first, so with --jobs > 1 the longest run does not start last.
    order = sorted(specs, key=lambda s: -s.batch * (1.3 if s.cached else 1.0))
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futures = {pool.submit(run_one, s, args, log): s for s in order}
        for fut in as_completed(futures):
            s = futures[fut]
            try:
                r = fut.result()
            except RuntimeError as e:  # one configuration lost: the others still make the table
                failed.append(str(e))
                print(e, file=sys.stderr, flush=True)
                continue
            done[s] = r
            print(f"ZeRO-{s.zero} batch {s.batch} micro {s.micro}: peak +{r['peak_mib']:.1f} MiB over "
                  f"{r['baseline_mib']:.0f} MiB, {r['s_per_batch']:.2f} s/batch", file=sys.stderr, flush=True)
            if args.json:  # after every configuration: a run cut short keeps what it measured
                Path(args.json).write_text(json.dumps([{**asdict(k), **v} for k, v in done.items()], indent=1))
    results = [(s, done[s]) for s in specs if s in done]
    if not results:
        raise SystemExit("no configuration finished:\n" + "\n".join(failed))
    print(f"\nmodel={args.model} fp32, query {args.query_len} / item {args.item_len} tokens, 1 process, "
          f"{args.threads} torch threads, {args.jobs} configuration(s) at once, {args.steps} measured "
          f"contrastive batch(es) after 1 warm-up of {args.warmup_len}-token texts; "
          f"peak = {results[0][1]['method']} above RSS after warm-up; wall {time.perf_counter() - t0:.0f} s\n")
    print(_table(results))
    if failed:
        raise SystemExit("not measured:\n" + "\n".join(failed))


if __name__ == "__main__":
    main()
