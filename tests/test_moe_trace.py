"""optimum traces MoE blocks: the trace must hold every expert, whatever tokens its input routed.

transformers' loops skip the experts no token of the input chose; traced on one token (2 of 4 experts), the
graph left the other two out, and a token routed to them got a wrong output (the support matrix's
DeepSeek-V3 failed its parity probe in about one export in five: optimum's dummy input is random)."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")


def _moe_block(name: str):
    from transformers import AutoModelForCausalLM

    from loraship.export import zoo

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(zoo.by_name(name).build_config(256), dtype=torch.float32).eval()
    layer = model.model.layers[-1]
    return layer.mlp


def _traced_error(block, tokens: int = 64) -> float:
    """Trace ``block`` on one token, then the largest difference from eager on ``tokens`` other tokens
    (infinite when the traced graph fails on them)."""
    one = torch.randn(1, 1, block.gate.weight.shape[1])
    many = torch.randn(1, tokens, block.gate.weight.shape[1])

    class Output(torch.nn.Module):  # Qwen3-MoE returns its router logits too
        def __init__(self) -> None:
            super().__init__()
            self.block = block

        def forward(self, x):
            out = self.block(x)
            return out[0] if isinstance(out, tuple) else out

    module = Output().requires_grad_(False)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TracerWarnings this test is about
        traced = torch.jit.trace(module, (one,), check_trace=False)
        try:
            return float((traced(many) - module(many)).abs().max())
        except RuntimeError:  # the frozen loop cannot even run on other routes (Qwen3-MoE's zip of hit experts)
            return float("inf")


@pytest.mark.parametrize("name", ["DeepSeek-V3", "Qwen3-MoE"])
def test_a_trace_on_one_token_holds_every_expert(name):
    from loraship.export.moe_trace import trace_every_expert

    torch.manual_seed(1)
    block = _moe_block(name)
    assert _traced_error(block) > 1e-3  # transformers' own loop: the experts the one token skipped are missing
    torch.manual_seed(1)
    with trace_every_expert():
        assert _traced_error(block) < 1e-5
