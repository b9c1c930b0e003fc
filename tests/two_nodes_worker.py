"""examples/train_gpt.py as tests/test_two_nodes_failures.py runs it under torchrun on two
nodes (arguments are train_gpt's), with two test hooks set by environment variables:

- ZX_STACKS_DIR: on SIGUSR1 the rank writes every thread's Python stack to
  ZX_STACKS_DIR/stacks-rank<RANK>.txt (faulthandler, so also while the main thread is blocked
  inside a C++ call): a scenario whose rank never raised says where that rank was.
- ZX_STUCK_RANK, ZX_STUCK_STEP: one rank stuck in its own code. Before optimizer step
  ZX_STUCK_STEP (default 3), rank ZX_STUCK_RANK sleeps (an hour) outside zero_ext while the
  others wait in the step's collectives. Its process stays alive and its heartbeats keep
  beating: a hung data loader or a deadlock in user code, not a dead or frozen rank.
"""

import faulthandler
import os
import runpy
import signal
import sys
import time

from zero_ext.engine import ZeroEngine

HERE = os.path.dirname(os.path.abspath(__file__))
STUCK_RANK = int(os.environ.get("ZX_STUCK_RANK", "-1"))
STUCK_STEP = int(os.environ.get("ZX_STUCK_STEP", "3"))
_step = ZeroEngine.step


def stuck_step(engine: ZeroEngine) -> None:
    if (engine.rank == STUCK_RANK and engine.global_steps == STUCK_STEP
            and engine.is_gradient_accumulation_boundary()):
        print(f"rank {engine.rank} stuck before step {STUCK_STEP + 1}", flush=True)
        time.sleep(3600)
    _step(engine)


if __name__ == "__main__":
    stacks_dir = os.environ.get("ZX_STACKS_DIR")
    if stacks_dir:
        # Open for the life of the process: faulthandler writes to it on the signal.
        stacks = open(os.path.join(stacks_dir, f"stacks-rank{os.environ['RANK']}.txt"),  # noqa: SIM115
                      "w")
        faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    if STUCK_RANK >= 0:
        ZeroEngine.step = stuck_step
    script = os.path.join(os.path.dirname(HERE), "examples", "train_gpt.py")
    sys.argv = [script, *sys.argv[1:]]
    runpy.run_path(script, run_name="__main__")
