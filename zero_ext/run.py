"""Run an unmodified Hugging Face (or TRL) training script on zero_ext:

    python -m zero_ext.run train.py --deepspeed ds.json [the script's own arguments...]
    torchrun --nproc_per_node=8 -m zero_ext.run train.py --deepspeed ds.json ...
    ZERO_EXT_CONFIG=ds.json torchrun --nproc_per_node=8 -m zero_ext.run train.py ...
    python -m zero_ext.run -m some.module --deepspeed ds.json ...   # a module, as python -m
    deepspeed --module zero_ext.run train.py --deepspeed ds.json ...   # DeepSpeed's launcher

It calls zero_ext.integrations.transformers.apply() and then runs the script as __main__ with
its arguments, exactly as `python train.py ...` would (sys.argv, sys.path[0] = the script's
folder, __file__ absolute; a folder or zip with __main__.py too). Under DeepSpeed's launcher,
which puts `--local_rank=N` first, the script gets it first among its own arguments, as
`deepspeed train.py` gives it. Every Trainer the script builds with `deepspeed=` (`--deepspeed ds.json`), or every
Trainer when ZERO_EXT_CONFIG names a config, then trains on a zero_ext engine with that
config; DeepSpeed need not be installed. A script without either trains as it always did.
"""

from __future__ import annotations

import os
import runpy
import sys
import zipfile

USAGE = ("usage: python -m zero_ext.run SCRIPT.py [script arguments...]\n"
         "       python -m zero_ext.run -m MODULE [module arguments...]\n"
         "Runs the script on zero_ext: its --deepspeed config (or ZERO_EXT_CONFIG) configures a "
         "zero_ext engine; under torchrun: torchrun ... -m zero_ext.run SCRIPT.py ...")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv == ["-m"]:
        print(USAGE, file=sys.stderr if not argv or argv == ["-m"] else sys.stdout)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    local_rank = []
    if argv[0].startswith("--local_rank"):  # deepspeed --module zero_ext.run SCRIPT ...
        taken = 1 if "=" in argv[0] else 2
        local_rank, argv = argv[:taken], argv[taken:]
        if not argv:
            print(USAGE, file=sys.stderr)
            raise SystemExit(2)
    if argv[0] != "-m" and not os.path.exists(argv[0]):
        raise SystemExit(f"zero_ext.run: no script {argv[0]!r}; give the path of a Python file "
                         "(or -m MODULE)")
    from zero_ext.integrations.transformers import apply

    apply()
    if argv[0] == "-m":
        # run_module sets argv[0] to the module's file
        sys.argv = [argv[1], *local_rank, *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        return
    script = argv[0]
    sys.argv = [script, *local_rank, *argv[1:]]
    if not (os.path.isdir(script) or zipfile.is_zipfile(script)):  # (run_path puts those
        sys.path[0] = os.path.dirname(os.path.abspath(script))    # on sys.path itself)
    runpy.run_path(os.path.abspath(script), run_name="__main__")


if __name__ == "__main__":
    main()
