#!/usr/bin/env bash
# One check of moeshard on a lent GPU machine, in under 8 minutes, from a bare machine without registry access.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--peak-tflops 989]
#
# Steps, each under `timeout` and within BUDGET_S seconds (default 450) in all:
#   wheels        pip install every wheel in .gpu/wheels (--no-index), if that folder exists
#   grouped_gemm  build .gpu/grouped_gemm-0.3.0.tar.gz in the background, if it exists (about 7 minutes)
#   pytest        python -m pytest -m gpu tests/test_gpu.py
#   moe-layer     one MoE layer's experts, E=128 over 4 simulated ranks, bf16 (benchmarks/gpu_bench.py)
#   throughput    moeshard's encoder against transformers', bf16 and fp32, batch 128 (benchmarks/gpu_bench.py)
#   megablocks    if the background build finished: its tests and MoE-layer timings; its wheel is saved
#   report        $OUT/gpu-results.md ($OUT set) or ./gpu-results.md, ready for docs/benchmarks.md
# Logs and JSON go to $OUT/gpu-logs too. --peak-tflops: the card's dense bf16 peak (H100 SXM: 989).
# --dry-run: every CPU-side step on CPU with tiny sizes (no install, no build): a test of this script.
# Environment: PYTHON (python3), BUDGET_S, WORK (a scratch folder), TORCH_CUDA_ARCH_LIST, MAX_JOBS.
set -uo pipefail

COMMAND="bash benchmarks/gpu_check.sh${*:+ $*}"
DRY_RUN=0
PEAK_TFLOPS=989
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --peak-tflops) PEAK_TFLOPS=${2:?--peak-tflops needs a number, e.g. 989}; shift ;;
        --peak-tflops=*) PEAK_TFLOPS=${1#*=} ;;
        -h | --help) sed -n '2,/^set /{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
        *) echo "error: unknown option $1: use --dry-run or --peak-tflops N" >&2; exit 2 ;;
    esac
    shift
done

cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
BUDGET=${BUDGET_S:-450}
RESERVE=40  # seconds kept for stopping the build and writing the report
WORK=${WORK:-$(mktemp -d /tmp/moeshard-gpu.XXXXXX)}
RESULTS=${OUT:+$OUT/gpu-results.md}
RESULTS=${RESULTS:-$PWD/gpu-results.md}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
mkdir -p "$WORK"
: > "$WORK/steps.tsv"
echo "moeshard GPU check: work folder $WORK, results $RESULTS, ${BUDGET}s budget$([ $DRY_RUN = 1 ] && echo ', dry run on CPU')"

# step NAME SECONDS COMMAND...: run under `timeout` (cut to what is left of the budget), log to $WORK/NAME.log
step() {
    local name=$1 limit=$2 left
    shift 2
    left=$((BUDGET - RESERVE - SECONDS))
    if [ "$left" -lt 15 ]; then
        printf '%s\tnot run: out of time\t0\n' "$name" >> "$WORK/steps.tsv"
        return 1
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (at most ${limit}s)"
    local started=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$WORK/$name.log"
    local code=${PIPESTATUS[0]}
    printf '%s\t%s\t%s\n' "$name" "$code" "$((SECONDS - started))" >> "$WORK/steps.tsv"
    return "$code"
}

if [ $DRY_RUN = 1 ]; then
    PYTEST_S=120
    LAYER_ARGS=(--device cpu --experts 8 --d-model 64 --d-ff 128 --seqs 1,2 --skews 0,0.6)
    THROUGHPUT_ARGS=(--device cpu --model tiny-switch --lines 8 --line-bytes 40 --batch-size 4 --repeats 1)
else
    PYTEST_S=240
    LAYER_ARGS=(--device cuda)
    THROUGHPUT_ARGS=(--device cuda)
fi

# ---- wheels carried in (deepspeed, a grouped_gemm wheel saved by an earlier check, ...)
if compgen -G ".gpu/wheels/*.whl" > /dev/null; then
    if [ $DRY_RUN = 1 ]; then
        echo "dry run: would pip install --no-index --find-links .gpu/wheels $(ls .gpu/wheels/*.whl | xargs -n1 basename | tr '\n' ' ')"
    else
        step wheels 120 "$PY" -m pip install --no-index --find-links .gpu/wheels .gpu/wheels/*.whl
    fi
fi

# ---- megablocks' GEMM: build in the background, niced, while the GPU steps run
GG_TARBALL=.gpu/grouped_gemm-0.3.0.tar.gz
GG_PID=
if [ -f "$GG_TARBALL" ] && "$PY" -c "import grouped_gemm.ops" 2> /dev/null; then
    echo "grouped_gemm is importable already: not building it" | tee "$WORK/grouped_gemm-build.txt"
elif [ -f "$GG_TARBALL" ] && [ $DRY_RUN = 1 ]; then
    echo "dry run: would build $GG_TARBALL in the background"
elif [ -f "$GG_TARBALL" ] && ! { mkdir -p "$WORK/grouped_gemm-src" && tar xzf "$GG_TARBALL" -C "$WORK/grouped_gemm-src"; }; then
    echo "failed: cannot unpack $GG_TARBALL" | tee "$WORK/grouped_gemm-build.txt"
elif [ -f "$GG_TARBALL" ]; then
    GG_STARTED=$SECONDS
    (
        cd "$WORK"/grouped_gemm-src/grouped_gemm-* || exit 1
        TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}
        export TORCH_CUDA_ARCH_LIST MAX_JOBS=${MAX_JOBS:-6}
        echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS GROUPED_GEMM_CUTLASS=${GROUPED_GEMM_CUTLASS:-0}"
        exec timeout -k 10 "$BUDGET" nice -n 10 "$PY" -m pip wheel --no-index --no-build-isolation --no-deps -w "$WORK/grouped_gemm-wheel" .
    ) > "$WORK/grouped_gemm-build.log" 2>&1 &
    GG_PID=$!
    echo "grouped_gemm: building in the background (log: $WORK/grouped_gemm-build.log)"
fi

# ---- the checks
step pytest "$PYTEST_S" "$PY" -m pytest -q -s -rs -m gpu -p no:cacheprovider tests/test_gpu.py
step moe-layer 90 "$PY" benchmarks/gpu_bench.py moe-layer --work "$WORK" --backends grouped_mm,megablocks "${LAYER_ARGS[@]}"
step throughput 240 "$PY" benchmarks/gpu_bench.py throughput --work "$WORK" "${THROUGHPUT_ARGS[@]}"

# ---- megablocks, if its build finished in time (its tests and timings need up to 2 minutes)
if [ -n "$GG_PID" ]; then
    while kill -0 "$GG_PID" 2> /dev/null && [ $((SECONDS + RESERVE + 120)) -lt "$BUDGET" ]; do sleep 5; done
    if kill -0 "$GG_PID" 2> /dev/null; then
        kill -TERM "$GG_PID"
        wait "$GG_PID"
        echo "did not finish within this check (stopped after $((SECONDS - GG_STARTED)) s); carry a wheel built by an earlier check in .gpu/wheels" > "$WORK/grouped_gemm-build.txt"
    elif wait "$GG_PID" && "$PY" -m pip install --no-index --no-deps --target "$WORK/grouped_gemm" "$WORK"/grouped_gemm-wheel/*.whl > /dev/null; then
        echo "built in $((SECONDS - GG_STARTED)) s ($(head -1 "$WORK/grouped_gemm-build.log")); the wheel is in gpu-logs/wheels" > "$WORK/grouped_gemm-build.txt"
        export PYTHONPATH="$WORK/grouped_gemm:$PYTHONPATH"
        step pytest-megablocks 75 "$PY" -m pytest -q -s -rs -m gpu -p no:cacheprovider -k megablocks tests/test_gpu.py
        step moe-layer-megablocks 45 "$PY" benchmarks/gpu_bench.py moe-layer --work "$WORK" --backends megablocks --tag megablocks "${LAYER_ARGS[@]}"
    else
        echo "failed: $(tail -3 "$WORK/grouped_gemm-build.log" | tr '\n' ' ')" > "$WORK/grouped_gemm-build.txt"
    fi
    cat "$WORK/grouped_gemm-build.txt"
fi

# ---- the results file, and the logs next to it
RESERVE=0
step report 30 "$PY" benchmarks/gpu_bench.py report --work "$WORK" --command "$COMMAND" --peak-tflops "$PEAK_TFLOPS" --out "$RESULTS"
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT/gpu-logs"
    cp "$WORK"/*.log "$WORK"/*.json "$WORK"/steps.tsv "$OUT/gpu-logs/" 2> /dev/null
    if compgen -G "$WORK/grouped_gemm-wheel/*.whl" > /dev/null; then
        mkdir -p "$OUT/gpu-logs/wheels" && cp "$WORK"/grouped_gemm-wheel/*.whl "$OUT/gpu-logs/wheels/"
    fi
fi
echo "== steps (name, exit code, seconds)"
cat "$WORK/steps.tsv"
echo "results: $RESULTS (${SECONDS}s in all)"
# the check fails when a step did (a test, a measurement, the report)
! grep -qvP '\t0\t' "$WORK/steps.tsv"
