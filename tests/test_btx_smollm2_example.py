"""The SmolLM2 reproduction's pipeline (examples/btx_smollm2), end to end on a tiny model: a smoke test of the
scripts that run on the GPU, with the same steps and outputs."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tiny_study import EXAMPLE, tiny_seed_and_data


@pytest.mark.skipif(not Path("/usr/share/games/fortunes/de").is_dir(), reason="needs Debian's fortunes-de")
def test_the_pipeline_runs_and_reports_every_model(tmp_path):
    seed, data = tiny_seed_and_data(tmp_path)
    out, work = tmp_path / "out", tmp_path / "work"
    common = [sys.executable, str(EXAMPLE / "pipeline.py"), "--data", str(data), "--model", str(seed), "--workdir",
              str(work), "--out", str(out), "--expert-tokens", "2048", "--moe-tokens", "2048", "--seq-len", "32",
              "--batch-size", "8", "--validation-blocks", "4", "--device", "cpu", "--latency-tokens", "4"]
    # Each stage on its own, as the device calls run them; moe before baselines needs no baseline.
    for stage in ("experts", "moe", "baselines", "eval"):
        finished = subprocess.run(common + ["--stage", stage] + (["--alpha-study"] if stage == "moe" else []),
                                  capture_output=True, text=True)
        assert finished.returncode == 0, (stage, finished.stderr[-3000:])
    summary = json.loads((out / "results.json").read_text())
    domains = {"code", "german", "arithmetic"}
    expected = {"seed", "expert code", "expert german", "expert arithmetic", "dense data-matched",
                "sparse upcycling", "best expert, continued", "linear merge (as merged)", "linear merge",
                "ties merge (as merged)", "ties merge", "traditional", "btx", "traditional, no seed", "btx, no seed",
                "bts", "bts (as composed)", "traditional, alpha 0", "traditional, alpha 0.1",
                "traditional, alpha auto"}
    assert expected <= set(summary["results"])
    for row in summary["results"].values():
        assert set(row) == domains | {"mixed"}
        assert all(0 < value < 1e6 for value in row.values())
    results = summary["results"]
    # Training moved every trained model away from its start, and BTS at composition is exactly its hub (the seed).
    seed_row = results["seed"]
    assert results["bts (as composed)"]["mixed"] == pytest.approx(seed_row["mixed"], rel=1e-4)
    assert results["expert code"]["code"] != seed_row["code"]
    assert results["linear merge"]["mixed"] != results["linear merge (as merged)"]["mixed"]
    # The best expert is the one with the lowest mixed perplexity, and what each model cost adds up: a model built
    # from the experts carries their tokens; the dense data-matched model trained on as many tokens by itself.
    best = min(domains, key=lambda d: results[f"expert {d}"]["mixed"])
    assert summary["best_expert"] == best
    costs = summary["costs"]
    expert_tokens = sum(costs[f"expert {d}"]["total_train_tokens"] for d in domains)
    assert costs["traditional"]["total_train_tokens"] > expert_tokens
    assert costs["dense data-matched"]["total_train_tokens"] == costs["btx"]["total_train_tokens"]
    assert costs["linear merge (as merged)"]["total_train_tokens"] == expert_tokens
    assert costs["seed"] == {"total_train_tokens": 0, "gpu_seconds": 0.0}
    for label in ("traditional", "btx", "traditional, no seed"):
        per_domain = summary["specialisation"][label]
        assert set(per_domain) == domains
        assert all(0.0 <= share <= 1.0 for shares in per_domain.values() for share in shares)
    # alpha 0 trains without the balance loss; auto changed its alpha during training; every setting reports
    # utilisation with a load entropy in [0, 1].
    assert set(summary["alpha_curves"]) == {"traditional, alpha auto"}
    for label in ("traditional", "traditional, alpha 0", "traditional, alpha 0.1", "traditional, alpha auto"):
        assert 0.0 <= summary["utilisation"][label]["mean_load_entropy"] <= 1.0
    assert set(summary["latency"]) == {"seed", "traditional", "btx"}
    assert all(t["generate_tokens_per_s"] > 0 for t in summary["latency"].values())
    table = (out / "results.md").read_text()
    assert "| sparse upcycling |" in table and "relative to that domain's expert" in table
    assert (out / "routing-report.html").stat().st_size > 1000
    # A stage whose inputs are missing says which stage to run first.
    finished = subprocess.run(common[:7] + [str(tmp_path / "empty")] + common[8:] + ["--stage", "moe"],
                              capture_output=True, text=True)
    assert finished.returncode != 0 and "--stage experts" in finished.stderr


class _Windows:
    """The pipeline's `Data.batches` over one random stream (what `train` reads of it)."""

    seq_len = 16

    def __init__(self):
        self.stream = torch.randint(3, 64, (4096,), generator=torch.Generator().manual_seed(5))

    def batches(self, domains, tokens, batch_size, seed):
        generator = torch.Generator().manual_seed(seed)
        steps = tokens // (batch_size * self.seq_len)
        for step in range(steps):
            starts = torch.randint(0, self.stream.numel() - self.seq_len, (batch_size,), generator=generator)
            yield step, steps, torch.stack([self.stream[s:s + self.seq_len] for s in starts.tolist()])


def test_a_paused_training_resumes_to_the_uninterrupted_result(tmp_path):
    """`--pause-after`: a model's training cut at every step and resumed from its saved state (weights, optimiser,
    losses, step) ends where an uninterrupted run ends, with the same loss curve."""
    sys.path.insert(0, str(EXAMPLE))
    import pipeline

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)

    def fresh():
        torch.manual_seed(0)
        return LlamaForCausalLM(config)

    data, tokens = _Windows(), 6 * 4 * 16  # six steps of 4 windows

    def run(workdir: Path, pause_at):
        args = argparse.Namespace(workdir=workdir, reuse=True, pause_at=pause_at, batch_size=4)
        model = fresh()
        result = pipeline.train(model, data, ["all"], tokens, args, 1e-3, 1e-3, seed=7, label="dense, data-matched")
        return model, result

    whole, whole_result = run(tmp_path / "whole", None)
    pieces, segments = None, 0
    while pieces is None:
        segments += 1
        try:
            pieces, pieces_result = run(tmp_path / "cut", 0.0)  # the deadline has passed: one step per segment
        except pipeline.Paused:
            assert (tmp_path / "cut" / "paused" / "dense-data-matched.pt").is_file()
    assert segments == 6 and not list((tmp_path / "cut" / "paused").iterdir())  # the state is gone once done
    assert pieces_result["loss_curve"] == pytest.approx(whole_result["loss_curve"], rel=1e-6)
    assert pieces_result["train_tokens"] == whole_result["train_tokens"]
    for (name, got), expected in zip(pieces.state_dict().items(), whole.state_dict().values()):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7, msg=name)


def test_the_scaling_view_keeps_a_method_run_at_some_budgets_only(tmp_path):
    """scaling.py over three budgets where one method (the alpha study) ran at two: its row stays, with a dash where
    it did not run, and the verdicts are computed per budget from the numbers given."""
    def run(tokens, results):
        costs = {m: {"total_train_tokens": tokens * 4 + 1e6, "gpu_seconds": tokens / 1e5} for m in results}
        return {"settings": {"expert_tokens": tokens}, "results": {m: {"mixed": v} for m, v in results.items()},
                "costs": costs}

    runs = [run(1e6, {"seed": 12.0, "ties merge": 7.0, "btx": 7.2, "btx, alpha 0": 6.9, "btx (as composed)": 9.0,
                       "dense": 6.5}),
            run(2.5e6, {"seed": 12.0, "ties merge": 7.0, "btx": 6.8}),
            run(5e6, {"seed": 12.0, "ties merge": 6.5, "btx": 6.6, "btx, alpha 0": 6.4, "dense": 6.41})]
    paths = []
    for index, content in enumerate(reversed(runs)):  # given out of order: sorted by budget
        paths.append(tmp_path / f"r{index}.json")
        paths[-1].write_text(json.dumps(content))
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(EXAMPLE / "scaling.py"), *map(str, paths), "--out", str(out)], check=True,
                   capture_output=True)
    text = (out / "scaling.md").read_text()
    assert "| method | 1M per expert | 2.5M per expert | 5M per expert |" in text
    assert "| btx, alpha 0 | 6.900 | — | **6.400** |" in text
    assert "| dense | **6.500** | — | 6.410 |" in text
    assert "| btx | 7.200 | **6.800** | 6.600 |" in text
    assert "(as composed)" not in text
    assert "- ties merge: the best composition is better at 1M, 2.5M, 5M" in text
    assert "- seed: the best composition is better at 1M, 2.5M, 5M" in text
    assert "- dense: the best composition is better at 5M (run at 1M, 5M only)" in text
    assert (out / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_parts_join_back_to_the_file_and_go_where_they_are_asked(tmp_path):
    """prepare.py's parts (what the device tool carries): by size or by count, beside the input or at a target, stale
    parts of an earlier, larger split removed, and their concatenation is the file."""
    sys.path.insert(0, str(EXAMPLE))
    from prepare import write_parts

    source = tmp_path / "in" / "model.gguf"
    source.parent.mkdir()
    data = bytes(range(256)) * 4099 + b"x"  # 1,049,345 bytes: odd, just over 1 MiB
    source.write_bytes(data)
    target = tmp_path / "out" / "smollm2.gguf"
    target.parent.mkdir()
    (target.parent / "smollm2.gguf.part2").write_bytes(b"stale")
    assert write_parts(source, count=2, target=target) == 2
    parts = sorted(target.parent.glob("smollm2.gguf.part*"))
    assert [p.name for p in parts] == ["smollm2.gguf.part0", "smollm2.gguf.part1"]
    assert b"".join(p.read_bytes() for p in parts) == data
    assert abs(parts[0].stat().st_size - parts[1].stat().st_size) <= 1
    assert not list(source.parent.glob("*.part*"))  # nothing written beside the input
    assert write_parts(source, mib=0.25) == 5
    assert b"".join((source.parent / f"model.gguf.part{i}").read_bytes() for i in range(5)) == data
    with pytest.raises(ValueError, match="size .* or their number"):
        write_parts(source, mib=1, count=2)
