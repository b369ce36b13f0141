#!/usr/bin/env bash
# One command for a GPU machine with no network: build fastnorm in place with what the machine has,
# then check and measure it. Every step logs to OUTDIR/<step>.log, runs under its own timeout, and
# a failing step does not stop the next; OUTDIR/summary.txt (rewritten after every step, printed
# last) lists each step's exit status.
#
#   bash bench/gpu_check.sh OUTDIR [STEP ...]
#
# Steps, in this order (default: the first eight):
#   build      pip install --no-build-isolation --no-deps -e . (TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=16)
#   info       python -m fastnorm.info (and --kernels: registers, spills, occupancy), nvidia-smi,
#              tool versions
#   plan       bench/run.py --plan: each benchmark case's launches (grid, block, resident blocks
#              per SM, waves) with estimated bytes moved, passes over memory and bytes in flight
#              -> plan.log, OUTDIR/plan.json
# After bench / bench-full (or after plan, when results.csv is already there), every measured
# case and pass is written next to its plan: OUTDIR/plan_vs_measured.csv and .json (estimated
# bytes, passes, launches low in flight, median time, GB/s on the minimum and on the estimate).
#   tests      python -m pytest tests -q (tests/cuda and the CPU tests, on the GPU)
#   memcheck   compute-sanitizer --tool memcheck  on tests/cuda -k "not graph" -m "not slow",
#              FASTNORM_TEST_SHORT=1 (short shapes), PYTORCH_NO_CUDA_MEMORY_CACHING=1
#   racecheck  compute-sanitizer --tool racecheck on the same
#   bench      bench/run.py --quick: the quick cases, no new case within 45 s of the step's limit
#              -> OUTDIR/results.csv + PNGs
#   e2e        bench/e2e.py --quick: six models, 10 steps each        -> OUTDIR/e2e.csv
#   bench-full bench/run.py, every case (over 10 minutes: run it in parts with or a part of it with
#              BENCH_ARGS="--ops layer_norm", say; cases past its budget are listed as skipped)
#   e2e-full   bench/e2e.py, full batches, 50 steps
#   dit        bench/dit_block.py --quick: a DiT block (AdaLN-Zero) forward + backward, eager vs
#              fastnorm's modulated norms, and torch.compile of each -> OUTDIR/dit_block.txt
# tests, memcheck, racecheck, bench and e2e build first when the extension does not load yet
# (a fresh machine), so `bash bench/gpu_check.sh OUT bench e2e` works on its own.
#
# Time: one command may run 10 minutes. The steps share GPU_CHECK_BUDGET seconds (default 570);
# each runs under min(its cap, what is left) and is skipped with less than 20 s left. Caps
# (seconds): build 240, info 30, tests 180, memcheck 90, racecheck 90, bench 180, e2e 150,
# bench-full 560, e2e-full 300. A cold build plus everything can outrun the budget: then split it,
#   call 1: bash bench/gpu_check.sh OUT build info plan tests
#   call 2: bash bench/gpu_check.sh OUT memcheck racecheck
#   call 3: bash bench/gpu_check.sh OUT bench e2e        (reuses the build on a warm machine)
#
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET, GPU_CHECK_BUNDLE=FILE.tar.gz (after every
# step, OUTDIR is packed into FILE: one file to fetch, complete up to the last step even when the
# command is killed), FASTNORM_COMMIT (the commit to record: the copied tree may have no .git),
# BENCH_ARGS / E2E_ARGS (more options for run.py / e2e.py), SANITIZER_ARGS (more compute-sanitizer
# options), TORCH_CUDA_ARCH_LIST, MAX_JOBS.
set -u

OUTDIR=${1:?usage: bash bench/gpu_check.sh OUTDIR [build info plan tests memcheck racecheck bench e2e bench-full e2e-full dit]}
shift
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(build info plan tests memcheck racecheck bench e2e)

cd "$(dirname "$0")/.."
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-570}
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
declare -A CAP=([build]=240 [info]=30 [plan]=90 [tests]=180 [memcheck]=90 [racecheck]=90 [bench]=180
                [e2e]=150 [bench-full]=560 [e2e-full]=300 [dit]=150)
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null \
            || echo compute-sanitizer)
START=$SECONDS
SUMMARY="$OUTDIR/summary.txt"
printf "%-11s %-28s %7s %5s  %s\n" step status seconds cap log > "$SUMMARY"

run_step() {  # name: runs the step's commands with its timeout; records status
    local name=$1 cap=${CAP[$1]} left=$((BUDGET - (SECONDS - START))) limit status t0
    limit=$((cap < left - 5 ? cap : left - 5))
    if [ "$limit" -lt 20 ]; then
        printf "%-11s %-28s %7s %5s  %s\n" "$name" "skipped (no time left)" 0 "$cap" - >> "$SUMMARY"
        echo "== $name: skipped, ${left}s of the ${BUDGET}s budget left"
        return
    fi
    echo "== $name (limit ${limit}s) -> $OUTDIR/$name.log"
    t0=$SECONDS
    # the step runs in a child bash so that `timeout` can end it and all its children
    STEP_LIMIT=$limit timeout -k 10 $((limit - 10)) bash -c "step_${name//-/_}" > "$OUTDIR/$name.log" 2>&1
    status=$?
    case $status in
        0) label=ok ;;
        124|137) label="$status (timed out)" ;;
        *) label="$status (failed)" ;;
    esac
    printf "%-11s %-28s %7s %5s  %s\n" "$name" "$label" $((SECONDS - t0)) "$cap" "$name.log" >> "$SUMMARY"
    show "$name"
    [ -n "${GPU_CHECK_BUNDLE:-}" ] && tar czf "$GPU_CHECK_BUNDLE" -C "$(dirname "$OUTDIR")" "$(basename "$OUTDIR")"
}

show() {  # what the step said last: the markdown table of the benchmarks, else the log's tail
    local log="$OUTDIR/$1.log"
    if grep -q '^## ' "$log" 2>/dev/null; then
        awk '/^## /{p=1} p' "$log"
    else
        tail -n "$([ "$1" = info ] && echo 40 || echo 12)" "$log"
    fi
}

ext_loaded() {
    "$PY" -c "import fastnorm, fastnorm._ext as e, sys; sys.exit(0 if e.loaded else 1)" >/dev/null 2>&1
}

step_build() {
    set -x
    "$PY" -m pip install --no-build-isolation --no-deps -v -e .
    "$PY" -c "import fastnorm, fastnorm._ext as e, sys; print('fastnorm extension loaded:', e.loaded, e.load_error or ''); sys.exit(0 if e.loaded else 1)"
}

step_info() {
    "$PY" -m fastnorm.info
    "$PY" -m fastnorm.info --kernels
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv
    nvcc --version | tail -n 2
    "$SANITIZER" --version | head -n 2
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
}

# The launch plan of every benchmark case (the emulation build, no GPU needed), to read next to
# the measured times: grid, block, resident blocks per SM and waves per kernel.
step_plan() {
    "$PY" bench/run.py --plan --plan-json "$OUTDIR/plan.json" || return
    [ -s "$OUTDIR/results.csv" ] && plan_join
    return 0
}

# The plans next to the measurements (after bench, or after plan when bench ran first). Never
# changes the bench step's status: a failure is reported in the log only.
plan_join() {
    if [ -s "$OUTDIR/plan.json" ] && [ -s "$OUTDIR/results.csv" ]; then
        "$PY" bench/run.py --plan-join "$OUTDIR/results.csv" --plan-json "$OUTDIR/plan.json" \
            --plan-out "$OUTDIR/plan_vs_measured" || echo "gpu_check: plan_vs_measured failed (ignored)"
    else
        echo "gpu_check: no plan.json yet: the plan step writes it and then joins the measurements"
    fi
}

step_tests() {
    "$PY" -m pytest tests -q -p no:cacheprovider -rfE
}

# The sanitizer pass: GPU-only tests, short shapes (FASTNORM_TEST_SHORT=1; not the ones marked slow), no CUDA
# graphs (they need the caching allocator, which is off so that memcheck sees each allocation's
# bounds); stops at the first failure. Exit status 99: the sanitizer reported an error.
sanitize() {  # tool
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 FASTNORM_TEST_SHORT=1 \
        "$SANITIZER" --tool "$1" --error-exitcode 99 ${SANITIZER_ARGS:-} \
        "$PY" -m pytest tests/cuda -q -x -k "not graph" -m "not slow" -p no:cacheprovider
}
step_memcheck() { sanitize memcheck; }
step_racecheck() { sanitize racecheck; }

bench_budget() {  # start no new case later than 45 s before the step's limit (a case + plots)
    echo $((STEP_LIMIT > 55 ? STEP_LIMIT - 45 : 10))
}

step_bench() {
    local compare=()
    [ -s bench/results/results.csv ] && compare=(--compare bench/results/results.csv)
    "$PY" bench/run.py --quick --budget "$(bench_budget)" --out "$OUTDIR/results.csv" "${compare[@]}" \
        ${BENCH_ARGS:-}
    local status=$?
    plan_join
    return $status
}

step_e2e() {
    "$PY" bench/e2e.py --quick --out "$OUTDIR/e2e.csv" ${E2E_ARGS:-}
}

step_bench_full() {
    local compare=()
    [ -s bench/results/results.csv ] && compare=(--compare bench/results/results.csv)
    "$PY" bench/run.py --budget "$(bench_budget)" --out "$OUTDIR/results.csv" "${compare[@]}" \
        ${BENCH_ARGS:-}
    local status=$?
    plan_join
    return $status
}

step_e2e_full() {
    "$PY" bench/e2e.py --out "$OUTDIR/e2e.csv" ${E2E_ARGS:-}
}

step_dit() {
    "$PY" bench/dit_block.py --quick > "$OUTDIR/dit_block.txt"
    local status=$?
    cat "$OUTDIR/dit_block.txt"
    return $status
}

export PY OUTDIR SANITIZER
export -f sanitize bench_budget plan_join step_build step_info step_plan step_tests step_memcheck step_racecheck step_bench \
    step_e2e step_bench_full step_e2e_full step_dit

echo "gpu_check: steps ${STEPS[*]}; budget ${BUDGET}s; python $PY; out $OUTDIR"
built=0
for s in "${STEPS[@]}"; do
    if [ -z "${CAP[$s]:-}" ]; then
        echo "gpu_check: unknown step '$s'"
        printf "%-11s %-28s %7s %5s  %s\n" "$s" "unknown step" 0 0 - >> "$SUMMARY"
        continue
    fi
    if [ "$s" = build ]; then
        built=1
    elif [ "$s" != info ] && [ "$s" != plan ] && [ $built = 0 ] && ! ext_loaded; then
        echo "gpu_check: the extension does not load: building first"
        built=1
        run_step build
    fi
    run_step "$s"
done

echo
echo "gpu_check summary ($((SECONDS - START))s of ${BUDGET}s; logs and results in $OUTDIR)"
cat "$SUMMARY"
# exit status 1 when a step that ran did not succeed
awk 'NR > 1 && $2 != "ok" && $2 !~ /^skipped/ {exit 1}' "$SUMMARY"
