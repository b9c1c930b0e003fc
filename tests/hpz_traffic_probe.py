"""Runs a training script (the arguments after this file's name) and prints, per rank, its
all-gather bytes by link class inside engine.backward and elsewhere, as one line
`traffic {json}`: what tests/test_hpz_two_nodes.py compares between the flat path and hpZ."""

import json
import os
import runpy
import sys

from zero_ext import comm
from zero_ext.engine import ZeroEngine

LINKS = ("intra_node_bytes", "inter_node_bytes")
in_backward = dict.fromkeys(LINKS, 0.0)
_backward = ZeroEngine.backward


def _all_gather_bytes(traffic) -> dict[str, float]:
    return {link: getattr(traffic, link).get("all_gather", 0.0) for link in LINKS}


def backward(self, *args, **kwargs):
    before = _all_gather_bytes(comm.traffic)
    try:
        return _backward(self, *args, **kwargs)
    finally:
        after = _all_gather_bytes(comm.traffic)
        for link in LINKS:
            in_backward[link] += after[link] - before[link]


ZeroEngine.backward = backward
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
total = _all_gather_bytes(comm.traffic)
line = "traffic " + json.dumps({
    "rank": int(os.environ["RANK"]), "backward": in_backward,
    "elsewhere": {link: total[link] - in_backward[link] for link in LINKS}}) + "\n"
sys.stdout.flush()
os.write(sys.stdout.fileno(), line.encode())  # one write: the node's ranks share the stream
