#!/usr/bin/env bash
# The GPU runs owed (benchmarks/RESULTS.md, "Owed on the H100"), cut into parts that each fit
# one 10-minute call of the device tool on a fresh machine (each part builds first; a warm
# machine keeps the build and skips it):
#
#   bash benchmarks/gpu_runbook.sh tests     # build, python -m zero_ext.env, the test suite
#   bash benchmarks/gpu_runbook.sh kernels   # bench_adamw (CUDA 256M; CPU 16 threads), bench_zero
#   bash benchmarks/gpu_runbook.sh b4        # the issue-5 headline at batch 4: zero_ext at
#                                            # ratio 1 and 0.5, and 0.5 with clipping
#   bash benchmarks/gpu_runbook.sh b4-base   # its baselines: FSDP2, DeepSpeed ZeRO-Offload
#   bash benchmarks/gpu_runbook.sh b16       # zero_ext at batch 16, ratio 1 and 0.75 (+clip)
#   bash benchmarks/gpu_runbook.sh b16-base  # the baselines at batch 16
#   bash benchmarks/gpu_runbook.sh ckpt      # bench_checkpoint --params 1B
#
# The DeepSpeed rows need benchmarks/fetch_gpu_wheels.sh run here first and carry=["wheels"].
# The parts' rows are then judged together, anywhere: python benchmarks/bench_offload.py
# --from-json <files_at>/b16/*.json <files_at>/b16-base/*.json (table, ratios, the goals).
# Every command's output goes to $OUT/<part>/<name>.log (or ./gpu_runs/ without $OUT); the
# last lines printed are a summary of each command's exit code, time and closing lines, which
# is what the device tool's reply carries. A command that overruns its share is stopped
# (timeout) and the part goes on.
set -u
part=${1:?"which part: tests, kernels, b4, b4-base, b16, b16-base or ckpt"}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=${OUT:-$root/gpu_runs}/$part
mkdir -p "$out"
summary="$out/summary.txt"
: > "$summary"

run() {  # run NAME SECONDS COMMAND...: logged, timed, summarized
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout --signal=INT --kill-after=20 "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    {
        echo "== $name: exit $rc after $((SECONDS - start)) s: $*"
        tail -n "${TAIL:-12}" "$out/$name.log"
    } >> "$summary"
}

build() {
    if python3 -c "from zero_ext import _C; assert _C.cuda_archs_built()" 2>/dev/null; then
        echo "== build: already built" >> "$summary"
        return
    fi
    MAX_JOBS=16 run build 300 python3 -m pip install --no-build-isolation --no-deps -e .
    run env 60 python3 -m zero_ext.env
}

build
case $part in
    tests)
        TAIL=25 run pytest 420 python3 -m pytest -q -x -p no:cacheprovider tests/ ;;
    kernels)
        run adamw_cuda 120 python3 benchmarks/bench_adamw.py --device cuda --cuda-params 256M
        run adamw_cpu16 150 python3 benchmarks/bench_adamw.py --device cpu --threads 16
        # issue 16: quantize / dequantize-sum against the H200's copy_ bandwidth (goal >= 40%)
        run quant_cuda 120 python3 benchmarks/bench_quant.py --device cuda --sizes 16M 256M \
            --blocks 256 2048 --repeats 20
        TAIL=20 run bench_zero 150 torchrun --nproc_per_node=1 benchmarks/bench_zero.py
        # torch's CUDA sanitizer: unsynchronized cross-stream accesses in the offload paths
        # (it does not model NCCL; these tests run at one rank).
        TAIL=20 TORCH_CUDA_SANITIZER=1 run sanitizer 200 python3 -m pytest -q -x -m cuda \
            -p no:cacheprovider tests/test_offload.py tests/test_checkpointing.py ;;
    b4|b16)
        batch=${part#b}
        # The ratio whose device-side state (python -m zero_ext.estimate --offload-ratio)
        # leaves room for the batch's activations: 57 GiB of state at 0.5, 36 at 0.75.
        ratio=$([ "$batch" = 4 ] && echo 0.5 || echo 0.75)
        TAIL=16 run zero_ext_r1 200 python3 examples/train_llama_offload.py --batch "$batch" \
            --json "$out/zero_ext_r1.json"
        TAIL=16 run "zero_ext_r$ratio" 200 python3 examples/train_llama_offload.py \
            --batch "$batch" --ratio "$ratio" --json "$out/zero_ext_r$ratio.json"
        # With clipping the CPU step waits for the norm and runs behind the next forward.
        TAIL=16 run "zero_ext_r${ratio}_clip" 200 python3 examples/train_llama_offload.py \
            --batch "$batch" --ratio "$ratio" --clip 1.0 \
            --json "$out/zero_ext_r${ratio}_clip.json" ;;
    b4-base|b16-base)
        batch=${part%-base}
        batch=${batch#b}
        TAIL=16 run fsdp2 240 python3 benchmarks/bench_offload.py --batch "$batch" \
            --impls fsdp2 --json "$out/fsdp2.json"
        if [ -d wheels ]; then
            run deepspeed_install 120 python3 -m pip install --no-index --find-links wheels \
                --no-build-isolation deepspeed
        fi
        TAIL=16 run deepspeed 300 python3 benchmarks/bench_offload.py --batch "$batch" \
            --impls deepspeed --json "$out/deepspeed.json" ;;
    ckpt)
        TAIL=20 run bench_checkpoint 500 torchrun --nproc_per_node=1 \
            benchmarks/bench_checkpoint.py --params 1B ;;
    *)
        echo "unknown part $part: tests, kernels, b4, b4-base, b16, b16-base or ckpt" >&2
        exit 2 ;;
esac
cat "$summary"
