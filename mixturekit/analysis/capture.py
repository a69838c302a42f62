"""Capture how a composed model routes: per token and router, the chosen experts, their weights and every
probability; for BTS, the stitch gate values per stream. The result is a tidy table every view renders from."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pandas as pd
import torch

from ..errors import MixtureKitError
from ..runtime.modeling import MixtureKitForCausalLM
from ..runtime.routing import route
from ..runtime.stitch import MERGE

_LAYER = re.compile(r"\.(\d+)\.")


class AnalysisError(MixtureKitError, ValueError):
    """The model or the text cannot be analysed."""


@dataclass
class RoutingTrace:
    """Everything captured from one run over some texts.

    `routes`: one row per (text, token, router) with `text_index, label, position, token, start, end, router, layer,
    module, experts` (top-k expert indices), `weights` (their renormalised weights), `probs` (all E probabilities)
    and `dominant` (the top expert's name). `gates` (BTS): one row per (text, token, stitch, stream) with
    `stitch, hub_block, direction, stream, gate_mean, gate_std`. `truncated[i]` says text i was cut to `max_tokens`.
    """

    method: str
    expert_names: list[str]
    texts: list[str]
    labels: list[str | None]
    routes: pd.DataFrame
    gates: pd.DataFrame
    truncated: list[bool] = field(default_factory=list)
    max_tokens: int = 0

    @property
    def routers(self) -> list[str]:
        return list(dict.fromkeys(self.routes["router"])) if len(self.routes) else []


def _router_parts(name: str) -> tuple[int, str]:
    match = _LAYER.search(name)
    layer = int(match.group(1)) if match else -1
    module = name[match.end():] if match else name
    return layer, module.removesuffix(".gate").removesuffix(".router") or "mlp"


@torch.inference_mode()
def capture_routing(
    model: MixtureKitForCausalLM, tokenizer, texts: list[str], labels: list[str | None] | None = None,
    max_tokens: int = 512,
) -> RoutingTrace:
    """Run `model` on each text (no gradient, one text at a time, at most `max_tokens` tokens each, and never more
    than the model's `max_position_embeddings`)."""
    if not isinstance(model, MixtureKitForCausalLM):
        raise AnalysisError(
            f"{type(model).__name__} is not a composed model: routing analysis needs a checkpoint written by "
            "`mixturekit compose` (model_type mixturekit)"
        )
    if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
        raise AnalysisError("give at least one non-empty text to analyse")
    labels = list(labels) if labels is not None else [None] * len(texts)
    if len(labels) != len(texts):
        raise AnalysisError(f"{len(labels)} labels for {len(texts)} texts: give one label per text, or none")
    config = model.config
    positions = getattr(config.text_config, "max_position_embeddings", None)
    if positions:
        max_tokens = min(max_tokens, positions)
    names = list(config.expert_names)
    stitches = list(getattr(model, "stitches", []))
    for stitch in stitches:
        stitch.record_gates = True
    route_rows, gate_rows, truncated = [], [], []
    was_training = model.training
    model.eval()
    try:
        for index, (text, label) in enumerate(zip(texts, labels)):
            encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
            ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
            truncated.append(len(ids) > max_tokens)
            ids, offsets = ids[:max_tokens], offsets[:max_tokens]
            tokens = [text[a:b] for a, b in offsets]
            output = model(input_ids=torch.tensor([ids], device=model.device), output_router_logits=True,
                           use_cache=False)
            base = {"text_index": index, "label": label}
            for router, logits in zip(model.router_recorder.names, output.router_logits or ()):
                layer, module = _router_parts(router)
                probabilities = torch.softmax(logits.float(), dim=-1).cpu()
                weights, experts = route(logits, config.num_experts_per_tok)
                for position, (token, (start, end)) in enumerate(zip(tokens, offsets)):
                    top = experts[position].tolist()
                    route_rows.append({**base, "position": position, "token": token, "start": start, "end": end,
                                       "router": router, "layer": layer, "module": module, "experts": top,
                                       "weights": weights[position].tolist(),
                                       "probs": probabilities[position].tolist(), "dominant": names[top[0]]})
            for k, stitch in enumerate(stitches):
                streams = (["hub"] + names) if stitch.direction == MERGE else names
                for stream, gate in zip(streams, stitch.last_gates or []):
                    means, stds = gate[0].float().mean(-1).cpu(), gate[0].float().std(-1).cpu()
                    for position, token in enumerate(tokens):
                        gate_rows.append({**base, "position": position, "token": token, "stitch": k,
                                          "hub_block": model.stitch_points[k], "direction": stitch.direction,
                                          "stream": stream, "gate_mean": means[position].item(),
                                          "gate_std": stds[position].item()})
    finally:
        for stitch in stitches:
            stitch.record_gates, stitch.last_gates = False, None
        model.train(was_training)
    return RoutingTrace(config.method, names, list(texts), labels, pd.DataFrame(route_rows), pd.DataFrame(gate_rows),
                        truncated, max_tokens)
