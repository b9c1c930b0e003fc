"""DeepSpeed's unit tests ported to zero_ext's API: one pytest test per ported case.

The test function names DeepSpeed's test file (test_zero_py for tests/unit/runtime/zero/
test_zero.py, ...) and the parameter names the test class and its parametrization there, so a
failure reads as the DeepSpeed test it is. The cases live in ds_conformance_cases*.py; the
distributed ones run inside one gloo process group per world size (2, and 3 for the
checkpoints saved at 2 ranks and loaded at 3), whose per-case results these tests read.
"""

import atexit
import functools
import os
import shutil
import tempfile

import pytest

import ds_conformance_cases as cases
from dist_harness import run_group

cases.load_all_cases()
_WORKDIR = tempfile.mkdtemp(prefix="zero-ext-ds-conformance-")
atexit.register(shutil.rmtree, _WORKDIR, True)


@functools.cache
def _group(world_size: int) -> list[dict]:
    if world_size == 3:
        _group(2)  # saves the checkpoints that the 3-rank group loads
    previous = os.environ.get("ZERO_EXT_CPU_SHM")
    os.environ["ZERO_EXT_CPU_SHM"] = "0"  # gloo's collectives, the path NCCL shares
    try:
        return run_group(world_size, cases.run_cases, world_size, _WORKDIR)
    finally:
        if previous is None:
            del os.environ["ZERO_EXT_CPU_SHM"]
        else:
            os.environ["ZERO_EXT_CPU_SHM"] = previous


def _run(world_size: int, test_id: str) -> None:
    if world_size == 0:
        cases.CASES[0][test_id]()
        return
    failures = [f"--- rank {r} ---\n{result[test_id]}"
                for r, result in enumerate(_group(world_size)) if result[test_id] is not None]
    assert not failures, f"{test_id} failed:\n" + "\n".join(failures)


def _ported(ds_file: str):
    """Parametrizes over the cases ported from DeepSpeed's `ds_file`, named as there."""
    prefix = ds_file + "::"
    items = [(ws, tid) for ws, table in sorted(cases.CASES.items()) for tid in table
             if tid.startswith(prefix)]
    assert items, ds_file
    return pytest.mark.parametrize("world_size, test_id", items,
                                   ids=[tid[len(prefix):] for _, tid in items])


@_ported("test_ds_config_dict.py")
def test_ds_config_dict_py(world_size, test_id):
    _run(world_size, test_id)


@_ported("test_ds_initialize.py")
def test_ds_initialize_py(world_size, test_id):
    _run(world_size, test_id)


@_ported("test_zero.py")
def test_zero_py(world_size, test_id):
    _run(world_size, test_id)


@_ported("test_zero_context.py")
def test_zero_context_py(world_size, test_id):
    _run(world_size, test_id)


@_ported("test_fp16.py")
def test_fp16_py(world_size, test_id):
    _run(world_size, test_id)


@_ported("test_dynamic_loss_scale.py")
def test_dynamic_loss_scale_py(world_size, test_id):
    _run(world_size, test_id)


@_ported("test_zero_optimizer.py")
def test_zero_optimizer_py(world_size, test_id):
    _run(world_size, test_id)


@_ported("test_latest_checkpoint.py")
def test_latest_checkpoint_py(world_size, test_id):
    _run(world_size, test_id)


@_ported("test_lr_scheduler.py")
def test_lr_scheduler_py(world_size, test_id):
    _run(world_size, test_id)


@_ported("test_other_optimizer.py")
def test_other_optimizer_py(world_size, test_id):
    _run(world_size, test_id)


@_ported("test_zero_optim_overflow.py")
def test_zero_optim_overflow_py(world_size, test_id):
    _run(world_size, test_id)


@_ported("test_ignore_unused_parameters.py")
def test_ignore_unused_parameters_py(world_size, test_id):
    _run(world_size, test_id)


@_ported("test_zero_context_return.py")
def test_zero_context_return_py(world_size, test_id):
    _run(world_size, test_id)


@_ported("test_shared_weights.py")
def test_shared_weights_py(world_size, test_id):
    _run(world_size, test_id)


@_ported("test_tag_validation.py")
def test_tag_validation_py(world_size, test_id):
    _run(world_size, test_id)


@_ported("test_zero_context_ancestry.py")
def test_zero_context_ancestry_py(world_size, test_id):
    _run(world_size, test_id)


@_ported("test_zero_nesting_init.py")
def test_zero_nesting_init_py(world_size, test_id):
    _run(world_size, test_id)


@_ported("test_zero_dynamic_class.py")
def test_zero_dynamic_class_py(world_size, test_id):
    _run(world_size, test_id)


@_ported("test_zero_linear_direct_init.py")
def test_zero_linear_direct_init_py(world_size, test_id):
    _run(world_size, test_id)


@_ported("test_zero_config.py")
def test_zero_config_py(world_size, test_id):
    _run(world_size, test_id)


@_ported("test_zero_grad_clip.py")
def test_zero_grad_clip_py(world_size, test_id):
    _run(world_size, test_id)


@_ported("test_zero_hook_attribute_delegation.py")
def test_zero_hook_attribute_delegation_py(world_size, test_id):
    _run(world_size, test_id)


@_ported("test_zero_late_module_attach.py")
def test_zero_late_module_attach_py(world_size, test_id):
    _run(world_size, test_id)


@_ported("test_bf16.py")
def test_bf16_py(world_size, test_id):
    _run(world_size, test_id)


@_ported("test_activation_checkpointing.py")
def test_activation_checkpointing_py(world_size, test_id):
    _run(world_size, test_id)


def test_every_ported_file_has_its_test():
    """A case registered under a DeepSpeed file without a test function here would never run."""
    here = {name for name in globals() if name.startswith("test_") and name.endswith("_py")}
    for table in cases.CASES.values():
        for test_id in table:
            ds_file = test_id.split("::")[0]
            assert ds_file.replace(".", "_") in here, test_id


@_ported("test_zero_tensor_fragment.py")
def test_zero_tensor_fragment_py(world_size, test_id):
    _run(world_size, test_id)


@_ported("test_no_sync_ctxt.py")
def test_no_sync_ctxt_py(world_size, test_id):
    _run(world_size, test_id)


@_ported("test_convert_checkpoint.py")
def test_convert_checkpoint_py(world_size, test_id):
    _run(world_size, test_id)


@_ported("test_offload_states.py")
def test_offload_states_py(world_size, test_id):
    _run(world_size, test_id)
