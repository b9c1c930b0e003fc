"""zero_ext.optim.AdamW as a torch.optim.Optimizer: parity, schedulers, state_dict, bad input."""

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import zero_ext

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _model(device):
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(50, 24), nn.LayerNorm(24), nn.Linear(24, 37),
                         nn.GELU(), nn.Linear(37, 5)).to(device)


def _param_groups(model):
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters()
                if not (n.endswith("weight") and p.dim() > 1)]
    return [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]


def _train(model, optimizer, scheduler, steps, device, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        tokens = torch.randint(0, 50, (16, 3), generator=gen).to(device)
        loss = model(tokens).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def _assert_models_close(a, b):
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert_close(pa, pb, rtol=1e-6, atol=1e-6 * pb.abs().max().item(), msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("options", [
    dict(),
    dict(maximize=True, betas=(0.8, 0.99), eps=1e-6),
], ids=["defaults", "maximize-betas-eps"])
def test_training_matches_torch_adamw_with_groups_and_scheduler(device, options):
    ours, theirs = _model(device), _model(device)
    opt = zero_ext.optim.AdamW(_param_groups(ours), lr=3e-3, **options)
    ref = torch.optim.AdamW(_param_groups(theirs), lr=3e-3, foreach=False, **options)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=20)
    sched_ref = torch.optim.lr_scheduler.OneCycleLR(ref, max_lr=1e-2, total_steps=20)
    _train(ours, opt, sched, 20, device)
    _train(theirs, ref, sched_ref, 20, device)
    _assert_models_close(ours, theirs)
    assert opt.param_groups[0]["lr"] == ref.param_groups[0]["lr"]


@pytest.mark.parametrize("device", DEVICES)
def test_l2_mode_matches_torch_adam(device):
    ours, theirs = _model(device), _model(device)
    opt = zero_ext.optim.AdamW(ours.parameters(), lr=1e-2, weight_decay=0.05,
                               decoupled_weight_decay=False)
    ref = torch.optim.Adam(theirs.parameters(), lr=1e-2, weight_decay=0.05, foreach=False)
    _train(ours, opt, None, 15, device)
    _train(theirs, ref, None, 15, device)
    _assert_models_close(ours, theirs)


def test_params_without_grads_are_left_alone():
    model = _model("cpu")
    frozen = model[2].weight
    frozen.requires_grad_(False)
    before = frozen.detach().clone()
    opt = zero_ext.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, opt, None, 3, "cpu")
    assert torch.equal(frozen, before)
    assert frozen not in opt.state


def test_state_dict_is_interchangeable_with_torch_adamw():
    # Train 5 steps with torch, continue 5 with zero_ext from torch's state, and the reverse;
    # both must match 10 uninterrupted torch steps.
    uninterrupted = _model("cpu")
    ref = torch.optim.AdamW(uninterrupted.parameters(), lr=1e-2, foreach=False)
    _train(uninterrupted, ref, None, 5, "cpu", seed=1)
    _train(uninterrupted, ref, None, 5, "cpu", seed=2)

    for first, second in ((torch.optim.AdamW, zero_ext.optim.AdamW),
                          (zero_ext.optim.AdamW, torch.optim.AdamW)):
        model = _model("cpu")
        opt = first(model.parameters(), lr=1e-2)
        _train(model, opt, None, 5, "cpu", seed=1)
        state = copy.deepcopy(opt.state_dict())
        resumed = second(model.parameters(), lr=1e-2)
        resumed.load_state_dict(state)
        _train(model, resumed, None, 5, "cpu", seed=2)
        _assert_models_close(model, uninterrupted)
        for p in model.parameters():
            assert resumed.state[p]["step"].item() == 10.0


def test_state_matches_torch_layout():
    model = _model("cpu")
    opt = zero_ext.optim.AdamW(model.parameters())
    _train(model, opt, None, 1, "cpu")
    for p in model.parameters():
        state = opt.state[p]
        assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
        assert state["step"].dtype == torch.float32 and state["step"].device.type == "cpu"
        assert state["exp_avg"].shape == p.shape and state["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(amsgrad=True), ValueError, "does not implement amsgrad=True"),
    (dict(lr=-1.0), ValueError, "invalid lr -1.0: expected lr >= 0"),
    (dict(betas=(0.9, 1.0)), ValueError, "invalid betas[1] 1.0"),
    (dict(eps=-1.0), ValueError, "invalid eps"),
    (dict(weight_decay=-0.1), ValueError, "invalid weight_decay"),
    (dict(lr=torch.tensor(0.1)), TypeError, "lr must be a Python float"),
])
def test_bad_arguments_raise(kwargs, error, message):
    with pytest.raises(error) as info:
        zero_ext.optim.AdamW(_model("cpu").parameters(), **kwargs)
    assert message in str(info.value)


def test_16bit_params_are_refused_with_advice():
    model = _model("cpu").to(torch.bfloat16)
    opt = zero_ext.optim.AdamW(model.parameters())
    model(torch.zeros(2, 3, dtype=torch.long)).float().sum().backward()
    with pytest.raises(TypeError, match="expected fp32 parameters, got torch.bfloat16"):
        opt.step()


def test_closure_is_called_and_its_loss_returned():
    model = _model("cpu")
    opt = zero_ext.optim.AdamW(model.parameters())

    def closure():
        opt.zero_grad()
        loss = model(torch.zeros(2, 3, dtype=torch.long)).sum()
        loss.backward()
        return loss

    assert isinstance(opt.step(closure), torch.Tensor)
    assert all(opt.state[p]["step"].item() == 1.0 for p in model.parameters())


def test_env_report_names_the_build():
    out = subprocess.run([sys.executable, "-m", "zero_ext.env"], capture_output=True, text=True,
                         check=True).stdout
    for field in ("torch", "CPU kernels built", "CPU kernel in use", "CUDA kernels built",
                  "gloo", "NCCL"):
        assert field in out
    assert zero_ext._C.cpu_isa_selected() in out
    assert "adamw_step_" in out
