"""Fine-tune the two-tower model with Ray Train + DeepSpeed.

    python -m jobs.train --config jobs/configs/train_local.yaml [section.key=value ...]
    ray job submit --working-dir . -- python -m jobs.train --config jobs/configs/train_cluster.yaml
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from jobs._cli import parse


def main(argv: Sequence[str] | None = None) -> dict:
    cfg = parse(argv, __doc__)
    from recsys import train

    summary = train.run(cfg)
    print(json.dumps(summary, indent=2, default=str))
    print(f"model exported to {summary['export']}")
    return summary


if __name__ == "__main__":
    main()
