"""Checkpoints: sharded save and load at any world size and stage, and consolidation.

engine.save_checkpoint / engine.load_checkpoint (engine_state.py) write and read the format of
format.py through the atomic, checksummed files of files.py; consolidate.py turns a checkpoint
into one safetensors file of full weights.
"""

from zero_ext.checkpoint.consolidate import consolidate
from zero_ext.checkpoint.format import CheckpointError

__all__ = ["CheckpointError", "consolidate"]
