"""The README's main job: examples/train_gpt.py under torchrun, two CPU ranks, learns."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_gpt_under_torchrun_lowers_the_loss():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           os.path.join(ROOT, "examples", "train_gpt.py"), "--config",
           os.path.join(ROOT, "examples", "configs", "zero2.json"), "--steps", "30"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    match = re.search(r"stage 2, 2 rank\(s\), 30 steps of 32 samples .*loss ([\d.]+) -> ([\d.]+)",
                      result.stdout)
    assert match, result.stdout[-3000:]
    first, last = map(float, match.groups())
    assert last < 0.8 * first
    assert "[zero_ext] step 20" in result.stdout  # the engine's steps_per_print line
