"""The whole pipeline in one job: prepare -> train -> evaluate (which also saves the index),
optionally -> index (embed + index without evaluating) -> deploy (start the Serve app).

    python -m jobs.pipeline --config jobs/configs/pipeline_tiny.yaml [--stages prepare,train] [k=v ...]
    ray job submit --working-dir . -- python -m jobs.pipeline --config jobs/configs/train_cluster.yaml
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

from recsys import storage
from recsys.config import Config, load_config, to_yaml

log = logging.getLogger("jobs.pipeline")
STAGES = ("prepare", "train", "evaluate", "index", "deploy")
DEFAULT_STAGES = ("prepare", "train", "evaluate")


def run_stages(cfg: Config, stages: Sequence[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {"stages": {}, "config": cfg.train.run_name}
    for stage in stages:
        t = time.perf_counter()
        log.info("stage %s starting", stage)
        if stage == "prepare":
            from recsys.data import prepare

            out = prepare.run(cfg)
            result: Any = {"counts": out.get("counts")}
        elif stage == "train":
            from recsys import train

            result = train.run(cfg)
        elif stage == "evaluate":
            from recsys import evaluate

            out = evaluate.run(cfg)
            result = {k: v for k, v in out.items() if k != "markdown"} if isinstance(out, dict) else out
            if isinstance(out, dict) and out.get("markdown"):
                print(out["markdown"])
        elif stage == "index":
            from recsys.evaluate import build_catalog_index

            result = build_catalog_index(cfg)
        elif stage == "deploy":
            from serve.app import deploy

            result = deploy(cfg)
        else:
            raise ValueError(f"unknown stage {stage!r}; choose from {STAGES}")
        wall = round(time.perf_counter() - t, 1)
        summary["stages"][stage] = {"wall_s": wall, "result": result}
        log.info("stage %s done in %.1fs", stage, wall)
    storage.write_json(storage.join(cfg.storage.root, "pipeline.json"), summary, cfg.storage)
    return summary


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="prepare -> train -> evaluate [-> index -> deploy]")
    parser.add_argument("--config")
    parser.add_argument("--stages", default=",".join(DEFAULT_STAGES), help=f"comma-separated, from {STAGES}")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.overrides)
    log.info("resolved config:\n%s", to_yaml(cfg))
    stages = [s for s in args.stages.split(",") if s]
    bad = set(stages) - set(STAGES)
    if bad:
        parser.error(f"unknown stage(s) {sorted(bad)}; choose from {STAGES}")
    summary = run_stages(cfg, stages)
    print(json.dumps(summary, indent=2, default=str))
    return summary


if __name__ == "__main__":
    main()
