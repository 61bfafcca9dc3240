"""A/B of two training recipes at the same budget, on the same prepared data, with a paired test.

    python -m bench.ab_train --config jobs/configs/train_homedepot.yaml --name batchfix \
        --a "train.shuffle=local train.mask_same_group=false" --b "" \
        --set "train.max_steps=100 train.checkpoint_every=100" --out docs/results/ab/homedepot-batchfix

Prepares the data once (skipped when `<root>/data/manifest.json` exists and --reuse-data), trains
arm A and arm B (run names `<name>-A`, `<name>-B`; the same seed, steps and batch), evaluates
both exports on the config's split with the same systems, and compares them query by query
(`bench.ab_compare`: paired bootstrap and t-test, 95% interval, "within noise" when it is).
Stages can be run apart (`--stages prepare,train` now, `--stages evaluate,compare` later).
`--c` adds a third arm (`<name>-C`), compared with A as B is (a three-point curve, one baseline);
`--arms` runs the train / evaluate stages for some arms only (e.g. `--arms C` once A and B exist).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import time
from pathlib import Path
from typing import Any

from recsys import paths, storage
from recsys.config import Config, load_config

log = logging.getLogger("bench.ab_train")

STAGES = ("prepare", "train", "evaluate", "compare")


def _cfg(args: argparse.Namespace, arm: str | None) -> Config:
    overrides = shlex.split(args.set)
    if arm is not None:
        overrides += shlex.split(getattr(args, arm.lower())) + [f"train.run_name={args.name}-{arm}"]
    return load_config(args.config, overrides)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--name", required=True, help="experiment name (run names <name>-A / <name>-B / <name>-C)")
    p.add_argument("--a", default="", help="overrides of arm A (the baseline), space separated")
    p.add_argument("--b", default="", help="overrides of arm B (the change)")
    p.add_argument("--c", default=None, help="overrides of an optional arm C, also compared with A")
    p.add_argument("--arms", default="", help="arms to train / evaluate (default: all)")
    p.add_argument("--set", default="", help="overrides shared by both arms (budget, root, eval)")
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--reuse-data", action="store_true", help="skip prepare when the data exists")
    p.add_argument("--metrics", default="ndcg@10,recall@10,ndcg@50,recall@50,mrr@10")
    p.add_argument("--system", default="fine_tuned")
    p.add_argument("--out", default="", help="folder for ab.json / ab.md (committed reports)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stages = [s for s in args.stages.split(",") if s]
    out: dict[str, Any] = {"name": args.name, "config": args.config, "a": args.a, "b": args.b, "shared": args.set}
    arms = ["A", "B"] + (["C"] if args.c is not None else [])
    if args.c is not None:
        out["c"] = args.c
    run_arms = [a.strip().upper() for a in args.arms.split(",") if a.strip()] or arms
    if set(run_arms) - set(arms):
        p.error(f"--arms {args.arms}: the arms are {','.join(arms)} (arm C needs --c)")
    base = _cfg(args, None)
    if "prepare" in stages:
        if args.reuse_data and storage.exists(paths.manifest(base), base.storage):
            log.info("data exists at %s: not prepared again", paths.data_dir(base))
        else:
            from recsys.data import prepare

            t = time.perf_counter()
            prepare.run(base)
            out["prepare_s"] = round(time.perf_counter() - t, 1)
    for arm in run_arms:
        cfg = _cfg(args, arm)
        if "train" in stages:
            from recsys import train

            out[f"train_{arm}"] = paths.relative_all(train.run(cfg), cfg)
        if "evaluate" in stages:
            from recsys import evaluate

            res = evaluate.run(cfg)
            out[f"eval_{arm}"] = {"report_dir": paths.relative(cfg, res["report_dir"]), "wall_s": res["wall_s"]}
    markdown = ""
    if "compare" in stages:
        from bench.ab_compare import compare, load_per_query, to_markdown

        a_dir = paths.eval_dir(_cfg(args, "A"))
        a_per_query = load_per_query(a_dir)
        parts = []
        for arm in arms[1:]:
            other = paths.eval_dir(_cfg(args, arm))
            result = compare(a_per_query, load_per_query(other), args.system, args.system,
                             args.metrics.split(","), where=(a_dir, other))
            key = "comparison" if arm == "B" else f"comparison_{arm}"
            out[key] = {**result, "a": paths.relative(base, a_dir), arm.lower(): paths.relative(base, other)}
            parts.append(to_markdown(result, f"A ({args.a or 'defaults'})", f"{arm} ({getattr(args, arm.lower()) or 'defaults'})"))
        markdown = "\n\n".join(parts)
        print(markdown)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        prev = Path(args.out, "ab.json")
        merged = {**(json.loads(prev.read_text()) if prev.exists() else {}), **out}
        prev.write_text(json.dumps(merged, indent=2, default=str))
        if markdown:
            Path(args.out, "ab.md").write_text(f"# A/B: {args.name}\n\nconfig {args.config}, shared overrides `{args.set}`\n\n{markdown}")
    return out


if __name__ == "__main__":
    main()
