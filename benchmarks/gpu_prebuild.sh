#!/usr/bin/env bash
# Builds, on a CPU machine, the CUDA extension the GPU check (benchmarks/gpu_check.sh) puts in
# place instead of building on the GPU machine, so that none of the GPU lease goes to a compile:
#
#   bash benchmarks/gpu_prebuild.sh            # ~1 min of downloads, ~3.5 min of build (2 cores)
#
# then, with the device tool:
#   command:   GPU_CHECK_PREBUILT=gpu_runs/_C.abi3.so bash benchmarks/gpu_check.sh "$OUT"
#   carry:     ["gpu_runs/_C.abi3.so", "gpu_runs/_C.abi3.so.json"]
#
# The GPU machine runs torch 2.11.0+cu130 (PyPI's default build of 2.11.0) on Python 3.12; the
# extension is built against that torch (in a virtual environment of its own, so the machine's
# torch stays as it is), with the machine's nvcc 13.0, for sm_90 only and every CPU kernel
# variant (the GPU host's CPU is not known here). _C.abi3.so uses Python's limited API, so the
# Python 3.11 here builds what 3.12 loads. The load is checked here, under that torch: every op
# registered, with its CUDA kernel.
#
# gpu_runs/_C.abi3.so.json records the torch it was built against and a digest of every source
# it was built from (benchmarks/extension_digest.py); gpu_check.sh builds instead of using the
# copy when either differs there, so a stale or mismatched extension is never run.
#
# Environment: GPU_TORCH (default 2.11.0), GPU_PREBUILD_VENV (default /tmp/zero_ext_gpu_venv,
# reused when it already has that torch), GPU_PREBUILD_DIR (the copy built, default
# /tmp/zero_ext_gpu_src), MAX_JOBS (default: the cores here).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
want=${GPU_TORCH:-2.11.0}
venv=${GPU_PREBUILD_VENV:-/tmp/zero_ext_gpu_venv}
out=$root/gpu_runs
mkdir -p "$out"
rm -f "$out/_C.abi3.so" "$out/_C.abi3.so.json"  # a failed run leaves nothing to carry

have=$("$venv/bin/python" -c 'import torch; print(torch.__version__)' 2> /dev/null || true)
if [ "${have%%+*}" != "$want" ]; then
    echo "gpu_prebuild: torch $want into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "torch==$want" numpy ninja setuptools wheel
fi
py=$venv/bin/python
"$py" - "$want" << 'EOF'
import sys, torch
if torch.__version__.split("+")[0] != sys.argv[1] or torch.version.cuda is None:
    sys.exit(f"gpu_prebuild: the virtual environment has torch {torch.__version__} "
             f"(CUDA {torch.version.cuda}); the GPU machine runs {sys.argv[1]} with CUDA")
print(f"gpu_prebuild: building against torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF

# A copy of the working tree (committed or not, less what git ignores): the build writes into
# its tree, and the editable install here stays built for this machine's torch. The copy's
# build/ folder is kept from one run to the next (the files keep their times), so a second
# run compiles only what changed.
src=${GPU_PREBUILD_DIR:-/tmp/zero_ext_gpu_src}
mkdir -p "$src"
find "$src" -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
git ls-files -z --cached --others --exclude-standard | tar -c --null -T - | tar -x -C "$src"
# The toolkit: CUDA_HOME, else the usual place (torch's own guess from nvcc on the PATH may be
# a wrapper script's folder, /usr/local here, which has no libcudart to link).
cuda_home=${CUDA_HOME:-/usr/local/cuda}
if [ ! -e "$cuda_home/lib64/libcudart.so" ] && [ ! -e "$cuda_home/lib/libcudart.so" ]; then
    echo "gpu_prebuild: no CUDA toolkit at $cuda_home (no libcudart.so); set CUDA_HOME"
    exit 1
fi
begin=$SECONDS
(cd "$src" && env CUDA_HOME="$cuda_home" TORCH_CUDA_ARCH_LIST=9.0 ZERO_EXT_CUDA=1 \
    ZERO_EXT_CPU_ISAS=all MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    "$py" setup.py build_ext --inplace > "$out/prebuild.log" 2>&1) || {
    grep -E -i "error|warning: .*deprecated" "$out/prebuild.log" | tail -n 20 | cut -c1-300
    echo "gpu_prebuild: the build failed (whole log: $out/prebuild.log)"
    exit 1
}
echo "gpu_prebuild: built in $((SECONDS - begin)) s"
strip -g -o "$out/_C.abi3.so" "$src/zero_ext/_C.abi3.so"

# The load check, and the record gpu_check.sh compares against on the GPU machine.
(cd "$src" && "$py" -) << 'EOF'
import torch
import zero_ext  # noqa: F401  (loads _C: the ops register)

names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("zero_ext::"))
no_cuda = [n for n in names if not torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")]
print(f"gpu_prebuild: {len(names)} ops load under torch {torch.__version__}; "
      f"without a CUDA kernel: {', '.join(no_cuda) or 'none'}")
EOF
"$py" "$src/benchmarks/extension_digest.py" --record "$out/_C.abi3.so.json"
ls -l "$out/_C.abi3.so"
