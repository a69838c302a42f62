"""Evaluate a model (composed or dense) on named datasets: perplexity per dataset and routing statistics."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from .errors import SourceError
from .runtime.modeling import MixtureKitForCausalLM
from .runtime.routing_stats import RoutingStatistics, dead_threshold
from .sources.paths import looks_like_local_path
from .training.data import check_data_source, load_data, token_blocks


@torch.inference_mode()
def evaluate(
    model_path: str | Path, data: dict[str, str | Path], block_size: int = 256, max_blocks: int = 64,
    batch_size: int = 8, text_column: str = "text", progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """For each named dataset: token-level perplexity (from the logits, so a composed model's auxiliary loss does
    not count) and, for composed models, each router's load, load entropy (of the shares of slots, normalised: 1 =
    balanced; not the analysis' mean token entropy) and dead experts."""
    if looks_like_local_path(model_path) and not Path(model_path).expanduser().is_dir():
        raise SourceError(f"checkpoint folder '{model_path}' does not exist (looked for "
                          f"'{Path(model_path).expanduser().absolute()}'); check the path")
    for source in data.values():  # before the model loads: a misspelled file fails in a second, not a minute
        check_data_source(source)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    composed = isinstance(model, MixtureKitForCausalLM) and model.config.method != "bts"
    results = {}
    for name, source in data.items():
        blocks = torch.tensor(token_blocks(load_data(source, required_columns=(text_column,)), tokenizer, block_size,
                                           text_column)["input_ids"][:max_blocks])
        statistics = RoutingStatistics()
        nll, tokens = 0.0, 0
        for start in tqdm(range(0, blocks.shape[0], batch_size), desc=f"eval {name}", unit="batch",
                          disable=not progress):
            batch = blocks[start:start + batch_size].to(model.device)
            output = model(input_ids=batch, output_router_logits=composed) if composed else model(input_ids=batch)
            logits = output.logits[:, :-1].float()
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum").item()
            tokens += batch[:, 1:].numel()
            if composed:
                for router_name, logits in zip(model.router_recorder.names, output.router_logits):
                    statistics.add(router_name, logits, model.config.num_experts_per_tok)
        entry: dict[str, Any] = {"perplexity": math.exp(nll / tokens), "tokens": tokens}
        if composed:
            dead_below = dead_threshold(model.config.num_experts)
            entry["routing"] = {
                s.name: {"load": [round(x, 4) for x in s.load], "load_entropy": round(s.entropy, 4),
                         "dead_experts": [model.config.expert_names[i] for i in s.dead_experts(dead_below)]}
                for s in statistics.summary()
            }
        results[name] = entry
    return results


def format_evaluation(results: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'data':<20}{'perplexity':>12}{'tokens':>10}{'load entropy':>14}  dead experts"]
    for name, entry in results.items():
        routing = entry.get("routing", {})
        entropy = sum(r["load_entropy"] for r in routing.values()) / len(routing) if routing else float("nan")
        dead = sorted({e for r in routing.values() for e in r["dead_experts"]})
        lines.append(f"{name:<20}{entry['perplexity']:>12.3f}{entry['tokens']:>10}{entropy:>14.3f}  "
                     f"{', '.join(dead) or '-'}")
    lines.append("load entropy: mean over routers of the normalised entropy of expert loads (1 = balanced)")
    return "\n".join(lines)
