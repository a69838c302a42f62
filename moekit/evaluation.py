"""Evaluate a model (composed or dense) on named datasets: perplexity per dataset and routing statistics.

The one place perplexity is computed (`next_token_nll`, `perplexity`): `evaluate` and the demo both score with it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoTokenizer

from .errors import SourceError
from .loading import load_for_scoring
from .runtime.assembly.modeling import MixtureKitForCausalLM
from .runtime.routed.routing_stats import RoutingStatistics, dead_threshold
from .sources.paths import looks_like_local_path
from .data import check_data_source, load_data, token_blocks


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Cross-entropy (in float32) of each position's logits against the next token of `ids` `[batch, seq]`: from the
    logits, not the model's own loss, which for a composed model also carries its load-balancing term."""
    logits = logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction=reduction)


@torch.inference_mode()
def block_nll(
    model, blocks: torch.Tensor, batch_size: int = 8, forward: Callable[[torch.Tensor], Any] | None = None,
    batches: Callable[[Iterable[int]], Iterable[int]] = iter,
) -> tuple[float, int]:
    """Summed next-token NLL of `blocks` `[n, seq_len]` and the number of tokens predicted, `batch_size` blocks per
    forward. `forward(batch)` replaces `model(input_ids=batch)` (to ask for more, such as router logits);
    `batches` wraps the batch starts (a progress bar)."""
    nll, tokens = 0.0, 0
    for start in batches(range(0, blocks.shape[0], batch_size)):
        batch = blocks[start:start + batch_size].to(model.device)
        output = forward(batch) if forward is not None else model(input_ids=batch)
        nll += next_token_nll(output.logits, batch).item()
        tokens += batch[:, 1:].numel()
    return nll, tokens


@torch.inference_mode()
def perplexity(model, blocks: dict[str, torch.Tensor], batch_size: int = 8) -> dict[str, float]:
    """Token-level perplexity of any causal LM (dense or composed) per name on fixed `[n, seq_len]` blocks, plus
    `mixed` over all their tokens."""
    was_training = model.training
    model.eval()
    result, total_nll, total_tokens = {}, 0.0, 0
    for name, named_blocks in blocks.items():
        nll, tokens = block_nll(model, named_blocks, batch_size)
        result[name] = math.exp(nll / tokens)
        total_nll, total_tokens = total_nll + nll, total_tokens + tokens
    result["mixed"] = math.exp(total_nll / total_tokens)
    model.train(was_training)
    return result


def data_blocks(
    source: str | Path, tokenizer, block_size: int = 256, max_blocks: int = 64, text_column: str = "text",
) -> torch.Tensor:
    """The first `max_blocks` blocks `[n, block_size]` of a data file or dataset's text, tokenized: what every model
    evaluated on `source` is scored on."""
    dataset = load_data(source, required_columns=(text_column,))
    return torch.tensor(token_blocks(dataset, tokenizer, block_size, text_column)["input_ids"][:max_blocks])


@torch.inference_mode()
def evaluate(
    model_path: str | Path, data: dict[str, str | Path], block_size: int = 256, max_blocks: int = 64,
    batch_size: int = 8, text_column: str = "text", progress: bool = False,
    device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
) -> dict[str, dict[str, Any]]:
    """For each named dataset: token-level perplexity (from the logits, so a composed model's auxiliary loss does
    not count) and, for composed models, each router's load, load entropy (of the shares of slots, normalised: 1 =
    balanced; not the analysis' mean token entropy) and dead experts. `device`, `dtype`: as `moekit.load`
    (default a GPU when there is one; float32 on the CPU)."""
    if looks_like_local_path(model_path) and not Path(model_path).expanduser().is_dir():
        raise SourceError(f"checkpoint folder '{model_path}' does not exist (looked for "
                          f"'{Path(model_path).expanduser().absolute()}'); check the path")
    for source in data.values():  # before the model loads: a misspelled file fails in a second, not a minute
        check_data_source(source)
    model = load_for_scoring(model_path, device=device, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    composed = isinstance(model, MixtureKitForCausalLM) and model.config.method != "bts"
    results = {}
    for name, source in data.items():
        blocks = data_blocks(source, tokenizer, block_size, max_blocks, text_column)
        statistics = RoutingStatistics()

        def forward(batch: torch.Tensor) -> Any:
            if not composed:
                return model(input_ids=batch)
            output = model(input_ids=batch, output_router_logits=True)
            biases = model.routing_biases()
            for router_name, logits in zip(model.router_recorder.names, output.router_logits):
                statistics.add(router_name, logits, model.config.num_experts_per_tok,
                               expert_bias=biases.get(router_name))
            return output

        nll, tokens = block_nll(model, blocks, batch_size, forward, lambda starts: tqdm(
            starts, desc=f"eval {name}", unit="batch", disable=not progress))
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
