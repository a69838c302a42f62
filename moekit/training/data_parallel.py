"""Sums over the data-parallel ranks, so that routing counts describe the global batch rather than one rank's.

Under `accelerate launch` (DDP, FSDP2, DeepSpeed ZeRO) every rank sees its own slice of each batch. Balance losses
and routing statistics computed from one slice drift with the number of ranks; summing the (gradient-free) counts
over the ranks makes a 2-process run train and report exactly like one process with the same global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def data_parallel_world_size() -> int:
    """How many processes share each batch: the default process group's size, 1 outside `torch.distributed`."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `tensor` over every rank (a new tensor; the input itself unchanged).

    A collective: every rank must call it, in the same order. Gradient-free by design (counts, not activations).
    """
    if data_parallel_world_size() == 1:
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that prints and writes what all ranks share."""
    return data_parallel_world_size() == 1 or dist.get_rank() == 0


def wait_for_all_ranks() -> None:
    """Block until every rank gets here (a no-op on one process): e.g. until rank 0 has written the output."""
    if data_parallel_world_size() > 1:
        dist.barrier()


def end_process_group() -> None:
    """Leave `torch.distributed` cleanly at the end of a command (after `wait_for_all_ranks`): a rank that exits with
    the group still open can be aborted by its communication threads, and the launcher then kills the others."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
