#!/usr/bin/env bash
# The GPU check (issue 12): every CUDA path built, tested and measured in ONE call of the device
# tool, at most 8 minutes on a fresh H200 machine (Python 3.12, torch 2.11+cu130, nvcc 13.0,
# 16 cores, no network). The next GPU session first builds the extension here, on the CPU
# machine, against that torch (benchmarks/gpu_prebuild.sh, ~5 minutes of the session, none of
# the lease), then runs exactly this (device tool `run`):
#
#   command:   GPU_CHECK_PREBUILT=gpu_runs/_C.abi3.so bash benchmarks/gpu_check.sh "$OUT"
#   kind:      nvidia-h200 (the issue's card; an H100 runs it as well: every figure is judged
#              against a baseline measured in the same run, and the machine step names the card)
#   carry:     ["gpu_runs/_C.abi3.so", "gpu_runs/_C.abi3.so.json"]
#   timeout_s: 510         (the script stops itself at 480 s)
#
# (Without the prebuilt extension, or where its record does not match the tree and torch there,
# the build step builds, up to 165 s: `bash benchmarks/gpu_check.sh "$OUT"`, carry [].)
#
# then reads the summary at the end of output_tail (each step's exit code, time, closing lines,
# and a status table last); files_at holds summary.txt, logs.tar (every step's whole log), the
# JSON of the parity check and the benchmarks, and _C.abi3.so: the extension the build step
# made, stripped, with its record. With the 15-minute lease (machine start included) that leaves one short
# rerun, on a fresh machine (a call finds the last one warm only within 30 s), of what failed or
# was skipped, without building again: here, copy the returned extension into the ignored
# gpu_runs/ folder, then
#
#   (here)     mkdir -p gpu_runs && cp <files_at>/_C.abi3.so* gpu_runs/
#   command:   GPU_CHECK_PREBUILT=gpu_runs/_C.abi3.so GPU_CHECK_ONLY=nccl_parity,bench_step \
#              GPU_CHECK_BUDGET=170 bash benchmarks/gpu_check.sh "$OUT"
#   carry:     ["gpu_runs/_C.abi3.so", "gpu_runs/_C.abi3.so.json"]
#   timeout_s: 200
#
# (the summary prints this line with the steps to redo; without the prebuilt extension keep
# `build` in the list). Call give_back unless rerunning at once.
#
# Steps, in priority order; each has its own timeout, and a global deadline (GPU_CHECK_BUDGET,
# default 480 s) shortens a step's timeout to the time left, or skips the step (listed as such)
# when less than its minimum is left. A failure never stops the run: every step runs, and the
# summary says which failed.
#   machine      nvidia-smi, cores, python and torch versions
#   build        setup.py build_ext --inplace for sm_90 only (TORCH_CUDA_ARCH_LIST=9.0), MAX_JOBS
#                = cores, only this CPU's kernel variant (ZERO_EXT_CPU_ISAS=host); timed
#   env          python -m zero_ext.env
#   cuda_tests   every CUDA test: pytest -k "$CUDA_TESTS" over tests/ selects the `-m cuda` tests
#                and every test with a cuda parameter or "cuda" in its name (tests/test_gpu_check.py
#                checks on CPU that this misses none), failures collected (no -x)
#   nccl_parity  tests/gpu_nccl_parity.py: world size 2 on the one GPU over NCCL, each rank its
#                own NCCL_HOSTID; gloo on CUDA tensors where NCCL fails (it says which worked)
#   adamw_cuda   bench_adamw.py CUDA 256M, fp32 and the mixed (offload) case
#   adamw_cpu16  bench_adamw.py on the host CPU with 16 threads
#   quant_cuda   bench_quant.py --device cuda (issue 16: >= 40% of the copy bandwidth)
#   bench_zero   bench_zero.py at world size 1 over NCCL (stage 2 vs DDP)
#   sanitizer    the offload and checkpointing CUDA tests under TORCH_CUDA_SANITIZER=1
#   bench_step   benchmarks/bench_step.py: zero_ext stages 2/3 vs FSDP2 vs plain torch on the
#                Llama 1.3B shape, with as many steps (<= 50 timed) as the time left allows
#   fused_cuda   issue 18: the fused cross-entropy at M=8192, H=4096, V=128256 bf16 against
#                eager (goal >= 1.0x at < 512 MiB extra), RMSNorm and SwiGLU against eager
#   nccl_stall   (only when named in GPU_CHECK_ONLY, e.g. in the rerun) the stall watch over
#                NCCL: tests/test_stall.py's unbounded-backend tests with both ranks on the GPU
#                over NCCL (a rank blocked in CUDA behind a stalled collective ends with the
#                report; one free on the host raises it; a frozen rank is named; a busy one
#                trips nothing)
# Issue 15's rows (the largest model on one GPU), run only when named in GPU_CHECK_ONLY, in a
# call of their own once the check above passes (each row's JSON comes back; fetch it here and
# judge them together with `bench_offload.py --from-json`):
#   offload_b16     Llama-2-7B shape, batch 16: zero_ext (stage 3, optimizer offload at
#                   GPU_OFFLOAD_RATIO, default 0.25, activation checkpointing) and FSDP2 with
#                   CPUOffloadPolicy, 6 steps each
#   offload_b4      the same at batch 4
#   offload_ceiling zero_ext with every state on the GPU, batch 8 (batch 16 does not fit)
#   offload_13b     Llama-2-13B shape, batch 8, offload_optimizer.ratio 0.6, with the
#                   estimator's model-state figures beside the measured
#   offload_ds      DeepSpeed ZeRO-Offload (stage 3, offload_optimizer cpu) on offload_b16's
#                   shape, installed first from the carried wheels/ (benchmarks/
#                   fetch_gpu_wheels.sh; carry ["wheels"] too); its CPU Adam's compile timed
#                   apart (initialize_s)
# e.g. GPU_CHECK_PREBUILT=gpu_runs/_C.abi3.so GPU_CHECK_ONLY=offload_b16,offload_b4,\
#      offload_ceiling,offload_13b GPU_CHECK_BUDGET=560 bash benchmarks/gpu_check.sh "$OUT"
#      (kind nvidia-h200: an H100 cannot hold these rows, which then say so; timeout_s 595,
#      carry ["gpu_runs/_C.abi3.so", "gpu_runs/_C.abi3.so.json"])
#
# Environment: GPU_CHECK_ONLY=a,b (run only these steps), GPU_CHECK_BUDGET=seconds,
# GPU_CHECK_PREBUILT=path (an extension an earlier run built on the same machine kind, put in
# place of building), GPU_CHECK_DRY=1 (print the plan, run nothing: each step is taken to use
# its whole timeout, so the plan shows the worst case and what it would skip).
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root" || exit 2
out=${1:-$root/gpu_runs}
mkdir -p "$out/logs"
out=$(cd "$out" && pwd)
summary=$out/summary.txt
: > "$summary"
budget=${GPU_CHECK_BUDGET:-480}
dry=${GPU_CHECK_DRY:-0}
only=${GPU_CHECK_ONLY:-}
prebuilt=${GPU_CHECK_PREBUILT:-}
grace=8                       # a step's kill-after plus the bookkeeping after it
# The CUDA tests, by keyword: markers count as keywords, so `cuda` takes -m cuda too; the nvcc
# compile checks (tests/test_cuda_sources.py) and this script's own checks (tests/
# test_gpu_check.py, which collects the whole suite again) run on CPU machines already.
CUDA_TESTS='cuda and not cuda_sources and not test_gpu_check'
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# torch (and DeepSpeed's op builder) guess the toolkit from the nvcc on the PATH; on the CPU
# machines that is a wrapper in /usr/local/bin, whose folder has no libcudart: name it.
if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then export CUDA_HOME=/usr/local/cuda; fi
cores=$(nproc)
started=$SECONDS
simulated=0                   # the dry run's clock: every step takes its whole timeout
status_lines=()

elapsed() { if [ "$dry" = 1 ]; then echo "$simulated"; else echo $((SECONDS - started)); fi; }

selected() { [ -z "$only" ] || [[ ",$only," == *",$1,"* ]]; }

named() { [[ ",$only," == *",$1,"* ]]; }  # steps that run only when named

record() {  # record NAME STATUS SECONDS: one line of the closing table
    status_lines+=("$(printf '%-15s %-34s %5s s' "$1" "$2" "$3")")
}

digest() {  # the closing lines of a step's log (TAIL=pytest: its failures and its last line),
    local log=$1  # after its first lines matching KEEP, where set
    if [ -n "${KEEP:-}" ]; then grep -E "$KEEP" "$log" | head -n 4; fi
    if [ "${TAIL:-10}" = pytest ]; then
        # A CUDA test skipped on the GPU machine is a failure of the check: show why.
        grep -E '^(FAILED|ERROR|SKIPPED) ' "$log" | head -n 30
        tail -n 1 "$log"
    else
        tail -n "${TAIL:-10}" "$log"
    fi | cut -c1-200
}

step() {  # step NAME TIMEOUT MINIMUM COMMAND...: run under the deadline, logged and summarized
    local name=$1 cap=$2 minimum=$3
    shift 3
    if ! selected "$name"; then
        record "$name" "not selected (GPU_CHECK_ONLY)" 0
        return
    fi
    local left=$((budget - $(elapsed) - grace))
    if [ "$left" -lt "$minimum" ]; then
        echo "== $name: SKIPPED: ${left} s left before the deadline, needs ${minimum} s" \
            >> "$summary"
        record "$name" "SKIPPED (deadline)" 0
        return
    fi
    local limit=$((cap < left ? cap : left)) shown
    shown=$(printf '%q ' "$@")
    echo "[gpu_check] $(elapsed) s: $name (timeout $limit s): $shown"
    if [ "$dry" = 1 ]; then
        simulated=$((simulated + limit))
        echo "== $name: planned, timeout $limit s: $shown" >> "$summary"
        record "$name" "planned" "$limit"
        return
    fi
    local log=$out/logs/$name.log begin=$SECONDS
    # A step may be one of the functions below (exported): timeout runs it in a child bash.
    if declare -F "$1" > /dev/null; then set -- bash -c '"$@"' "$1" "$@"; fi
    timeout --signal=INT --kill-after=5 "$limit" "$@" > "$log" 2>&1
    local rc=$? took=$((SECONDS - begin))
    {
        echo "== $name: exit $rc after $took s (timeout $limit s): $shown"
        digest "$log"
    } >> "$summary"
    case $rc in
        0) record "$name" "ok" "$took" ;;
        124|137) record "$name" "TIMEOUT (exit $rc)" "$took" ;;
        *) record "$name" "FAILED (exit $rc)" "$took" ;;
    esac
    # The device tool brings back at most 8 files: the logs travel as one archive.
    tar -rf "$out/logs.tar" -C "$out" "logs/$name.log" && rm -f "$log"
}

machine_info() {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    echo "cores: $cores; $(python3 --version); torch $(python3 -c 'import torch;
print(torch.__version__, torch.version.cuda, torch.backends.cpu.get_cpu_capability())')"
    nvcc --version | tail -n 2
}

run_bench_step() {  # as many timed steps (<= 50) as the time left allows, after 3 warm-up steps
    # About 20 s of start, then per row ~15 s of model build, setup and warm-up and ~0.5 s a
    # step (the anchor's FSDP2 ran 0.42 s a step on an H100) for the four rows.
    local timed=$((($1 - 20 - 4 * 15) / 2))
    timed=$((timed > 50 ? 50 : timed))
    if [ "$timed" -lt 10 ]; then
        echo "bench_step: ${1} s is too little for 10 timed steps of each row"
        return 3
    fi
    python3 benchmarks/bench_step.py --steps $((timed + 3)) --warmup 3 --json "$out/bench_step.json"
}
run_fused_cuda() {  # issue 18's GPU figures, eager in the same run (no compile: its time)
    python3 benchmarks/bench_kernels.py --device cuda --dtype bfloat16 \
        --sizes 8192x128256x4096 --impls fused eager --repeats 3 || return
    python3 benchmarks/bench_norms.py --device cuda --no-compile --tokens 64M --repeats 10 \
        --hidden 1024 4096 8192 16384 --ops rms swiglu
}
build_extension() {  # the extension for sm_90 and this CPU, and a stripped copy to bring back
    if [ -n "$prebuilt" ]; then
        cp "$prebuilt" zero_ext/_C.abi3.so && echo "zero_ext: building: no, using $prebuilt"
        return
    fi
    env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$cores" ZERO_EXT_CUDA=1 ZERO_EXT_CPU_ISAS=host \
        python3 setup.py build_ext --inplace || return
    strip -g -o "$out/_C.abi3.so" zero_ext/_C.abi3.so 2> /dev/null \
        || cp zero_ext/_C.abi3.so "$out/_C.abi3.so"
    python3 benchmarks/extension_digest.py --record "$out/_C.abi3.so.json"
    ls -l "$out/_C.abi3.so"
}
run_offload_ds() {  # issue 15's DeepSpeed row (ZeRO-Offload, stage 3) on row 1's shape
    if ! python3 -c "import deepspeed" 2> /dev/null; then
        if [ ! -d wheels ]; then
            echo "offload_ds: DeepSpeed is not installed and there is no wheels/ folder: run" \
                "benchmarks/fetch_gpu_wheels.sh on the CPU machine and carry [\"wheels\"]"
            return 3
        fi
        python3 -m pip install --no-index --find-links wheels --no-build-isolation deepspeed \
            || return
    fi
    # Its first initialize compiles DeepSpeed's CPU Adam: the row's initialize_s says how long.
    python3 benchmarks/bench_offload.py --impls deepspeed --ds-stage 3 --batch 16 --steps 6 \
        --row-timeout $(($1 - 40)) --json "$out/offload_ds_b16.json"
}
export -f machine_info run_bench_step run_fused_cuda build_extension run_offload_ds
export out cores prebuilt

echo "[gpu_check] $(date -u +%H:%M:%S) UTC, deadline $budget s, logs in $out" \
    "(dry run: $dry, only: ${only:-all})"
TAIL=6 step machine 20 3 machine_info
# An extension is used only where its record (benchmarks/extension_digest.py) says it was built
# from this tree's sources for this torch; otherwise the build step builds.
# The build step is selected whenever an extension was given: it puts it in place, or builds.
# One built on a CPU machine (gpu_prebuild.sh) may also fail to load on this image (other
# system libraries): it is imported once here, and built instead where that fails.
if [ -n "$prebuilt" ]; then
    selected build || only="$only,build"
    if ! why=$(python3 benchmarks/extension_digest.py --check "$prebuilt.json"); then
        echo "[gpu_check] not using $prebuilt: $why; building instead" | tee -a "$summary"
        prebuilt=""
    elif [ "$dry" != 1 ]; then
        load_log=$out/logs/prebuilt_load.log
        if ! { cp "$prebuilt" zero_ext/_C.abi3.so > "$load_log" 2>&1 &&
                timeout 60 python3 -c "import zero_ext" >> "$load_log" 2>&1; }; then
            echo "[gpu_check] not using $prebuilt: it does not load here ($(tail -n 2 \
                "$load_log" | tr '\n' ' ' | cut -c1-300)); building instead" | tee -a "$summary"
            rm -f zero_ext/_C.abi3.so
            prebuilt=""
        fi
        tar -rf "$out/logs.tar" -C "$out" logs/prebuilt_load.log && rm -f "$load_log"
    fi
fi
build_cap=165
[ -n "$prebuilt" ] && build_cap=10  # a copy
KEEP='^zero_ext: building' TAIL=3 step build "$build_cap" 1 build_extension
TAIL=24 step env 12 5 python3 -m zero_ext.env
TAIL=pytest step cuda_tests 100 40 python3 -m pytest -q -p no:cacheprovider -rfEs \
    --continue-on-collection-errors --durations=15 tests/ -k "$CUDA_TESTS"
TAIL=12 step nccl_parity 55 30 python3 tests/gpu_nccl_parity.py --timeout 25 \
    --json "$out/nccl_parity.json"
KEEP='bandwidth ceiling' TAIL=12 step adamw_cuda 20 12 python3 benchmarks/bench_adamw.py \
    --device cuda --cuda-params 256M --no-deepspeed
KEEP='bandwidth ceiling' TAIL=12 step adamw_cpu16 25 15 python3 benchmarks/bench_adamw.py \
    --device cpu --threads 16 --no-deepspeed
TAIL=26 step quant_cuda 20 10 python3 benchmarks/bench_quant.py --device cuda --sizes 16M 256M \
    --blocks 256 2048 --repeats 20 --error-numel 1M
TAIL=16 step bench_zero 30 15 python3 -m torch.distributed.run --nproc_per_node=1 \
    benchmarks/bench_zero.py \
    --impls ddp,zero_ext --rounds 2 --json "$out/bench_zero.json"
TAIL=pytest step sanitizer 40 20 env TORCH_CUDA_SANITIZER=1 python3 -m pytest -q \
    -p no:cacheprovider -rfEs tests/test_offload.py tests/test_checkpointing.py -k "$CUDA_TESTS"
left=$((budget - $(elapsed) - grace))
# bench_step (issue 12's) comes first; with time to spare 40 s of it are left to fused_cuda.
[ "$left" -ge 140 ] && left=$((left - 40))
TAIL=12 step bench_step "$left" 100 run_bench_step "$left"
TAIL=20 step fused_cuda 40 20 run_fused_cuda
# Named only (bench_step takes what the check leaves): the stall watch over NCCL.
named nccl_stall && TAIL=pytest step nccl_stall 90 45 env ZERO_EXT_TEST_UNBOUNDED_BACKEND=nccl \
    python3 -m pytest -q -p no:cacheprovider -rfEs tests/test_stall.py -k unbounded
ratio=${GPU_OFFLOAD_RATIO:-0.25}
offload_rows="python3 benchmarks/bench_offload.py --impls zero_ext,fsdp2 --steps 6"
# The rows keep 84-109 GB of model state on the GPU (the estimator: the 7B at ratio 0.25
# 84.1 GB, all of it 108.6 GB, the 13B at 0.6 100.7 GB), activations on top: an H200's. On a
# smaller card each is listed as skipped, with the reason, rather than run out of memory.
gpu_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2> /dev/null \
    | head -n 1)
offload_row() {  # offload_row NAME ARGS...: step NAME ARGS... where the GPU can hold the row
    if [ "$dry" != 1 ] && [ "${gpu_mib:-0}" -lt 120000 ] 2> /dev/null; then
        echo "== $1: SKIPPED: it needs an H200 (>= 120000 MiB), this GPU has ${gpu_mib:-none}" \
            "MiB (device tool: kind nvidia-h200)" >> "$summary"
        record "$1" "SKIPPED (GPU memory)" 0
        return
    fi
    step "$@"
}
# shellcheck disable=SC2086  # offload_rows is a command line
{
    named offload_b16 && TAIL=16 offload_row offload_b16 250 150 $offload_rows --batch 16 \
        --zero-ratio "$ratio" --row-timeout 120 --json "$out/offload_b16.json"
    named offload_b4 && TAIL=16 offload_row offload_b4 160 100 $offload_rows --batch 4 \
        --zero-ratio "$ratio" --row-timeout 75 --json "$out/offload_b4.json"
    named offload_ceiling && TAIL=12 offload_row offload_ceiling 100 60 python3 \
        examples/train_llama_offload.py --batch 8 --no-offload --steps 6 \
        --json "$out/offload_ceiling_b8.json"
    named offload_13b && TAIL=12 offload_row offload_13b 160 100 python3 \
        examples/train_llama_offload.py --model 13b --batch 8 --ratio 0.6 --steps 6 \
        --json "$out/offload_13b_b8.json"
    # The row's own timeout leaves it 40 s of the step's to write what it measured.
    named offload_ds && {
        ds_cap=$((budget - $(elapsed) - grace))
        ds_cap=$((ds_cap < 300 ? ds_cap : 300))
        TAIL=12 offload_row offload_ds "$ds_cap" 150 run_offload_ds "$ds_cap"
    }
} || true

{
    echo
    worst=$([ "$dry" = 1 ] && echo " (dry run: the worst case)")
    echo "== gpu_check: $(elapsed) s of $budget$worst; step, status, seconds:"
    printf '%s\n' "${status_lines[@]}"
    redo=$(printf '%s\n' "${status_lines[@]}" | awk '/FAILED|TIMEOUT|SKIPPED/ {print $1}' \
        | grep -v '^build$' | paste -s -d, -)
    if [ -n "$redo" ]; then
        # With an extension to carry (given, or built here and brought back) the rerun only puts
        # it in place; without one it builds again.
        how="" with="" steps="build,$redo"
        if [ -n "$prebuilt" ]; then
            how="; carry [\"$prebuilt\", \"$prebuilt.json\"]"
            with="GPU_CHECK_PREBUILT=$prebuilt " steps=$redo
        elif [ -f "$out/_C.abi3.so" ]; then
            how="; here: mkdir -p gpu_runs && cp <files_at>/_C.abi3.so* gpu_runs/; carry"
            how="$how [\"gpu_runs/_C.abi3.so\", \"gpu_runs/_C.abi3.so.json\"]"
            with="GPU_CHECK_PREBUILT=gpu_runs/_C.abi3.so " steps=$redo
        fi
        echo "rerun (fresh machine, timeout_s 200$how): ${with}GPU_CHECK_ONLY=$steps" \
            "GPU_CHECK_BUDGET=170 bash benchmarks/gpu_check.sh \"\$OUT\""
    fi
} >> "$summary"
cat "$summary"
# Exit 1 when a step failed, timed out or was skipped: the caller sees it without reading.
! grep -q -E 'FAILED|TIMEOUT|SKIPPED' <(printf '%s\n' "${status_lines[@]}")
