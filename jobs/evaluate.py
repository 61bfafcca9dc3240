"""Evaluate the fine-tuned model against popularity, BM25 and the zero-shot encoder; write the report.

    python -m jobs.evaluate --config jobs/configs/train_local.yaml [eval.split=test ...]
"""

from __future__ import annotations

from collections.abc import Sequence

from jobs._cli import parse


def main(argv: Sequence[str] | None = None) -> dict:
    cfg = parse(argv, "Evaluate and write the transfer report")
    from recsys import evaluate

    result = evaluate.run(cfg)
    print(result["markdown"])
    print(f"report: {result['report_dir']}/report.{{json,md,png}}")
    return result


if __name__ == "__main__":
    main()
