"""Run under `torchrun --nproc_per_node 2` on CPU (gloo): shard a composed model with FSDP2 the way `accelerate`
does (`fsdp2_prepare_model`, the same function its FSDP2 plugin calls on GPUs; accelerate itself will not shard on
CPU), give each rank its half of a batch, and write the mean loss and the gathered gradients for the test to compare
with one process. With `efficient`, only rank 0 reads the weights (`fsdp_cpu_ram_efficient_loading`): the other
ranks build the model empty and receive its shards from rank 0.

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp2_worker.py MODEL BATCH.pt OUT.pt {efficient,full}

FSDP2's warning that the wrapped model "returned a view tensor" (whose in-place use would skip the all-gather) is an
error here. The process ends with `os._exit` once every rank has passed the barrier and the group is destroyed: FSDP2
keeps the sharded model alive through hooks that PyTorch's C++ side holds, so the gloo process group (its three
threads) outlives `destroy_process_group` and used to be destroyed during interpreter shutdown, where a joinable
thread aborts the process ("terminate called without an active exception", SIGABRT), now and then under load.
"""

from __future__ import annotations

import os
import sys
import types
import warnings

import torch
import torch.distributed as dist


def main(model_folder: str, batch_file: str, out_file: str, loading: str) -> None:
    warnings.filterwarnings("error", message=".*returned a view tensor.*")
    dist.init_process_group("gloo")
    os.environ["ACCELERATE_USE_FSDP"] = "true"  # what `accelerate launch` sets; transformers reads it when loading
    os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "true" if loading == "efficient" else "false"
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from transformers import AutoModelForCausalLM

    import moekit  # noqa: F401

    rank = dist.get_rank()
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", state_dict_type="FULL_STATE_DICT",
        cpu_ram_efficient_loading=loading == "efficient", reshard_after_forward=True)
    model = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32).train()
    accelerator = types.SimpleNamespace(
        state=types.SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=None, parallelism_config=None,
        mixed_precision="no", is_main_process=rank == 0, device=torch.device("cpu"))
    model = fsdp2_prepare_model(accelerator, model)
    sharded = sum(hasattr(p, "full_tensor") for p in model.parameters())
    ids = torch.load(batch_file).chunk(dist.get_world_size())[rank]
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= dist.get_world_size()
    gradients = {name: p.grad.full_tensor() for name, p in model.named_parameters() if p.grad is not None}
    if rank == 0:
        torch.save({"loss": mean_loss, "gradients": gradients, "sharded": sharded,
                    "parameters": sum(1 for _ in model.parameters())}, out_file)
    dist.barrier()


if __name__ == "__main__":
    try:
        main(*sys.argv[1:5])
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # see the module docstring: no interpreter shutdown with the group's threads still running
