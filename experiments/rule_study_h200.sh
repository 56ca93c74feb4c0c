#!/usr/bin/env bash
# Issue 13's GPU study in a few device calls on one held machine; the runs go on in the
# background between calls (setsid) and live under $STUDY, outside the synced working tree.
#   bash experiments/rule_study_h200.sh start   # smoke checks; small float x3 (+ lr 1e-3, old) and the tiny
#                                               # sweep (seed 0) at once; then the sweep's best rule on small
#                                               # x3 and tiny best/old/float x3
#   bash experiments/rule_study_h200.sh wait    # wait (up to WAIT_S in all), then report
# Every call ends with the current reports and log tarballs under $OUT.
set -uo pipefail
OUT="${OUT:-study_logs}"
STUDY="${STUDY:-/tmp/study}"
WAIT_S="${WAIT_S:-540}"
mkdir -p "$OUT" "$STUDY"
export PYTHONPATH=.
export PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=2
TINY=(--root "$STUDY/tiny" --preset tiny --steps 1221 --batch-size 64 --seq-len 256 --eval-every 100 --eval-windows 512)
SMALL=(--root "$STUDY/small" --preset small --steps 3052 --batch-size 32 --seq-len 512 --eval-every 200 --eval-windows 512)
SWEEP=old,ramp24-64,ramp16-64,ramp32-64,const32,cool24-64,cool16-64,ema5,ema3,scale32,scale127,scale0,float,float-lr1e-3,float-lr4e-3

report() {
    for size in tiny small; do
        steps=1221; [ "$size" = small ] && steps=3052
        [ -d "$STUDY/$size" ] && python3 experiments/rule_study.py report --root "$STUDY/$size" --steps "$steps" \
            --out "$OUT" --name "rule_study_${size}_h200" 2>&1
    done
    cat "$STUDY"/launch_*.log > "$OUT/rule_study_launch_h200.log" 2>/dev/null
}

wait_all() {  # until no launcher runs, or WAIT_S
    local t=0
    while pgrep -f "rule_study.py run" > /dev/null && [ "$t" -lt "$WAIT_S" ]; do sleep 10; t=$((t + 10)); done
    echo "waited ${t} s; launchers still running: $(pgrep -fc 'rule_study.py run')"
}

launch() {  # name, then rule_study run arguments
    local name="$1"; shift
    setsid nohup python3 experiments/rule_study.py "$@" >> "$STUDY/launch_$name.log" 2>&1 < /dev/null &
}

case "${1:-start}" in
    start)
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
        python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
        date -u | tee -a "$OUT/device.txt"
        # The captured step with a moving θ, and a short captured training run with evaluations, first.
        timeout 240 python3 -m pytest tests/test_cuda_training.py -m cuda -k "captured or synchronise" -q -p no:cacheprovider 2>&1 | tail -4
        timeout 240 python3 -m ternary_graph.cli train --preset tiny --steps 30 --batch-size 64 --seq-len 256 \
            --eval-every 10 --eval-windows 32 --cuda-graph --no-progress --out "$STUDY/smoke" > "$OUT/smoke.log" 2>&1
        rc=$?; tail -12 "$OUT/smoke.log"
        if [ $rc -ne 0 ]; then echo "smoke run failed ($rc): not launching"; exit 1; fi
        launch small run "${SMALL[@]}" --variants float --seeds 0,1,2 --parallel 3
        launch small_check run "${SMALL[@]}" --variants float-lr1e-3,old --seeds 0 --parallel 2
        launch tiny run "${TINY[@]}" --variants "$SWEEP" --seeds 0 --parallel 8
        sleep 30
        while pgrep -f "root $STUDY/tiny" > /dev/null && [ "$SECONDS" -lt "$WAIT_S" ]; do sleep 5; done
        best=$(python3 experiments/rule_study.py best --root "$STUDY/tiny" --steps 1221)
        echo "tiny sweep done after $SECONDS s; best rule: $best" | tee "$OUT/best.txt"
        python3 experiments/rule_study.py report --root "$STUDY/tiny" --steps 1221
        launch small_best run "${SMALL[@]}" --variants "$best" --seeds 0,1,2 --parallel 3
        launch tiny_final run "${TINY[@]}" --variants "$best,old,float" --seeds 1,2 --parallel 6
        WAIT_S=$((WAIT_S - SECONDS)) wait_all
        ;;
    wait)
        wait_all
        ;;
esac
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
report
