"""Prepare data: validate raw logs (quarantine), build items, duplicate groups and examples.

    python -m jobs.prepare --config jobs/configs/prepare_tiny.yaml [section.key=value ...]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jobs._cli import parse


def summary(manifest: dict[str, Any]) -> str:
    """A few human lines: rows in/kept/quarantined (per reason), examples, where things are."""
    c = manifest["counts"]
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(c["quarantined_by_reason"].items())) or "none"
    cat_reasons = ", ".join(f"{k}={v}" for k, v in sorted(c["catalog_quarantined_by_reason"].items())) or "none"
    examples = ", ".join(f"{k}={v}" for k, v in c["examples"].items())
    return "\n".join(
        [
            f"events:   {c['rows_in']} in, {c['rows_kept']} kept, {c['rows_quarantined']} quarantined ({reasons}); "
            f"{c.get('rows_in_files', '?')} rows in {c.get('event_files', '?')} file(s), {c.get('blank_lines', 0)} blank lines",
            f"catalog:  {c['catalog_rows_in']} in, {c['catalog_rows_kept']} kept, "
            f"{c['catalog_rows_quarantined']} quarantined ({cat_reasons}); {c.get('catalog_rows_in_files', '?')} rows in "
            f"{c.get('catalog_files', '?')} file(s), {c.get('catalog_blank_lines', 0)} blank lines",
            f"users {c['users']}, sessions {c['sessions']}, items {c['items']}",
            f"examples: {examples}",
            f"manifest: {manifest['paths']['manifest']}  ({manifest['wall_s']} s)",
        ]
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cfg = parse(argv, __doc__)
    from recsys.data import prepare

    manifest = prepare.run(cfg)
    print(summary(manifest))
    return manifest


if __name__ == "__main__":
    main()
