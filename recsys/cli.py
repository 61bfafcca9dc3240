"""`recsys <stage> [--config FILE] [overrides...]`: the same jobs as `python -m jobs.<stage>`."""

from __future__ import annotations

import importlib
import sys

STAGES = ("prepare", "train", "evaluate", "build_index", "deploy", "pipeline", "demo")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0].replace("-", "_") not in STAGES:
        print(f"usage: recsys {{{','.join(STAGES)}}} [--config FILE] [section.key=value ...]")
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    stage = argv[0].replace("-", "_")
    module = importlib.import_module(f"jobs.{stage}")
    module.main(argv[1:])


if __name__ == "__main__":
    main()
