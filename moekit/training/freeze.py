"""Freeze policies: which parameters of a composed model train."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import TrainingError

POLICIES = ("routers", "routers+attention", "stitches", "full")


@dataclass(frozen=True)
class TrainableSummary:
    policy: str
    trainable: int
    total: int
    by_role: tuple[tuple[str, int, bool], ...] = ()  # (role, parameters, trains)

    def __str__(self) -> str:
        roles = "; ".join(f"{role} {count:,} {'trains' if trains else 'frozen'}" for role, count, trains in self.by_role)
        return (f"policy {self.policy}: {self.trainable:,} of {self.total:,} parameters train "
                f"({100 * self.trainable / max(self.total, 1):.2f}%)" + (f" ({roles})" if roles else ""))


def parameter_roles(model: nn.Module) -> dict[str, str]:
    """Each parameter's role in the composition: `stack` (experts), `router`, `shared`, `shared_expert`, `shared_gate`,
    `stream`, `stitch`."""
    from ..plan.planner import tensor_roles

    roles = {name: role for name, (_, role, _) in tensor_roles(model).items()}
    return {name: roles.get(name, "shared") for name, _ in model.named_parameters()}


def apply_freeze_policy(model: nn.Module, policy: str) -> TrainableSummary:
    """Set `requires_grad` by policy and say how much trains.

    `routers`: only the routers. `routers+attention`: the routers and every averaged (non-expert) weight, as in the
    BTX paper's MoE stage (attention, norms, embeddings, head). `stitches`: only BTS stitches. `full`: everything.
    A shared expert's gate trains with the routers (it is routing: how much of the shared expert each token takes);
    the shared expert itself is an expert, frozen unless the experts train (`full`, or LoRA).
    LoRA is applied by PEFT on top of a policy (see `moekit.training.lora`).
    """
    if policy not in POLICIES:
        raise TrainingError(f"unknown freeze policy '{policy}'; valid: {', '.join(POLICIES)} (and lora via PEFT)")
    method = model.config.method
    if policy in ("routers", "routers+attention") and method == "bts":
        raise TrainingError(f"policy '{policy}' trains routers, but a bts model has none; use 'stitches' or 'full'")
    if policy == "stitches" and method != "bts":
        raise TrainingError(f"policy 'stitches' needs a bts model; this one is {method}: use 'routers'")
    trains = {"routers": {"router", "shared_gate"}, "routers+attention": {"router", "shared_gate", "shared"},
              "stitches": {"stitch"},
              "full": {"stack", "router", "shared", "shared_expert", "shared_gate", "stream", "stitch"}}[policy]
    roles = parameter_roles(model)
    trainable = total = 0
    counts: dict[str, int] = {}
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(roles[name] in trains)
        total += parameter.numel()
        trainable += parameter.numel() if parameter.requires_grad else 0
        counts[roles[name]] = counts.get(roles[name], 0) + parameter.numel()
    if trainable == 0:
        raise TrainingError(f"policy '{policy}' leaves nothing to train in this {method} model")
    return TrainableSummary(policy, trainable, total, tuple((r, n, r in trains) for r, n in sorted(counts.items())))
