"""Greedy generation in vLLM, run by the vLLM environment's Python (tests/test_vllm.py, bench/vllm_throughput.py).

    python tests/vllm_generate.py MODEL PROMPTS.json MAX_TOKENS OUT.json [BATCHES]

PROMPTS.json holds lists of token ids. OUT.json gets, per prompt, the generated token ids and the log-probability of
each (from the raw logits, float32), and the seconds the generation took. BATCHES (e.g. `1,32`, for the benchmark):
after a warm-up, also time the generation of the first b prompts for each b (`batch_seconds`). One process per model:
vLLM keeps global state.
"""

import json
import os
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: no second interpreter


def main(model: str, prompts_file: str, max_tokens: str, out_file: str, batches: str = "") -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = json.loads(open(prompts_file).read())
    started = time.perf_counter()
    llm = LLM(model=model, skip_tokenizer_init=True, dtype="float32", enforce_eager=True,
              max_model_len=max(len(p) for p in prompts) + int(max_tokens), kv_cache_memory_bytes=512 * 2**20,
              max_num_seqs=max(len(prompts), 1), seed=0)
    loaded = time.perf_counter()
    params = SamplingParams(max_tokens=int(max_tokens), temperature=0.0, logprobs=0, ignore_eos=True,
                            detokenize=False)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    finished = time.perf_counter()
    results = []
    for output in outputs:
        completion = output.outputs[0]
        chosen = [step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids)]
        results.append({"tokens": list(completion.token_ids), "logprobs": chosen})
    batch_seconds = {}
    for batch in [int(b) for b in batches.split(",") if b]:
        begun = time.perf_counter()
        llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts[:batch]], params, use_tqdm=False)
        batch_seconds[batch] = time.perf_counter() - begun
    with open(out_file, "w") as file:
        json.dump({"results": results, "load_seconds": loaded - started, "generate_seconds": finished - loaded,
                   "batch_seconds": batch_seconds}, file)


if __name__ == "__main__":
    main(*sys.argv[1:6])
