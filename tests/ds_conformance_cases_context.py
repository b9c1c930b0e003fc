"""Ported cases: zero_ext.Init, GatheredParameters and parameters used outside their module.

From DeepSpeed's tests/unit/runtime/zero/{test_zero_context,test_zero_context_ancestry,
test_zero_context_return}.py. DeepSpeed runs a constructor under Init on real tensors and
partitions afterwards, so a model holds the values its constructors gave on rank 0; the cases
check those values from the outside (GatheredParameters, the engine's full parameters) and
training against plain PyTorch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

import zero_ext

from ds_conformance_cases import (
    HIDDEN,
    assert_params_close,
    batch,
    case,
    collectively,
    ds_adam,
    expect_zero_ext_error,
    full_params,
    named,
    parity,
    rank,
    reference_copy,
    train_engine,
    train_reference,
    world,
)

ZERO = "test_zero.py::"
CONTEXT = "test_zero_context.py::"


# -- test_zero_context.py ---------------------------------------------------------------------
def init_values_or_refusal(build, expected: dict) -> None:
    """DeepSpeed runs a constructor under Init on real tensors, so the model holds the values
    the constructor gave on rank 0. zero_ext must give the same values or refuse loudly."""
    config = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "Adam"},
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 1}}
    try:
        with zero_ext.Init(config=config):
            model = build()
        engine, _, _, _ = zero_ext.initialize(model=model, config=config,
                                              model_parameters=list(model.parameters()))
    except Exception as error:  # noqa: BLE001 - a loud refusal is allowed
        assert str(error).startswith("zero_ext"), f"not a zero_ext refusal: {error!r}"
        return
    got = full_params(engine)
    for name, value in expected.items():
        assert torch.equal(got[name], value), f"{name}: {got[name]} != {value}"


class ConvX(nn.Conv1d):
    """A subclass adding a parameter initialized in its own constructor."""

    def __init__(self, *args):
        super().__init__(*args)
        self.param_in = nn.Parameter(torch.FloatTensor(5).uniform_())

    def forward(self, x):
        return x


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = ConvX(1, 3, 4)
        self.param = nn.Parameter(torch.FloatTensor(5).uniform_())

    def forward(self, x):
        return x


@case(CONTEXT + "TestSerialContext::test_subclass_param")
def subclass_param(tmp):
    torch.manual_seed(7)
    expected = named(ConvNet())
    torch.manual_seed(7)
    init_values_or_refusal(ConvNet, expected)


class ParentInit(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(12, 1)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            with torch.no_grad():
                module.weight.fill_(1 + rank())
                module.bias.zero_()


@case(ZERO + "TestZero3InitForParentWeightInitialization")
def parent_weight_initialization(tmp):
    # The parent's self.apply(init) sets the child's weight, differently per rank: rank 0's
    # value (1) is the model's.
    init_values_or_refusal(ParentInit, {"linear.weight": torch.ones(1, 12),
                                        "linear.bias": torch.zeros(1)})


class L1Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(HIDDEN, HIDDEN)


@case(CONTEXT + "TestZeroGatheredParametersFree")
def gathered_parameters_free(tmp):
    # Right after construction under Init, before initialize: GatheredParameters gives the
    # whole weight with the constructor's values; outside it no whole copy is held.
    torch.manual_seed(11)
    expected = L1Model().l1.weight.detach().clone()
    torch.manual_seed(11)
    with zero_ext.Init(config={"train_batch_size": world(), "zero_optimization": {"stage": 3}}):
        model = L1Model()
    with zero_ext.GatheredParameters(list(model.parameters())):
        inside = model.l1.weight.detach().clone()
    weight = model.l1.weight
    assert inside.shape == (HIDDEN, HIDDEN) and not inside.is_meta, inside.shape
    assert torch.equal(inside, expected), "gathered values are not the constructor's"
    assert weight.is_meta or weight.numel() == 0, "the whole weight stays allocated"


@case(CONTEXT + "TestScatterGather")
def scatter_gather(tmp):
    torch.manual_seed(12)
    expected = nn.Linear(6, 3).weight.detach().clone()
    torch.manual_seed(12)
    with zero_ext.Init():
        layer = nn.Linear(6, 3)
    outside = nn.Linear(6, 3)  # no effect outside the context
    assert not outside.weight.is_meta and outside.weight.numel() == 18
    with zero_ext.GatheredParameters(layer.weight):
        inside = layer.weight.detach().clone()
    assert inside.numel() == 18 and torch.equal(inside, expected), inside


@case(CONTEXT + "TestGatherUpdate[before_initialize]")
def gather_update_before_initialize(tmp):
    with zero_ext.Init():
        layer = nn.Linear(4, 2)
    def write():
        with zero_ext.GatheredParameters(layer.weight, modifier_rank=1):
            if rank() == 1:
                with torch.no_grad():
                    layer.weight.zero_()

    collectively(write)
    with zero_ext.GatheredParameters(layer.weight):
        seen = layer.weight.detach().clone()
    assert torch.equal(seen, torch.zeros(2, 4)), seen


class TwoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(HIDDEN, HIDDEN)
        self.l2 = nn.Linear(HIDDEN, HIDDEN)
        self.cel = nn.CrossEntropyLoss()

    def forward(self, x, y):
        return self.cel(self.l2(torch.relu(self.l1(x))), y)


class NoBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.l2 = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x, y):
        return nn.functional.mse_loss(self.l2(torch.relu(self.l1(x))), y)


@case(CONTEXT + "zero_ext::gathered_parameters_signature_and_ds_shape")
def gathered_parameters_signature(tmp):
    # DeepSpeed's GatheredParameters(params, modifier_rank=None, fwd_module=None,
    # enabled=True): a third positional argument is fwd_module (zero_ext read it as `enabled`,
    # and None gathered nothing, silently), `fwd_module=` is taken (peft and accelerate pass
    # it), None entries are passed over (a layer without a bias); a partitioned parameter has
    # DeepSpeed's ds_shape beside ds_numel (peft reads it to size adapters); the names are
    # also zero_ext.zero's, as deepspeed.zero's.
    import zero_ext.zero

    assert (zero_ext.zero.Init, zero_ext.zero.GatheredParameters,
            zero_ext.zero.register_external_parameter) == (
        zero_ext.Init, zero_ext.GatheredParameters, zero_ext.register_external_parameter)
    torch.manual_seed(4)
    model = NoBias()
    full = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "Adam"},
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    engine = zero_ext.initialize(model=model, config=config)[0]
    for name, param in model.named_parameters():
        assert param.numel() == 0 and param.ds_shape == full[name].shape, (name, param.shape)
        assert param.ds_numel == full[name].numel()
    with zero_ext.GatheredParameters([model.l1.weight, model.l1.bias], None, None):
        assert torch.equal(model.l1.weight, full["l1.weight"])
    with zero_ext.GatheredParameters(model.l2.weight, fwd_module=model.l1):
        assert torch.equal(model.l2.weight, full["l2.weight"])
    hooks = len(model.l1._forward_pre_hooks)
    with zero_ext.GatheredParameters(model.l2.weight, fwd_module=model.l1):
        pass  # declared again: nothing more to hook (peft passes fwd_module on every call)
    assert len(model.l1._forward_pre_hooks) == hooks
    with zero_ext.GatheredParameters([None, model.l2.bias], modifier_rank=0, enabled=False):
        assert model.l2.bias.numel() == 0
    assert model.l1.weight.numel() == 0 and model.l2.weight.numel() == 0
    assert engine.global_steps == 0
    # An engine nothing keeps is freed with the values: a named error, not an AttributeError.
    import gc

    dropped = NoBias()
    zero_ext.initialize(model=dropped, config=config)
    gc.collect()
    expect_zero_ext_error(lambda: dropped.l1.weight.sum(),
                          "used after the engine that partitioned it was freed")


class CastsTied(TwoLinear):
    """Its forward reads l1's weight again, cast, after l1's unit was released."""

    def forward(self, x, y):
        h = torch.relu(self.l1(x))
        out = nn.functional.linear(h.float(), self.l1.weight.float()).to(h.dtype)
        return self.cel(self.l2(out), y)


@case(CONTEXT + "zero_ext::module_to_before_and_after_initialize")
def module_to(tmp):
    # `model.to(device)` / `.to(dtype)` / `.cpu()` between building under Init and initialize,
    # and `engine.to(engine.device)` / `model.cpu()` after, as DeepSpeed scripts do: zero_ext
    # refused each as a use of the values. Before initialize a cast rounds the values as on a
    # plain model; after, a move to where the parameters are is nothing, and a real move or
    # cast is a named error (DeepSpeed would cast its 16-bit copies under the engine).
    torch.manual_seed(7)
    plain = TwoLinear()
    torch.manual_seed(7)
    with zero_ext.Init():
        model = TwoLinear()
    model.to("cpu")
    model.to(torch.bfloat16)
    model.cpu()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    config = {"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True},
              "optimizer": {"type": "Adam", "params": {"lr": 1e-3}},
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    engine = zero_ext.initialize(model=model, config=config)[0]
    engine.to(engine.device)
    model.cpu()
    model.to(torch.bfloat16)
    with zero_ext.GatheredParameters(list(model.parameters())):
        got = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name, value in plain.named_parameters():
        assert torch.equal(got[name], value.detach().to(torch.bfloat16)), name
    expect_zero_ext_error(model.float, "parameter l1.weight is used outside any forward")
    train_engine(engine, 1, dtype=torch.bfloat16)
    # A conversion of a placeholder, not assigned by a module's .to(), holds no values.
    with zero_ext.Init():
        other = TwoLinear()
    converted = other.l1.weight.to(torch.bfloat16)
    expect_zero_ext_error(lambda: converted.sum(), "on a conversion of a parameter built")
    # Inside a forward a released parameter's conversion gathers it (a tied weight under bf16).
    engine = zero_ext.initialize(model=CastsTied(), config=config)[0]
    x, y = batch(0, 0, rank(), dtype=torch.bfloat16)
    engine.backward(engine(x, y))
    engine.step()


@case(CONTEXT + "zero_ext::init_takes_deepspeeds_arguments")
def init_arguments(tmp):
    # deepspeed.zero.Init's arguments as scripts pass them (zero_ext took only config and
    # enabled: each was a TypeError): config_dict_or_path, dtype (the shards are kept, and
    # rounded, in it from construction on), remote_device="cpu", pin_memory,
    # mem_efficient_linear, and module= (an already-built model partitioned now).
    config = {"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True},
              "optimizer": {"type": "Adam", "params": {"lr": 1e-3}},
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    torch.manual_seed(8)
    plain = TwoLinear()
    want = {n: p.detach().to(torch.bfloat16) for n, p in plain.named_parameters()}
    torch.manual_seed(8)
    with zero_ext.Init(config_dict_or_path=config, dtype=torch.bfloat16, remote_device="cpu",
                       pin_memory=True, mem_efficient_linear=False):
        model = TwoLinear()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    built = TwoLinear()
    built.load_state_dict(plain.state_dict())
    zero_ext.Init(module=built, config=config)  # as DeepSpeed's conversion: not cast
    assert {p.dtype for p in built.parameters()} == {torch.float32}
    with zero_ext.Init(config={"bf16": {"enabled": "auto"}}):  # HF's "auto" decides nothing
        assert {p.dtype for p in TwoLinear().parameters()} == {torch.float32}
    for candidate in (model, built):
        with zero_ext.GatheredParameters(list(candidate.parameters())):
            got = {n: p.detach().to(torch.bfloat16) for n, p in candidate.named_parameters()}
        assert all(torch.equal(got[n], want[n]) for n in want), got
    engine = zero_ext.initialize(model=built, config=config)[0]
    train_engine(engine, 1, dtype=torch.bfloat16)
    expect_zero_ext_error(lambda: zero_ext.Init(mpu=object()), "mpu not supported")
    expect_zero_ext_error(lambda: zero_ext.Init(remote_device="nvme"), "NVMe")
    expect_zero_ext_error(lambda: zero_ext.Init(config), "first argument is DeepSpeed's module=")


@case(CONTEXT + "TestGatherUpdate[after_initialize]")
def gather_update_after_initialize(tmp):
    # A model built under Init, then initialized: a modifier_rank write inside
    # GatheredParameters reaches every rank, the engine's weights and its fp32 master weights
    # (the next step trains from the written values).
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0,
              "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "weight_decay": 0.0}},
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    with zero_ext.Init(config=config):
        model = TwoLinear()
    engine, _, _, _ = zero_ext.initialize(model=model, config=config,
                                          model_parameters=list(model.parameters()))
    written = torch.arange(HIDDEN * HIDDEN, dtype=torch.float32).view(HIDDEN, HIDDEN) / 100
    inside_shape = []

    def write():
        with zero_ext.GatheredParameters(model.l1.weight, modifier_rank=1):
            inside_shape.append(tuple(model.l1.weight.shape))
            if rank() == 1:
                with torch.no_grad():
                    model.l1.weight.copy_(written)

    collectively(write)
    start = full_params(engine)
    train_engine(engine, 2)
    got = full_params(engine)
    assert inside_shape == [(HIDDEN, HIDDEN)], inside_shape
    assert torch.equal(start["l1.weight"], written), "the write was lost"
    reference = reference_copy(TwoLinear, start)
    train_reference(reference, ds_adam(list(reference.parameters()), config), 2, clip=1.0)
    assert_params_close(got, named(reference), "training from the written weights")


for _threshold in (None, 0):
    @case(CONTEXT + "TestGatheredParametersAllRanksErrorOnModification"
          + ("[kept_whole]" if _threshold is None else "[partitioned]"), threshold=_threshold)
    def modification_without_modifier_rank(tmp, threshold):
        _modification_without_modifier_rank(threshold)


def _modification_without_modifier_rank(threshold):
    # modifier_rank=None promises no change. DeepSpeed with enable_sanity_checks raises
    # "in-place modification" on every rank. zero_ext lists the key as having no effect
    # (docs/deepspeed-compat.md: the change is dropped), so either is allowed here, on every
    # rank alike: never weights that differ across ranks. DeepSpeed's config leaves the
    # 100-element weights below the persistence threshold (kept whole on every rank).
    config = {"train_micro_batch_size_per_gpu": 1,
              "zero_optimization": {"stage": 3, "enable_sanity_checks": True}}
    if threshold is not None:
        config["zero_optimization"]["stage3_param_persistence_threshold"] = threshold
    with zero_ext.Init(config=config):
        model = TwoLinear()
    engine, _, _, _ = zero_ext.initialize(model=model, config=config,
                                          model_parameters=list(model.parameters()))
    before = full_params(engine)
    errors = []
    try:
        with zero_ext.GatheredParameters([model.l1.weight, model.l2.weight], modifier_rank=None):
            if rank() == 0:
                with torch.no_grad():
                    model.l1.weight.add_(1.0)
    except RuntimeError as error:
        errors.append(str(error))
    after = full_params(engine)
    everyone = [None] * world()
    dist.all_gather_object(everyone, (bool(errors), after["l1.weight"]))
    raised = [r for r, _ in everyone]
    assert all(raised) or not any(raised), f"ranks that raised: {raised}"
    if errors:
        assert errors[0].startswith("zero_ext"), errors[0]
    for _, weight in everyone:
        assert torch.equal(weight, before["l1.weight"]), "the change reached some rank"


class ExtLinear(nn.Module):
    """Uses linear1.weight outside linear1 (a tied head): an external parameter."""

    def __init__(self, dim=16):
        super().__init__()
        self.dim = dim
        self.linear1 = nn.Linear(dim, dim)
        self.linear2 = nn.Linear(dim, dim)

    def forward(self, x, y):
        b = self.linear2(self.linear1(x))
        c = nn.functional.linear(b, self.linear1.weight)
        return nn.functional.cross_entropy(c, y)


for _registered in (False, True):
    @case(CONTEXT + "TestSerialContext::test_ext_param_getattr" +
          ("[register_external_parameter]" if _registered else ""), registered=_registered)
    def external_parameter(tmp, registered):
        # DeepSpeed gathers linear1.weight for its use outside linear1 (registered or found by
        # itself); zero_ext must train it like plain PyTorch, or (unregistered) refuse at the
        # first use, naming it, instead of computing on an empty placeholder.
        config = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0,
                  "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "weight_decay": 0.0}},
                  "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 1}}
        torch.manual_seed(3)
        model = ExtLinear()
        if registered:
            zero_ext.register_external_parameter(model, model.linear1.weight)
        engine, _, _, _ = zero_ext.initialize(model=model, config=config,
                                              model_parameters=list(model.parameters()))
        with zero_ext.GatheredParameters(model.linear1.weight):
            numel = model.linear1.weight.numel()
        initial = full_params(engine)
        try:
            train_engine(engine, 2, hidden=16)
        except Exception as error:  # noqa: BLE001 - the refusal is checked below
            assert not registered, f"a registered external parameter failed: {error!r}"
            assert str(error).startswith("zero_ext") and "linear1.weight" in str(error), \
                repr(error)
            return
        got = full_params(engine)
        assert numel == 16 * 16
        reference = reference_copy(ExtLinear, initial)
        train_reference(reference, ds_adam(list(reference.parameters()), config), 2, clip=1.0,
                        hidden=16)
        assert_params_close(got, named(reference), "external parameter")


# -- test_zero_context_ancestry.py ------------------------------------------------------------
class GrandPa(nn.Module):
    def __init__(self):
        super().__init__()
        self.param_grandpa = nn.Parameter(torch.ones(5))
        self.param_grandpa.data = (self.param_grandpa.data + 1).data


class Pa(GrandPa):
    def __init__(self):
        super().__init__()
        self.param_pa = nn.Parameter(torch.ones(5))
        self.param_pa.data = (self.param_pa.data + 1).data
        self.param_grandpa.data = (self.param_grandpa.data + 1).data


class Son(Pa):
    """Each constructor in the chain edits its own and its ancestors' parameters (.data): the
    values must survive Init (DeepSpeed partitions only after the outermost __init__)."""

    def __init__(self):
        super().__init__()
        self.param = nn.Parameter(torch.ones(5))
        self.param.data = (self.param.data + 1).data
        self.param_pa.data = (self.param_pa.data + 1).data
        self.param_grandpa.data = (self.param_grandpa.data + 1).data


@case("test_zero_context_ancestry.py::TestSerialParamInit::test_subclass_param_init")
def subclass_param_init(tmp):
    ones = torch.ones(5)
    try:
        with zero_ext.Init(config={"train_batch_size": world(),
                                   "zero_optimization": {"stage": 3}}):
            model = Son()
        with zero_ext.GatheredParameters(list(model.parameters(recurse=False))):
            seen = {n: p.detach().clone() for n, p in model.named_parameters()}
    except Exception as error:  # noqa: BLE001 - a loud refusal is allowed
        assert str(error).startswith("zero_ext"), f"not a zero_ext refusal: {error!r}"
        return
    assert torch.equal(seen["param"], ones + 1), seen
    assert torch.equal(seen["param_pa"], ones + 2), seen
    assert torch.equal(seen["param_grandpa"], ones + 3), seen


class MagicModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        return self.linear(x).square().mean()

    def magic(self):
        return 42


@case("test_zero_context_ancestry.py::TestDSInitWZinit[stage3]")
def initialize_inside_init(tmp):
    # initialize called inside the Init context; the engine forwards the module's attributes.
    config = {"train_batch_size": 2 * world(), "gradient_clipping": 1.0,
              "optimizer": {"type": "Adam", "params": {"lr": 0.00015, "weight_decay": 0.0}},
              "zero_optimization": {"stage": 3}}
    with zero_ext.Init(config=config):
        model = MagicModel()
        engine, *_ = zero_ext.initialize(model=model, config=config,
                                         model_parameters=list(model.parameters()))
    loss = engine(torch.ones(2, 4))
    engine.backward(loss)
    engine.step()
    assert engine.magic() == 42
    assert engine.global_steps == 1


# -- test_zero_context_return.py --------------------------------------------------------------
RETURN = "test_zero_context_return.py::TestReturnParam::"


class DanglingBias(nn.Linear):
    """Returns its own bias for the caller to use after this module's forward ended."""

    def forward(self, x):
        return super().forward(x), self.bias


class DanglingAttention(nn.Linear):
    def __init__(self, dim=16):
        super().__init__(dim, dim)
        self.d_linear = DanglingBias(dim, dim)

    def forward(self, x):
        out, bias = self.d_linear(super().forward(x))
        return out, bias


class DanglingExt(nn.Module):
    def __init__(self, dim=16):
        super().__init__()
        self.linear1 = nn.Linear(dim, dim)
        self.dangler = DanglingAttention(dim)

    def forward(self, x, y):
        act2, bias = self.dangler(self.linear1(x))
        return nn.functional.cross_entropy(act2 + bias, y)


_Z3_RETURN = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0,
              "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "weight_decay": 0.0}},
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 1}}


@case(RETURN + "test_ext_param_return")
def ext_param_return(tmp):
    # A parameter returned from its module and used by the caller: DeepSpeed keeps it gathered
    # for that use; zero_ext must train like plain PyTorch or refuse at the first use, naming
    # the parameter, never compute on an empty placeholder.
    try:
        parity(DanglingExt, _Z3_RETURN, steps=3, hidden=16)
    except Exception as error:
        text = str(error)
        if not (text.startswith("zero_ext") and "dangler.d_linear.bias" in text):
            raise


class VariableOutput(nn.Module):
    def __init__(self, output_type: str, dim=16):
        super().__init__()
        self.output_type = output_type
        self.linear1 = nn.Linear(dim, dim)

    def forward(self, x):
        act1 = self.linear1(x)
        if self.output_type == "dict":
            return {"loss": act1.sum()}
        return act1.sum() if self.output_type == "tensor" else None


for _output in ("tensor", "dict", "None"):
    @case(RETURN + f"test_stage_3_output_type[{_output}]", output=_output)
    def stage3_output_type(tmp, output):
        torch.manual_seed(4)
        model = VariableOutput(output)
        engine, _, _, _ = zero_ext.initialize(model=model, config=_Z3_RETURN,
                                              model_parameters=list(model.parameters()))
        initial = full_params(engine)
        x = torch.rand(16)
        out = engine(x)
        if output == "None":
            assert out is None
            return
        engine.backward(out["loss"] if isinstance(out, dict) else out)
        engine.step()
        got = full_params(engine)
        reference = reference_copy(lambda: VariableOutput(output), initial)
        opt = ds_adam(list(reference.parameters()), _Z3_RETURN)
        ref_out = reference(x)
        (ref_out["loss"] if isinstance(ref_out, dict) else ref_out).backward()
        torch.nn.utils.clip_grad_norm_(list(reference.parameters()), 1.0)
        opt.step()
        assert_params_close(got, named(reference), output)


# -- test_zero_nesting_init.py, test_zero_dynamic_class.py ------------------------------------
def _train_one_step(model: nn.Module, config: dict) -> int:
    engine, _, _, _ = zero_ext.initialize(model=model, config=config,
                                          model_parameters=list(model.parameters()))
    loss = engine(torch.ones(2, model.in_features)).square().mean()
    engine.backward(loss)
    engine.step()
    return engine.global_steps


_NESTED = {"train_micro_batch_size_per_gpu": 2,
           "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "weight_decay": 0.0}},
           "zero_optimization": {"stage": 3}}


@case("test_zero_nesting_init.py::TestNestingInit::test_nesting_init")
def nesting_init(tmp):
    # Init inside Init: one partitioning, the plain build's values, and the model trains.
    config = _NESTED
    torch.manual_seed(21)
    expected = named(nn.Linear(4, 4))
    torch.manual_seed(21)
    with zero_ext.Init(config=config), zero_ext.Init(config=config):
        model = nn.Linear(4, 4)
    with zero_ext.GatheredParameters(list(model.parameters())):
        seen = named(model)
    for name, value in expected.items():
        assert torch.equal(seen[name], value), name
    assert _train_one_step(model, config) == 1


@case("test_zero_nesting_init.py::TestShutdownInNestingInit::test_shutdown_in_nesting_init")
def shutdown_in_nesting_init(tmp):
    # An engine built inside an outer Init, then a second model built under Init after it.
    config = _NESTED
    with zero_ext.Init(config=config):
        with zero_ext.Init(config=config):
            model1 = nn.Linear(4, 4)
        steps1 = _train_one_step(model1, config)
        with zero_ext.Init(config=config):
            model2 = nn.Linear(4, 4)
    assert steps1 == 1 and _train_one_step(model2, config) == 1


for _inside in (False, True):
    _name = ("TestNewClassDeclaredInsideNestingInit::test_new_class_declared_inside_nesting_init"
             if _inside else
             "TestNewClassDeclaredNestingInit::test_new_class_declared_nesting_init")

    @case(f"test_zero_dynamic_class.py::{_name}", inside=_inside)
    def new_class_declared_in_init(tmp, inside):
        # A module class defined inside the Init block is partitioned like any other.
        config = _NESTED

        def declare():
            class MyModel(nn.Module):
                in_features = 4

                def __init__(self):
                    super().__init__()
                    self.fc = nn.Linear(4, 4)

                def forward(self, x):
                    return self.fc(x)
            return MyModel

        torch.manual_seed(22)
        expected = named(declare()())
        torch.manual_seed(22)
        with zero_ext.Init(config=config):
            cls = declare()
            if inside:
                model = cls()
            else:
                with zero_ext.Init(config=config):
                    model = cls()
        with zero_ext.GatheredParameters(list(model.parameters())):
            seen = named(model)
        for name, value in expected.items():
            assert torch.equal(seen[name], value), name
        assert _train_one_step(model, config) == 1


# -- test_zero_linear_direct_init.py ----------------------------------------------------------
@case("test_zero_linear_direct_init.py::TestZero3LinearDirectInit::"
      "test_wrapper_and_parameter_storage_lifecycle")
def linear_direct(tmp):
    # A bare nn.Linear at stage 3 with a client AdamW(lr 0.1): the output, and the weights after
    # the step, are plain PyTorch's (with DeepSpeed's default clipping at 1.0).
    torch.manual_seed(20260728)
    model = nn.Linear(4, 3)
    reference = nn.Linear(4, 3)
    reference.load_state_dict(model.state_dict())
    config = {"train_micro_batch_size_per_gpu": 2,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                    "stage3_max_reuse_distance": 0}}
    engine, _, _, _ = zero_ext.initialize(model=model, config=config,
                                          optimizer=torch.optim.AdamW(model.parameters(), lr=0.1))
    inputs = torch.arange(8, dtype=torch.float32).reshape(2, 4) / 8
    output = engine(inputs)
    engine.backward(output.sum())
    engine.step()
    got = full_params(engine)
    ref_out = reference(inputs)
    ref_out.sum().backward()
    torch.nn.utils.clip_grad_norm_(list(reference.parameters()), 1.0)
    torch.optim.AdamW(reference.parameters(), lr=0.1).step()
    torch.testing.assert_close(output.detach(), ref_out.detach())
    assert_params_close(got, named(reference), "after one step")


# -- test_zero_hook_attribute_delegation.py, test_zero_late_module_attach.py ------------------
class AttributeDelegatingWrapper(nn.Module):
    """A wrapper whose __getattr__ falls back to the wrapped module's attributes."""

    def __init__(self, module):
        super().__init__()
        self.wrapped = module

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("wrapped"), name)

    def forward(self, inputs):
        return self.wrapped(inputs)


class DelegatingWrapperModel(nn.Module):
    def __init__(self, hidden_dim=4):
        super().__init__()
        self.input = nn.Linear(hidden_dim, hidden_dim)
        self.output = AttributeDelegatingWrapper(nn.Linear(hidden_dim, hidden_dim))

    def forward(self, x, y):
        return nn.functional.cross_entropy(self.output(self.input(x)), y)


@case("test_zero_hook_attribute_delegation.py::TestHookAttributeDelegation")
def hook_attribute_delegation(tmp):
    # Stage 3's hooks on a module that delegates attribute lookups: training as plain PyTorch.
    # "torch_adam": true builds torch.optim.AdamW in DeepSpeed, with its weight_decay 0.01
    # (lr 0.1 instead of 1e-3 so that the decay shows in two steps).
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_clipping": 1.0,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "optimizer": {"type": "AdamW", "params": {"lr": 0.1, "torch_adam": True}}}
    parity(DelegatingWrapperModel, config, steps=2, hidden=4,
           ref_optimizer=lambda ps: torch.optim.AdamW(ps, lr=0.1))


class Tiny(nn.Module):
    def __init__(self, hidden=16):
        super().__init__()
        self.fc = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x):
        out = self.fc(x)
        late = getattr(self, "late", None)  # attached after initialize
        return late(out) if late is not None else out


@case("test_zero_late_module_attach.py::TestZero3LateModuleAttach::"
      "test_forward_after_late_submodule_attach")
def late_module_attach(tmp):
    # A submodule attached after initialize runs as plain PyTorch in the stage-3 forward.
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    torch.manual_seed(5)
    model = Tiny()
    engine, *_ = zero_ext.initialize(model=model, config=config,
                                     model_parameters=list(model.parameters()))
    weights = full_params(engine)
    late = nn.Linear(16, 16, bias=False)
    engine.module.late = late
    x = torch.randn(2, 16)
    with torch.no_grad():
        got = engine(x)
        want = late(nn.functional.linear(x, weights["fc.weight"]))
    torch.testing.assert_close(got, want)
