"""The sharded optimizer: fp32 master weights and AdamW state for this rank's slice of each bucket.

Created by the engine at initialize and driven by engine.step(); users see it as the
`optimizer` that zero_ext.initialize returns, a torch.optim.Optimizer whose param_groups are
theirs (LR schedulers set group["lr"] as usual). One zero_ext::adamw_step_ call per parameter
group updates every bucket shard of the group, and writes the new 16-bit weights straight into
the model's flat buffer when the model computes in 16 bits; the engine then all-gathers them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from zero_ext import ops
from zero_ext.zero.client_optimizer import ClientShards
from zero_ext.zero.partition import BucketLayout

__all__ = ["ShardState", "ZeroOptimizer"]


@dataclass(eq=False)
class ShardState:
    """Optimizer state for this rank's slice of one bucket (the whole bucket at stage 0)."""

    layout: BucketLayout
    master: torch.Tensor             # fp32 weights; a view of the model's flat buffer if fp32
    weights_16bit: torch.Tensor | None   # 16-bit weights written in the same pass: the model's
    #                                      slice, or under offload a host staging buffer
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: torch.Tensor               # one-element fp32 CPU step count, as torch.optim keeps it
    # Offload: the model's slice when it lives elsewhere than the optimizer state (on the
    # device while the state is on the host); the step's result is copied into it.
    model_weights: torch.Tensor | None = None

    @property
    def updated_weights(self) -> torch.Tensor:
        """What the step produces in the model's dtype (the copy source under offload)."""
        return self.weights_16bit if self.weights_16bit is not None else self.master

    @torch.no_grad()
    def write_model_weights(self, start: int = 0, end: int | None = None) -> None:
        """The model's weights of elements [start, end) of this shard (all of it by default)
        re-derived from the fp32 master weights, wherever either lives."""
        if self.weights_16bit is not None:
            self.weights_16bit[start:end].copy_(self.master[start:end])
        if self.model_weights is not None:
            self.model_weights[start:end].copy_(self.updated_weights[start:end])


class ZeroOptimizer(torch.optim.Optimizer):
    """AdamW / Adam over the model-dtype slices of the buckets this rank updates (`weights`, in
    bucket order: shards of the flat buffers, or whole buckets at stage 0)."""

    # What DeepSpeed's ZeRO optimizer shows of the step, which training scripts log from
    # engine.optimizer: `loss_scale` / `cur_scale` (1.0 without fp16), `overflow` (the last
    # boundary step found a non-finite gradient norm) and `_global_grad_norm` (its norm, the
    # loss scale divided out). The engine hands over its fp16 `loss_scaler` and records each
    # boundary step's outcome (zero/stepping.py).
    loss_scaler = None
    overflow = False
    # The user's optimizer when it is not AdamW (zero/client_optimizer.py), stepping the shards;
    # `optimizer` as DeepSpeed's ZeRO optimizers name the optimizer they wrap.
    client: ClientShards | None = None
    optimizer: torch.optim.Optimizer | None = None
    _global_grad_norm: float | None = None

    @property
    def loss_scale(self) -> float:
        return 1.0 if self.loss_scaler is None else self.loss_scaler.scale

    @loss_scale.setter
    def loss_scale(self, value: float) -> None:
        if self.loss_scaler is None:
            raise ValueError("zero_ext: there is no loss scale to set: it is 1.0 unless fp16 "
                             "is enabled in the config")
        self.loss_scaler.scale = float(value)

    cur_scale = loss_scale

    # DeepSpeed's ZeRO optimizers have offload_states / reload_states too, and RLHF frameworks
    # call them there (OpenRLHF: `engine.optimizer.offload_states(...)`): here they are the
    # engine's, which holds every buffer they move (`engine`, a weak reference it sets).
    engine = None

    def offload_states(self, include=None, device="cpu", pin_memory: bool = True,
                       non_blocking: bool = False) -> None:
        """engine.offload_states(), called on the optimizer as DeepSpeed's ZeRO ones allow."""
        self.engine().offload_states(include, device, pin_memory, non_blocking)

    def reload_states(self, non_blocking: bool = False) -> None:
        """engine.reload_states(), called on the optimizer."""
        self.engine().reload_states(non_blocking)

    def __init__(self, param_groups: list[dict], layouts: list[BucketLayout],
                 weights: list[torch.Tensor], *, defaults: dict,
                 state_buffer: Callable[[torch.Tensor, torch.dtype], torch.Tensor] | None = None,
                 staged: Callable[[BucketLayout], bool] | None = None,
                 stage_16bit: bool = True,
                 client: torch.optim.Optimizer | None = None, rank: int = 0):
        """Under offload, `staged(layout)` says whether a layout's model weights live elsewhere
        than its optimizer state (host vs device); those shards get their state from
        `state_buffer(like, dtype)` (a buffer shaped like `like` where the state lives), and
        each step's result is copied into the model's slice, for a 16-bit model through a
        16-bit staging buffer beside the state with `stage_16bit` (host state: the upload's
        source), else cast from the fp32 master on the way (device state, host weights: a
        buffer of every shard kept on the device would give back what offload_param saves).
        `client`: the user's optimizer
        (not AdamW), which then steps the master shards and keeps its own state
        (zero/client_optimizer.py); the shards hold no moments."""
        super().__init__(param_groups, defaults)
        self.shards: list[ShardState] = []

        def moments(make) -> list[torch.Tensor]:
            return [torch.empty(0) for _ in range(2)] if client is not None else \
                [make() for _ in range(2)]
        for layout, view in zip(layouts, weights):
            fp32 = view.dtype == torch.float32
            if state_buffer is None or not staged(layout):
                master = view if fp32 else view.detach().float()
                self.shards.append(ShardState(
                    layout, master, None if fp32 else view,
                    *moments(lambda m=master: torch.zeros_like(m)),
                    torch.tensor(0.0, dtype=torch.float32)))
                continue
            master = state_buffer(view, torch.float32)
            master.copy_(view)
            staging = None if fp32 or not stage_16bit else state_buffer(view, view.dtype)
            self.shards.append(ShardState(
                layout, master, staging,
                *moments(lambda v=view: state_buffer(v, torch.float32).zero_()),
                torch.tensor(0.0, dtype=torch.float32), model_weights=view))
        if client is not None:
            self.client = ClientShards(client, self.shards, rank)
            self.optimizer = client

    @torch.no_grad()
    def sharded_step(self, grads: list[torch.Tensor], inv_scale: torch.Tensor | None,
                     only: list[ShardState] | None = None, copy_out: bool = True,
                     groups: list[dict] | None = None) -> None:
        """One update of every shard from its reduced gradient (`grads` in bucket order), or of
        the shards in `only` (offload steps them one at a time, as gradients arrive).
        `inv_scale` multiplies every gradient (loss-scale and clipping factors). Shards whose
        model weights live elsewhere get the result copied there, unless `copy_out` is False
        (the optimizer offload copies asynchronously itself). `groups` stands in for
        param_groups (a copy taken when a step was deferred)."""
        # One kernel launch per group, gradient dtype, and whether 16-bit copies are written
        # in the same pass (the op takes them for every tensor of a launch or for none).
        by_group: dict[tuple[int, torch.dtype, bool],
                       list[tuple[ShardState, torch.Tensor]]] = {}
        for shard, grad in zip(self.shards if only is None else only, grads):
            key = (shard.layout.group, grad.dtype, shard.weights_16bit is not None)
            by_group.setdefault(key, []).append((shard, grad))
        if self.client is not None:
            pairs = [pair for group_pairs in by_group.values() for pair in group_pairs]
            self.client.step([s for s, _ in pairs], [g for _, g in pairs], inv_scale,
                             self.param_groups if groups is None else groups)
            by_group = {}  # stepped; the copies out below
            for shard, _ in pairs:
                if copy_out and shard.model_weights is not None:
                    shard.model_weights.copy_(shard.updated_weights, non_blocking=True)
        for (group_index, _, _), pairs in by_group.items():
            group = (self.param_groups if groups is None else groups)[group_index]
            shards = [s for s, _ in pairs]
            copies = [s.weights_16bit for s in shards if s.weights_16bit is not None]
            ops.adamw_step_(
                [s.master for s in shards], [g for _, g in pairs], [s.exp_avg for s in shards],
                [s.exp_avg_sq for s in shards], [s.step for s in shards], copies,
                lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1],
                eps=group["eps"], weight_decay=group["weight_decay"],
                decoupled_weight_decay=group["decoupled_weight_decay"],
                bias_correction=group["bias_correction"], maximize=group["maximize"],
                inv_scale=inv_scale)
            if copy_out:
                for shard in shards:
                    if shard.model_weights is not None:
                        # offload_param alone: device results into the pinned host shard,
                        # queued on this stream without a host sync; the next gather's upload
                        # stream waits for this stream first, and nothing reads the host shard
                        # on the CPU.
                        shard.model_weights.copy_(shard.updated_weights, non_blocking=True)
        # torch's LR schedulers check that the optimizer stepped before they do; this is our step.
        self._opt_called = True

    @torch.no_grad()
    def refresh_master(self, layout_index: int) -> None:
        """The fp32 master weights of one bucket, re-read from the model's 16-bit values after
        they were changed from outside (GatheredParameters with a modifier rank)."""
        for shard in self.shards:
            if shard.layout.index != layout_index:
                continue
            if shard.model_weights is not None:
                shard.master.copy_(shard.model_weights)
            elif shard.weights_16bit is not None:
                shard.master.copy_(shard.weights_16bit)

    @torch.no_grad()
    def write_model_weights(self) -> None:
        """The model's weights (every shard this rank updates) re-derived from the fp32 master
        weights, wherever either lives; e.g. after loading masters from a checkpoint. Stages
        1-2 still need the engine's all-gather to spread the shards."""
        for shard in self.shards:
            shard.write_model_weights()

    @torch.no_grad()
    def freeze_variance(self, compressed_momentum: bool = False) -> bool:
        """Adam's second moment stays as it is from now on (1-bit Adam's remedy for compressed
        gradients; zero/compression.py's freeze_variance): each shard's moments are
        bias-corrected once in place (exp_avg /= 1 - beta1^t, exp_avg_sq /= 1 - beta2^t at its
        step t), and its group steps with betas (beta1, 1.0) and no bias correction, so the
        kernel keeps v exactly (v * 1 + g^2 * 0) and steps lr * m / (sqrt(v) + eps): Adam's
        update with v frozen. Marked in the group ("variance_frozen"), which checkpoints keep.
        With `compressed_momentum` (top-k's compress_momentum) the gradients handed over from
        now on are the momentum itself: the groups step with betas (0, 1.0), m = g, and keep
        their beta1 as "compressed_beta1" for the reductions (zero/compression.py).
        Returns whether anything was frozen now."""
        groups = [g for g in self.param_groups if not g.get("variance_frozen")]
        if not groups:
            return False
        frozen = {id(g) for g in groups}
        for shard in self.shards:
            group = self.param_groups[shard.layout.group]
            if id(group) not in frozen or not group["bias_correction"]:
                continue
            beta1, beta2 = group["betas"]
            t = float(shard.step)
            if t > 0:
                shard.exp_avg.div_(1.0 - beta1 ** t)
                shard.exp_avg_sq.div_(1.0 - beta2 ** t)
        for group in groups:
            if compressed_momentum:
                group["compressed_beta1"] = group["betas"][0]
            group["betas"] = (0.0 if compressed_momentum else group["betas"][0], 1.0)
            group["bias_correction"] = False
            group["variance_frozen"] = True
        return True

    def step(self, closure=None):
        raise RuntimeError("zero_ext: the sharded optimizer is stepped by engine.step(), which "
                           "reduces gradients first; call engine.step(), not optimizer.step()")

    def zero_grad(self, set_to_none: bool = True) -> None:
        """No-op: the engine owns gradients and drops them after every step."""

    def state_dict(self):
        raise RuntimeError("zero_ext: the sharded optimizer's state is spread over ranks; it is "
                           "saved with engine.save_checkpoint(), not optimizer.state_dict()")

    def nbytes(self, shards: list[ShardState] | None = None) -> dict[str, int]:
        """Bytes held per kind of state (of every shard, or of `shards`): master weights not
        aliasing the model, and moments (a client optimizer's state: "optimizer")."""
        shards = self.shards if shards is None else shards

        def size(ts):
            return sum(t.numel() * t.element_size() for t in ts)
        master = {"master": size([s.master for s in shards
                                  if s.weights_16bit is not None or s.model_weights is not None])}
        if self.client is not None:
            return {**master, "optimizer": size([t for s in shards
                                                 for t in self.client.state_of(s).values()
                                                 if torch.is_tensor(t)])}
        return {**master, "exp_avg": size([s.exp_avg for s in shards]),
                "exp_avg_sq": size([s.exp_avg_sq for s in shards])}


# torch's LR schedulers wrap optimizer.step to see that it ran before them; this optimizer's
# step is sharded_step, which says so itself (_opt_called). Marked here so a scheduler the
# user built on their own optimizer, then moved to this one (initialize), does not warn.
ZeroOptimizer.step._wrapped_by_lr_sched = True
