"""A decoding step's routed matmul on CUDA: each slot's row times its chosen expert's weight, read where it lies.

With a handful of tokens (a decoding step) a routed Linear is a few matrix-vector products, bound by reading the k
chosen experts' weights. The reference (`experts.chosen_experts_linear`) first copies those weights out of the stacked
`[E, out, in]` tensor (`index_select`) and then runs a batched matmul: three passes over k weight matrices where one
would do, and two or three more launches to mix the k outputs. Here one Triton kernel reads each chosen expert's rows
in place, accumulates in float32, adds the bias and, where asked, mixes each token's k slot outputs by their routing
weights, with the reference's roundings: each slot's output (and its sum with the bias) rounded to the weight's dtype,
the mix in float32 rounded once, so a decoding step and a whole sequence agree in bf16 as before.

It is a `torch.library.triton_op`: `torch.compile` traces into it, so the static cache's compiled, CUDA-graphed
decoding step keeps it (the copies of the reference were why compiled code used to take the sorted path instead).
It is registered when this module is imported on a machine with CUDA and Triton, never lazily: `torch.compile`
cannot trace Triton's import (a lazy registration broke the compiled graph at every routed module).
Inference only: it has no backward, and `experts.few_tokens_at_inference` sends nothing that wants a gradient here.
"""

from __future__ import annotations

import importlib.util

import torch

# 2 waves of an H100/H200's 132 SMs: programs below this leave the memory system idle, so blocks shrink to make more.
_PROGRAMS_WANTED = 264
# Weight elements a program loads per step of its inner loop (16 KiB of bf16). A matvec is bound by reading the
# weights, so what matters is the bytes in flight: a narrow block (few output columns, as in a down projection with one
# token: 256 programs of 8 columns) reads a longer stretch of each row per step instead of a smaller tile.
_TILE_ELEMENTS = 8192
_MIN_INNER = 256  # wide blocks (64 columns) too: 256 inner elements beat 128 by 9-10% (bench/decode_kernel.py)


def _tile(output_rows: int, out_features: int, in_features: int) -> tuple[int, int]:
    """(output columns per program, inner elements per loop step): the widest block that still gives
    `_PROGRAMS_WANTED` programs (8 columns at least), and as many inner elements as make `_TILE_ELEMENTS` (at least
    `_MIN_INNER`, at most the row's length rounded up to a power of two)."""
    block_n = 8
    for block in (64, 32, 16):
        if output_rows * -(-out_features // block) >= _PROGRAMS_WANTED:
            block_n = block
            break
    row = 1 << max(0, in_features - 1).bit_length()
    return block_n, max(16, min(row, max(_MIN_INNER, _TILE_ELEMENTS // block_n)))


def _register_operator():
    """The Triton kernel as the `moekit::chosen_experts_matvec` operator (what compiled code calls) and as a plain
    launch (what eager code calls: a decoding step is bound by host time, and the operator's dispatch adds to it)."""
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

    @triton.jit
    def chosen_matvec(inputs, weight, bias, experts, mix, out, in_features, out_features,
                      TOP_K: tl.constexpr, INPUT_PER_SLOT: tl.constexpr, MIX: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # a token when mixing, else a slot
        columns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        columns_inside = columns < out_features
        element = out.dtype.element_ty
        total = tl.zeros([BLOCK_N], dtype=tl.float32)
        for choice in tl.static_range(TOP_K if MIX else 1):
            slot = row * TOP_K + choice if MIX else row
            expert = tl.load(experts + slot).to(tl.int64)
            input_row = slot if INPUT_PER_SLOT else slot // TOP_K
            expert_rows = weight + expert * out_features * in_features + columns[:, None].to(tl.int64) * in_features
            partial = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            for start in range(0, in_features, BLOCK_K):
                inner = start + tl.arange(0, BLOCK_K)
                inner_inside = inner < in_features
                x = tl.load(inputs + input_row * in_features + inner, mask=inner_inside, other=0.0).to(tl.float32)
                w = tl.load(expert_rows + inner[None, :], mask=columns_inside[:, None] & inner_inside[None, :],
                            other=0.0).to(tl.float32)
                partial += w * x[None, :]
            output = tl.sum(partial, axis=1).to(element).to(tl.float32)
            if HAS_BIAS:
                b = tl.load(bias + expert * out_features + columns, mask=columns_inside, other=0.0).to(tl.float32)
                output = (output + b).to(element).to(tl.float32)
            if MIX:
                total += tl.load(mix + slot) * output
            else:
                total += output
        tl.store(out + row * out_features + columns, total.to(element), mask=columns_inside)

    def launch(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, experts: torch.Tensor,
               mix: torch.Tensor | None, top_k: int, wrap=lambda kernel: kernel) -> torch.Tensor:
        slots = experts.numel()
        out_features, in_features = weight.shape[1], weight.shape[2]
        output_rows = slots // top_k if mix is not None else slots
        out = inputs.new_empty(output_rows, out_features)
        if output_rows == 0:
            return out
        block, block_k = _tile(output_rows, out_features, in_features)
        grid = (output_rows, triton.cdiv(out_features, block))
        wrap(chosen_matvec)[grid](
            inputs, weight, bias if bias is not None else weight, experts,
            mix if mix is not None else weight, out, in_features, out_features,
            TOP_K=top_k, INPUT_PER_SLOT=inputs.shape[0] == slots and top_k > 1, MIX=mix is not None,
            HAS_BIAS=bias is not None, BLOCK_N=block, BLOCK_K=block_k,
        )
        return out

    @triton_op("moekit::chosen_experts_matvec", mutates_args=())
    def chosen_experts_matvec(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                              experts: torch.Tensor, mix: torch.Tensor | None, top_k: int) -> torch.Tensor:
        return launch(inputs, weight, bias, experts, mix, top_k, wrap_triton)

    return chosen_experts_matvec, launch


_OPERATOR, _LAUNCH = (_register_operator() if torch.cuda.is_available() and importlib.util.find_spec("triton")
                      else (None, None))


def can_run_kernel(inputs: torch.Tensor) -> bool:
    return inputs.is_cuda and _OPERATOR is not None


def chosen_experts_matvec(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          experts: torch.Tensor, mix: torch.Tensor | None = None) -> torch.Tensor:
    """`y[s] = inputs[row of s] @ weight[experts[s]].T + bias[experts[s]]` for every slot s of `experts [N, k]`.

    `inputs` is `[N, in]` (a token's row serves its k slots) or `[N*k, in]` (one row per slot). With `mix [N, k]`
    (float32 routing weights) the result is each token's mix of its k slot outputs, `[N, out]`; without, `[N*k, out]`.
    """
    run = _OPERATOR if torch.compiler.is_compiling() else _LAUNCH
    return run(inputs.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(),
               experts.reshape(-1).contiguous(), None if mix is None else mix.float().contiguous(), experts.shape[-1])
