"""zero_ext.fused.apply(model): the fused ops swapped into transformers models, in one process.

The reference is the same transformers model, a deep copy taken before apply(), run unfused:
in fp32 the loss and every parameter's gradient agree to 1e-5 (Llama with tied and untied
embeddings, GPT-2), in bf16 closely; in training with labels the fused model returns the loss
without logits, in evaluation the logits as before. transformers' loss options go through:
``num_items_in_batch`` (the HF Trainer's gradient accumulation), ``shift_labels``, ignored
tokens and ``ignore_index``. A dispatch mode counts the zero_ext ops each forward runs, so a
swap that silently fell back to the unfused forward fails. The residual add fused into the
norm of Llama layers and GPT-2 blocks: bit-identical to the layers' own forwards, inside
transformers' checkpoint, through generation's KV cache, bound as the block's own forward binds
its arguments. Also: idempotence, ``modules=`` by class name and its errors, the models and
modules apply() must leave alone (GPT-2 blocks with cross-attention among them).
"""

import collections
import copy
import functools
import inspect
import re

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import zero_ext.checkpointing
import zero_ext.fused
from zero_ext.fused import rms_norm

VOCAB = 97
FP32 = {"atol": 1e-5, "rtol": 1e-5}
LAYERS = 2
INIT = 0.2  # weights large enough that the activations reach where the GeLU variants differ


class OpCalls(TorchDispatchMode):
    """Counts the zero_ext ops dispatched inside the block (below autograd: forward kernels
    and the backward kernels autograd calls)."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name.startswith("zero_ext::fused_linear_cross_entropy_fwd"):
            name = "zero_ext::linear_cross_entropy"  # the forward op, with gradients or without
        if name.startswith("zero_ext::"):
            self.calls[name.removeprefix("zero_ext::")] += 1
        if name == "zero_ext::fused_norm" and args[1] is not None:
            self.calls["fused_norm_residual"] += 1  # the residual add in the norm's pass
        return func(*args, **(kwargs or {}))


def llama(tied=True, dtype=torch.float32, **overrides):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=tied, initializer_range=INIT, **overrides)
    return LlamaForCausalLM(config).to(dtype)


def llama_family(config_class, model_class):
    """A tiny Mistral / Qwen2 / Qwen3 (the Llama family's other members apply() knows)."""
    def build():
        torch.manual_seed(0)
        return model_class(config_class(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, initializer_range=INIT,
            tie_word_embeddings=False))
    return build


def gpt2(**overrides):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=LAYERS, n_head=4, n_positions=64,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0, initializer_range=INIT, **overrides)
    return GPT2LMHeadModel(config)


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 11), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100          # a prompt not trained on
    labels[2, -3:] = -100         # padding
    return ids, labels


def fused_and_reference(model, **apply_kwargs):
    reference = copy.deepcopy(model)
    counts = zero_ext.fused.apply(model, **apply_kwargs)
    return model, reference, counts


def assert_same_gradients(model, reference, **tolerance):
    pairs = list(zip(model.named_parameters(), reference.named_parameters(), strict=True))
    assert pairs
    for (name, p), (_, q) in pairs:
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, **tolerance, msg=lambda m, n=name: f"{n}: {m}")


def train_step(model, reference, ids, **kwargs):
    model.train()
    reference.train()
    with OpCalls() as ops:
        out = model(input_ids=ids, **kwargs)
        out.loss.backward()
    ref = reference(input_ids=ids, **kwargs)
    ref.loss.backward()
    return out, ref, ops.calls


NORMS = 2 * LAYERS + 1
# Each layer's norm after the attention takes the residual add (Llama family and GPT-2 alike).
SWIGLU_RMS = {"rms_norm": NORMS, "swiglu": LAYERS, "residual_norm": LAYERS}
SWIGLU_RMS_OPS = {"fused_norm": NORMS, "swiglu": LAYERS, "fused_norm_residual": LAYERS}
GELU_LN = {"layer_norm": NORMS, "bias_gelu": LAYERS, "residual_norm": LAYERS}
GELU_LN_OPS = {"fused_norm": NORMS, "bias_gelu": LAYERS, "fused_norm_residual": LAYERS}
# model, the counts apply() returns, the zero_ext ops one forward must run (none fell back).
PARITY = {
    "llama-tied": (functools.partial(llama, tied=True), SWIGLU_RMS, SWIGLU_RMS_OPS),
    "llama-untied": (functools.partial(llama, tied=False), SWIGLU_RMS, SWIGLU_RMS_OPS),
    "gpt2": (gpt2, GELU_LN, GELU_LN_OPS),
    "mistral": (llama_family(MistralConfig, MistralForCausalLM), SWIGLU_RMS, SWIGLU_RMS_OPS),
    "qwen2": (llama_family(Qwen2Config, Qwen2ForCausalLM), SWIGLU_RMS, SWIGLU_RMS_OPS),
    # On eager attention the softmax is swapped too (SDPA, the default, is left alone).
    "llama-eager": (functools.partial(llama, tied=False, attn_implementation="eager"),
                    SWIGLU_RMS | {"softmax": LAYERS},
                    SWIGLU_RMS_OPS | {"scaled_masked_softmax": LAYERS}),
    "gpt2-eager": (functools.partial(gpt2, attn_implementation="eager"),
                   GELU_LN | {"softmax": LAYERS},
                   GELU_LN_OPS | {"scaled_masked_softmax": LAYERS}),
    # Qwen3 normalizes each head's queries and keys too: 4-D inputs.
    "qwen3": (llama_family(Qwen3Config, Qwen3ForCausalLM),
              SWIGLU_RMS | {"rms_norm": NORMS + 2 * LAYERS},
              SWIGLU_RMS_OPS | {"fused_norm": NORMS + 2 * LAYERS}),
}


@pytest.mark.parametrize("case", list(PARITY))
def test_fp32_loss_and_every_gradient_match_unfused(case):
    build, counts, forward_ops = PARITY[case]
    model, reference, swapped = fused_and_reference(build())
    assert swapped == dict.fromkeys(swapped, 0) | {"cross_entropy": 1} | counts
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    assert (head.weight is embedding.weight) == (case in ("llama-tied", "gpt2", "gpt2-eager"))
    ids, labels = batch()
    out, ref, calls = train_step(model, reference, ids, labels=labels)
    assert out.logits is None and ref.logits is not None
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref.loss, **FP32)
    assert_same_gradients(model, reference, **FP32)
    for op, n in (forward_ops | {"linear_cross_entropy": 1}).items():
        assert calls[op] == n, op


# Two ways to checkpoint a transformers model: zero_ext's, and HF's own switch
# (activation_checkpointing_enable, gradient_checkpointing_enable's new name: torch's checkpoint
# through the same layer wrapper); the fused MLP op of the family.
CHECKPOINTED = {
    "llama-zero_ext": (llama, zero_ext.checkpointing.apply, "swiglu"),
    # (the old name where the new one does not exist: transformers 5.17, the GPU machine's)
    "gpt2-hf": (gpt2, lambda m: getattr(m, "activation_checkpointing_enable",
                                        m.gradient_checkpointing_enable)(), "bias_gelu"),
}


@pytest.mark.parametrize("case", list(CHECKPOINTED))
def test_activation_checkpointing_recomputes_the_fused_modules(case):
    build, checkpoint, activation = CHECKPOINTED[case]
    model, reference, _ = fused_and_reference(build())
    for m in (model, reference):
        checkpoint(m)
    ids, labels = batch()
    out, ref, calls = train_step(model, reference, ids, labels=labels)
    torch.testing.assert_close(out.loss, ref.loss, **FP32)
    assert_same_gradients(model, reference, **FP32)
    # Each layer's two norms and MLP run again in backward; the final norm and the loss not.
    # transformers checkpoints in the layer class's forward, which apply() replaced on the
    # instance: the fused layer itself goes through the checkpoint, residual add included.
    assert calls["fused_norm"] == NORMS + 2 * LAYERS and calls[activation] == 2 * LAYERS
    assert calls["fused_norm_residual"] == 2 * LAYERS


# A model of each family, and its base model (without the head) and layers.
FAMILIES = {"llama": (functools.partial(llama, tied=False),
                      lambda m: (m.model, m.model.layers)),
            "gpt2": (gpt2, lambda m: (m.transformer, m.transformer.h))}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_residual_add_in_the_norm_changes_no_bit_of_the_layers_outputs(family, dtype):
    # Against the same fused model whose layers run their own forward (h = residual + attention
    # as a tensor add, then the fused norm of h): the kernel rounds the sum once, as the add
    # does, and normalizes that rounded sum, so the hidden states are identical in both dtypes.
    build, layers_of = FAMILIES[family]
    model = build().to(dtype)
    zero_ext.fused.apply(model, cross_entropy=False)
    layers_own = copy.deepcopy(model)
    for layer in layers_of(layers_own)[1]:
        del layer.forward
    ids, _ = batch()
    outputs = []
    for m in (model, layers_own):
        with OpCalls() as ops:
            hidden = layers_of(m)[0](input_ids=ids).last_hidden_state
            hidden.float().square().mean().backward()
        outputs.append(hidden)
        assert ops.calls["fused_norm_residual"] == (LAYERS if m is model else 0)
    assert torch.equal(*outputs)
    for (name, p), q in zip(model.named_parameters(), layers_own.parameters(), strict=True):
        if name == "lm_head.weight":  # not used by the base model
            continue
        if dtype == torch.float32:  # the backward adds the two gradients of h in the same order
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7, msg=name)
        else:  # h's two gradients summed in fp32 and rounded once, not rounded twice: bf16
            # rounding, grown through the attention's backward; a lost gradient is off by O(1)
            err = (p.grad.float() - q.grad.float()).abs().max()
            assert err <= 2**-4 * q.grad.float().abs().max(), (name, err)


def test_bf16_model_close_to_unfused_with_an_fp32_loss():
    model, reference, _ = fused_and_reference(llama(tied=False, dtype=torch.bfloat16))
    ids, labels = batch()
    out, ref, _ = train_step(model, reference, ids, labels=labels)
    assert out.loss.dtype == ref.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref.loss, atol=2e-2, rtol=1e-2)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        # Relative to the gradient's size: bf16 rounds each op; a wrong gradient is off by O(1).
        scale = q.grad.float().abs().max()
        err = (p.grad.float() - q.grad.float()).abs().max()
        assert err <= 0.1 * scale + 1e-3, (name, err, scale)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_eval_mode_and_training_without_labels_keep_the_logits(family):
    model, reference, _ = fused_and_reference(FAMILIES[family][0]())
    ids, labels = batch()
    model.eval()
    reference.eval()
    with torch.no_grad(), OpCalls() as ops:
        out = model(input_ids=ids, labels=labels)
    ref = reference(input_ids=ids, labels=labels)
    assert ops.calls["fused_norm"] == 2 * LAYERS + 1
    assert ops.calls["linear_cross_entropy"] == 0
    torch.testing.assert_close(out.logits, ref.logits, **FP32)
    torch.testing.assert_close(out.loss, ref.loss, **FP32)
    # Generation (eval, KV cache, one token a step) runs the fused norms, MLPs and layers as
    # well: each step's layers read and write the cache in the fused body.
    generate = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0,
                "return_dict_in_generate": True, "output_logits": True}
    with OpCalls() as ops:
        got = model.generate(ids[:, :4], **generate)
    expected = reference.generate(ids[:, :4], **generate)
    assert ops.calls["fused_norm_residual"] == 5 * LAYERS
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.logits, expected.logits, strict=True):
        torch.testing.assert_close(a, b, **FP32)
    model.train()
    reference.train()
    out = model(input_ids=ids)
    assert out.loss is None
    torch.testing.assert_close(out.logits, reference(input_ids=ids).logits, **FP32)


def test_output_attentions_and_hidden_states_come_through_the_fused_layers():
    # transformers records them with hooks on the attention modules and layers, which the
    # fused layer still calls as modules.
    model, reference, _ = fused_and_reference(llama(attn_implementation="eager"), softmax=False)
    ids, _ = batch()
    model.eval()
    reference.eval()
    with torch.no_grad(), OpCalls() as ops:
        out = model(input_ids=ids, output_attentions=True, output_hidden_states=True)
    ref = reference(input_ids=ids, output_attentions=True, output_hidden_states=True)
    assert ops.calls["fused_norm_residual"] == LAYERS
    for name in ("attentions", "hidden_states"):
        got, expected = getattr(out, name), getattr(ref, name)
        assert len(got) == len(expected) > 0, name
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, **FP32, msg=name)


def test_num_items_in_batch_divides_the_sum_as_transformers_does():
    model, reference, _ = fused_and_reference(llama())
    ids, labels = batch()
    # The HF Trainer counts the tokens of all accumulated micro-batches: more than this one has.
    items = torch.tensor(57)
    out, ref, _ = train_step(model, reference, ids, labels=labels, num_items_in_batch=items)
    torch.testing.assert_close(out.loss, ref.loss, **FP32)
    n = (labels[:, 1:] != -100).sum()
    mean = reference(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(out.loss, mean * n / items, **FP32)  # not the mean
    assert_same_gradients(model, reference, **FP32)


def test_shift_labels_and_ignore_index_are_used_as_given():
    model, reference, _ = fused_and_reference(gpt2())
    ids, labels = batch()
    # Targets already aligned with the positions (here: each position's own token, not the
    # next), with -1 marking the ignored ones.
    shifted = labels.masked_fill(labels == -100, -1)
    out, ref, _ = train_step(model, reference, ids, labels=labels, shift_labels=shifted,
                             ignore_index=-1)
    torch.testing.assert_close(out.loss, ref.loss, **FP32)
    assert_same_gradients(model, reference, **FP32)
    # The shifted labels are not shifted again: the loss differs from the labels' own.
    other = reference(input_ids=ids, labels=labels).loss
    assert (out.loss - other).abs() > 1e-3


def test_skip_logits_decides_as_liger_kernel_and_the_hf_trainer_pass_it():
    model, reference, _ = fused_and_reference(llama())
    ids, labels = batch()
    reference.eval()
    ref = reference(input_ids=ids, labels=labels)
    model.eval()  # the Trainer's prediction_step with use_liger_kernel: loss only
    with OpCalls() as ops:
        out = model(input_ids=ids, labels=labels, skip_logits=True)
    assert out.logits is None and ops.calls["linear_cross_entropy"] == 1
    torch.testing.assert_close(out.loss, ref.loss, **FP32)
    model.train()  # logits asked for in training: the unfused head and transformers' loss
    seen = []
    model.model.register_forward_pre_hook(lambda m, a, kw: seen.append(set(kw)),
                                          with_kwargs=True)
    with OpCalls() as ops:
        out = model(input_ids=ids, labels=labels, skip_logits=False)
    assert ops.calls["linear_cross_entropy"] == 0
    assert "skip_logits" not in seen[0]  # the option is the fused forward's, not the model's
    torch.testing.assert_close(out.logits, ref.logits, **FP32)
    torch.testing.assert_close(out.loss, ref.loss, **FP32)
    with pytest.raises(ValueError, match="^zero_ext.fused.apply: skip_logits=True asks "
                                         "LlamaForCausalLM for the loss without logits, but no "
                                         "labels"):
        model(input_ids=ids, skip_logits=True)


def test_return_dict_false_gives_the_loss_first():
    model, reference, _ = fused_and_reference(llama())
    ids, labels = batch()
    model.train()
    reference.train()
    out = model(input_ids=ids, labels=labels, return_dict=False, use_cache=False)
    ref = reference(input_ids=ids, labels=labels, return_dict=False, use_cache=False)
    # (loss, logits, ...) with None for the logits: later entries keep their places
    assert isinstance(out, tuple) and len(out) == len(ref) and out[1] is None
    torch.testing.assert_close(out[0], ref[0], **FP32)
    out = model(input_ids=ids, labels=labels, return_dict=False)
    ref = reference(input_ids=ids, labels=labels, return_dict=False)
    assert len(out) == len(ref) and type(out[2]) is type(ref[2])  # the cache, where it was


def test_a_forward_replaced_after_apply_is_bound_by_its_own_signature():
    # The fused forward reads its fallback's signature once per function, not per call: a
    # forward put in later (here labels first) is read anew, not bound by the class's.
    from zero_ext._plain_forward import plain_forward, replace_plain_forward

    model, reference, _ = fused_and_reference(llama())
    ids, labels = batch()
    model.train()
    reference.train()
    model(input_ids=ids, labels=labels)
    own = plain_forward(model)

    def labels_first(self, labels, input_ids, **kwargs):
        return own(input_ids=input_ids, labels=labels, **kwargs)

    replace_plain_forward(model, labels_first.__get__(model))
    with OpCalls() as ops:
        out = model(labels, ids)
    assert ops.calls["linear_cross_entropy"] == 1 and out.logits is None
    torch.testing.assert_close(out.loss, reference(input_ids=ids, labels=labels).loss, **FP32)


def test_second_apply_swaps_nothing_and_changes_nothing():
    model, reference, first = fused_and_reference(llama())
    again = zero_ext.fused.apply(model)
    assert sum(first.values()) == 2 + 4 * LAYERS and set(again.values()) == {0}
    ids, labels = batch()
    out, ref, calls = train_step(model, reference, ids, labels=labels)
    torch.testing.assert_close(out.loss, ref.loss, **FP32)
    assert calls["linear_cross_entropy"] == 1 and calls["swiglu"] == LAYERS


def test_switches_select_the_kinds():
    counts = zero_ext.fused.apply(llama(), cross_entropy=False, activations=False)
    assert counts == {"cross_entropy": 0, "rms_norm": 2 * LAYERS + 1, "layer_norm": 0,
                      "swiglu": 0, "bias_gelu": 0, "softmax": 0, "residual_norm": LAYERS}
    model = gpt2()
    assert zero_ext.fused.apply(model, norms=False)["layer_norm"] == 0
    model.train()
    ids, labels = batch()
    assert model(input_ids=ids, labels=labels).logits is None


def test_the_reference_model_and_a_deep_copy_are_their_own():
    model, reference, _ = fused_and_reference(llama())
    twin = copy.deepcopy(model)  # as TRL copies a reference model
    assert twin.forward.__self__ is twin and twin.lm_head.forward.__self__ is twin.lm_head
    assert "forward" not in reference.__dict__ and "forward" not in reference.lm_head.__dict__
    ids, labels = batch()
    twin.train()
    with torch.no_grad():
        twin.lm_head.weight.mul_(2)  # the copy's head, not the original's, computes its loss
        assert (twin(input_ids=ids, labels=labels).loss -
                model(input_ids=ids, labels=labels).loss).abs() > 1e-3
    # The HF Trainer reads the forward's signature to keep dataset columns.
    assert "labels" in inspect.signature(model.forward).parameters


def test_lora_adapters_added_after_apply_are_trained():
    # LoRA on GPT-2's c_fc: the fused MLP sees a wrapped c_fc and runs the module's own forward
    # (its product would skip the adapter); the head, not wrapped, still gives the fused loss.
    from peft import LoraConfig, get_peft_model

    model, reference, _ = fused_and_reference(gpt2())
    config = LoraConfig(r=4, target_modules=["c_fc", "c_attn"], fan_in_fan_out=True,
                        init_lora_weights=False)
    torch.manual_seed(3)
    model = get_peft_model(model, config)
    torch.manual_seed(3)
    reference = get_peft_model(reference, config)
    ids, labels = batch()
    out, ref, calls = train_step(model, reference, ids, labels=labels)
    assert out.logits is None and calls["bias_gelu"] == 0
    torch.testing.assert_close(out.loss, ref.loss, **FP32)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        if q.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, **FP32, msg=name)


class ScaledNorm(nn.Module):
    """A user's RMSNorm under another name: apply() swaps it only when asked to."""

    def __init__(self, h):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, h))
        self.eps = 1e-5

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class NoWeightNorm(nn.Module):
    def forward(self, x):
        return x


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = ScaledNorm(16)
        self.plain = NoWeightNorm()
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        return self.proj(self.plain(self.norm(x)))


def test_modules_by_class_name_probe_leaves_every_random_generator(monkeypatch):
    # The probe that compares a named class with the kind's formula draws its dropout from
    # seed 0 in a forked generator: no other generator (every CUDA device's) is reseeded.
    model = Tiny()
    state = torch.get_rng_state()
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    zero_ext.fused.apply(model, modules={"ScaledNorm": "rms_norm"})
    assert reseeded == [] and torch.equal(torch.get_rng_state(), state)


def test_modules_by_class_name():
    model = Tiny()
    reference = copy.deepcopy(model)
    assert set(zero_ext.fused.apply(model).values()) == {0}  # not a class apply() knows
    assert zero_ext.fused.apply(model, modules={"ScaledNorm": "rms_norm"})["rms_norm"] == 1
    x = torch.randn(5, 16, requires_grad=True)
    with OpCalls() as ops:
        out = model(x)
    assert ops.calls["fused_norm"] == 1
    torch.testing.assert_close(out, reference(x), **FP32)


@pytest.mark.parametrize("modules, match", [
    ({"Linear": "rmsnorm"}, (r"modules\['Linear'\] = 'rmsnorm' is not a kind; expected one "
                             r"of 'rms_norm', 'layer_norm', 'swiglu_mlp', 'bias_gelu_mlp', "
                             r"'causal_lm'")),
    ({"LlamaRMSNorm": "rms_norm"}, (r"modules names class 'LlamaRMSNorm', but the model has no "
                                    r"module of that class; its classes are \['Linear', "
                                    r"'NoWeightNorm', 'ScaledNorm', 'Tiny'\]")),
    ({"NoWeightNorm": "layer_norm"}, (r"modules\['NoWeightNorm'\] = 'layer_norm', but "
                                      r"NoWeightNorm has no `weight` tensor .*; remove the "
                                      r"entry, or name a class that has it")),
    ({"Linear": "swiglu_mlp"}, r"Linear has no `gate_proj`, `up_proj`, `down_proj` module"),
    ({"Tiny": "causal_lm"}, r"Tiny has `lm_head` NoneType, not exactly torch.nn.Linear"),
])
def test_modules_errors_name_the_class_what_is_missing_and_the_fix(modules, match):
    model = Tiny()
    with pytest.raises(ValueError) as error:
        zero_ext.fused.apply(model, modules={"ScaledNorm": "rms_norm", **modules})
    assert str(error.value).startswith("zero_ext.fused.apply: ")
    assert re.search(match, str(error.value)), str(error.value)
    assert "forward" not in model.norm.__dict__  # nothing half-applied before the error


def test_models_it_cannot_reproduce_are_left_alone():
    # Gemma: (1 + weight) norms, GeLU-gated MLP; Llama with a non-SiLU gate; a soft-capped head.
    torch.manual_seed(0)
    gemma = GemmaForCausalLM(GemmaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    gelu_llama = llama(hidden_act="gelu")
    for model in (gemma, gelu_llama):
        reference = copy.deepcopy(model)
        counts = zero_ext.fused.apply(model, norms=model is not gelu_llama)
        assert counts["rms_norm"] == 0 and counts["swiglu"] == 0, type(model).__name__
        ids, labels = batch()
        model.train()
        reference.train()
        torch.testing.assert_close(model(input_ids=ids, labels=labels).loss,
                                   reference(input_ids=ids, labels=labels).loss, **FP32)
    assert zero_ext.fused.apply(gemma)["cross_entropy"] == 0  # GemmaForCausalLM: not listed
    # Named explicitly, Gemma's norm has the attributes but not the formula: refused.
    with pytest.raises(ValueError, match=r"^zero_ext.fused.apply: modules\['GemmaRMSNorm'\] = "
                       r"'rms_norm', but GemmaRMSNorm computes something else than the "
                       r"'rms_norm' formula \(on a random input its forward differs"):
        zero_ext.fused.apply(gemma, modules={"GemmaRMSNorm": "rms_norm"})
    capped = llama()
    capped.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="transforms the logits "
                                         r"\(config.final_logit_softcapping\)"):
        zero_ext.fused.apply(capped, modules={"LlamaForCausalLM": "causal_lm"})
    assert zero_ext.fused.apply(capped)["cross_entropy"] == 0


def test_the_plain_forward_is_the_fallback_whichever_of_wrapper_and_substitute_comes_first():
    # zero_ext._plain_forward, which apply() and stage 3's partitioned Linear go through.
    from zero_ext._plain_forward import (
        forward_is_plain,
        plain_forward,
        replace_plain_forward,
        wrap_forward,
    )

    def wrapper(self, x):
        return plain_forward(self)(x) + 1

    def substitute(self, x):
        return nn.Linear.forward(self, x) * 2

    x = torch.ones(1, 2)
    for order in ("wrap first", "substitute first"):
        layer = nn.Linear(2, 2)
        expected = 2 * nn.Linear.forward(layer, x) + 1
        steps = [(wrap_forward, wrapper), (replace_plain_forward, substitute)]
        for install, forward in steps if order == "wrap first" else steps[::-1]:
            install(layer, forward.__get__(layer))
        assert layer.forward.__func__ is wrapper and not forward_is_plain(layer), order
        assert plain_forward(layer).__func__ is substitute, order
        torch.testing.assert_close(layer(x), expected, msg=order)
        twin = copy.deepcopy(layer)
        assert plain_forward(twin).__self__ is twin, order
    substituted = nn.Linear(2, 2)
    replace_plain_forward(substituted, substitute.__get__(substituted))
    assert forward_is_plain(substituted) and forward_is_plain(copy.deepcopy(substituted))
    foreign = nn.Linear(2, 2)
    foreign.forward = lambda x: x
    assert not forward_is_plain(foreign) and plain_forward(foreign) is foreign.forward


def test_other_instances_and_wrapped_modules_are_untouched():
    fused, other = llama(), llama()
    zero_ext.fused.apply(fused)
    assert not any("forward" in m.__dict__ for m in other.modules())  # instance-level swaps
    # A module whose forward another wrapper replaced keeps that wrapper.
    model = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    wrapped = model.model.norm
    wrapped.forward = lambda x, inner=wrapped.forward: inner(x)
    counts = zero_ext.fused.apply(model)
    assert counts["rms_norm"] == 4  # input, post-attention, q and k norms; not the final one
    assert "_zero_ext_fused" not in wrapped.__dict__


def test_a_layer_whose_norm_was_wrapped_after_apply_adds_the_residual_itself():
    model, reference, _ = fused_and_reference(llama())
    norm = model.model.layers[0].post_attention_layernorm
    norm.forward = lambda x, inner=norm.forward: inner(x)  # e.g. a logging shim
    ids, labels = batch()
    out, ref, calls = train_step(model, reference, ids, labels=labels)
    torch.testing.assert_close(out.loss, ref.loss, **FP32)
    assert_same_gradients(model, reference, **FP32)
    assert calls["fused_norm_residual"] == LAYERS - 1 and calls["fused_norm"] == NORMS


def test_gpt2_blocks_with_cross_attention_run_their_own_forward():
    # Their add before ln_2 is the cross-attention branch's, when the call has encoder states:
    # left to transformers' code (the branch's norm is still swapped, as any LayerNorm).
    model, reference, counts = fused_and_reference(gpt2(add_cross_attention=True))
    assert counts["residual_norm"] == 0 and counts["layer_norm"] == NORMS + LAYERS
    ids, labels = batch()
    encoder = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(2))
    out, ref, calls = train_step(model, reference, ids, labels=labels,
                                 encoder_hidden_states=encoder)
    assert calls["fused_norm_residual"] == 0 and calls["fused_norm"] == NORMS + LAYERS
    torch.testing.assert_close(out.loss, ref.loss, **FP32)
    assert_same_gradients(model, reference, **FP32)
    # A fused block without the branch, given encoder states: transformers' own error.
    model = gpt2()
    zero_ext.fused.apply(model)
    with pytest.raises(ValueError, match="has to be instantiated with cross-attention layers"):
        model(input_ids=ids, encoder_hidden_states=encoder)


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
def test_a_fused_block_takes_its_arguments_as_its_own_forward_does():
    # GPT2Model passes a block its cache, mask and encoder states positionally, the rest by
    # keyword; the fused body binds them to the block's signature. The cache's other name
    # sends the call to the block's own forward, which does with it what it does: transformers
    # 5.25 renames past_key_values to its cache argument; 5.17 (the GPU machine's) names it
    # past_key_values and ignores a `cache` keyword.
    from transformers import DynamicCache

    model, reference, _ = fused_and_reference(gpt2())
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(2))
    positions = torch.arange(5).expand(3, 5)
    own = next(n for n in ("cache", "past_key_values")
               if n in inspect.signature(type(model.transformer.h[0]).forward).parameters)
    other = {"cache": "past_key_values", "past_key_values": "cache"}[own]
    renamed = other == "past_key_values"  # the old name, which the block takes as its own
    calls = {  # name: (args, kwargs, a cache given, the fused body takes it)
        "positional": ((x, None, None, None), {"use_cache": False}, False, True),
        "keywords": ((), {"hidden_states": x, "position_ids": positions}, False, True),
        "cache positional": ((x, "cache"), {"use_cache": True}, True, True),
        f"{own} keyword": ((x,), {own: "cache", "use_cache": True}, True, True),
        f"{other} keyword": ((x,), {other: "cache", "use_cache": True}, renamed, False),
    }
    for name, (args, kwargs, cached, fused) in calls.items():
        outputs, caches = [], []
        for m in (model, reference):
            cache = DynamicCache(config=m.config)
            given = [cache if a == "cache" else a for a in args]
            named = {k: cache if isinstance(v, str) else v for k, v in kwargs.items()}
            with torch.no_grad(), OpCalls() as ops:
                outputs.append(m.transformer.h[0](*given, **named))
            caches.append(cache)
            if m is model:
                assert ops.calls["fused_norm_residual"] == int(fused), name
        torch.testing.assert_close(*outputs, **FP32, msg=name)
        assert caches[0].get_seq_length() == caches[1].get_seq_length() == 5 * cached, name
        if cached:
            torch.testing.assert_close(caches[0].layers[0].keys, caches[1].layers[0].keys)


def test_fallback_to_the_module_forward_where_the_kernel_does_not_take_the_call():
    model = llama()
    zero_ext.fused.apply(model)
    norm = model.model.norm
    x = torch.randn(4, 32, dtype=torch.float64)  # dtype differs from the fp32 weight
    with OpCalls() as ops:
        out = norm(x)
    assert ops.calls["fused_norm"] == 0
    assert out.dtype == torch.float64
    expected = rms_norm(x.float(), norm.weight, norm.variance_epsilon).double()
    torch.testing.assert_close(out, expected, **FP32)


def test_an_fp16_model_keeps_its_own_loss_and_trains():
    # The fused cross-entropy has no fp16 kernel: the head is left to the model's own loss
    # (decided before the labels are taken from the call), the layers still fused.
    model, reference, _ = fused_and_reference(llama(dtype=torch.float16))
    ids, labels = batch()
    out, ref, calls = train_step(model, reference, ids, labels=labels)
    assert calls["linear_cross_entropy"] == 0 and calls["fused_norm"] > 0
    assert out.logits is not None and torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, ref.loss, atol=2e-3, rtol=2e-3)


def test_the_kernels_take_fp64_on_the_cpu_only():
    from zero_ext.fused.swap import _device_takes

    dtypes = (torch.float32, torch.float64)
    assert _device_takes(torch.empty(2, dtype=torch.float64), dtypes)
    assert not _device_takes(torch.empty(2, dtype=torch.float64, device="meta"), dtypes)
    assert _device_takes(torch.empty(2, device="meta"), dtypes)
    assert not _device_takes(torch.empty(2, dtype=torch.float16), dtypes)


# -- the config switch: zero_ext.fused_kernels, applied by zero_ext.initialize -----------------

def initialize_cases():
    """Runs in a one-rank group (dist_harness): initialize with the switch on, off, with its
    options, and on a model with nothing to swap."""
    import contextlib
    import io
    import warnings

    import zero_ext

    def start(model, fused=None, **more):
        config = {"train_micro_batch_size_per_gpu": 3, **more}
        if fused is not None:
            config["zero_ext"] = {"fused_kernels": fused}
        log = io.StringIO()
        with contextlib.redirect_stdout(log), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine = zero_ext.initialize(model=model, config=config)[0]
        return engine, log.getvalue(), [str(w.message) for w in caught]

    def fused_kinds(model):
        return collections.Counter(m.__dict__.get("_zero_ext_fused") for m in model.modules()
                                   if m.__dict__.get("_zero_ext_fused"))

    results = {}
    model = llama()
    reference = copy.deepcopy(model).train()
    engine, log, _ = start(model, {"enabled": True})
    ids, labels = batch()
    out = engine(input_ids=ids, labels=labels)
    results["on"] = {"log": log, "kinds": fused_kinds(model), "logits": out.logits,
                     "loss": out.loss.item(),
                     "reference": reference(input_ids=ids, labels=labels).loss.item()}
    model = llama()
    start(model)
    results["off"] = fused_kinds(model)
    model = llama()
    start(model, {"enabled": True, "norms": False, "activations": False,
                  "modules": {"LlamaMLP": "swiglu_mlp"}})
    results["options"] = fused_kinds(model)
    results["gpt2"] = start(gpt2(), {"enabled": True})[1]
    _, log, caught = start(nn.Sequential(nn.Linear(4, 4)), {"enabled": True})
    results["nothing"] = {"log": log, "warnings": caught}
    results["stage3"] = stage3_head_case(start)
    return results


def stage3_head_case(start):
    """Stage 3 with the untied head a gathered unit, its fused forward applied before
    initialize (the config switch) and after: either way the head's fallback for logits is the
    engine's partitioned Linear forward, and the loss and logits match the unfused model."""
    from zero_ext._plain_forward import plain_forward
    from zero_ext.zero.unit_hooks import _partitioned_linear_forward

    stage3 = {"stage": 3, "stage3_param_persistence_threshold": 0}
    results = {}
    for order in ("before", "after"):
        model = llama(tied=False)
        reference = copy.deepcopy(model).train()
        engine, _, _ = start(model, {"enabled": order == "before"}, zero_optimization=stage3)
        swapped = zero_ext.fused.apply(model) if order == "after" else None
        ids, labels = batch()
        fallback = plain_forward(model.lm_head)
        loss = engine(input_ids=ids, labels=labels).loss
        logits = engine(input_ids=ids).logits
        results[order] = {
            "swapped": swapped, "fused_head": model.lm_head.__dict__.get("_zero_ext_fused"),
            "fallback_partitioned": fallback.__func__ is _partitioned_linear_forward,
            "loss": (loss.item(), reference(input_ids=ids, labels=labels).loss.item()),
            "logits_close": torch.allclose(logits, reference(input_ids=ids).logits, **FP32)}
    return results


def test_initialize_applies_the_fused_kernels_when_the_config_asks():
    from dist_harness import run_group

    (results,) = run_group(1, initialize_cases)
    on = results["on"]
    assert "[zero_ext] fused kernels: 1 cross_entropy, 5 rms_norm, 0 layer_norm, 2 swiglu, " \
           "0 bias_gelu" in on["log"]
    assert on["kinds"] == {"causal_lm": 1, "lm_head": 1, "rms_norm": 5, "swiglu_mlp": 2,
                           "decoder_layer": 2}
    assert on["logits"] is None
    assert on["loss"] == pytest.approx(on["reference"], rel=1e-5)
    assert "[zero_ext] fused kernels: 1 cross_entropy, 0 rms_norm, 5 layer_norm, 0 swiglu, " \
           "2 bias_gelu, 0 softmax, 2 residual_norm" in results["gpt2"]
    assert results["off"] == {}  # off by default
    assert results["options"] == {"causal_lm": 1, "lm_head": 1, "swiglu_mlp": 2}
    nothing = results["nothing"]
    assert "0 cross_entropy, 0 rms_norm" in nothing["log"]
    assert any("zero_ext.fused_kernels.enabled is true, but no module of this Sequential"
               in w for w in nothing["warnings"])
    for order, stage3 in results["stage3"].items():
        assert stage3["fused_head"] == "lm_head", order
        assert stage3["fallback_partitioned"] and stage3["logits_close"], order
        assert stage3["loss"][0] == pytest.approx(stage3["loss"][1], rel=1e-5), order
    assert results["stage3"]["after"]["swapped"]["cross_entropy"] == 1


@pytest.mark.parametrize("fused, message", [
    ({"enable": True}, "zero_ext.fused_kernels.enable: unknown key; did you mean 'enabled'?"),
    ({"cross_entropy_loss": True}, ("zero_ext.fused_kernels.cross_entropy_loss: unknown key; "
                                    "did you mean 'cross_entropy'?")),
    ({"enabled": "maybe"}, "zero_ext.fused_kernels.enabled: expected true or false"),
    ({"modules": ["LlamaMLP"]}, ("zero_ext.fused_kernels.modules: expected a JSON object of "
                                 "class name -> kind")),
    ({"modules": {"LlamaMLP": "swiglu"}}, ("zero_ext.fused_kernels.modules.LlamaMLP: expected "
                                           "one of 'rms_norm', 'layer_norm', 'swiglu_mlp'")),
])
def test_config_section_refuses_unknown_keys_and_bad_values(fused, message):
    from zero_ext.config import ConfigError, ZeroConfig

    with pytest.raises(ConfigError) as error:
        ZeroConfig.load({"zero_ext": {"fused_kernels": fused}})
    assert str(error.value).startswith(message), str(error.value)


def test_config_section_defaults_and_round_trip():
    from zero_ext.config import ZeroConfig

    settings = ZeroConfig.load({}).zero_ext.fused_kernels
    assert (settings.enabled, settings.cross_entropy, settings.norms, settings.activations,
            settings.modules) == (False, True, True, True, {})
    given = {"enabled": True, "norms": False, "modules": {"MyNorm": "rms_norm"}}
    config = ZeroConfig.load({"zero_ext": {"fused_kernels": given}})
    again = ZeroConfig.load(config.to_dict()).zero_ext.fused_kernels
    assert again == config.zero_ext.fused_kernels and again.modules == {"MyNorm": "rms_norm"}
