"""Tiny random models of every supported family, saved as Hugging Face folders, for the invariant tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

VOCAB = 96
COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
# Family-specific fields, e.g. explicit head_dim where the family does not derive it, GPT-2's own names.
ARCHITECTURES: dict[str, dict] = {
    "llama": {},
    "mistral": {"sliding_window": 8},
    "qwen2": {},
    "qwen3": {"head_dim": 8},
    "gemma": {"head_dim": 8},
    "gemma2": {"head_dim": 8, "sliding_window": 8},
    "gemma3_text": {"head_dim": 8, "sliding_window": 8},
    "phi3": {},
    "olmo2": {},
    "granite": {},
    "stablelm": {},
    "gpt_neox": {},
    "phi": {},
    "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_inner": 48, "n_positions": 64},
}


def tiny_config(model_type: str, **overrides) -> PretrainedConfig:
    fields = {**COMMON, **ARCHITECTURES[model_type], **overrides}
    return AutoConfig.for_model(model_type, **fields)


def make_model(config: PretrainedConfig, seed: int) -> torch.nn.Module:
    """A dense model with every weight drawn from `seed` (norm weights too, so experts really differ)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 1:
                parameter.copy_(1.0 + 0.1 * torch.randn_like(parameter) if "weight" in name else 0.1 * torch.randn_like(parameter))
            else:
                parameter.normal_(0, 0.2)
    return model


def save_model(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


def padded_prompts(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts, left-padded with token 0 so that row i has i pad tokens (row 0 none), and their attention mask."""
    tokens = torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(tokens)
    for row in range(batch):
        pads = min(row, length - 1)
        tokens[row, :pads], mask[row, :pads] = 0, 0
    return tokens, mask


def enable_activation_checkpointing(model: torch.nn.Module, **checkpoint_kwargs) -> None:
    """transformers 5.24 renamed `gradient_checkpointing_enable` (now deprecated); call whichever is installed."""
    kwargs = checkpoint_kwargs or None
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def force_routing(router: torch.nn.Module, expert: int) -> None:
    """Make a router send every token to `expert` with probability 1."""
    def forced(hidden):
        logits = torch.full((hidden.shape[0], router.num_experts), float("-inf"))
        logits[:, expert] = 0.0
        return logits
    router.forward = forced


def randomise_stitches(model: torch.nn.Module, seed: int = 0) -> None:
    """Random bts stitches (scales around 1, the rest at 0.3), so the expert streams reach the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.stitches.named_parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * (1.0 if "scale" in name else 0.3))


def stitch_gradients(folder: Path, batch: torch.Tensor, seed: int) -> list[tuple[torch.nn.Module, dict]]:
    """A bts checkpoint with the same random stitches, its stitch gradients on `batch` without and then with
    activation checkpointing: `[(model, {name: gradient})]` for each."""
    runs = []
    for checkpointing in (False, True):
        model = AutoModelForCausalLM.from_pretrained(folder)
        randomise_stitches(model, seed)
        if checkpointing:
            enable_activation_checkpointing(model)
        model.train()
        model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
        runs.append((model, {n: p.grad.clone() for n, p in model.stitches.named_parameters()}))
    return runs
