"""zero_ext against DeepSpeed itself: one ds_config, the same data, compared step by step.

The cases (deepspeed_reference_cases.py) run inside one gloo process group per world size (2,
and 3 for chunks that do not divide evenly); each test reads its case's result.
"""

import functools
import os

import deepspeed_reference_cases as cases
import pytest

from dist_harness import run_group


@functools.cache
def _group(world_size: int) -> list[dict] | Exception:
    """The group's per-rank results, or its failure: kept, so that a group that failed (or
    timed out) fails each of its tests at once instead of running again for each."""
    previous = os.environ.get("ZERO_EXT_CPU_SHM")
    os.environ["ZERO_EXT_CPU_SHM"] = "0"  # gloo's collectives, which DeepSpeed also runs on
    try:
        return run_group(world_size, cases.run_cases, world_size)
    except Exception as error:  # noqa: BLE001 - re-raised by every test of the group
        return error
    finally:
        if previous is None:
            del os.environ["ZERO_EXT_CPU_SHM"]
        else:
            os.environ["ZERO_EXT_CPU_SHM"] = previous


@pytest.mark.parametrize("world_size, case_id",
                         [(ws, cid) for ws, table in sorted(cases.CASES.items()) for cid in table])
def test_trains_as_deepspeed(world_size, case_id):
    group = _group(world_size)
    if isinstance(group, Exception):
        raise group
    failures = [f"--- rank {r} ---\n{result[case_id]}"
                for r, result in enumerate(group) if result[case_id] is not None]
    assert not failures, f"{case_id} failed:\n" + "\n".join(failures)


class _RunsCode:
    """Unpickling this would create a file: what a malicious checkpoint would do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_deepspeed_checkpoint_is_read_as_data_never_code(tmp_path):
    import argparse

    import torch

    from zero_ext.checkpoint import from_deepspeed
    from zero_ext.checkpoint.format import CheckpointError

    tag = tmp_path / "global_step1"
    tag.mkdir()
    marker = tmp_path / "ran"
    torch.save({"module": {}, "param_shapes": [], "hook": _RunsCode(str(marker))},
               tag / "mp_rank_00_model_states.pt")
    assert from_deepspeed.is_deepspeed_checkpoint(str(tag))
    with pytest.raises(CheckpointError, match="could not be read as plain data"):
        from_deepspeed._load(str(tag / "mp_rank_00_model_states.pt"))
    assert not marker.exists()
    # Megatron-DeepSpeed's arguments in the client state are data: read as they were saved
    torch.save({"args": argparse.Namespace(lr=0.1)}, tag / "client.pt")
    assert from_deepspeed._load(str(tag / "client.pt"))["args"] == argparse.Namespace(lr=0.1)


def test_a_corrupted_deepspeed_file_is_refused_not_loaded(tmp_path):
    """torch.load(mmap=True) does not check the CRC-32 of a zip record: a changed byte of a
    tensor loaded as a wrong value until zero_ext checked them."""
    import torch

    from zero_ext.checkpoint import from_deepspeed
    from zero_ext.checkpoint.format import CheckpointError

    path = str(tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    torch.save({"optimizer_state_dict": {"fp32": torch.arange(1000.0)}}, path)
    cases.flip_record_byte(path)
    with pytest.raises(CheckpointError, match="optim_states/data/0 fails its CRC-32 check"):
        from_deepspeed._load(path)
