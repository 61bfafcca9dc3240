"""Domain-adaptive pretraining: masked-LM continued pretraining of model.name_or_path on the shop's
catalog texts and training queries / histories (Ray Train + DeepSpeed), writing the adapted
encoder (no MLM head) to <root>/<pretrain.run_name>/model for train to read as model.name_or_path.

    python -m jobs.pretrain --config jobs/configs/pretrain_homedepot.yaml [section.key=value ...]
    ray job submit --working-dir . -- python -m jobs.pretrain --config jobs/configs/pretrain_homedepot.yaml
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from jobs._cli import parse


def main(argv: Sequence[str] | None = None) -> dict:
    cfg = parse(argv, __doc__)
    from recsys import pretrain

    summary = pretrain.run(cfg)
    print(json.dumps(summary, indent=2, default=str))
    print(f"adapted encoder written to {summary['output']}: train it with model.name_or_path={summary['output']}")
    return summary


if __name__ == "__main__":
    main()
