"""What an extension was built from: a digest of every source zero_ext._C is built from
(setup.py, csrc/, kernels/) and the torch it was built against.

benchmarks/gpu_prebuild.sh (a CPU machine) and gpu_check.sh's build step (the GPU machine)
record both beside the extension they build; gpu_check.sh checks the record of an extension it
is given against its own tree and torch, and builds instead when either differs, so an extension
built from other sources or for another torch is never run.

    python benchmarks/extension_digest.py                 # the digest of this tree's sources
    python benchmarks/extension_digest.py --record F.json # write the record for this tree and
                                                          # the torch of this python
    python benchmarks/extension_digest.py --check F.json  # exit 1, saying why, unless F.json
                                                          # matches this tree and torch

torch's version is read from its version.py without importing torch (a second or more).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SOURCE_DIRS = ("csrc", "kernels")
SOURCE_FILES = ("setup.py",)


def digest(root: str) -> str:
    paths = [os.path.join(root, name) for name in SOURCE_FILES]
    for folder in SOURCE_DIRS:
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, folder)):
            dirnames.sort()
            paths += [os.path.join(dirpath, name) for name in filenames
                      if not name.endswith((".o", ".so", ".pyc"))]
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(os.path.relpath(path, root).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(f.read())
        h.update(b"\0")
    return h.hexdigest()[:16]


def torch_build() -> str:
    """This python's torch, e.g. "2.11.0+cu130 (CUDA 13.0)", read without importing it."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return "no torch"
    version = runpy.run_path(os.path.join(spec.submodule_search_locations[0], "version.py"))
    return f"{version['__version__']} (CUDA {version.get('cuda')})"


def record() -> dict:
    return {"sources": digest(ROOT), "torch": torch_build()}


def mismatch(path: str) -> str:
    """Why the extension recorded in `path` may not run here ("" when it may)."""
    try:
        with open(path) as f:
            recorded = json.load(f)
    except (OSError, ValueError) as e:
        return f"its record {path} cannot be read ({e})"
    here = record()
    return "; ".join(f"built from {key} {recorded.get(key)!r}, here {value!r}"
                     for key, value in here.items() if recorded.get(key) != value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", metavar="JSON")
    parser.add_argument("--check", metavar="JSON")
    args = parser.parse_args()
    if args.record:
        written = record()
        with open(args.record, "w") as f:
            json.dump(written, f, indent=1)
        print(f"{args.record}: {written}")
    elif args.check:
        why = mismatch(args.check)
        if why:
            print(f"the extension does not match this tree and torch: {why}")
            return 1
    else:
        print(digest(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
