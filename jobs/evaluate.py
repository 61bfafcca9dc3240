"""Evaluate the fine-tuned model against popularity, BM25 and the zero-shot encoder; write the report.

    python -m jobs.evaluate --config jobs/configs/train_local.yaml [eval.split=test ...]
"""

from __future__ import annotations

from collections.abc import Sequence

from jobs._cli import parse


def main(argv: Sequence[str] | None = None) -> dict:
    cfg = parse(argv, __doc__)
    from recsys import evaluate

    result = evaluate.run(cfg)
    # The compact table (headline metrics, best in bold, significance vs the baselines); the
    # full one is in report.md, which the summary's last line points to.
    print(result["summary"])
    print(f"report: {result['report_dir']}/report.{{json,md,png}}")
    return result


if __name__ == "__main__":
    main()
