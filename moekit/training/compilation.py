"""Regional `torch.compile` for training: each decoder block compiled in place, the opt-in `compile: true`.

A composed model's training step at a small width is bound by launches and Python, not by its matmuls: a btx block
routes three projections, each with a router, a sort, a gather and a mix (docs/performance.md). Compiling the blocks
fuses the small kernels around the grouped matmuls (the Triton combine and SiLU·mul stay, as operators). Compiling
block by block rather than the whole model leaves the module tree, its parameter names and the saved checkpoint
unchanged (`nn.Module.compile` swaps only how the block is called), and the loss and the optimiser as they are.
"""

from __future__ import annotations

import torch

from ..runtime.base_model.architecture import decoder_layers

# What `torch.compile` compiles with; tests on CPU use "aot_eager" (the same graphs, no C++ compiler).
BACKEND = "inductor"


def compile_decoder_blocks(model: torch.nn.Module) -> int:
    """Compile each decoder block of a composed model in place; the number of blocks compiled.

    Blocks share their code but not every constant: each router records its logits under its own name, which the
    compiled graph holds, so every block compiles once (seconds each). Dynamo's default limit of 8 graphs per code
    object would leave the blocks after the eighth in eager code (measured: `compile: true` then trained no faster
    than eager at 30 blocks), so the limit is raised to the number of blocks (never lowered). The training forward
    must not pass a KV cache (`train_routers` does not): its per-layer state would add a guard per block too.
    """
    dense = getattr(model, "dense_model", model)
    config = getattr(model.config, "text_config", model.config)
    _, blocks = decoder_layers(dense, config)
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, 2 * len(blocks))
    dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 4 * len(blocks))
    for block in blocks:
        block.compile(backend=BACKEND)
    return len(blocks)
