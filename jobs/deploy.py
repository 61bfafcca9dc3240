"""Deploy the Serve app on the run's exported model and index; returns once it is ready.

The index is used only if it records the export's model_id (built by jobs.index from this
export); one built by another model is refused with both identities named. Without an index each
replica embeds the catalog at start-up. Deploying again after retraining to the same path
serves the new weights: the deployment is keyed by the model's identity, not its path.

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
    cfg = parse(argv, __doc__)
    from serve.control import deploy

    out = deploy(cfg)
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
