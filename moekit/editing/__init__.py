"""Editing composed checkpoints: remove, add and prune experts, each an exact operation on the routing, streamed
like compose and recorded in the config's `edits` and the model card."""

from .add import add_expert
from .prune import expert_saliency, expert_usage, prune_experts
from .remove import EditError, remove_experts
from .router_fit import fit_routers_from_data

__all__ = ["EditError", "add_expert", "expert_saliency", "expert_usage", "fit_routers_from_data", "prune_experts",
           "remove_experts"]
