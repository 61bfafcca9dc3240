#!/usr/bin/env bash
# Prepare, on a machine that reaches PyPI, what bench/gpu_run.sh installs on a GPU machine that
# reaches nothing: wheels of the Python packages its image lacks (Python 3.12, x86-64), pinned to
# the versions of this checkout's venv, and MiniLM's config + tokenizer (its 90 MB weights are too
# big to carry; the bench then trains a random-weight MiniLM of the same shape).
#
#     bash bench/gpu_prepare.sh            # writes .whl/gpu-bench/ (git-ignored, ~4 MB)
#
# Then carry ".whl/gpu-bench" with the device run (see bench/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=.whl/gpu-bench
rm -rf "$DEST" && mkdir -p "$DEST"

ver() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
# What the GPU image lacks for `import recsys.train` + deepspeed (checked against its package
# list, /work/.library/device/KINDS.md): pydantic (+ its core and helpers), deepspeed, hjson.
# typing-extensions travels too: pydantic needs a recent one, the image's version is unknown.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$DEST" \
  "pydantic==$(ver pydantic)" "pydantic-core==$(ver pydantic_core)" "annotated-types==$(ver annotated_types)" \
  "typing-inspection==$(ver typing_inspection)" "typing-extensions==$(ver typing_extensions)" "hjson==$(ver hjson)"
# DeepSpeed ships only a source archive; its wheel is pure Python (ops are JIT-built when used,
# and the bench uses none: torch AdamW, no shared-memory comm op), so one built here runs there.
"$PY" -m pip wheel -q --no-deps -w "$DEST" "deepspeed==$(ver deepspeed)"

MINILM=$("$PY" -c "from recsys.encoder import bundled_model_path; print(bundled_model_path())")
mkdir -p "$DEST/minilm-config"
for f in config.json tokenizer.json tokenizer_config.json special_tokens_map.json vocab.txt; do
  [ -f "$MINILM/$f" ] && cp "$MINILM/$f" "$DEST/minilm-config/"
done
ls -la "$DEST" "$DEST/minilm-config"
du -sh "$DEST"
