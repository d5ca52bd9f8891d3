#!/usr/bin/env bash
# Every GPU figure of the project in one run, into one JSON ($OUT/gpu_suite.json): about 6-8 minutes
# on one H100/H200. Needs only the checkout, MNIST's four .gz files in data/MNIST/raw/ and the
# baselines' wheels in .whl/ (both git-ignored: copy them in and carry them), e.g. with the device tool:
#
#   mkdir -p data/MNIST/raw && cp ../shared/data/MNIST/raw/*.gz data/MNIST/raw/
#   pip download --no-deps -d .whl PyHessian==0.1 curvlinops-for-pytorch==3.0.1 backpack-for-pytorch==1.7.1 \
#       einconv==0.1.0 einops linear_operator mpmath opt_einsum tqdm unfoldNd
#   run: bash benchmarks/gpu_suite.sh          (carry: .whl, data)
#
# Parts (each under its own time limit, so one failure does not cost the others):
#   hessian     HVP / gradient (eager and compiled) and top-1/top-5 vs PyHessian and curvlinops (benchmarks/hessian.py)
#   throughput  MNIST-FC epoch: overparam vs a bare LightningModule vs the hand-written loop, with and
#               without CUDA graphs (benchmarks/train_throughput.py)
#   ensemble    K = 16 vmapped members vs 16 separate runs on 60k points (benchmarks/ensemble.py)
#   full_batch  full-batch GD steps/s through the Trainer vs a hand-written loop (benchmarks/full_batch.py)
# DEVICE=cpu QUICK=1 bash benchmarks/gpu_suite.sh checks the script's plumbing on a CPU in a few minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_suite_out}"
DEVICE="${DEVICE:-cuda}"
QUICK="${QUICK:-0}"
mkdir -p "$OUT"
export OVERPARAM_DATA_DIR="${OVERPARAM_DATA_DIR:-$PWD/data}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python}"
log() { echo "[gpu_suite $(date +%H:%M:%S)] $*"; }

if ! $PY -c "import overparam" 2>/dev/null; then
  log "installing overparam (editable, no dependencies)"
  $PY -m pip install -q --no-deps --no-build-isolation -e . || log "install failed"
fi
BASELINE=""
if ls .whl/*.whl >/dev/null 2>&1; then
  if [ ! -x .gpu/venv-bench/bin/python ]; then
    log "baselines venv (PyHessian, curvlinops) from .whl/ on top of this torch"
    $PY -m venv --system-site-packages .gpu/venv-bench && .gpu/venv-bench/bin/pip install -q --no-deps --no-index .whl/*.whl
  fi
  [ -x .gpu/venv-bench/bin/python ] && BASELINE="--baseline-python .gpu/venv-bench/bin/python"
else
  log "no .whl/: the hessian part runs without PyHessian and curvlinops"
fi

if [ "$QUICK" = 1 ]; then
  HESSIAN_ARGS="--models mlp --hvp-only"; THROUGHPUT_ARGS="--mnist-n-train 4096 --repeats 1"
  ENSEMBLE_ARGS="--points 2048 --members 4 --epochs 2"; FULL_ARGS="--steps 300 --repeats 1"
  METHODS="overparam manual16 resident"
else
  HESSIAN_ARGS="--compile --full"; THROUGHPUT_ARGS="--repeats 3"
  ENSEMBLE_ARGS="--points 60000"; FULL_ARGS="--steps 5000 --repeats 3"
  METHODS="overparam lightning manual16 resident resident-graphs"
fi

part() {  # name, time limit (s), command...
  local name=$1 limit=$2; shift 2
  log "$name: $*"
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  log "$name: exit $rc after $((SECONDS - start)) s"
  echo "$rc $((SECONDS - start))" > "$OUT/$name.status"
}

part hessian 240 $PY benchmarks/hessian.py --device "$DEVICE" $HESSIAN_ARGS $BASELINE --json "$OUT/hessian.json"
part throughput 150 $PY benchmarks/train_throughput.py --device "$DEVICE" --tasks mnist --methods $METHODS $THROUGHPUT_ARGS --json "$OUT/throughput.json"
part ensemble 120 $PY benchmarks/ensemble.py --device "$DEVICE" $ENSEMBLE_ARGS --json "$OUT/ensemble.json"
part full_batch 90 $PY benchmarks/full_batch.py --device "$DEVICE" $FULL_ARGS --json "$OUT/full_batch.json"

$PY - "$OUT" <<'EOF'
import json, os, platform, subprocess, sys
out = sys.argv[1]
import torch
suite = {"python": platform.python_version(), "torch": torch.__version__,
         "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "parts": {}}
for name in ("hessian", "throughput", "ensemble", "full_batch"):
    rc, seconds = open(os.path.join(out, f"{name}.status")).read().split()
    path = os.path.join(out, f"{name}.json")
    entry = {"exit": int(rc), "seconds": int(seconds), "results": json.load(open(path)) if os.path.exists(path) else None}
    if entry["results"] is None:
        entry["log_tail"] = open(os.path.join(out, f"{name}.log")).read()[-3000:]
    suite["parts"][name] = entry
json.dump(suite, open(os.path.join(out, "gpu_suite.json"), "w"), indent=1)
print(json.dumps({k: (v["exit"], v["seconds"]) for k, v in suite["parts"].items()}))
EOF
log "wrote $OUT/gpu_suite.json"
