"""A/B of domain-adaptive pretraining at equal total compute, with a paired test (issue 19).

    python -m bench.ab_pretrain --config jobs/configs/train_amazon.yaml --name dapt \
        --set "storage.root=runs/ab-amazon train.warmup_steps=10 eval.systems=[fine_tuned] eval.embed_actors=2" \
        --steps 100 --pretrain-share 0.25 --pretrain "pretrain.sources=[items,histories]" \
        --out docs/results/ab/amazon-dapt

Arm A fine-tunes `--steps` two-tower steps from model.name_or_path (the bundled MiniLM). Arm B
first runs masked-LM pretraining (recsys.pretrain) for P steps, then fine-tunes the adapted
encoder for `--steps` - P' steps, where P' is P in two-tower-step equivalents of compute:

    P' = round(P * flops(MLM step) / flops(two-tower step))

FLOPs are counted from the tokens each step actually computes over (padded): for the MLM step,
the tokens the pretrain workers logged; for a two-tower step, the padded query and item lengths
of `--sample-batches` batches drawn from the training examples exactly as `recsys.features`
tokenises them. Per token, forward = 2 x (the encoder's non-embedding parameters) + the
attention scores 4 x layers x length x hidden, and for MLM also the head over every position
2 x (hidden^2 + hidden x vocab) (Hugging Face's BertForMaskedLM scores all positions);
backward = 2 x forward. P is chosen as the largest whose P' stays within `--pretrain-share` of
the budget. Wall-clock per step is recorded beside it (`step_s`), but on a shared 2-core machine
it measures the load, so FLOPs decide. Both arms: the same seed, data, batch and evaluation;
the comparison is `bench.ab_compare` over the test split's queries, paired by key.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
from pathlib import Path
from typing import Any

import numpy as np

from recsys import paths
from recsys.config import Config, load_config

log = logging.getLogger("bench.ab_pretrain")


def encoder_shape(cfg: Config) -> dict[str, int]:
    """Layers, hidden size, vocabulary and non-embedding parameters of model.name_or_path."""
    from transformers import AutoConfig, AutoModel

    from recsys.encoder import resolve_model_path

    path = resolve_model_path(cfg.model.name_or_path)
    mc = AutoConfig.from_pretrained(path)
    model = AutoModel.from_pretrained(path)
    body = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("embeddings.", "pooler.")))
    return {"layers": int(mc.num_hidden_layers), "hidden": int(mc.hidden_size), "vocab": int(mc.vocab_size), "body_params": int(body)}


def token_flops(shape: dict[str, int], length: float, mlm_head: bool) -> float:
    """Forward + backward FLOPs per token of a sequence of `length` tokens."""
    fwd = 2 * shape["body_params"] + 4 * shape["layers"] * length * shape["hidden"]
    if mlm_head:
        fwd += 2 * (shape["hidden"] ** 2 + shape["hidden"] * shape["vocab"])
    return 3.0 * fwd


def two_tower_step_tokens(cfg: Config, batches: int, seed: int = 0) -> dict[str, float]:
    """Mean padded query and item lengths of a training batch (per worker, `train.rows_per_batch`
    rows), sampled from the prepared examples and tokenised as the train workers do."""
    import pyarrow as pa

    from recsys import storage
    from recsys.features import features
    from recsys.items import ItemTable
    from recsys.model import load_tokenizer

    kinds = ["next_item", "search"] if cfg.train.task == "both" else [cfg.train.task]
    table = pa.concat_tables([t for k in kinds if (t := storage.read_parquet_dir(paths.examples(cfg, k, "train"), cfg.storage)) is not None])
    items, tok = ItemTable.load(cfg), load_tokenizer(cfg.model)
    rng = np.random.default_rng(seed)
    rows = cfg.train.rows_per_batch
    q_len, d_len = [], []
    for _ in range(batches):
        take = table.take(rng.choice(table.num_rows, size=rows, replace=False)).to_pydict()
        f = features({k: np.array(v, dtype=object) for k, v in take.items()}, items, tok, cfg)
        q_len.append(max(len(r) for r in f["q_ids"]))
        d_len.append(max(len(r) for r in f["d_ids"]))
    return {"rows": rows, "query_len": float(np.mean(q_len)), "item_len": float(np.mean(d_len))}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--name", required=True, help="experiment name: runs <name>-A, <name>-B, <name>-mlm")
    p.add_argument("--set", default="", help="overrides shared by both arms (root, eval, ...)")
    p.add_argument("--pretrain", default="", help="pretrain.* overrides of arm B (sources, batch, lr, ...)")
    p.add_argument("--steps", type=int, required=True, help="the budget: two-tower steps of arm A")
    p.add_argument("--pretrain-share", type=float, default=0.25, help="share of the budget arm B spends on MLM")
    p.add_argument("--sample-batches", type=int, default=20)
    p.add_argument("--stages", default="prepare,pretrain,train,evaluate,compare",
                   help="prepare is skipped when <root>/data/manifest.json exists")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stages = [s for s in args.stages.split(",") if s]
    shared = shlex.split(args.set) + [f"train.max_steps={args.steps}", f"train.checkpoint_every={args.steps}"]
    base = load_config(args.config, shared)
    mlm_cfg = load_config(args.config, shared + shlex.split(args.pretrain) + [f"pretrain.run_name={args.name}-mlm"])

    if "prepare" in stages:
        # Both the FLOP sampling below and the MLM corpus read the prepared data.
        from recsys import storage

        if storage.exists(paths.manifest(base), base.storage):
            log.info("data exists at %s: not prepared again", paths.data_dir(base))
        else:
            from recsys.data import prepare

            prepare.run(base)
    shape = encoder_shape(base)
    tt = two_tower_step_tokens(base, args.sample_batches, base.train.seed)
    world = base.train.num_workers
    tt_flops = world * tt["rows"] * (tt["query_len"] * token_flops(shape, tt["query_len"], False)
                                     + tt["item_len"] * token_flops(shape, tt["item_len"], False))
    # An MLM step's padded length is at most max_tokens; the step count is chosen before the
    # run from that bound, and the ratio is re-computed from the tokens the run logged.
    mlm_world = mlm_cfg.pretrain.num_workers  # pretrain has its own worker count
    mlm_bound = mlm_world * mlm_cfg.pretrain.batch_size * mlm_cfg.pretrain.max_tokens * token_flops(shape, mlm_cfg.pretrain.max_tokens, True)
    budget = args.pretrain_share * args.steps * tt_flops
    mlm_steps = max(1, int(budget // mlm_bound))
    out: dict[str, Any] = {"name": args.name, "config": args.config, "shared": args.set, "pretrain_overrides": args.pretrain,
                           "budget_steps": args.steps, "encoder": shape, "two_tower_step": {**tt, "flops": tt_flops}}
    prev = Path(args.out, "ab.json") if args.out else None
    if prev is not None and prev.exists():
        out = {**json.loads(prev.read_text()), **out}
    mlm_cfg = load_config(args.config, shared + shlex.split(args.pretrain) + [f"pretrain.run_name={args.name}-mlm", f"pretrain.steps={mlm_steps}"])
    if "pretrain" in stages:
        from recsys import pretrain

        out["pretrain"] = paths.relative_all(pretrain.run(mlm_cfg), mlm_cfg)
    from recsys import pretrain

    rows = pretrain.read_metrics(mlm_cfg)
    if not rows:
        raise SystemExit(f"no pretraining metrics under {paths.pretrain_dir(mlm_cfg)}: run the pretrain stage first")
    tokens = rows[-1]["tokens_total"]
    mean_len = tokens / (rows[-1]["step"] * mlm_world * mlm_cfg.pretrain.batch_size)
    mlm_flops_total = tokens * token_flops(shape, mean_len, True)
    equiv = mlm_flops_total / tt_flops
    ft_b = args.steps - round(equiv)  # P' = round(...), as documented
    out["compute"] = {
        "mlm_steps": rows[-1]["step"], "mlm_tokens": tokens, "mlm_mean_padded_len": mean_len,
        "mlm_flops": mlm_flops_total, "mlm_step_flops": mlm_flops_total / rows[-1]["step"],
        "mlm_steps_in_two_tower_steps": equiv, "fine_tune_steps_A": args.steps, "fine_tune_steps_B": ft_b,
        "flops_A": args.steps * tt_flops, "flops_B": ft_b * tt_flops + mlm_flops_total,
        "mlm_step_s_median": float(np.median([r["step_s"] for r in rows])),
    }
    log.info("compute: %s", out["compute"])
    b = f"model.name_or_path={paths.pretrained(mlm_cfg)} train.max_steps={ft_b} train.checkpoint_every={ft_b}"
    ab_stages = ",".join(s for s in stages if s in ("train", "evaluate", "compare"))
    if ab_stages:
        from bench import ab_train

        res = ab_train.main(["--config", args.config, "--name", args.name, "--a", "", "--b", b, "--set", " ".join(shlex.quote(s) for s in shared),
                             "--stages", ab_stages, *(["--out", args.out] if args.out else [])])
        out.update({k: v for k, v in res.items() if k.startswith(("train_", "eval_", "comparison"))})
        for arm in ("A", "B"):
            from recsys import storage

            arm_cfg = load_config(args.config, shared + [f"train.run_name={args.name}-{arm}"] + (shlex.split(b) if arm == "B" else []))
            try:
                mrows = [json.loads(x) for x in storage.read_bytes(paths.metrics_file(arm_cfg), arm_cfg.storage).decode().splitlines() if x]
                out.setdefault("compute", {})[f"two_tower_examples_per_s_{arm}"] = float(np.median([r["examples_per_s"] for r in mrows]))
            except (FileNotFoundError, OSError):
                pass
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        merged = {**(json.loads(prev.read_text()) if prev is not None and prev.exists() else {}), **out}
        prev_path = Path(args.out, "ab.json")
        prev_path.write_text(json.dumps(merged, indent=2, default=str))
        Path(args.out, "pretrain_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(json.dumps(out.get("compute"), indent=2))
    return out


if __name__ == "__main__":
    main()
