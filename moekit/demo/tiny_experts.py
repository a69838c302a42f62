"""Train the demo's dense experts from scratch: a byte-level BPE tokenizer, a tiny Llama seed, one branch per domain.

This is Branch-Train-Mix's recipe in miniature: every expert starts from the same seed model, so their shared
weights (attention, embeddings, norms) stay close enough to average, and each expert then specialises on one domain.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from ..evaluation import next_token_nll

PAD, BOS, EOS = "<pad>", "<s>", "</s>"


@dataclass(frozen=True)
class TinySettings:
    """Everything that decides the trained weights; a change invalidates the cached experts."""

    vocab_size: int = 1024
    hidden_size: int = 128
    num_layers: int = 4
    intermediate_size: int = 344
    num_heads: int = 4
    seq_len: int = 128
    batch_size: int = 16
    seed_steps: int = 256
    seed_lr: float = 3e-3
    expert_steps: int = 128
    expert_lr: float = 2e-3
    warmup_steps: int = 10
    eval_blocks: int = 24
    router_steps: int = 60
    router_lr: float = 2e-2
    router_windows: int = 128
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@contextmanager
def torch_threads(count: int | None = None) -> Iterator[None]:
    """Use every CPU this process may run on (or `count`), and give the caller's setting back afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, count or available_cpus()))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train_tokenizer(texts: list[str], vocab_size: int, max_length: int = 256) -> PreTrainedTokenizerFast:
    """Byte-level BPE, so any text (code, digits, unicode) encodes without unknown tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=max_length,
    )


def encode_documents(tokenizer: PreTrainedTokenizerFast, documents: list[str]) -> torch.Tensor:
    """One long stream `<s> doc </s> <s> doc </s> ...`: training samples windows from it, evaluation cuts blocks."""
    # The `tokenizers` object directly: whole documents are longer than the model's context, which is fine here.
    encoded = tokenizer.backend_tokenizer.encode_batch(documents, add_special_tokens=False)
    stream: list[int] = []
    for encoding in encoded:
        stream.extend([tokenizer.bos_token_id, *encoding.ids, tokenizer.eos_token_id])
    return torch.tensor(stream, dtype=torch.long)


def validation_blocks(stream: torch.Tensor, seq_len: int, max_blocks: int) -> torch.Tensor:
    """Non-overlapping `[blocks, seq_len]` windows from the start, so every model is scored on the same tokens."""
    count = min(max_blocks, stream.numel() // seq_len)
    if count < 1:
        raise ValueError(f"validation text has {stream.numel()} tokens, fewer than one block of {seq_len}")
    return stream[: count * seq_len].view(count, seq_len)


def tiny_llama(settings: TinySettings, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A freshly initialised Llama small enough to train on two CPU cores in about a minute."""
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=settings.hidden_size, intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_layers, num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_heads, max_position_embeddings=max(256, settings.seq_len),
        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(settings.seed)
    return LlamaForCausalLM(config)


def next_token_loss(model: PreTrainedModel, ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy from the logits ourselves: a composed model's `loss` would also carry its load-balancing term."""
    return next_token_nll(model(input_ids=ids).logits, ids, reduction)


def _learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    model: PreTrainedModel, stream: torch.Tensor, steps: int, lr: float, settings: TinySettings, seed: int,
    desc: str, progress: bool = True,
) -> list[float]:
    """Plain AdamW on random windows of `stream`; the window order is fixed by `seed`. Returns the losses."""
    if stream.numel() <= settings.seq_len + 1:
        raise ValueError(f"{desc}: {stream.numel()} training tokens, too few for windows of {settings.seq_len}")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    offsets = torch.arange(settings.seq_len)
    losses = []
    model.train()
    with tqdm(range(steps), desc=desc, disable=not progress, leave=False) as bar:
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(step, steps, lr, settings.warmup_steps)
            starts = torch.randint(0, stream.numel() - settings.seq_len, (settings.batch_size, 1), generator=generator)
            loss = next_token_loss(model, stream[starts + offsets])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    model.eval()
    return losses


def branch_experts(
    seed_model: PreTrainedModel, streams: dict[str, torch.Tensor], settings: TinySettings, progress: bool = True,
) -> dict[str, PreTrainedModel]:
    """One copy of the seed per domain, each trained the same number of steps on its own domain only."""
    experts = {}
    for index, (name, stream) in enumerate(streams.items()):
        expert = type(seed_model)(seed_model.config)
        expert.load_state_dict(seed_model.state_dict())
        train(expert, stream, settings.expert_steps, settings.expert_lr, settings, settings.seed + 1 + index,
              desc=f"expert {name}", progress=progress)
        experts[name] = expert
    return experts


def save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, folder: Path) -> Path:
    """A self-contained Hugging Face folder (safetensors + tokenizer), the form `compose` reads."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
