"""Greedy generation in vLLM, run by the vLLM environment's Python (tests/test_vllm.py, bench/vllm_throughput.py).

    python tests/vllm_generate.py JOBS.json

JOBS.json holds a list of jobs, run one after another by one process (importing vLLM costs more than starting an
engine for a tiny model): `{"model": PATH, "prompts": [[token ids]], "max_tokens": N, "out": OUT.json}`, with
optionally `"batches": [1, 32]` (for the benchmark: after a warm-up, also time the generation of the first b prompts
for each b, `batch_seconds`). OUT.json gets, per prompt, the generated token ids and the log-probability of each
(from the raw logits, float32), and the seconds the generation took; or, if vLLM failed for that model, the error
(`{"error": ..., "loaded_weights": ...}`) and the next job still runs: each engine is torn down before the next.
"""

import json
import os
import sys
import time
import traceback

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: no second interpreter


class WeightLoadWatch:
    """Whether vLLM began reading a checkpoint's weights (a refusal must come before)."""

    def __init__(self):
        self.loaded = False

    def __enter__(self):
        from vllm.model_executor.model_loader import default_loader

        self.original = default_loader.DefaultModelLoader.load_weights

        def load_weights(loader, *args, **kwargs):
            self.loaded = True
            return self.original(loader, *args, **kwargs)

        default_loader.DefaultModelLoader.load_weights = load_weights
        return self

    def __exit__(self, *exc):
        from vllm.model_executor.model_loader import default_loader

        default_loader.DefaultModelLoader.load_weights = self.original


def generate(model: str, prompts: list[list[int]], max_tokens: int, batches: list[int]) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    started = time.perf_counter()
    llm = LLM(model=model, skip_tokenizer_init=True, dtype="float32", enforce_eager=True,
              max_model_len=max(len(p) for p in prompts) + max_tokens, kv_cache_memory_bytes=512 * 2**20,
              max_num_seqs=max(len(prompts), 1), seed=0)
    try:
        loaded = time.perf_counter()
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=0, ignore_eos=True,
                                detokenize=False)
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        finished = time.perf_counter()
        results = []
        for output in outputs:
            completion = output.outputs[0]
            chosen = [step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids)]
            results.append({"tokens": list(completion.token_ids), "logprobs": chosen})
        batch_seconds = {}
        for batch in batches:
            begun = time.perf_counter()
            llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts[:batch]], params, use_tqdm=False)
            batch_seconds[batch] = time.perf_counter() - begun
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
    return {"results": results, "load_seconds": loaded - started, "generate_seconds": finished - loaded,
            "batch_seconds": batch_seconds}


def main(jobs_file: str) -> None:
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    for job in json.loads(open(jobs_file).read()):
        with WeightLoadWatch() as watch:
            try:
                outcome = generate(job["model"], job["prompts"], int(job["max_tokens"]), job.get("batches", []))
            except Exception:  # reported to the test, which decides whether this model was meant to fail
                outcome = {"error": traceback.format_exc()[-6000:]}
        outcome["loaded_weights"] = watch.loaded
        cleanup_dist_env_and_memory()
        with open(job["out"], "w") as file:
            json.dump(outcome, file)


if __name__ == "__main__":
    main(sys.argv[1])
