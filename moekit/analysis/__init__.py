"""Analysis: capture per-token routing (and BTS stitch gates) and reduce it; every view renders from this."""

from .capture import (
    IMAGE_TOKEN_LABEL, AnalysisError, RoutingTrace, capture_routing, capture_routing_of_ids, capture_routing_of_inputs,
)
from .reductions import (
    dead_experts, dominant_expert_per_token, gate_strength, layer_agreement, mean_token_entropy, routing_by_label,
    utilisation,
)

__all__ = [
    "IMAGE_TOKEN_LABEL", "AnalysisError", "RoutingTrace", "capture_routing", "capture_routing_of_ids",
    "capture_routing_of_inputs", "dead_experts",
    "dominant_expert_per_token", "gate_strength", "layer_agreement", "mean_token_entropy", "routing_by_label",
    "utilisation",
]
