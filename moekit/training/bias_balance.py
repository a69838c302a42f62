"""`balance: bias`: loss-free balancing (DeepSeek-V3, Wang et al. 2024), the bias update between training steps.

Each router's `expert_bias` is added to its logits to choose the top k (`runtime.routed.routing.route`), never to the
weights. After every optimizer step, each expert's bias moves by `balance_bias_rate` towards equal load:
`bias_i += u * sign(mean load - load_i)`, from the step's slot counts over all its micro-batches and ranks (the
counts the model's routing hook gives, summed over the data-parallel ranks, so every rank makes the same update).
The bias is a buffer of the model, so it is saved with the weights and `--resume` continues from it.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from ..runtime.assembly.modeling import MixtureKitForCausalLM
from ..runtime.assembly.outputs import TrainingRouting
from ..runtime.routed.routing import Router
from .composed import find_composed_model


def bias_update(slots: torch.Tensor, rate: float) -> torch.Tensor:
    """DeepSeek-V3's step for slot counts `[routers, E]`: `rate * sign(mean load - load_i)` per router and expert
    (up for an expert under its router's mean load, down above it, zero at it or for a router that saw no token)."""
    slots = slots.float()
    return rate * torch.sign(slots.mean(dim=-1, keepdim=True) - slots)


class BiasBalanceCallback(TrainerCallback):
    """Moves every router's selection bias after each optimizer step, for models whose config says `balance: bias`;
    does nothing for `balance: loss`.

    Outside a `Trainer`, call `attach(model)` once and `step()` after each optimizer step.
    """

    def __init__(self) -> None:
        self._model: MixtureKitForCausalLM | None = None
        self._handle = None
        self._routers: dict[str, list[Router]] = {}
        self._names: list[str] = []
        self._slots: torch.Tensor | None = None  # the step's slot counts [routers, E], summed over its forwards

    def attach(self, model) -> None:
        """Watch `model`'s training forwards and move its routers' biases at each `step()`."""
        self.detach()
        composed = find_composed_model(model)
        if composed is None or getattr(composed.config, "balance", "loss") != "bias":
            return
        self._model = composed
        # By name, every copy: PEFT's trained copies of a router (modules_to_save) beside the original.
        for module in composed.modules():
            if isinstance(module, Router):
                self._routers.setdefault(module.qualified_name, []).append(module)
        self._handle = composed.register_routing_hook(self._observe)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._model, self._handle, self._slots, self._routers, self._names = None, None, None, {}, []

    def _observe(self, routing: TrainingRouting) -> None:
        slots = routing.slots.detach().float()
        self._names = list(routing.names)
        self._slots = slots.clone() if self._slots is None else self._slots + slots.to(self._slots.device)

    @torch.no_grad()
    def step(self) -> None:
        """Move the biases from the routing seen since the last step (nothing if none was seen)."""
        if self._model is None or self._slots is None:
            return
        slots, self._slots = self._slots, None
        for name, change in zip(self._names, bias_update(slots, self._model.config.balance_bias_rate)):
            for router in self._routers.get(name, ()):
                router.expert_bias.add_(change.to(router.expert_bias.device))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.attach(model)

    def on_step_end(self, args, state, control, **kwargs):
        self.step()

    def on_train_end(self, args, state, control, **kwargs):
        self.detach()
