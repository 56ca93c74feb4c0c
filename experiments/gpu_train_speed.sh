#!/usr/bin/env bash
# Issue 12's GPU evidence in one device call (logs under $OUT):
#   bash experiments/gpu_train_speed.sh
# 1. the CUDA tests of the grouped experts, the linear kernels and the GPU training step,
# 2. bench_linear (backward: dX + votes against bf16 dX + dW), 3. bench_train (all presets).
set -uo pipefail
OUT="${OUT:-gpu_logs}"
mkdir -p "$OUT"
export PYTHONPATH=.
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton, torch_geometric; print('torch', torch.__version__, 'triton', triton.__version__, 'pyg', torch_geometric.__version__)" | tee -a "$OUT/device.txt"
timeout "${PYTEST_S:-180}" python3 -m pytest ${CUDA_TESTS:-tests/test_grouped_linear.py tests/test_cuda_training.py tests/test_kernels_update.py tests/test_kernels_linear.py} -m cuda -k "${CUDA_K:-not forward and not untuned}" -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest_cuda.log" | tail -15
timeout "${LINEAR_S:-120}" python3 experiments/bench_linear.py --out "$OUT" --shapes 8192x8192,4096x14336 --reps-ms 50 > "$OUT/bench_linear.stdout" 2>&1; tail -12 "$OUT/bench_linear.stdout"
timeout "${TRAIN_S:-300}" python3 experiments/bench_train.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tail -40
