"""zero_ext.checkpointing: gradients unchanged by checkpointing and cpu_checkpointing, saved
activations cut, HF models through apply(), stage 2 and 3 under the engine (2 gloo ranks, one
group for every engine case), configure() and profile."""

import functools
import json
import warnings

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from zero_ext import checkpointing

import checkpointing_cases as cases
from dist_harness import run_group


@pytest.fixture(autouse=True)
def default_settings():
    checkpointing.configure()
    checkpointing.counters.reset()
    checkpointing.profile_report()
    yield
    checkpointing.configure()


class Step(nn.Module):
    """A block with a keyword tensor argument, a non-tensor keyword, a nested input and a
    non-tensor output."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x, pair, *, mask=None, scale=1.0):
        h = torch.tanh(self.fc(x * pair[0] + pair[1])) * scale
        if mask is not None:
            h = h * mask
        return x + h, {"aux": h.square().mean(), "note": "kept"}


def _step_grads(mode: str):
    torch.manual_seed(0)
    blocks = nn.ModuleList(Step() for _ in range(3))
    x = torch.randn(4, 8, requires_grad=True)
    pair = (torch.rand(4, 8) + 0.5, torch.randn(8, requires_grad=True))
    mask = torch.rand(4, 8)
    total, h = 0.0, x
    for block in blocks:
        if mode == "none":
            h, extra = block(h, pair, mask=mask, scale=0.5)
        elif mode == "nested":  # a segment inside a segment: only the outer one saves
            def inner(y, block=block):
                return checkpointing.checkpoint(block, y, pair, mask=mask, scale=0.5)

            h, extra = checkpointing.checkpoint(inner, h)
        else:
            h, extra = checkpointing.checkpoint(block, h, pair, mask=mask, scale=0.5)
        assert extra["note"] == "kept"
        total = total + extra["aux"]
    (h.square().mean() + total).backward()
    return [p.grad for p in blocks.parameters()] + [x.grad, pair[1].grad]


@pytest.mark.parametrize("mode, cpu", [("checkpoint", False), ("checkpoint", True),
                                       ("nested", True)])
def test_gradients_identical_with_checkpointing(mode, cpu):
    reference = _step_grads("none")
    checkpointing.configure(cpu_checkpointing=cpu)
    got = _step_grads(mode)
    for g, r in zip(got, reference):
        assert torch.equal(g, r)
    if cpu:
        # Each segment's saved inputs went to the host and came back: h, pair's two and mask
        # (4x8, 4x8, 8, 4x8 floats), or with nesting only the outer segment's h (the lambda
        # holds the rest). Segment 2's backward started the copy back of segment 1's inputs,
        # segment 1's that of segment 0's.
        tensors, nbytes = (1, 128) if mode == "nested" else (4, 3 * 128 + 32)
        counters = checkpointing.counters
        assert counters.tensors_to_host == 3 * tensors
        assert counters.bytes_to_host == counters.bytes_to_device == 3 * nbytes
        assert counters.prefetches == 2
    else:
        assert checkpointing.counters.tensors_to_host == 0


def test_cpu_checkpointing_keeps_the_inputs_layout():
    strides = []

    def fn(x):
        strides.append(x.stride())
        return (x * 2).sin()

    checkpointing.configure(cpu_checkpointing=True)
    x = torch.randn(3, 5, requires_grad=True)
    checkpointing.checkpoint(fn, x.t()).sum().backward()
    assert strides == [(1, 5), (1, 5)]  # forward, then the replay from the host copy
    assert torch.equal(x.grad, 2 * (2 * x).cos())


@pytest.mark.parametrize("view", [False, True], ids=["tensor", "temporary_view"])
@pytest.mark.parametrize("cpu", [False, True], ids=["checkpoint", "cpu_checkpointing"])
def test_an_input_modified_in_place_after_its_segment_raises_as_torch_does(cpu, view):
    # With the inputs moved to the host autograd's own version check is bypassed (the saved-
    # tensor hooks take the tensors): the host copies must not hide the change, and on CUDA
    # the copy could race it. A temporary view is gone by backward; its base is modified.
    checkpointing.configure(cpu_checkpointing=cpu)
    x = torch.randn(4, 8, requires_grad=True)
    h = x * 2
    out = checkpointing.checkpoint(lambda a: (a.sin() * 3).sum(), h[:, :4] if view else h)
    with torch.no_grad():
        h.add_(1)
    with pytest.raises(RuntimeError, match="modified by an in-?place operation"):
        out.backward()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_an_input_modified_then_dropped_while_its_copy_ran_raises():
    # The write was queued on the compute stream while the side stream's copy to the host
    # could still read the tensor, and by backward nothing holds it (the weak reference the
    # backward checks is dead): seen when the next segment lets the original go.
    checkpointing.configure(cpu_checkpointing=True)
    x = torch.randn(256, 256, device="cuda", requires_grad=True)
    h = x * 2
    out = checkpointing.checkpoint(lambda a: (a.sin() * 3).sum(), h)
    with torch.no_grad():
        h.add_(1)
    del h
    out = out + checkpointing.checkpoint(lambda a: a.cos().sum(), x * 3)
    with pytest.raises(RuntimeError, match="modified by an in-place operation"):
        out.backward()


def test_without_gradients_checkpoint_just_calls():
    block = Step()
    checkpointing.configure(cpu_checkpointing=True)
    with torch.no_grad():
        _, extra = checkpointing.checkpoint(block, torch.ones(2, 8), (torch.ones(8),) * 2)
    assert extra["note"] == "kept" and checkpointing.counters.tensors_to_host == 0


@functools.cache
def _saved(mode):
    return cases.saved_activation_bytes(mode)


def test_saved_activations_fall_by_half_and_cpu_checkpointing_leaves_none_on_the_device():
    none, ckpt, cpu = _saved("none"), _saved("checkpoint"), _saved("cpu")
    assert ckpt["saved"] <= none["saved"] / 2, (ckpt["saved"], none["saved"])
    # What checkpointing keeps of the blocks is their inputs: cpu_checkpointing moves exactly
    # those, and afterwards no block's input is alive on the device.
    blocks = len(cases.build_gpt().blocks)
    assert ckpt["saved"] - cpu["saved"] == blocks * ckpt["block_input_bytes"]
    assert cpu["to_host"] == blocks * cpu["block_input_bytes"]
    assert (none["inputs_alive"], ckpt["inputs_alive"], cpu["inputs_alive"]) == (4, 4, 0)
    for name, grad in none["grads"].items():
        assert torch.equal(ckpt["grads"][name], grad), name
        assert torch.equal(cpu["grads"][name], grad), name


def test_number_checkpoints_and_profile():
    model = cases.build_gpt()
    assert checkpointing.apply(model) == [f"blocks.{i}" for i in range(4)]
    assert checkpointing.apply(model) == [f"blocks.{i}" for i in range(4)]  # once is enough
    checkpointing.configure({"number_checkpoints": 2, "profile": True})
    tokens, targets = cases.batch(0, 2)
    model(tokens, targets).backward()
    report = checkpointing.profile_report()
    assert [t.name for t in report] == ["blocks.0", "blocks.1"]
    assert all(t.forward_s > 0 and t.backward_s > 0 for t in report), report
    assert str(report[0]).startswith("blocks.0: forward ")
    assert checkpointing.profile_report() == []


@pytest.mark.parametrize("cpu", [False, True])
def test_profile_leaves_the_segments_outputs_writable_in_place(cpu):
    # A model that adds its residual into a segment's output in place (h = ckpt(f, x);
    # h += x) trains with profile on as without it, and its segment is timed.
    linear = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8)
    grads = []
    for profile in (False, True):
        checkpointing.configure(profile=profile, cpu_checkpointing=cpu)
        checkpointing.profile_report()
        linear.zero_grad()
        h = checkpointing.checkpoint(lambda t: torch.tanh(linear(t)), x.requires_grad_())
        h += x
        h.sum().backward()
        grads.append(linear.weight.grad.clone())
    report = checkpointing.profile_report()
    assert len(report) == 1 and report[0].backward_s is not None and report[0].backward_s > 0
    assert torch.equal(grads[0], grads[1])


def test_profile_hooks_do_not_pile_up_on_inputs_that_outlive_the_step():
    # A parameter passed into a segment lives on: the hook that notes the end of the
    # segment's backward goes once fired, or every step would add one, timing old segments.
    checkpointing.configure(profile=True)
    checkpointing.profile_report()
    weight = torch.nn.Parameter(torch.randn(4, 4))
    for _ in range(3):
        x = torch.randn(2, 4, requires_grad=True)
        checkpointing.checkpoint(lambda a, b: torch.tanh(a @ b), x, weight).sum().backward()
        assert not weight._backward_hooks
    first = checkpointing.profile_report(reset=False)[0].backward_s
    x = torch.randn(2, 4, requires_grad=True)
    checkpointing.checkpoint(lambda a, b: torch.tanh(a @ b), x, weight).sum().backward()
    assert checkpointing.profile_report()[0].backward_s == first


def test_apply_names_what_it_could_not_find():
    with pytest.raises(ValueError, match=r"class \['Nothing'\] in the model; its classes are"):
        checkpointing.apply(cases.build_gpt(), block_classes=["Nothing"])
    with pytest.raises(ValueError, match="has no nn.ModuleList or nn.Sequential of blocks"):
        checkpointing.apply(nn.Linear(2, 2))
    assert checkpointing.apply(nn.Sequential(nn.Linear(2, 2), nn.Tanh())) == ["0", "1"]
    assert checkpointing.apply(cases.build_gpt(), block_classes=[cases.Block]) == \
        [f"blocks.{i}" for i in range(4)]


def test_partition_activations_accepted_with_one_notice(monkeypatch):
    monkeypatch.setattr(checkpointing, "_noticed", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            settings = checkpointing.configure({"partition_activations": True})
    assert settings.partition_activations
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "nothing to split" in messages[0], messages
    with pytest.raises(ValueError, match="number_checkpoints"):
        checkpointing.configure(number_checkpoints=0)
    with pytest.raises(TypeError, match="config must be an ActivationCheckpointingConfig"):
        checkpointing.configure(3)


class _Mpu:
    """A Megatron-style model-parallel unit of `size` ranks."""

    def __init__(self, size: int):
        self.size = size

    def get_model_parallel_world_size(self) -> int:
        return self.size

    def get_model_parallel_rank(self) -> int:
        return 0


def _settings(section) -> tuple:
    return (section.partition_activations, section.cpu_checkpointing,
            section.contiguous_memory_optimization, section.number_checkpoints,
            section.synchronize_checkpoint_boundary, section.profile)


def test_deepspeeds_configure_call_works_as_written(tmp_path, monkeypatch):
    """Megatron-DeepSpeed's call, DeepSpeed's order: the defaults, then deepspeed_config's
    section (a JSON path or a dict), then the keywords under DeepSpeed's names."""
    monkeypatch.setattr(checkpointing, "_configured", False)
    assert not checkpointing.is_configured()
    whole = {"train_batch_size": 8, "activation_checkpointing": {
        "profile": True, "number_checkpoints": 4, "cpu_checkpointing": None}}
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(whole))
    for source in (str(path), path, whole):
        section = checkpointing.configure(_Mpu(1), deepspeed_config=source,
                                          checkpoint_in_cpu=True, num_checkpoints=2,
                                          synchronize=True, contiguous_checkpointing=False)
        # (partition, cpu, contiguous, number, synchronize, profile)
        assert _settings(section) == (False, True, False, 2, True, True), source
        assert _settings(checkpointing._config) == _settings(section)
    assert checkpointing.is_configured()
    # The file alone: its section over the defaults, null read as false as DeepSpeed does.
    assert _settings(checkpointing.configure(None, deepspeed_config=path)) == \
        (False, False, False, 4, False, True)
    # A whole config without the section: the defaults, no warning about its other keys.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _settings(checkpointing.configure({"train_batch_size": 8, "bf16": {}})) == \
            (False, False, False, None, False, False)
    checkpointing.set_num_layers(6)
    assert checkpointing._config.number_checkpoints == 6
    checkpointing.reset()
    assert checkpointing.non_reentrant_checkpoint is checkpointing.checkpoint
    with pytest.raises(ValueError, match="2 model-parallel ranks; zero_ext is data-parallel"):
        checkpointing.configure(_Mpu(2))
    with pytest.raises(TypeError, match="cpu_checkpointing=True and checkpoint_in_cpu=False"):
        checkpointing.configure(cpu_checkpointing=True, checkpoint_in_cpu=False)
    with pytest.raises(TypeError, match="both a config and deepspeed_config"):
        checkpointing.configure({"profile": True}, deepspeed_config=whole)


@pytest.mark.parametrize("grad", [True, False])
def test_checkpoint_returns_outputs_as_deepspeeds_does(grad):
    """DeepSpeed's checkpoint returns a one-element tuple or list as its element and a list as
    a tuple (a layer's `return (h,)` feeds the next layer as h)."""
    x = torch.randn(3, 4, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        one = checkpointing.checkpoint(lambda a: (a.sin(),), x)
        single = checkpointing.checkpoint(lambda a: [a.sin()], x)
        pair = checkpointing.checkpoint(lambda a: [a.sin(), a.cos()], x)
        as_dict = checkpointing.checkpoint(lambda a: {"h": a.sin()}, x)
    assert isinstance(one, torch.Tensor) and isinstance(single, torch.Tensor)
    assert type(pair) is tuple and len(pair) == 2 and list(as_dict) == ["h"]
    assert_close(one, x.sin()) and assert_close(pair[1], x.cos())
    if grad:
        (one.sum() + pair[1].sum()).backward()
        assert_close(x.grad, x.detach().cos() - x.detach().sin())


def test_initialize_leaves_configure_settings_without_a_section():
    """configure() before initialize (Megatron-DeepSpeed's order) stays in force after an
    engine whose config has no activation_checkpointing section (DeepSpeed's initialize never
    touches them); a config with the section sets them from the defaults, as configure does."""
    for result in _engine_results():
        settings = result["settings"]
        assert settings["without_section"] == {"cpu_checkpointing": True, "profile": True,
                                               "number_checkpoints": 2}, settings
        assert settings["with_section"] == {"cpu_checkpointing": False, "profile": False,
                                            "number_checkpoints": None}, settings


def test_hf_llama_through_apply():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=cases.VOCAB, hidden_size=32, intermediate_size=48,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=cases.SEQ)
    tokens, _ = cases.batch(0, 2)
    grads = {}
    for mode in ("none", "apply", "cpu"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        if mode != "none":
            with warnings.catch_warnings():
                warnings.simplefilter("error", FutureWarning)
                assert checkpointing.apply(model) == ["model.layers.0", "model.layers.1"]
        checkpointing.configure(cpu_checkpointing=mode == "cpu", profile=True)
        model(input_ids=tokens, labels=tokens).loss.backward()
        grads[mode] = {n: p.grad for n, p in model.named_parameters()}
        names = [t.name for t in checkpointing.profile_report()]
        assert names == ([] if mode == "none" else ["model.layers.0", "model.layers.1"])
    assert checkpointing.counters.tensors_to_host > 0
    for name, grad in grads["none"].items():
        assert_close(grads["apply"][name], grad, rtol=0, atol=0, msg=name)
        assert_close(grads["cpu"][name], grad, rtol=0, atol=0, msg=name)


@functools.cache
def _engine_results():
    return run_group(2, cases.engine_cases)


def _assert_same_params(got: dict, reference: dict, rank: int) -> None:
    """Bitwise on the CPU, where a replay computes exactly what the forward did; on a GPU,
    atomics in some backward kernels (embedding) make two runs differ in the last bits."""
    for name, value in reference["params"].items():
        if got["device"] == "cpu":
            assert torch.equal(got["params"][name], value), (rank, name)
        else:
            assert_close(got["params"][name], value, rtol=1e-5,
                         atol=1e-5 * value.abs().max().item(), msg=f"rank {rank} {name}")


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("mode", ["apply", "explicit", "apply+cpu"])
def test_engine_parameters_equal_without_checkpointing(stage, mode):
    for rank, result in enumerate(_engine_results()):
        runs = result[f"stage{stage}"]
        got, reference = runs[mode], runs["none"]
        _assert_same_params(got, reference, rank)
        assert (got["to_host"] > 0) == mode.endswith("cpu")
        if stage == 3:
            # Every unit released after each backward, and the prefetch order recorded in the
            # first step is the one without checkpointing: the recomputations did not count.
            assert got["released"] == reference["released"] == [True] * 3
            assert got["order"] == reference["order"]
        assert got["calls"] == reference["calls"]  # the same gathers, reductions
        order_notes = [w for w in got["warnings"] if "different order" in w]
        assert not order_notes, order_notes


def test_engine_stage3_checkpoints_blocks_that_are_bare_linears():
    for rank, result in enumerate(_engine_results()):
        runs = result["linear_blocks"]
        assert runs["apply"]["segments"] == 2 * 3 and runs["none"]["segments"] == 0
        _assert_same_params(runs["apply"], runs["none"], rank)


def test_engine_says_once_that_partition_activations_has_no_effect():
    for result in _engine_results():
        notes = [w for w in result["stage2"]["apply"]["warnings"] if "partition_activations" in w]
        assert len(notes) == 1 and "nothing to split" in notes[0], notes


def test_engine_stage3_hf_llama_through_apply_with_cpu_checkpointing():
    for rank, result in enumerate(_engine_results()):
        llama = result["llama"]
        assert llama["blocks"] == ["model.layers.0", "model.layers.1"]
        assert llama["apply+cpu"]["to_host"] > 0
        assert llama["apply+cpu"]["released"] == [True, True]
        _assert_same_params(llama["apply+cpu"], llama["none"], rank)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_peak_memory_halves_with_checkpointing_and_falls_further_on_the_host():
    result = cases.cuda_peak_memory()
    none, ckpt, cpu = result["none"], result["checkpoint"], result["cpu"]
    assert ckpt["rise"] <= none["rise"] / 2, (ckpt["rise"], none["rise"])
    assert cpu["rise"] < ckpt["rise"], (cpu["rise"], ckpt["rise"])
    for name, grad in none["grads"].items():
        tolerance = {"rtol": 1e-4, "atol": 1e-5 * grad.abs().max().item()}
        assert_close(ckpt["grads"][name], grad, **tolerance, msg=name)
        assert_close(cpu["grads"][name], grad, **tolerance, msg=name)


# -- zero_ext's apply() and transformers' own switch: the one called last wins, with a warning
HF_REPLACED = r"zero_ext.checkpointing.apply replaces .*gradient_checkpointing_enable"
ZERO_EXT_REPLACED = r"gradient_checkpointing_enable\(\).* replaces zero_ext.checkpointing.apply"
LAYERS = ["model.layers.0", "model.layers.1"]


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=cases.VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=cases.SEQ))


def _llama_step(model):
    """Gradients of one training step, how often the first layer's MLP ran (2: checkpointed
    once; 3: twice, nested), and the segments zero_ext's checkpoint timed."""
    checkpointing.configure(profile=True)
    checkpointing.profile_report()
    runs = []
    hook = model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: runs.append(1))
    tokens, _ = cases.batch(0, 2)
    model.train()
    model(input_ids=tokens, labels=tokens).loss.backward()
    hook.remove()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return grads, len(runs), [t.name for t in checkpointing.profile_report()]


@functools.cache
def _plain_llama_grads():
    grads, runs, timed = _llama_step(_tiny_llama())
    assert runs == 1 and timed == []
    return grads


def _hf_switch(model, which):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # gradient_checkpointing_enable's rename
        getattr(model, which)()


def _hf_switches() -> list[str]:
    """transformers' checkpointing switches in the installed version: gradient_checkpointing_
    enable, and activation_checkpointing_enable where it exists (its new name; 5.17, the GPU
    machine's, has only the old one)."""
    from transformers import PreTrainedModel
    return [name for name in ("gradient_checkpointing_enable", "activation_checkpointing_enable")
            if hasattr(PreTrainedModel, name)]


@pytest.mark.parametrize("blocks", [None, ["LlamaDecoderLayer"]])
@pytest.mark.parametrize("switch", _hf_switches())
@pytest.mark.parametrize("order", ["hf_then_zero_ext", "zero_ext_then_hf"])
def test_the_checkpointing_switch_called_last_wins_with_a_warning(order, switch, blocks):
    model = _tiny_llama()
    if order == "hf_then_zero_ext":
        _hf_switch(model, switch)
        with pytest.warns(UserWarning, match=HF_REPLACED):
            checkpointing.apply(model, block_classes=blocks)
    else:
        checkpointing.apply(model, block_classes=blocks)
        with pytest.warns(UserWarning, match=ZERO_EXT_REPLACED):
            _hf_switch(model, switch)
    grads, runs, timed = _llama_step(model)
    # zero_ext's checkpoint times its segments; torch's (HF's) does not. Either way each
    # layer is checkpointed exactly once, and the gradients are those of a plain step.
    assert timed == (LAYERS if order == "hf_then_zero_ext" else [])
    assert runs == 2
    for name, grad in _plain_llama_grads().items():
        assert_close(grads[name], grad, rtol=0, atol=0, msg=name)


def test_calling_the_same_switch_again_does_not_warn():
    model = _tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        checkpointing.apply(model)
        checkpointing.apply(model)
    _, runs, timed = _llama_step(model)
    assert runs == 2 and timed == LAYERS


def test_training_arguments_gradient_checkpointing_after_apply_wins_with_a_warning(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = _tiny_llama()
    checkpointing.apply(model)
    tokens, _ = cases.batch(0, 2)
    data = [{"input_ids": row, "labels": row} for row in tokens]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the argument's rename
        args = TrainingArguments(output_dir=str(tmp_path), gradient_checkpointing=True,
                                 max_steps=1, per_device_train_batch_size=2, use_cpu=True,
                                 report_to="none", disable_tqdm=True, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=data)
    with pytest.warns(UserWarning, match=ZERO_EXT_REPLACED):
        trainer.train()
    _, runs, timed = _llama_step(model)  # torch's checkpoint, once per layer
    assert runs == 2 and timed == []
