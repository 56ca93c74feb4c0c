#!/usr/bin/env bash
# Everything this project claims about CUDA, in one device call:
#   bash experiments/gpu_suite.sh            (on the GPU machine, from the repo root; logs in $OUT or ./gpu_logs)
# 1. every CUDA-marked test, 2. default_3b memory and step time, 3. MoEGraph routing benchmark.
set -uo pipefail
OUT="${OUT:-gpu_logs}"
mkdir -p "$OUT"
export PYTHONPATH=.
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton, torch_geometric; print('torch', torch.__version__, 'triton', triton.__version__, 'pyg', torch_geometric.__version__)" | tee -a "$OUT/device.txt"
timeout 240 python3 -m pytest tests -m cuda -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest_cuda.log" | tail -15
timeout 200 python3 experiments/memory_3b.py --json "$OUT/memory_3b.json" 2>&1 | tee "$OUT/memory_3b.log" | tail -15
timeout 120 python3 experiments/bench_moegraph.py --json "$OUT/bench_moegraph.json" 2>&1 | tee "$OUT/bench_moegraph.log" | tail -20
