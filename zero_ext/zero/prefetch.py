"""Stage 3's prefetch: which units to gather ahead of their use, from the order the first step
used them in (agreed by every rank), within the live and in-flight limits."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

from zero_ext import comm
from zero_ext.zero.units import GatherUnit, UnitState

if TYPE_CHECKING:
    from zero_ext.zero.params import PartitionedParameters

__all__ = ["Prefetcher"]


class Prefetcher:
    """Records the order units are used in during the first step (forward calls and backward
    arrivals, separately), checks it is the same on every rank, and afterwards names the units
    to gather ahead of use (the next one, then more within stage3_prefetch_bucket_size elements
    in flight; all within stage3_max_live_parameters gathered), and keeps a unit gathered when
    the order uses it again within stage3_max_reuse_distance. When a step departs from the
    recorded order (control flow changed), it says so once and gathers on demand from then on.
    A forward that does not train (an evaluation, generate() between steps: it may run part of
    the model, or its units in another order) follows the recorded forward order with a cursor
    of its own, from wherever its unit is in it: it prefetches as a training forward does and
    neither moves the training step's place in the order nor turns prefetch off.
    """

    def __init__(self, prefetch_numel: int, max_live_numel: int, max_reuse_numel: int):
        self.prefetch_numel, self.max_live_numel = prefetch_numel, max_live_numel
        self.max_reuse_numel = max_reuse_numel
        self.recording: dict[str, list[GatherUnit]] | None = {"forward": [], "backward": []}
        self.order: dict[str, list[GatherUnit]] | None = None
        self.cursor = {"forward": 0, "backward": 0, "inference": 0}
        # Set by the engine's forward while it runs: whether it trains (autograd on)
        self.training_forward: bool | None = None

    def _pass(self, phase: str) -> str:
        """Which pass a use in `phase` belongs to: "forward" or "backward" of the training
        step, or "inference" (a forward without autograd: an evaluation, a generation). The
        engine's forward says which it is (inside it, a reentrant checkpoint runs without
        autograd); generate() and a submodule called directly go by autograd's state."""
        if phase == "backward":
            return phase
        training = self.training_forward
        return phase if (torch.is_grad_enabled() if training is None else training) \
            else "inference"

    def next_units(self, phase: str, unit: GatherUnit,
                   params: PartitionedParameters) -> list[GatherUnit]:
        kind = self._pass(phase)
        if self.recording is not None:
            # The training step's order: an inference pass (an evaluation, a generation
            # before the first step) is not part of it, and counted in it, would make every
            # unit look reused soon and keep it gathered.
            if kind != "inference":
                self.recording[phase].append(unit)
            return []
        if self.order is None:
            return []
        order, at = self.order[phase], self.cursor[kind]
        if at >= len(order) or order[at] is not unit:
            at = 0  # a new pass starts at the top of the order
        if order[at] is not unit:
            if kind == "inference":
                # Part of the model, or another order: resumed where the unit is (no
                # prefetch for a unit the training step does not run).
                if unit not in order:
                    return []
                at = order.index(unit)
            else:
                warnings.warn("zero_ext stage 3: modules ran in a different order than in the "
                              "first step; parameters are gathered on demand from now on (no "
                              "prefetch)", stacklevel=2)
                self.order = None
                return []
        self.cursor[kind] = at + 1
        if self.prefetch_numel <= 0:
            return []
        live = sum(u.numel for u in params.units if u.state is not UnitState.SHARDED)
        in_flight = sum(u.numel for u in params.units if u.state is UnitState.GATHERING)
        chosen = []
        for position, upcoming in enumerate(order[at + 1:]):
            if upcoming.state is not UnitState.SHARDED or upcoming in chosen:
                continue
            # The next unit is gathered ahead even when it alone exceeds the bucket (a unit is
            # gathered whole; DeepSpeed, gathering parameter by parameter, would still bring
            # part of it): else a bucket below one decoder layer, as DeepSpeed's 5e7 default
            # and HF's "auto" (0.9 hidden^2) are for 7B-scale layers, would prefetch nothing.
            over_budget = position > 0 and in_flight + upcoming.numel > self.prefetch_numel
            if over_budget or live + upcoming.numel > self.max_live_numel:
                break
            chosen.append(upcoming)
            in_flight += upcoming.numel
            live += upcoming.numel
        return chosen

    def reused_soon(self, unit: GatherUnit) -> bool:
        """Whether the recorded forward order uses `unit` again within stage3_max_reuse_distance
        elements of other units' parameters (then it stays gathered instead of re-gathered);
        0 turns keeping off."""
        if self.order is None or self.max_reuse_numel <= 0 or \
                self._pass("forward") == "inference":
            return False
        distance = 0
        for upcoming in self.order["forward"][self.cursor["forward"]:]:
            if upcoming is unit:
                return True
            distance += upcoming.numel
            if distance > self.max_reuse_numel:
                return False
        return False

    def end_step(self, params: PartitionedParameters) -> None:
        self.cursor = dict.fromkeys(self.cursor, 0)
        if self.recording is None:
            return
        index = {id(u): i for i, u in enumerate(params.units)}
        mine = {phase: [index[id(u)] for u in units] for phase, units in self.recording.items()}
        everyone = comm.all_gather_object(mine)
        self.recording = None
        if all(order == mine for order in everyone):
            self.order = {phase: [params.units[i] for i in seq] for phase, seq in mine.items()}
        else:
            warnings.warn("zero_ext stage 3: ranks ran their modules in different orders in the "
                          "first step; prefetch is off (gathers stay on demand)", stacklevel=2)
