#!/usr/bin/env bash
# Everything that needs a GPU, in one command for a one-GPU machine (under 8 minutes on an H100):
#   1. the GPU tests (tests/gpu/: gloo ranks sharing cuda:0 on the Triton and the ATen kernels, a
#      one-rank NCCL group, torchvision/timm models where they import,
#      CUDA graphs, torch.compile, the compiled per-channel steps);
#   2. the GPU benchmark (scripts/bench/bench_gpu.py: per-layer times, kernel launches, ResNet-50
#      step).
# Needs only torch with CUDA, pytest and (for the ResNet-50 step) torchvision: no hydra, no wandb.
# Writes results/gpu/{env.json,tests.log,tests.xml,bench_gpu.json,bench.log} (OUT=dir to change)
# and prints a short table last. Exit code: non-zero when a test failed or the benchmark broke.
# TESTS_TIMEOUT / BENCH_TIMEOUT (seconds; default 360 / 300) bound the two parts; COMPILE_MODEL=1
# also times the ResNet-50 step under torch.compile (a few minutes more).
#
#   bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-results/gpu}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=disabled
PY="${PYTHON:-python3}"

"$PY" - "$OUT/env.json" <<'EOF'
import json, sys, torch
info = {
    "torch": torch.__version__,
    "cuda": torch.version.cuda,
    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None,
}
json.dump(info, open(sys.argv[1], "w"), indent=2)
print("gpu_check:", info)
if not torch.cuda.is_available():
    sys.exit("gpu_check.sh expected a CUDA GPU (got none)")
EOF
[ $? -eq 0 ] || exit 2

started=$(date +%s)
timeout "${TESTS_TIMEOUT:-360}" "$PY" -m pytest tests/gpu -q -rs \
    -p no:cacheprovider -o addopts="" --durations=12 --junitxml="$OUT/tests.xml" 2>&1 | tee "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}
timeout "${BENCH_TIMEOUT:-300}" "$PY" scripts/bench/bench_gpu.py --out "$OUT/bench_gpu.json" ${COMPILE_MODEL:+--compile-model} 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}

echo
echo "================ gpu_check summary ($(($(date +%s) - started)) s) ================"
grep -E "^[0-9]+ (passed|failed)|passed|failed" "$OUT/tests.log" | tail -1
"$PY" - "$OUT/bench_gpu.json" <<'EOF'
import json, os, sys
if not os.path.exists(sys.argv[1]):
    sys.exit("no benchmark results")
r = json.load(open(sys.argv[1]))
print(f"{r['device_name']}, torch {r['torch']}, {r['date']}")
print("| config | shape | Triton ms | / cuDNN BN | / torch SyncBN | / ATen set | GPU us | 8 passes us "
      "| kernels Triton/ATen/compiled steps/torch/cuDNN |")
for row in r["layers"]:
    print(f"| {row['config']} | {tuple(row['shape'])} | {row['syncbn_ms']:.3f} "
          f"| {row['syncbn_over_cudnn']:.2f} | {row['syncbn_over_torch_syncbn']:.2f} "
          f"| {row['syncbn_over_aten']:.2f} | {row['syncbn_gpu_us']} | {row['eight_passes_us']:.1f} "
          f"| {row['syncbn_kernels']}/{row['syncbn_aten_kernels']}/"
          f"{row['syncbn_compiled_steps_kernels']}/{row['torch_syncbn_kernels']}/"
          f"{row['cudnn_bn_kernels']} |")
print("ATen per-channel steps compiled:", r.get("steps_compiled"))
steps = r["resnet50_step"]
if isinstance(steps, str):
    print("ResNet-50 step:", steps)
else:
    base = {(s["precision"], s["norm"]): s for s in steps}
    for s in steps:
        g = s["graphed_ms"]
        g = f"{g:.1f} ms" if isinstance(g, float) else g
        cudnn = base[(s["precision"], "cudnn_bn")]["eager_ms"]
        torch_sbn = base[(s["precision"], "torch_syncbn")]["eager_ms"]
        print(f"ResNet-50 step ({s['batch']} images, {s['precision']}) {s['norm']}: "
              f"eager {s['eager_ms']:.1f} ms ({s['eager_ms'] / cudnn:.2f}x cuDNN, "
              f"{s['eager_ms'] / torch_sbn:.2f}x torch SyncBN), CUDA graph {g}, "
              f"compiled {s.get('compiled_ms')} (Triton custom ops: {s.get('compiled_triton_ms')})")
EOF
echo "tests exit $tests_rc, benchmark exit $bench_rc"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
