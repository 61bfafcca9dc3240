"""Training overhead: plain single-process PyTorch vs Ray Train + DeepSpeed (2 workers).

Same model, loss, optimizer, number of steps and GLOBAL batch on the same prepared examples.
Prints the per-step time of each (after warm-up steps) and the ratio, plus end-to-end wall time.

    python -m bench.train_overhead [--model bundled|tiny-random] [--steps 20] [--global-batch 32]
                                   [--tokenize-in worker|pipeline|both]

With `--tokenize-in both` (the default) the Ray arm runs twice: tokenising in the train workers'
collate, and in a Ray Data actor pool ahead of them; both are compared with the plain loop.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch


def _prepare(root: str, model: str, global_batch: int, steps: int, zero: int, precision: str):  # noqa: ANN202
    from recsys.config import load_config
    from recsys.data import prepare

    cfg = load_config(
        None,
        [
            f"storage.root={root}",
            f"model.name_or_path={model}",
            "data.synthetic_users=300",
            "data.synthetic_items=400",
            "train.task=both",
            f"train.batch_size={global_batch // 2}",
            f"train.max_steps={steps}",
            f"train.checkpoint_every={steps}",
            "train.log_every=1",
            f"train.zero_stage={zero}",
            f"train.precision={precision}",
            "train.run_name=bench",
        ],
    )
    if not Path(root, "data", "manifest.json").exists():
        prepare.run(cfg)
    return cfg


def plain_loop(cfg, global_batch: int, steps: int, warmup: int) -> tuple[list[float], float]:  # noqa: ANN001
    """The same work in one process with 2 threads, no Ray, no DeepSpeed."""
    import pyarrow.dataset as pads

    from recsys import paths
    from recsys.features import collate
    from recsys.items import ItemTable
    from recsys.losses import SampledSoftmaxLoss
    from recsys.model import build_two_tower, load_tokenizer
    from recsys.train import TrainStep

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    items = ItemTable.load(cfg)
    tok = load_tokenizer(cfg.model)
    table = pads.dataset([str(p) for k in ("next_item", "search") for p in Path(paths.examples(cfg, k, "train")).glob("*.parquet")]).to_table()
    module = TrainStep(build_two_tower(cfg.model), SampledSoftmaxLoss(cfg.train.temperature, gather=False))
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    module = module.to(dtype)
    opt = torch.optim.AdamW(module.parameters(), lr=cfg.train.lr)
    times = []
    n = table.num_rows
    for step in range(steps):
        s = time.perf_counter()
        idx = [(step * global_batch + i) % n for i in range(global_batch)]
        batch = {k: table.column(k).take(idx).to_numpy(zero_copy_only=False) for k in ("query", "history", "item_id", "weight")}
        loss = module(collate(batch, items, tok, cfg))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - s)
    return times[warmup:], time.perf_counter() - t0


def ray_deepspeed(cfg, global_batch: int, warmup: int) -> tuple[list[float], float]:  # noqa: ANN001
    from recsys import train

    t0 = time.perf_counter()
    train.run(cfg)
    rows = train._read_metrics(cfg)
    per_step = [global_batch / r["examples_per_s"] for r in rows[warmup:]]
    return per_step, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="bundled")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--global-batch", type=int, default=32)
    p.add_argument("--zero", type=int, default=2)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--root", default="runs/bench-train")
    p.add_argument("--tokenize-in", default="both", choices=["worker", "pipeline", "both"])
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = str(Path(args.root).absolute())
    import shutil

    cfg = _prepare(root, args.model, args.global_batch, args.steps, args.zero, args.precision)
    plain, plain_wall = plain_loop(cfg, args.global_batch, args.steps, args.warmup)
    modes = ["worker", "pipeline"] if args.tokenize_in == "both" else [args.tokenize_in]
    ours: dict[str, tuple[float, float]] = {}
    for mode in modes:
        run_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"tokenize_in": mode, "run_name": f"bench-{mode}"})})
        shutil.rmtree(Path(root) / run_cfg.train.run_name, ignore_errors=True)  # a fresh run, not a resume
        per_step, wall = ray_deepspeed(run_cfg, args.global_batch, args.warmup)
        ours[mode] = (statistics.median(per_step), wall)
    pm = statistics.median(plain)
    print(f"\nmodel={args.model} global_batch={args.global_batch} steps={args.steps} (first {args.warmup} excluded) "
          f"precision={args.precision} zero={args.zero} cores={os.cpu_count()}")
    print(f"{'setup':58s} {'ms/step (median)':>18s} {'wall s':>8s}")
    print(f"{'plain PyTorch, 1 process, 2 threads':58s} {pm * 1000:18.0f} {plain_wall:8.1f}")
    for mode, (om, wall) in ours.items():
        print(f"{f'Ray Train + DeepSpeed ZeRO-{args.zero}, 2 workers, tokenise in {mode}':58s} {om * 1000:18.0f} {wall:8.1f}")
    for mode, (om, _) in ours.items():
        print(f"ratio ours/plain per step, tokenise in {mode}: {om / pm:.2f}x   (goal <= 1.2x)")
    if len(ours) == 2:
        print(f"pipeline vs worker tokenisation per step: {ours['pipeline'][0] / ours['worker'][0]:.2f}x")


if __name__ == "__main__":
    main()
