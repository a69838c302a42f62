"""A tiny seed model and the SmolLM2 study's data prepared for it: what the GPU scripts' CPU smoke tests run on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from transformers import LlamaConfig, LlamaForCausalLM

from moekit.demo.domains import build_domains
from moekit.demo.tiny_experts import train_tokenizer

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "btx_smollm2"


def tiny_seed_and_data(root: Path) -> tuple[Path, Path]:
    """(a random tiny Llama with a tokenizer trained on the demo's domains, `prepare.py`'s data for it), under root."""
    domains = build_domains(chars_per_domain=20_000)
    tokenizer = train_tokenizer([t for d in domains.values() for t in d.train] + ["Äpfel Öl über"], 300)
    seed = root / "seed"
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(seed)
    tokenizer.save_pretrained(seed)
    data = root / "data"
    subprocess.run([sys.executable, str(EXAMPLE / "prepare.py"), "--out", str(data), "--tokenizer", str(seed),
                    "--max-chars", "40000"], check=True, capture_output=True, text=True)
    return seed, data
