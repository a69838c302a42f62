"""`alpha_mode: auto`: a controller that changes the balance loss's weight between training steps.

The model's forward only reads the weight (`MixtureKitForCausalLM.current_alpha`); this callback owns it. Its state
is saved in every checkpoint's `trainer_state.json` (as an `ExportableState`), so `--resume` continues with the alpha
the interrupted run had reached.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ..runtime.assembly.modeling import MixtureKitForCausalLM
from ..runtime.assembly.outputs import TrainingRouting
from .composed import find_composed_model

GROWTH, DECAY = 1.5, 0.95


def next_alpha(alpha: float, lowest_load: float, config) -> float:
    """x1.5 while some expert gets less than the floor share of a router's slots (`load_floor`, default half the
    uniform share), else decay by 0.95 back towards the configured alpha; never above `alpha_max`."""
    floor = config.load_floor if config.load_floor is not None else 0.5 / config.num_experts
    if lowest_load < floor:
        return min(config.alpha_max, max(alpha, 1e-3) * GROWTH)
    return max(config.alpha, alpha * DECAY)


class AutoAlphaCallback(TrainerCallback, ExportableState):
    """Adapts the balance loss's alpha after each optimizer step from the step's routing (all its micro-batches and
    ranks together), for models whose config says `alpha_mode: auto`; does nothing for `fixed`.

    The new alpha applies from the next step. Outside a `Trainer`, call `attach(model)` once and `step()` after each
    optimizer step.
    """

    def __init__(self) -> None:
        self.alpha: float | None = None  # None until attached: the model's configured alpha
        self._model: MixtureKitForCausalLM | None = None
        self._handle = None
        self._slots: torch.Tensor | None = None  # the step's slot counts [routers, E], summed over its forwards

    def attach(self, model) -> None:
        """Watch `model`'s training forwards and set its alpha (to the restored one when resuming)."""
        self.detach()
        composed = find_composed_model(model)
        if composed is None or composed.config.alpha_mode != "auto":
            return
        self._model = composed
        if self.alpha is None:
            self.alpha = float(composed.config.alpha)
        composed.current_alpha = self.alpha
        self._handle = composed.register_routing_hook(self._observe)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._model, self._handle, self._slots = None, None, None

    def _observe(self, routing: TrainingRouting) -> None:
        slots = routing.slots.detach().float()
        self._slots = slots.clone() if self._slots is None else self._slots + slots.to(self._slots.device)

    def step(self) -> None:
        """Update alpha from the routing seen since the last step (nothing if none was seen)."""
        if self._model is None or self._slots is None:
            return
        slots, self._slots = self._slots, None
        lowest = (slots / slots.sum(dim=-1, keepdim=True).clamp(min=1)).min().item()
        self.alpha = next_alpha(self.alpha, lowest, self._model.config)
        self._model.current_alpha = self.alpha

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        saved = None
        if state is not None:
            if state.stateful_callbacks is None:
                state.stateful_callbacks = {}
            # A checkpoint written without this callback (an older release) has no entry, and the Trainer's save
            # would fail on it: start one, from the configured alpha.
            saved = state.stateful_callbacks.setdefault(type(self).__name__, self.state())
        saved = saved[0] if isinstance(saved, list) else saved
        restored = ((saved or {}).get("attributes") or {}).get("alpha")
        if restored is not None:  # resuming: the alpha the checkpoint's run had reached
            self.alpha = float(restored)
        self.attach(model)

    def on_step_end(self, args, state, control, **kwargs):
        self.step()

    def on_train_end(self, args, state, control, **kwargs):
        self.detach()

    def state(self) -> dict:
        return {"args": {}, "attributes": {"alpha": self.alpha}}
