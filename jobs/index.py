"""Embed the catalog with the exported model (Ray Data actor pool) and save the retrieval index.

    python -m jobs.index --config jobs/configs/train_local.yaml
    ray job submit --working-dir . -- python -m jobs.index --config jobs/configs/train_cluster.yaml
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from jobs._cli import parse


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cfg = parse(argv, __doc__)
    from recsys.catalog_index import build_catalog_index

    out = build_catalog_index(cfg)
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
