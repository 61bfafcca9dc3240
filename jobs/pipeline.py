"""The whole pipeline in one job: prepare -> [pretrain] -> train -> evaluate (metrics and report) -> index
(the serving index: catalog embeddings by the export, recording its model_id), optionally ->
recommend (batch top-k for every user, jobs.recommend) and deploy (start the Serve app; it
refuses an index another model built). With pretrain.enabled the pretrain stage (masked-LM
domain-adaptive pretraining, jobs.pretrain) runs after prepare, and every later stage reads its
output as model.name_or_path (so evaluate's zero_shot is the adapted encoder before contrastive tuning).

    python -m jobs.pipeline --config jobs/configs/pipeline_tiny.yaml [--stages prepare,train] [k=v ...]
    ray job submit --working-dir . -- python -m jobs.pipeline --config jobs/configs/train_cluster.yaml
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import Any

from jobs import _cli
from recsys import storage
from recsys.config import Config

log = logging.getLogger("jobs.pipeline")
STAGES = ("prepare", "pretrain", "train", "evaluate", "index", "recommend", "deploy")
DEFAULT_STAGES = ("prepare", "train", "evaluate", "index")  # + pretrain after prepare when pretrain.enabled


def default_stages(cfg: Config) -> list[str]:
    stages = list(DEFAULT_STAGES)
    if cfg.pretrain.enabled:
        stages.insert(stages.index("prepare") + 1, "pretrain")
    return stages


def chain_pretrained(cfg: Config) -> Config:
    """cfg with model.name_or_path = the adapted encoder jobs.pretrain wrote (pretrain.enabled)."""
    from recsys import paths
    from recsys.pretrain import META_FILE

    out = paths.pretrained(cfg)
    if not storage.exists(storage.join(out, META_FILE), cfg.storage):
        raise FileNotFoundError(f"pretrain.enabled=true but there is no adapted encoder at {out}: run the pretrain stage "
                                "first (--stages pretrain,...) or set pretrain.enabled=false")
    made_from = storage.read_json(storage.join(out, META_FILE), cfg.storage).get("base_model")
    if made_from != cfg.model.name_or_path:
        # An adapted encoder left by an earlier run with another base model: training on it
        # would silently fine-tune a model other than the one configured.
        raise ValueError(f"pretrain.enabled=true: the adapted encoder at {out} was pretrained from {made_from!r}, not "
                         f"model.name_or_path={cfg.model.name_or_path!r}; rerun the pretrain stage or set another pretrain.run_name")
    log.info("pretrain.enabled: later stages read the adapted encoder %s as model.name_or_path (was %s)", out, cfg.model.name_or_path)
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"name_or_path": out})})


def run_stages(cfg: Config, stages: Sequence[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {"stages": {}, "config": cfg.train.run_name}
    chained = False
    for stage in stages:
        t = time.perf_counter()
        log.info("stage %s starting", stage)
        if cfg.pretrain.enabled and not chained and stage not in ("prepare", "pretrain"):
            cfg, chained = chain_pretrained(cfg), True
        if stage == "prepare":
            from recsys.data import prepare

            out = prepare.run(cfg)
            result: Any = {"counts": out.get("counts")}
        elif stage == "pretrain":
            from recsys import pretrain

            result = pretrain.run(cfg)
        elif stage == "train":
            from recsys import train

            result = train.run(cfg)
        elif stage == "evaluate":
            from recsys import evaluate

            out = evaluate.run(cfg)
            # The tables and the per-pair tests are in the report; the compact summary is printed.
            result = {k: v for k, v in out.items() if k not in ("markdown", "summary", "significance")}
            print(out["summary"])
        elif stage == "index":
            from recsys.catalog_index import build_catalog_index

            result = build_catalog_index(cfg)
        elif stage == "recommend":
            from recsys import recommend

            result = recommend.run(cfg)
        elif stage == "deploy":
            from serve.control import deploy

            result = deploy(cfg)
        else:
            raise ValueError(f"unknown stage {stage!r}; choose from {STAGES}")
        wall = round(time.perf_counter() - t, 1)
        summary["stages"][stage] = {"wall_s": wall, "result": result}
        log.info("stage %s done in %.1fs", stage, wall)
    storage.write_json(storage.join(cfg.storage.root, "pipeline.json"), summary, cfg.storage)
    return summary


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = _cli.parser(__doc__)
    parser.add_argument("--stages", default=None,
                        help=f"comma-separated, from {STAGES}; default {','.join(DEFAULT_STAGES)} (pretrain after prepare when pretrain.enabled)")
    args = parser.parse_args(_cli.argv_list(argv))
    stages = [s for s in args.stages.split(",") if s] if args.stages is not None else []
    bad = set(stages) - set(STAGES)
    if bad:
        parser.error(f"unknown stage(s) {sorted(bad)}; choose from {STAGES}")
    cfg = _cli.load(parser, args)
    if args.stages is None:
        stages = default_stages(cfg)
    summary = run_stages(cfg, stages)
    print(json.dumps(summary, indent=2, default=str))
    return summary


if __name__ == "__main__":
    main()
