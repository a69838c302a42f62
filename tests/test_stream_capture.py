"""bts steps each expert stream block by block from what its own forward passes its blocks (moekit.runtime.bts.streams):
whatever a family's blocks return (a tensor, a tuple, GPT-Neo's and the original GPT's lists the loop unpacks), the
stream stepped block by block ends where the family's own forward ends."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moekit.runtime.bts.streams import capture_stream, replace_output


class _Block(nn.Module):
    def __init__(self, width: int, returns: str):
        super().__init__()
        self.linear, self.returns = nn.Linear(width, width), returns

    def forward(self, hidden: torch.Tensor, scale: torch.Tensor) -> object:
        out = hidden + torch.tanh(self.linear(hidden)) * scale
        return {"tensor": out, "tuple": (out, None), "list": [out, None]}[self.returns]


class _Model(nn.Module):
    """A decoder loop in the style of the family: a tensor-returning block is used as is, the others unpacked."""

    def __init__(self, returns: str, width: int = 8, depth: int = 3):
        super().__init__()
        self.embed = nn.Embedding(16, width)
        self.blocks = nn.ModuleList(_Block(width, returns) for _ in range(depth))
        self.returns = returns

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden, scale = self.embed(input_ids), torch.tensor(0.5)
        for block in self.blocks:
            outputs = block(hidden, scale)
            hidden = outputs if self.returns == "tensor" else outputs[0]
            if hidden.dim() != 3:  # what GPT-Neo's `.view(-1, length, width)` would refuse
                raise RuntimeError(f"hidden state of shape {tuple(hidden.shape)}")
        return hidden


@pytest.mark.parametrize("returns", ["tensor", "tuple", "list"])
def test_a_stream_stepped_block_by_block_ends_where_its_forward_ends(returns):
    torch.manual_seed(0)
    model = _Model(returns).eval()
    tokens = torch.randint(0, 16, (2, 5))
    with torch.no_grad():
        expected = model(input_ids=tokens)
        state = capture_stream(model, model.blocks, {"input_ids": tokens})
        assert torch.equal(state.hidden, model.embed(tokens))
        state.advance_to(len(model.blocks))
    assert state.done == 3 and torch.equal(state.hidden, expected)
    assert all(isinstance(block, _Block) for block in model.blocks)  # the real blocks are back in place


def test_replace_output_keeps_the_kind_of_output():
    old, new = torch.zeros(1), torch.ones(1)
    assert replace_output(old, new) is new
    assert replace_output((old, "cache"), new) == (new, "cache")
    replaced = replace_output([old, "cache"], new)
    assert isinstance(replaced, list) and replaced[0] is new and replaced[1] == "cache"
