"""GPU correctness smoke test: every method on CUDA in bf16 against its reference, before any timing is trusted.

    python bench/gpu_smoke.py

traditional/btx from identical copies must match the dense model (bf16 relative error <= 1e-2); BTS at
initialisation must match the hub exactly; greedy generation with the KV cache must equal generation without.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moekit import MixtureKitConfig, MixtureKitForCausalLM  # noqa: E402


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected.float()).norm() / expected.float().norm()).item()


def main() -> None:
    device, dtype = "cuda", torch.bfloat16
    config = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4)
    torch.manual_seed(0)
    dense = LlamaForCausalLM(config).to(device, dtype).eval()
    tokens = torch.randint(0, 4096, (4, 128), device=device)
    prompt = tokens[:1, :16]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    failures = 0
    for method in ("traditional", "btx", "bts"):
        extra = {"expert_configs": [config, config], "stitch_layers_index": [1, 3]} if method == "bts" else {}
        composed = MixtureKitForCausalLM(MixtureKitConfig(
            text_config=config, method=method, expert_names=["a", "b"] if method == "bts" else ["a", "b", "c", "d"],
            num_experts_per_tok=2, **extra)).to(device, dtype).eval()
        state = dense.state_dict()
        with torch.no_grad():
            for name, tensor in composed.state_dict().items():
                if name in state:
                    tensor.copy_(state[name])
                elif name.startswith("streams."):
                    tensor.copy_(state["model." + name.split(".", 2)[2]])
            for module in composed.modules():  # stacked experts: every expert a copy of the dense weights
                if hasattr(module, "source_map"):
                    prefix = next(n for n, m in composed.named_modules() if m is module)
                    for param_name, stack in module.source_map.items():
                        pieces = [state[f"{prefix}.{n}"] for n in stack.names]
                        composed.get_parameter(f"{prefix}.{param_name}").copy_(
                            torch.cat(pieces, 0).unsqueeze(0).expand_as(composed.get_parameter(f"{prefix}.{param_name}")))
            error = _relative_error(composed(input_ids=tokens).logits, dense(input_ids=tokens).logits)
        settings = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)
        same = torch.equal(composed.generate(prompt, use_cache=True, **settings),
                           composed.generate(prompt, use_cache=False, **settings))
        ok = error <= (0.0 if method == "bts" else 1e-2) and same
        failures += not ok
        print(f"{method:12s} relative error vs reference {error:.2e}   cache == no cache: {same}   "
              f"{'ok' if ok else 'FAILED'}")
    raise SystemExit(failures)


if __name__ == "__main__":
    main()
