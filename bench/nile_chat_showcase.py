"""The seed's showcase at its real size: Nile-Chat-3x4B's layout, a base and two experts of gemma-3-4b's real config
(vision tower included, random weights), composed `btx` (top-2 of 3) and `traditional`, generating in bf16 from a
prompt with an image, and a few router-training steps on image-text input.

    python bench/nile_chat_showcase.py --workdir /root/nile --out results.json            # on a GPU
    python bench/nile_chat_showcase.py --workdir /tmp/nile --tiny --device cpu            # the same steps, tiny

Prints and writes (JSON) per method: compose wall time and peak host memory (the composing process's own, from a
child process), the composed checkpoint's size, generation tokens/s with an image against the dense base model
measured in the same process, and the router-training step time. Weights are random: the figures are speed and
memory, not quality. The experts are the base with the MLPs perturbed (a stand-in for fine-tunes of one seed).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

import moekit  # noqa: F401  (registers the composed architecture with the Auto classes)

# google/gemma-3-4b-it's published config (text and SigLIP vision tower); `--tiny` shrinks it for a CPU check.
GEMMA3_4B_TEXT = dict(
    vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, sliding_window=1024, max_position_embeddings=131072,
)
GEMMA3_4B_VISION = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                        image_size=896, patch_size=14)
GEMMA3_4B = dict(mm_tokens_per_image=256, image_token_index=262144, boi_token_index=255999, eoi_token_index=256000)
TINY_TEXT = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=16,
                 max_position_embeddings=512)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                   patch_size=8)
TINY = dict(mm_tokens_per_image=4, image_token_index=500, boi_token_index=498, eoi_token_index=499)


def gemma3_config(tiny: bool):
    from transformers import Gemma3Config

    text, vision, top = (TINY_TEXT, TINY_VISION, TINY) if tiny else (GEMMA3_4B_TEXT, GEMMA3_4B_VISION, GEMMA3_4B)
    return Gemma3Config(text_config=text, vision_config=vision, **top)


def make_sources(workdir: Path, tiny: bool, device: str) -> list[Path]:
    """The base and two experts: random bf16 weights, the experts' MLPs perturbed by 1% noise."""
    from transformers import Gemma3ForConditionalGeneration

    config = gemma3_config(tiny)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    folders = []
    torch.manual_seed(0)
    with torch.device(device):
        model = Gemma3ForConditionalGeneration(config).to(dtype)
    for index, name in enumerate(["base", "expert_a", "expert_b"]):
        folder = workdir / name
        if not (folder / "config.json").is_file():
            if index:
                with torch.no_grad():
                    for parameter_name, parameter in model.named_parameters():
                        if ".mlp." in parameter_name and "language_model" in parameter_name:
                            parameter.add_(0.01 * parameter.std() * torch.randn_like(parameter))
            model.save_pretrained(folder)
        folders.append(folder)
    del model
    return folders


def compose_in_child(recipe: dict, output: Path) -> dict:
    """Compose in a child process: its wall time and its own peak resident memory."""
    code = ("import json, sys, moekit; moekit.compose(json.loads(sys.argv[1]), output=sys.argv[2], overwrite=True, "
            "progress=False)")
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, json.dumps(recipe), str(output)], check=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    size = sum(p.stat().st_size for p in output.glob("*.safetensors"))
    return {"compose_s": round(seconds, 1), "compose_peak_rss_gb": round(max(peak, before) / 2**20, 2),
            "checkpoint_gb": round(size / 1e9, 2)}


def image_prompt(config, device: str, text_tokens: int = 32) -> dict:
    """input_ids with the image's tokens where Gemma 3 expects them, and random pixel values of the tower's size."""
    generator = torch.Generator().manual_seed(1)
    text = torch.randint(10, config.boi_token_index - 1, (text_tokens,), generator=generator)
    image = [config.boi_token_index] + [config.image_token_index] * config.mm_tokens_per_image + [config.eoi_token_index]
    ids = torch.cat([torch.tensor([2]), text[: text_tokens // 2], torch.tensor(image), text[text_tokens // 2:]])
    size = config.vision_config.image_size
    pixels = torch.randn(1, 3, size, size, generator=generator)
    return {"input_ids": ids[None].to(device), "pixel_values": pixels.to(device),
            "attention_mask": torch.ones(1, ids.numel(), dtype=torch.long, device=device)}


def synchronise(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def generation_speed(folder: Path, device: str, dtype: torch.dtype, new_tokens: int) -> dict:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype).to(device).eval()
    inputs = image_prompt(model.config if hasattr(model.config, "mm_tokens_per_image") else
                          model.config.text_config, device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=4, do_sample=False)  # warm-up (kernels, caches)
        synchronise(device)
        start = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        synchronise(device)
    seconds = time.perf_counter() - start
    result = {"generate_tokens_per_s": round(new_tokens / seconds, 2), "generated": out[0, -8:].tolist()}
    if device.startswith("cuda"):
        result["gpu_peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return result


def router_steps(folder: Path, device: str, dtype: torch.dtype, steps: int) -> dict:
    """A few AdamW steps on the routers alone, image-text input, the LM loss plus the balance loss."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype).to(device).train()
    trainable = [p for _, router in model.routers() for p in router.parameters()]
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for parameter in trainable:
        parameter.requires_grad_(True)
    optimiser = torch.optim.AdamW(trainable, lr=1e-3)
    config = model.config.text_config if not hasattr(model.config, "mm_tokens_per_image") else model.config
    inputs = image_prompt(config, device, text_tokens=256)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    times, losses = [], []
    for _ in range(steps):
        synchronise(device)
        start = time.perf_counter()
        output = model(**inputs, labels=inputs["input_ids"])
        output.loss.backward()
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)
        synchronise(device)
        times.append(time.perf_counter() - start)
        losses.append(round(float(output.loss.detach()), 4))
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"router_parameters": sum(p.numel() for p in trainable), "router_step_s": round(min(times[1:] or times), 3),
            "router_losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--tiny", action="store_true", help="a tiny Gemma 3 config (CPU check of the same steps)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", default="btx,traditional")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--keep", action="store_true", help="keep each composed checkpoint (default: delete it)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    results: dict = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                     "config": "tiny" if args.tiny else "gemma-3-4b", "dtype": str(dtype)}
    start = time.perf_counter()
    sources = make_sources(args.workdir, args.tiny, args.device)
    results["sources_s"] = round(time.perf_counter() - start, 1)
    results["source_gb"] = round(sum(p.stat().st_size for p in sources[0].glob("*.safetensors")) / 1e9, 2)
    results["dense"] = generation_speed(sources[0], args.device, dtype, args.new_tokens)
    print(json.dumps(results), flush=True)
    for method in args.methods.split(","):
        recipe = {"method": method, "dtype": "float32" if args.device == "cpu" else "bfloat16",
                  "experts": [{"name": p.name, "source": str(p)} for p in sources], "num_experts_per_tok": 2}
        output = args.workdir / method
        row = compose_in_child(recipe, output)
        row.update(generation_speed(output, args.device, dtype, args.new_tokens))
        row["tokens_per_s_vs_dense"] = round(row["generate_tokens_per_s"] / results["dense"]["generate_tokens_per_s"], 3)
        row.update(router_steps(output, args.device, dtype, args.steps))
        results[method] = row
        print(json.dumps({method: row}), flush=True)
        if args.out:  # after each method: a run cut short keeps what it measured
            args.out.write_text(json.dumps(results, indent=2) + "\n")
        if not args.keep:
            shutil.rmtree(output)


if __name__ == "__main__":
    main()
