"""Deploy the Serve app on the run's exported model and index; returns once it is ready.

    python -m jobs.deploy --config jobs/configs/train_local.yaml serve.port=8000
    ray job submit --working-dir . -- python -m jobs.deploy --config jobs/configs/train_cluster.yaml

On a cluster the application keeps running after this job ends (Serve's controller is a
detached actor); `serve status` shows it and `serve shutdown` stops it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from jobs._cli import parse


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cfg = parse(argv, "Deploy the scoring and retrieval service")
    from serve.app import deploy

    out = deploy(cfg)
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
