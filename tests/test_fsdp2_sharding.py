"""FSDP2 sharding as `accelerate` applies it, on 2 CPU processes: each composition trains like one process.

Every rank holds half of each parameter and half of the batch; the loss (with its global-batch balance term) and every
gradient must equal one process's on the whole batch. With `fsdp_cpu_ram_efficient_loading`, rank 1 builds the model
empty and receives its shards from rank 0: a model whose construction depended on the loaded values (a cached
tensor, a non-persistent buffer computed from weights) would differ there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from moekit import compose
from processes import free_port
from tiny_models import VOCAB, make_model, save_model, tiny_config

from moekit import MixtureKitConfig, MixtureKitForCausalLM

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch was built without distributed")
WORKER = Path(__file__).with_name("fsdp2_worker.py")


@pytest.fixture(scope="module")
def compositions(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp2")
    folders = [save_model(make_model(tiny_config("llama"), seed), root / f"dense{seed}") for seed in range(3)]
    experts = [{"name": f"e{i}", "source": str(folder)} for i, folder in enumerate(folders)]
    recipes = {
        "traditional": {"method": "traditional", "experts": experts, "num_experts_per_tok": 2, "alpha": 0.1},
        "btx": {"method": "btx", "experts": experts, "num_experts_per_tok": 2, "alpha": 0.1},
        "bts": {"method": "bts", "base": experts[0], "experts": experts[1:]},
    }
    built = {}
    for method, recipe in recipes.items():
        built[method] = compose({**recipe, "router_init": "random", "dtype": "float32", "seed": 0},
                                output=root / method, progress=False)
    return built


def one_process(folder: Path, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).train()
    if model.config.method == "bts":  # zero stitch gates would give the streams no gradient to check
        with torch.no_grad():
            for parameter in model.stitches.parameters():
                parameter.add_(0.2)
        model.save_pretrained(folder)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["traditional", "btx", "bts"])
@pytest.mark.parametrize("loading", ["efficient", "full"])
def test_fsdp2_on_two_processes_gives_one_process_loss_and_gradients(compositions, method, loading, tmp_path):
    ids = torch.randint(3, VOCAB, (4, 24), generator=torch.Generator().manual_seed(7))
    loss, gradients = one_process(compositions[method], ids)
    torch.save(ids, tmp_path / "batch.pt")
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), str(WORKER),
               str(compositions[method]), str(tmp_path / "batch.pt"), str(tmp_path / "out.pt"), loading]
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    sharded = torch.load(tmp_path / "out.pt")
    assert sharded["sharded"] == sharded["parameters"], "every parameter should be a DTensor shard"
    torch.testing.assert_close(sharded["loss"], loss, rtol=1e-5, atol=1e-6)
    assert set(sharded["gradients"]) == set(gradients)
    for name, gradient in gradients.items():
        torch.testing.assert_close(sharded["gradients"][name], gradient, rtol=1e-4, atol=1e-6,
                                   msg=lambda message, name=name: f"{name}: {message}")


@pytest.mark.parametrize("method", ["traditional", "btx", "bts"])
def test_no_output_of_a_training_forward_is_a_view(method):
    """FSDP2 registers its pre-backward all-gather on the root module's outputs and warns when one is a view (an
    in-place op on it would drop the hook: wrong gradients). Every output that requires grad must own its storage;
    the two-process test above turns that warning into an error as well."""
    experts = dict(expert_names=list("ab")) if method == "bts" else dict(expert_names=list("abc"), num_experts_per_tok=2)
    model = MixtureKitForCausalLM(MixtureKitConfig(text_config=tiny_config("llama"), method=method, **experts)).train()
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    output = model(input_ids=ids, labels=ids, output_router_logits=True)
    tensors = {name: value for name, value in output.items() if isinstance(value, torch.Tensor)}
    tensors.update({f"router_logits[{i}]": t for i, t in enumerate(output.router_logits or ())})
    grad_tensors = {name: t for name, t in tensors.items() if t.requires_grad}
    assert {"loss", "logits", "last_hidden_state"} <= set(grad_tensors)
    views = sorted(name for name, t in grad_tensors.items() if t._base is not None)
    assert views == [], f"outputs that are views: {views}"
