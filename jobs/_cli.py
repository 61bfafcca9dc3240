"""Argument parsing shared by every job entrypoint: `--config FILE` plus `section.key=value` overrides.

`recsys <stage> ...` (recsys/cli.py) and `python -m jobs.<stage> ...` run the same parser; a job's
`--help` shows its module docstring (what it does and how it is launched).
"""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

from recsys.config import Config, ConfigError, load_config, to_yaml

log = logging.getLogger("jobs")

OVERRIDES_HELP = textwrap.fill(
    "Any config field can be overridden as section.key=value (sections: storage, data, model, "
    "train, pretrain, eval, serve, recommend; fields and defaults: recsys/config.py). Text fields take the value "
    "verbatim (model.query_prefix='query: '); numbers, booleans, lists and mappings are read as "
    "YAML (eval.ks=[10,50], train.worker_resources={train: 1}). Unknown keys and out-of-range "
    "values stop the job with the key and the nearest valid name.",
    width=88,
)


def _prog() -> str:
    argv0 = sys.argv[0]
    if argv0.startswith("recsys "):  # set by recsys/cli.py
        return argv0
    path = Path(argv0)
    return f"python -m jobs.{path.stem}" if path.parent.name == "jobs" else path.name


def parser(doc: str | None, default_config: str | None = None) -> argparse.ArgumentParser:
    """A job's parser: its docstring as the description, `--config` and the dotted overrides."""
    p = argparse.ArgumentParser(
        prog=_prog(),
        description=doc,
        epilog=OVERRIDES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        default=default_config,
        metavar="FILE",
        help=f"YAML config (see jobs/configs/){f'; default {default_config}' if default_config else ''}",
    )
    p.add_argument(
        "overrides", nargs="*", metavar="section.key=value",
        help="dotted overrides, e.g. train.lr=1e-5 model.pooling=cls",
    )
    return p


def argv_list(argv: Sequence[str] | None) -> list[str]:
    return list(sys.argv[1:] if argv is None else argv)


def load(p: argparse.ArgumentParser, args: argparse.Namespace) -> Config:
    """Set up logging and load the config; a config error exits with its message (status 2)."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    log.info("resolved config (%s):\n%s", args.config or "defaults", to_yaml(cfg))
    return cfg


def parse(argv: Sequence[str] | None, doc: str | None) -> Config:
    p = parser(doc)
    return load(p, p.parse_args(argv_list(argv)))
