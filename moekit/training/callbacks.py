"""`transformers` TrainerCallbacks: routing statistics (with a warning when an expert goes dead), and throughput.

The statistics are the callback's own: it reads each training forward's routing through the model's
`register_routing_hook` (the model keeps none).
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

from transformers import TrainerCallback

from ..runtime.assembly.modeling import MixtureKitForCausalLM
from ..runtime.assembly.outputs import TrainingRouting
from ..runtime.routed.routing_stats import RouterStats, RoutingStatistics, dead_threshold
from .composed import find_composed_model

logger = logging.getLogger(__name__)


class RoutingStatsCallback(TrainerCallback):
    """Logs per-router load, normalised entropy, max-load share, dead experts and the auxiliary (balance) loss that
    the logged loss includes (`routing/aux_loss`) to the trainer's loggers, and warns once per (router, expert) whose
    share of routed slots stays under `dead_threshold` for `window` steps.

    Under data-parallel training the model sums its routing counts over the ranks, so every rank sees (and logs)
    the loads of the global batch, not of its own slice.

    `dead_threshold` defaults to a tenth of the uniform share (0.1 / E). A `Trainer` attaches the callback to its
    model when training begins; elsewhere, call `attach(model)` first.
    """

    def __init__(self, dead_threshold: float | None = None, window: int = 20, per_router: bool = False):
        self.dead_threshold, self.window, self.per_router = dead_threshold, window, per_router
        self.below: dict[tuple[str, int], int] = {}
        self.warned: set[tuple[str, int]] = set()
        self.interval: dict[str, list[float]] = {}
        self.interval_steps = 0
        self.interval_aux_losses: list[float] = []
        self.statistics = RoutingStatistics()  # this step's training forwards
        self._handle = None

    def attach(self, model) -> None:
        """Count the routing of `model`'s training forwards from now on (detached from any earlier model)."""
        self.detach()
        composed = find_composed_model(model)
        if composed is not None:
            self._handle = composed.register_routing_hook(self._observe)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.statistics.reset()

    def _observe(self, routing: TrainingRouting) -> None:
        for name, row in zip(routing.names, routing.slots):
            self.statistics.add_counts(name, row)
        self.statistics.add_aux_loss(routing.aux_loss)  # for the log, beside the loss it is part of

    def _threshold(self, model: MixtureKitForCausalLM) -> float:
        return self.dead_threshold if self.dead_threshold is not None else dead_threshold(model.config.num_experts)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.attach(model)

    def on_train_end(self, args, state, control, **kwargs):
        self.detach()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        composed = find_composed_model(model)
        if composed is None:
            return
        threshold = self._threshold(composed)
        for stats in self.statistics.summary():
            totals = self.interval.setdefault(stats.name, [0.0] * len(stats.load))
            self.interval[stats.name] = [t + p for t, p in zip(totals, stats.load)]
            for expert in range(len(stats.load)):
                key = (stats.name, expert)
                self.below[key] = self.below.get(key, 0) + 1 if expert in stats.dead_experts(threshold) else 0
                if self.below[key] >= self.window and key not in self.warned:
                    self.warned.add(key)
                    if state is not None and not state.is_world_process_zero:
                        continue  # the loads are global (summed over ranks by the model): one warning is enough
                    message = (f"expert {expert} ({composed.config.expert_names[expert]}) of router {stats.name} has "
                               f"had under {threshold:.3f} of the routed slots for {self.window} steps: it is dead. "
                               "Raise alpha, use alpha_mode: auto or balance: bias, or re-initialise that router.")
                    logger.warning(message)
                    warnings.warn(message, stacklevel=2)
        aux_loss = self.statistics.mean_aux_loss()
        if aux_loss is not None:
            self.interval_aux_losses.append(aux_loss)
        self.interval_steps += 1
        self.statistics.reset()

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        composed = find_composed_model(model)
        if composed is None or logs is None or not self.interval_steps:
            return
        threshold = self._threshold(composed)
        entropies, max_loads, dead = [], [], 0
        for name, totals in self.interval.items():
            load = [t / self.interval_steps for t in totals]
            stats = RouterStats(name, load, 0)
            entropies.append(stats.entropy)
            max_loads.append(stats.max_load)
            dead += len(stats.dead_experts(threshold))
            if self.per_router:
                logs[f"routing/{name}/max_load"] = round(stats.max_load, 4)
                logs[f"routing/{name}/entropy"] = round(stats.entropy, 4)
        if entropies:
            logs["routing/entropy_mean"] = round(sum(entropies) / len(entropies), 4)
            logs["routing/max_load_max"] = round(max(max_loads), 4)
            logs["routing/dead_experts"] = dead
            logs["routing/alpha"] = composed.current_alpha
            if getattr(composed.config, "balance", "loss") == "bias":  # how far loss-free balancing has moved
                logs["routing/expert_bias_max"] = round(max(
                    (router.expert_bias.abs().max().item() for _, router in composed.routers()), default=0.0), 6)
        if self.interval_aux_losses:  # the balance (and z-) loss inside the logged loss, on its own
            logs["routing/aux_loss"] = round(sum(self.interval_aux_losses) / len(self.interval_aux_losses), 6)
        complete_history(state, logs, "routing/")
        self.interval, self.interval_steps, self.interval_aux_losses = {}, 0, []


def complete_history(state, logs: dict, prefix: str) -> None:
    """The trainer stored its copy of a step's logs before calling back: add what a callback logged under `prefix`,
    so that trainer_state.json (and whatever reads the history) has it too."""
    history = state.log_history if state is not None else []
    if history and history[-1].get("step") == state.global_step:
        history[-1].update({key: value for key, value in logs.items() if key.startswith(prefix)})


class ThroughputCallback(TrainerCallback):
    """Logs `throughput/tokens_per_second` (of the global batch, all processes together) and
    `throughput/seconds_per_step` over each logging interval, for runs whose steps hold a known number of tokens
    (fixed-length blocks). Scaling over processes is read from it; the first interval includes the warm-up."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self.mark: tuple[float, int] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.mark = (time.perf_counter(), state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.mark is None or logs is None or "loss" not in logs:
            return
        now, (then, step) = time.perf_counter(), self.mark
        steps = state.global_step - step
        if steps > 0 and now > then:
            logs["throughput/tokens_per_second"] = round(steps * self.tokens_per_step / (now - then), 1)
            logs["throughput/seconds_per_step"] = round((now - then) / steps, 4)
            complete_history(state, logs, "throughput/")
        self.mark = (now, state.global_step)


def add_routing_callbacks(trainer, callback: RoutingStatsCallback | None = None) -> RoutingStatsCallback:
    """Put a `RoutingStatsCallback` first among the trainer's callbacks: the reporting integrations (TensorBoard,
    W&B, ...) and the printer run after it, so they receive the routing statistics it adds to each log. With
    `alpha_mode: auto`, an `AutoAlphaCallback` too (before it, so the logged alpha is the step's new one); with
    `balance: bias`, a `BiasBalanceCallback`."""
    from .auto_alpha import AutoAlphaCallback  # it imports this module
    from .bias_balance import BiasBalanceCallback  # likewise

    callback = callback or RoutingStatsCallback()
    trainer.callback_handler.callbacks.insert(0, callback)
    composed = find_composed_model(trainer.model)
    if composed is not None and composed.config.alpha_mode == "auto":
        trainer.callback_handler.callbacks.insert(0, AutoAlphaCallback())
    if composed is not None and getattr(composed.config, "balance", "loss") == "bias":
        trainer.callback_handler.callbacks.insert(0, BiasBalanceCallback())
    return callback


def save_model_and_log(trainer, folder) -> None:
    """Save the trained model (gathered from every process, written by the main one) and, beside it, the run's log
    history as `trainer_state.json`, so that the losses and statistics of a run without checkpoints are kept too."""
    trainer.save_model(str(folder))
    if trainer.is_world_process_zero():
        trainer.state.save_to_json(str(Path(folder) / "trainer_state.json"))
