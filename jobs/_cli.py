"""Argument parsing shared by every job entrypoint: `--config FILE` plus `section.key=value` overrides."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from recsys.config import Config, load_config, to_yaml

log = logging.getLogger("jobs")


def parse(argv: Sequence[str] | None, description: str) -> Config:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML config (see jobs/configs/)")
    parser.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-5 model.pooling=cls"
    )
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    cfg = load_config(args.config, args.overrides)
    log.info("resolved config (%s):\n%s", args.config or "defaults", to_yaml(cfg))
    return cfg
