#!/usr/bin/env bash
# Run HERE (where PyPI answers), before a device call: puts into wheels/ (git-ignored) what the
# GPU machine lacks for the DeepSpeed row of bench_offload.py: DeepSpeed's source (it builds
# there without its ops, which it compiles on first use with that machine's nvcc) and the
# wheels of its dependencies missing from that image (Python 3.12, x86-64). Then pass
# carry=["wheels"] to the device tool, and start the command with
# `python3 -m pip install --no-index --find-links wheels --no-build-isolation deepspeed`.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p wheels
pip download --quiet --no-deps --no-binary=:all: deepspeed==0.19.8 -d wheels
# Every requirement of DeepSpeed's but torch and numpy (the image has those; which of the rest
# it has is not known here, and `--no-index` finds a missing one only in wheels/).
pip download --quiet --python-version 3.12 --only-binary=:all: --platform any \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 \
    einops hjson msgpack ninja "packaging>=20.0" psutil py-cpuinfo "pydantic>=2.0.0" tqdm \
    -d wheels
ls -l wheels
