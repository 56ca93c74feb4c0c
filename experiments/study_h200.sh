#!/usr/bin/env bash
# The GPU studies of issues 13 and 14 in a few device calls on one held machine. The runs go on
# in the background between calls (setsid) and live under $STUDY, outside the synced working
# tree; every call ends with the current reports and log tarballs under $OUT.
#   bash experiments/study_h200.sh rule       # issue 13: smoke checks; small float x3 (+ lr 1e-3, old) and the
#                                             # tiny rule sweep (seed 0) at once; then the sweep's best rule on
#                                             # small x3 and tiny best/old/float x3
#   bash experiments/study_h200.sh rule-small # issue 13 on the small preset itself: old and four
#                                             # higher-θ rules (seed 0) and graph-learned-vq seed 0 (issue 14's
#                                             # (a)) at once; `wait` until they end
#   bash experiments/study_h200.sh routing-old  # the ablation again under rule old (6 small runs)
#   bash experiments/study_h200.sh float-frozen  # issue 13's float twin x3 with today's code beside `old` x3, and
#                                                # issue 14's (b) frozen x3 under rule old beside the same `old` x3
#                                                # as (e) graph (routing graph is the default: the same runs)
#   bash experiments/study_h200.sh gemv-i8f   # CUDA tests of i8/i8f and the M = 1 sweep of i8f and i8 (with fma's
#                                             # default) at three shapes, then small M: one call, no training
#   bash experiments/study_h200.sh float-frozen-tests  # float-frozen's six runs, the CUDA GEMV/generation tests
#                                                      # beside them; then `wait`
#   bash experiments/study_h200.sh frozen-1m  # issue 14's (b) frozen x3 under rule old and (e) at 2^20 codes (seed 0);
#                                             # `pack` on the next call
#   bash experiments/study_h200.sh codes-reseed  # 2^20 codes re-seeded 8x as often / from random inputs, 65,536
#                                                # codes from random inputs x3, CUDA VQ tests; then `pack`
#   bash experiments/study_h200.sh codes-window  # re-seed checks every 400 calls: 65,536 codes x3, 2^20 codes;
#                                                # then `pack`
#   bash experiments/study_h200.sh rule-start40  # issue 13: ramp40-48 x3 and the float twin at lr 1e-3 x3 at small,
#                                                # beside the rule sweep's old x3 and float x3; then `pack`
#   bash experiments/study_h200.sh decode-vq  # the CUDA VQ tests, the batch-1 VQ search at 10M codes and
#                                             # default_3b's decode rows: one call, no training
#   bash experiments/study_h200.sh gemv-profile  # the i8f sweep and the small decode profile (compiled steps too) with
#                                               # the CUDA generation/GEMV tests in what is left of 585 s, no training
#   bash experiments/study_h200.sh gemv-auto  # CUDA GEMV/generation tests, then the 8192^2 sweep: one call, no training
#   bash experiments/study_h200.sh gemv-pf    # the L2-prefetch tiles of i8f and fma against the same tiles without
#                                             # it (M = 1, three shapes), then the CUDA GEMV tests: one call
#   bash experiments/study_h200.sh gemv-and-old  # CUDA tests and sweep of the decode GEMVs, then `old` seeds 1, 2
#                                                # at small (two runs alone on the GPU: ~400 s)
#   bash experiments/study_h200.sh routing    # issue 14: small ablation, graph/frozen/topk/hash seed 0 and
#                                             # graph seeds 1, 2 at once (6 small runs of 50M tokens fill
#                                             # one session's device time); the CUDA router-capture tests
#   bash experiments/study_h200.sh wait       # wait (up to WAIT_S), then report
# One call runs at most 10 minutes: call `wait` again within 30 s of the last return, or the
# machine (and the runs) go back. On 2026-12-01 ~20 runs at once kept the H200 at 100%.
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
# the ablation of 2026-12-02 (rule cool24-64), and its rerun under the rule that trains small best (old)
ROUTING=(--root "$STUDY/routing" --rule cool24-64 --preset small --steps 3052 --batch-size 32 --seq-len 512
         --eval-every 200 --eval-windows 512)
ROUTING_OLD=(--root "$STUDY/routing-old" --rule old --preset small --steps 3052 --batch-size 32 --seq-len 512
             --eval-every 200 --eval-windows 512)
SWEEP=old,ramp24-64,ramp16-64,ramp32-64,const32,cool24-64,cool16-64,ema5,ema3,scale32,scale127,scale0,float,float-lr1e-3,float-lr4e-3

report() {
    [ -d "$STUDY/tiny" ] && python3 experiments/rule_study.py report --root "$STUDY/tiny" --steps 1221 \
        --out "$OUT" --name rule_study_tiny_h200 2>&1
    [ -d "$STUDY/small" ] && python3 experiments/rule_study.py report --root "$STUDY/small" --steps 3052 \
        --out "$OUT" --name rule_study_small_h200 2>&1
    [ -d "$STUDY/routing" ] && python3 experiments/routing_ablation.py report --root "$STUDY/routing" --steps 3052 \
        --out "$OUT" --name routing_ablation_small_h200 2>&1
    [ -d "$STUDY/small-now" ] && python3 experiments/rule_study.py report --root "$STUDY/small-now" --steps 3052 \
        --out "$OUT" --name rule_study_small_now_h200 2>&1
    [ -d "$STUDY/routing-old" ] && python3 experiments/routing_ablation.py report --root "$STUDY/routing-old" \
        --steps 3052 --out "$OUT" --name routing_ablation_old_small_h200 2>&1
    [ -d "$STUDY/small-start40" ] && python3 experiments/rule_study.py report --root "$STUDY/small-start40" \
        --steps 3052 --out "$OUT" --name rule_study_small_start40 2>&1
    cat "$STUDY"/launch_*.log > "$OUT/study_launch_h200.log" 2>/dev/null
}

wait_all() {  # until no launcher runs, or WAIT_S
    local t=0
    while pgrep -f "(rule_study|routing_ablation).py run" > /dev/null && [ "$t" -lt "$WAIT_S" ]; do
        sleep 10; t=$((t + 10))
    done
    echo "waited ${t} s; launchers still running: $(pgrep -fc '(rule_study|routing_ablation).py run')"
}

extract_old() {  # folder: the rule sweep's `old` x3 at small (2026-12-02) as old-s0..2 under it
    mkdir -p "$1"
    for f in docs/measurements/rule_study_small2_h200.tar.gz docs/measurements/rule_study_small_old_h200.tar.gz; do
        tar xzf "$f" -C "$1" --strip-components=2 --wildcards './small/old-s*'
    done
}

float_now() {  # the float twin x3 at small with today's code, beside the sweep's `old` x3
    extract_old "$STUDY/small-now"
    launch small_float_now rule_study.py run --root "$STUDY/small-now" "${SMALL[@]:2}" --variants float \
        --seeds 0,1,2 --parallel 3
}

frozen_old() {  # folder holding old-s0..2: issue 14's (b) x3 under rule old, beside (e) graph = those `old`
                # runs (the routing graph is the default, the flags are the same)
    mkdir -p "$STUDY/routing-old"
    for s in 0 1 2; do cp -r "$1/old-s$s" "$STUDY/routing-old/graph-s$s"; done
    launch routing_old_frozen routing_ablation.py run "${ROUTING_OLD[@]}" --variants frozen --seeds 0,1,2 --parallel 3
}

frozen_and_1m_codes() {  # issue 14 under rule old: (b) frozen x3 beside the sweep's `old` x3, and (e) at 2^20 codes
    extract_old "$STUDY/old-src"  # not small-now: report() would tabulate it as a rule study
    frozen_old "$STUDY/old-src"
    launch routing_old_1m routing_ablation.py run "${ROUTING_OLD[@]}" --variants graph-1m-codes --seeds 0 --parallel 1
}

beside_runs() {  # a tarball of finished ablation runs under rule old: they join routing-old's report
    mkdir -p "$STUDY/routing-old" && tar xzf "$1" -C "$STUDY/routing-old"
}

launch() {  # name, script, then its run arguments
    local name="$1" script="$2"; shift 2
    setsid nohup python3 "experiments/$script" "$@" >> "$STUDY/launch_$name.log" 2>&1 < /dev/null &
}

i8f_sweep_and_decode_profile() {  # on an idle GPU: the M = 1 i8f sweep at the three shapes, then the small
                                  # preset's decode rows with the weight products' share of a step
    timeout 200 python3 experiments/bench_decode.py --out "$OUT" --skip-models --budget-s 160 --variants i8f 2>&1 \
        | grep -E "^ *(gemv|small M|experts) |^best|FAILED|WRONG|Error|bf16 F.linear" | tail -60
    timeout 320 python3 experiments/bench_decode.py --out "$OUT/models" --models-only --presets small:64 \
        --skip-training-kernels --budget-s 290 2>&1 | grep -E "^ *small |^small:|FAILED|Error" | tail -24  # room for the compiled rows' compilation
}

device_info() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
    date -u | tee -a "$OUT/device.txt"
}

smoke() {  # name, then extra train flags: 30 captured tiny steps with evaluations, or stop the script
    local name="$1"; shift
    timeout 240 python3 -m ternary_graph.cli train --preset tiny --steps 30 --batch-size 64 --seq-len 256 \
        --eval-every 10 --eval-windows 32 --cuda-graph --no-progress --out "$STUDY/smoke-$name" "$@" \
        > "$STUDY/smoke-$name.log" 2>&1
    local rc=$?
    grep -E "validation loss|error" "$STUDY/smoke-$name.log" | sed "s/^/[smoke $name] /"
    if [ $rc -ne 0 ]; then tail -20 "$STUDY/smoke-$name.log"; echo "smoke $name failed ($rc): not launching"; exit 1; fi
}

case "${1:-wait}" in
    rule)
        device_info
        timeout 240 python3 -m pytest tests/test_cuda_training.py -m cuda -k "captured or synchronise" -q \
            -p no:cacheprovider 2>&1 | tail -4
        smoke rule
        launch small rule_study.py run "${SMALL[@]}" --variants float --seeds 0,1,2 --parallel 3
        launch small_check rule_study.py run "${SMALL[@]}" --variants float-lr1e-3,old --seeds 0 --parallel 2
        launch tiny rule_study.py run "${TINY[@]}" --variants "$SWEEP" --seeds 0 --parallel 8
        sleep 30
        while pgrep -f "root $STUDY/tiny" > /dev/null && [ "$SECONDS" -lt "$WAIT_S" ]; do sleep 5; done
        best=$(python3 experiments/rule_study.py best --root "$STUDY/tiny" --steps 1221)
        echo "tiny sweep done after $SECONDS s; best rule: $best" | tee "$OUT/best.txt"
        python3 experiments/rule_study.py report --root "$STUDY/tiny" --steps 1221
        launch small_best rule_study.py run "${SMALL[@]}" --variants "$best" --seeds 0,1,2 --parallel 3
        launch tiny_final rule_study.py run "${TINY[@]}" --variants "$best,old,float" --seeds 1,2 --parallel 6
        WAIT_S=$((WAIT_S - SECONDS)) wait_all
        ;;
    rule-small)
        device_info
        # the float twin and cool24-64 runs of 2026-12-01 join the report (old-s0 there was stopped at step 800)
        mkdir -p "$STUDY/small" && tar xzf docs/measurements/rule_study_small_h200_runs.tar.gz -C "$STUDY/small" \
            && rm -rf "$STUDY/small/old-s0"
        smoke rule
        launch small_sweep rule_study.py run "${SMALL[@]}" --variants old,cool40-64,d5-cool32-96,d5-cool48-112,d5-ramp32-96 \
            --seeds 0 --parallel 5
        # (a) of issue 14 beside (e) of 2026-12-02 (graph-s0 there): the learned VQ projection, same code and day
        launch routing_a routing_ablation.py run "${ROUTING[@]}" --variants graph-learned-vq --seeds 0 --parallel 1
        WAIT_S=$((WAIT_S - SECONDS)) wait_all
        ;;
    float-frozen)  # the float twin x3 and (b) frozen x3 under rule old: (e) graph under rule old is the rule study's `old`
        device_info
        float_now
        frozen_old "$STUDY/small-now"
        sleep 60
        nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
        WAIT_S=$((WAIT_S - SECONDS)) wait_all
        ;;
    gemv-i8f)
        device_info
        timeout 100 python3 -m pytest tests/test_ternary_gemv.py -m cuda -q -p no:cacheprovider -k "i8" \
            > "$OUT/pytest_gemv_cuda.log" 2>&1
        tail -3 "$OUT/pytest_gemv_cuda.log"
        timeout 320 python3 experiments/bench_decode.py --out "$OUT" --skip-models --budget-s 280 --variants i8f,i8 \
            > "$OUT/bench_decode_stdout.log" 2>&1
        grep -E "^ *(gemv|small M|experts) |^kernel|^best|FAILED|WRONG|bf16 F.linear" "$OUT/bench_decode_stdout.log" | tail -90
        exit 0
        ;;
    float-frozen-tests)  # float-frozen's six runs, with the CUDA GEMV and generation tests beside them
                         # (correctness only: no timing shares the GPU with training)
        device_info
        float_now
        frozen_old "$STUDY/small-now"
        timeout 300 python3 -m pytest tests/test_ternary_gemv.py tests/test_generate.py -m cuda -q -rf \
            -p no:cacheprovider > "$OUT/pytest_gemv_cuda.log" 2>&1
        tail -3 "$OUT/pytest_gemv_cuda.log"
        nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
        WAIT_S=$((570 - SECONDS)) wait_all
        ;;
    frozen-1m)  # issue 14 alone on the GPU: (b) frozen x3
                # under rule old and (e) at 2^20 codes (seed 0); STOP_S (default 560) bounds the wait; then `pack`
        device_info
        frozen_and_1m_codes
        sleep 90
        nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
        WAIT_S=$((${STOP_S:-560} - SECONDS)) wait_all
        ;;
    codes-reseed)  # issue 14 under rule old: 2^20 codes re-seeded 8x as often and from random inputs (seed 0), and
                   # 65,536 codes re-seeded from random inputs x3, beside the runs of 2026-12-07 (frozen x3, graph x3,
                   # graph-1m-codes); the CUDA VQ tests beside them; STOP_S (default 560) bounds the wait; then `pack`
        device_info
        beside_runs docs/measurements/routing_ablation_old_small_frozen_1m_h100_2026-12-07_runs.tar.gz
        launch routing_old_1m_reseed routing_ablation.py run "${ROUTING_OLD[@]}" \
            --variants graph-1m-codes-reseed12,graph-1m-codes-random-reseed --seeds 0 --parallel 2
        launch routing_old_random_reseed routing_ablation.py run "${ROUTING_OLD[@]}" --variants graph-random-reseed \
            --seeds 0,1,2 --parallel 3
        timeout 300 python3 -m pytest tests/test_kernels_vq.py -m cuda -q -rf -p no:cacheprovider \
            > "$OUT/pytest_vq_cuda.log" 2>&1
        tail -3 "$OUT/pytest_vq_cuda.log"
        nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
        WAIT_S=$((${STOP_S:-560} - SECONDS)) wait_all
        ;;
    codes-window)  # issue 14 under rule old: re-seed checks every 400 calls, 65,536 codes x3 and 2^20 codes (seed 0),
                   # beside the runs of 2026-12-07 (frozen x3, graph x3, graph-1m-codes, the re-seeding variants);
                   # STOP_S (default 560) bounds the wait; then `pack`
        device_info
        beside_runs docs/measurements/routing_ablation_old_small_reseed_h100_2026-12-07_runs.tar.gz
        launch routing_old_window routing_ablation.py run "${ROUTING_OLD[@]}" \
            --variants graph-reseed400,graph-1m-codes-reseed400 --seeds 0 --parallel 2
        launch routing_old_window_seeds routing_ablation.py run "${ROUTING_OLD[@]}" --variants graph-reseed400 \
            --seeds 1,2 --parallel 2
        sleep 90
        nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
        WAIT_S=$((${STOP_S:-560} - SECONDS)) wait_all
        ;;
    rule-start40)  # issue 13 on small: θ 40 -> 48 (ramp40-48) x3, and the float twin at lr 1e-3 x3 (its 2026-12-01
                   # run was stopped at step 800, ahead of lr 2e-3), beside the sweep's old x3 and the float twin's
                   # lr 2e-3 x3 (2026-12-01/02); STOP_S (default 560) bounds the wait; then `pack`
        device_info
        extract_old "$STUDY/small-start40"
        tar xzf docs/measurements/rule_study_small_h200_runs.tar.gz -C "$STUDY/small-start40" --wildcards 'float-s*'
        launch small_start40 rule_study.py run --root "$STUDY/small-start40" "${SMALL[@]:2}" \
            --variants ramp40-48,float-lr1e-3 --seeds 0,1,2 --parallel 6
        sleep 90
        nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
        WAIT_S=$((${STOP_S:-560} - SECONDS)) wait_all
        ;;
    decode-vq)  # the CUDA VQ tests; the decode step's VQ search at 10M codes (the default tile against the
                # other small tiles, the fma phase 1, the training tile and torch, in interleaved rounds);
                # then default_3b's decode rows on an idle GPU: one call of ~6 minutes, no training
        device_info
        timeout 120 python3 -m pytest tests/test_kernels_vq.py -m cuda -q -rf -p no:cacheprovider \
            > "$OUT/pytest_vq_cuda.log" 2>&1
        tail -3 "$OUT/pytest_vq_cuda.log"
        timeout 150 python3 experiments/bench_vq.py --skip sweep table step --out "$OUT/vq" 2>&1 | tail -8
        timeout $((${STOP_S:-560} - SECONDS)) python3 experiments/bench_decode.py --out "$OUT/default_3b" --models-only \
            --presets default_3b:16 --skip-training-kernels --budget-s $((${STOP_S:-560} - 30 - SECONDS)) 2>&1 \
            | grep -E "^ *default_3b |^default_3b:|FAILED|Error" | tail -16
        exit 0
        ;;
    gemv-profile)  # no training: the i8f sweep, the small decode profile, the
                   # CUDA GEMV and generation tests; one call of ~5 minutes
        device_info
        i8f_sweep_and_decode_profile
        timeout $((585 - SECONDS)) python3 -m pytest tests/test_generate.py tests/test_ternary_gemv.py -m cuda -q -rf \
            -p no:cacheprovider > "$OUT/pytest_gemv_generate_cuda.log" 2>&1
        tail -3 "$OUT/pytest_gemv_generate_cuda.log"
        exit 0
        ;;
    pack)  # wait (up to WAIT_S), then the reports, each with its runs' configs, metrics and logs
        wait_all
        ;;
    gemv-auto)  # auto is i8f at M <= 2: the CUDA GEMV and generation tests, then i8f against the other
                # kernels at 8192^2 (M = 1 sweep, M = 2..16 defaults); one call, no training
        device_info
        timeout 300 python3 -m pytest tests/test_ternary_gemv.py tests/test_generate.py -m cuda -q -rf \
            -p no:cacheprovider > "$OUT/pytest_gemv_cuda.log" 2>&1
        tail -3 "$OUT/pytest_gemv_cuda.log"
        timeout 150 python3 experiments/bench_decode.py --out "$OUT" --skip-models --budget-s 110 --variants i8f \
            --shapes 8192x8192 > "$OUT/bench_decode_stdout.log" 2>&1
        grep -E "^ *(gemv|small M|experts) |^best|FAILED|WRONG|bf16 F.linear" "$OUT/bench_decode_stdout.log" | tail -40
        exit 0
        ;;
    gemv-pf)  # the L2 prefetch of each program's word slice: the i8f and fma prefetch tiles against the
              # same tiles without it, in one M = 1 sweep at three shapes; then the CUDA GEMV tests
        device_info
        timeout 380 python3 experiments/bench_decode.py --out "$OUT" --skip-models --budget-s 340 --variants i8f,fma \
            --tiles 'pf|^i8f/(64x32w4/sm4|128x32w8/sm2|64x32w4/sm2|32x32w4/sm8)$|^fma/64x32w4/sm4$' \
            > "$OUT/bench_decode_stdout.log" 2>&1
        grep -E "^ *(gemv|small M|experts) |^best|FAILED|WRONG|bf16 F.linear" "$OUT/bench_decode_stdout.log" | tail -75
        timeout $((585 - SECONDS)) python3 -m pytest tests/test_ternary_gemv.py -m cuda -q -rf -p no:cacheprovider \
            > "$OUT/pytest_gemv_cuda.log" 2>&1
        tail -3 "$OUT/pytest_gemv_cuda.log"
        exit 0
        ;;
    routing-old)  # the ablation again under rule old: graph/frozen/topk/hash seed 0, graph seeds 1, 2
        device_info
        launch routing_old routing_ablation.py run "${ROUTING_OLD[@]}" --variants graph,frozen,topk,hash --seeds 0 \
            --parallel 4
        launch routing_old_seeds routing_ablation.py run "${ROUTING_OLD[@]}" --variants graph --seeds 1,2 --parallel 2
        WAIT_S=$((WAIT_S - SECONDS)) wait_all
        ;;
    gemv-and-old)  # the decode GEMVs (CUDA tests of "i8", then the sweep) on an idle GPU; then `old` seeds 1, 2
        device_info
        timeout 90 python3 -m pytest tests/test_ternary_gemv.py -m cuda -k "i8" -q -p no:cacheprovider \
            > "$OUT/pytest_gemv_cuda.log" 2>&1
        tail -5 "$OUT/pytest_gemv_cuda.log"
        timeout 120 python3 experiments/bench_decode.py --out "$OUT" --skip-models --shapes 8192x8192 --budget-s 100 \
            2>&1 | grep -E "^ *(gemv|small M|experts) |^kernel|SASS|^best|FAILED|WRONG" | tail -60
        launch small_old rule_study.py run "${SMALL[@]}" --variants old --seeds 1,2 --parallel 2
        sleep 20
        WAIT_S=$((570 - SECONDS)) wait_all
        mkdir -p "$STUDY/reports"
        python3 experiments/rule_study.py report --root "$STUDY/small" --steps 3052 --out "$STUDY/reports" \
            --name rule_study_small_old 2>&1 | tail -5
        (cd "$STUDY" && find . -name config.json -o -name metrics.jsonl -o -name train.log -o -name 'launch_*.log' \
            -o -path './reports/*' | tar czf "$OUT/study_old.tar.gz" -T -)
        exit 0
        ;;
    routing)
        device_info
        launch routing routing_ablation.py run "${ROUTING[@]}" --variants graph,frozen,topk,hash --seeds 0 --parallel 4
        launch routing_seeds routing_ablation.py run "${ROUTING[@]}" --variants graph --seeds 1,2 --parallel 2
        timeout 300 python3 -m pytest tests/test_cuda_training.py -m cuda -k "captured" -q -p no:cacheprovider \
            > "$OUT/pytest_cuda_routers.log" 2>&1
        tail -4 "$OUT/pytest_cuda_routers.log"
        WAIT_S=$((WAIT_S - SECONDS)) wait_all
        ;;
    wait)
        wait_all
        ;;
    *)
        echo "usage: bash experiments/study_h200.sh rule|rule-small|float-frozen|gemv-i8f|float-frozen-tests|frozen-1m|codes-reseed|codes-window|rule-start40|decode-vq|gemv-profile|pack|gemv-auto|routing-old|gemv-and-old|routing|wait" >&2; exit 2
        ;;
esac
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
report  # every report also writes <name>_runs.tar.gz, its runs so far, in case the machine goes back
