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
    # The model's expert history (`moekit edit`, opt-out): e.g. "law added", "e1 removed", "math opted out".
    expert_history: list[str] = field(default_factory=list)

    @property
    def routers(self) -> list[str]:
        return list(dict.fromkeys(self.routes["router"])) if len(self.routes) else []


def _router_parts(name: str) -> tuple[int, str]:
    match = _LAYER.search(name)
    layer = int(match.group(1)) if match else -1
    module = name[match.end():] if match else name
    return layer, module.removesuffix(".gate").removesuffix(".router") or "mlp"


def _check_model(model) -> None:
    if not isinstance(model, MixtureKitForCausalLM):
        raise AnalysisError(
            f"{type(model).__name__} is not a composed model: routing analysis needs a checkpoint written by "
            "`moekit compose` (model_type mixturekit)"
        )


def _check_labels(labels: list[str | None] | None, count: int, what: str) -> list[str | None]:
    labels = list(labels) if labels is not None else [None] * count
    if len(labels) != count:
        raise AnalysisError(f"{len(labels)} labels for {count} {what}: give one label per text, or none")
    return labels


def _token_limit(model: MixtureKitForCausalLM, max_tokens: int) -> int:
    positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)  # the language model's
    return min(max_tokens, positions) if positions else max_tokens


@torch.inference_mode()
def capture_routing(
    model: MixtureKitForCausalLM, tokenizer, texts: list[str], labels: list[str | None] | None = None,
    max_tokens: int = 512,
) -> RoutingTrace:
    """Run `model` on each text (no gradient, one text at a time, at most `max_tokens` tokens each, and never more
    than the model's `max_position_embeddings`)."""
    _check_model(model)
    if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
        raise AnalysisError("give at least one non-empty text to analyse")
    labels = _check_labels(labels, len(texts), "texts")
    max_tokens = _token_limit(model, max_tokens)
    encoded = []
    for text in texts:
        tokens = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        encoded.append((tokens["input_ids"], tokens["offset_mapping"]))
    return _capture(model, list(texts), labels, encoded, max_tokens)


@torch.inference_mode()
def capture_routing_of_ids(
    model: MixtureKitForCausalLM, tokenizer, ids, labels: list[str | None] | None = None, max_tokens: int = 512,
) -> RoutingTrace:
    """`capture_routing` for texts already split into tokens: each row of `ids` (a `[n, seq_len]` tensor or lists of
    token ids, such as evaluation blocks) is one text, run as is; its tokens are decoded one by one for display."""
    _check_model(model)
    rows = [[int(i) for i in row] for row in ids]
    if not rows or any(not row for row in rows):
        raise AnalysisError("give at least one non-empty row of token ids to analyse")
    labels = _check_labels(labels, len(rows), "rows of token ids")
    texts, encoded = [], []
    for row in rows:
        tokens = [tokenizer.decode([token]) for token in row]
        ends = [len(t) for t in tokens]
        for k in range(1, len(ends)):
            ends[k] += ends[k - 1]
        texts.append("".join(tokens))
        encoded.append((row, [(end - len(token), end) for token, end in zip(tokens, ends)]))
    return _capture(model, texts, labels, encoded, _token_limit(model, max_tokens))


def _capture(
    model: MixtureKitForCausalLM, texts: list[str], labels: list[str | None],
    encoded: list[tuple[list[int], list[tuple[int, int]]]], max_tokens: int,
) -> RoutingTrace:
    """Run the model on each text's token ids (cut to `max_tokens`) and tabulate routes and gates."""
    config = model.config
    names = list(config.expert_names)
    stitches = list(getattr(model, "stitches", []))
    for stitch in stitches:
        stitch.record_gates = True
    route_rows, gate_rows, truncated = [], [], []
    was_training = model.training
    model.eval()
    try:
        for index, (text, label, (ids, offsets)) in enumerate(zip(texts, labels, encoded)):
            truncated.append(len(ids) > max_tokens)
            ids, offsets = ids[:max_tokens], offsets[:max_tokens]
            tokens = [text[a:b] for a, b in offsets]
            output = model(input_ids=torch.tensor([ids], device=model.device), output_router_logits=True,
                           use_cache=False)
            base = {"text_index": index, "label": label}
            biases = model.routing_biases() if hasattr(model, "routing_biases") else {}
            for router, logits in zip(model.router_recorder.names, output.router_logits or ()):
                layer, module = _router_parts(router)
                probabilities = torch.softmax(logits.float(), dim=-1).cpu()
                weights, experts = route(logits, config.num_experts_per_tok, biases.get(router))
                for position, (token, (start, end)) in enumerate(zip(tokens, offsets)):
                    top = experts[position].tolist()
                    route_rows.append({**base, "position": position, "token": token, "start": start, "end": end,
                                       "router": router, "layer": layer, "module": module, "experts": top,
                                       "weights": weights[position].tolist(),
                                       "probs": probabilities[position].tolist(), "dominant": names[top[0]]})
            for k, stitch in enumerate(stitches):
                running = [n for n in names if n not in set(getattr(config, "disabled_experts", None) or ())]
                streams = (["hub"] + running) if stitch.direction == MERGE else running
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
                        truncated, max_tokens, expert_history(config))


def expert_history(config) -> list[str]:
    """What happened to the experts since composing, from the config: added, removed or pruned, opted out."""
    verbs = {"add": "added", "remove": "removed", "prune": "pruned"}
    history = [f"{name} {verbs[edit['operation']]}" for edit in getattr(config, "edits", None) or []
               if edit.get("operation") in verbs for name in edit.get("experts", [])]
    return history + [f"{name} opted out" for name in getattr(config, "disabled_experts", None) or []]
