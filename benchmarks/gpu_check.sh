#!/usr/bin/env bash
# One prepared command for a lent GPU machine (bare image: torch, pytorch-lightning, timm, ... but not steel's
# other dependencies, which travel as wheels in .gpu-wheels/, see `make gpu-wheels`):
#   1. installs the wheels into a target dir (no network there),
#   2. the `gpu`-marked tests (tests/test_gpu.py): tiny fit with bf16-mixed and 16-mixed on CUDA, `steel launch
#      --gpus 0` with 2 folds queued on one GPU, export + `steel predict --device cuda` with parity against CPU,
#   3. benchmarks/bench_train.py --cuda  (Unet/FPN efficientnet-b3, 256x512 crops, batch 16, bf16, NHWC on/off),
#   4. benchmarks/bench_predict.py --cuda (resnet34 Unet, 10 folds x 3 TTA, 256x1600, projected to 5,506 images).
# Every step has its own time limit (about 8 minutes in all); each step's output is saved under $OUT as it runs,
# so the figures come back even when a later step fails or the call is cut off.
#
#   benchmarks/gpu_check.sh                # on the GPU machine (device tool: carry .gpu-wheels)
#   benchmarks/gpu_check.sh --cpu-dry-run  # here: the same steps at toy sizes on the CPU (tests/test_gpu_check.py)
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
case "${1:-}" in
  --cpu-dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: benchmarks/gpu_check.sh [--cpu-dry-run]" >&2; exit 2 ;;
esac
OUT=${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
T0=$(date +%s)
export WANDB_MODE=disabled PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# step NAME LIMIT_S CMD...: run CMD with a time limit, its output to the terminal and $OUT/NAME.log
step() {
  local name=$1 limit=$2; shift 2
  local t=$(date +%s) rc
  echo "=== $name (limit ${limit}s): $*" | tee "$OUT/$name.log"
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  local msg="$name: rc=$rc, $(( $(date +%s) - t )) s"
  [ "$rc" = 124 ] && msg="$msg (time limit)"
  echo "$msg" | tee -a "$SUMMARY"
  return 0
}

if [ $DRY = 0 ]; then
  if ls .gpu-wheels/*.whl >/dev/null 2>&1; then
    SITE=/tmp/steel-site
    step wheels 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" .gpu-wheels/*.whl
    export PYTHONPATH=$SITE
  else
    echo "gpu_check: no .gpu-wheels/*.whl (run \`make gpu-wheels\` here and carry .gpu-wheels)" | tee -a "$SUMMARY"
  fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

step env 60 "$PY" - <<'PY'
import importlib, platform, subprocess, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, bf16 {torch.cuda.is_bf16_supported()}")
    print(subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip())
for m in ("pytorch_lightning", "timm", "segmentation_models_pytorch", "albumentations", "optuna", "jsonargparse",
          "submitit", "iterstrat", "torchmetrics", "onnxruntime", "steel"):
    mod = importlib.import_module(m)
    print(f"{m} {getattr(mod, '__version__', '?')}")
PY

if [ $DRY = 0 ]; then
  step tests 200 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py -rs --durations=5
  step bench_train 120 "$PY" benchmarks/bench_train.py --cuda --n-images 64
  step bench_predict 120 "$PY" benchmarks/bench_predict.py --cuda --measure-n 128 --repeats 2 --batch 8
else
  step tests 600 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py -rs
  step bench_train 600 "$PY" benchmarks/bench_train.py --device cpu --models Unet:resnet18 --batch 2 \
    --crop 64 128 --n-images 8 --height 64 --width 320 --steps 1 --warmup 1 --rounds 1 --channels-last both \
    --workers 1 --repeats 1
  step bench_predict 600 "$PY" benchmarks/bench_predict.py --large --device cpu --measure-n 2 --large-n 10 \
    --large-size 64 320 --folds 2 --tta none,hflip --encoder resnet18 --repeats 1 --batch 2
fi
echo "gpu_check: $(( $(date +%s) - T0 )) s in all; logs in $OUT" | tee -a "$SUMMARY"
