"""`recsys <stage> [--config FILE] [overrides...]`: the same jobs as `python -m jobs.<stage>`.

The stages are the job modules in jobs/ (every public module with a `main`), found when the
command runs, so this list cannot drift from the jobs that exist. `recsys <stage> --help`
prints that job's own usage.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
import sys
from pathlib import Path

# Only the order stages are listed in (the flow of a run); which stages exist comes from jobs/.
_FLOW = ("prepare", "pretrain", "train", "evaluate", "index", "recommend", "deploy", "pipeline", "demo")


def stages() -> dict[str, str]:
    """Stage name -> the first line of its module docstring, for every job in jobs/.

    Read from the source (not imported) so `recsys --help` stays instant."""
    import jobs

    found: dict[str, str] = {}
    for mod in pkgutil.iter_modules(jobs.__path__):
        if mod.name.startswith("_") or mod.ispkg:
            continue
        spec = importlib.util.find_spec(f"jobs.{mod.name}")
        if spec is None or spec.origin is None:
            continue
        tree = ast.parse(Path(spec.origin).read_text())
        if not any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body):
            continue
        doc = (ast.get_docstring(tree) or "").strip()
        found[mod.name] = " ".join(doc.split("\n\n")[0].split())  # its first paragraph
    order = {s: i for i, s in enumerate(_FLOW)}
    return dict(sorted(found.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


def usage(known: dict[str, str]) -> str:
    width = max(map(len, known), default=0)
    lines = [
        f"usage: recsys {{{','.join(known)}}} [--config FILE] [section.key=value ...]",
        "       recsys <stage> --help     that stage's options and launch examples",
        "",
        "stages (`python -m jobs.<stage>` runs the same job):",
        *(f"  {name:<{width}}  {doc}" for name, doc in known.items()),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    known = stages()
    if argv and argv[0] in ("-h", "--help"):
        sys.stdout.write(usage(known))
        sys.exit(0)
    if not argv:
        sys.stderr.write(usage(known))
        sys.exit(2)
    stage = argv[0].replace("-", "_")
    if stage not in known:
        sys.stderr.write(f"recsys: unknown stage {argv[0]!r}; choose from {', '.join(known)}\n\n{usage(known)}")
        sys.exit(2)
    module = importlib.import_module(f"jobs.{stage}")
    # The job's parser names itself after argv[0]: `recsys train: error: ...`, `usage: recsys train`.
    argv0 = sys.argv[0]
    sys.argv[0] = f"recsys {stage}"
    try:
        module.main(argv[1:])
    finally:
        sys.argv[0] = argv0


if __name__ == "__main__":
    main()
