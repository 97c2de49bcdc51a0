"""MoE blocks that trace to the same graph whatever tokens the trace's input routes (optimum's exports).

transformers 4.57 runs a mixture of experts as a Python loop over the experts its tokens were routed to:
DeepSeek-V3 skips an expert whose token count is zero (``if token_indices.numel() > 0``), Qwen3-MoE loops
over ``expert_hit`` (the experts some token chose). A ``torch.jit`` trace (optimum's exporter) freezes that
Python control flow for the trace's random dummy input: an expert that input routed no token to is left
out of the graph, and the export is wrong for every prompt that routes a token to it. Whether that happens
changed from one export to the next (optimum's dummy ids are not seeded); the parity probe caught it as
max |dlogit| 0.44 on the zoo's DeepSeek-V3 in about one export in five.

:func:`trace_every_expert` swaps in forwards that run every expert on the tokens routed to it (none is a
gather of zero rows, an empty matmul and an empty ``index_add``): the same sparse work, the same results,
and a graph that holds every expert.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from unittest import mock


def _deepseek_v3_moe(self, hidden_states, topk_indices, topk_weights):
    """``DeepseekV3MoE.moe`` without its skip of experts that got no token."""
    import torch

    final = torch.zeros_like(hidden_states, dtype=topk_weights.dtype)
    expert_mask = torch.nn.functional.one_hot(topk_indices, num_classes=len(self.experts)).permute(2, 0, 1)
    for expert_idx, expert in enumerate(self.experts):
        token_indices, weight_indices = torch.where(expert_mask[expert_idx])
        weighted = expert(hidden_states[token_indices]) * topk_weights[token_indices, weight_indices].unsqueeze(-1)
        final.index_add_(0, token_indices, weighted)
    return final.type(hidden_states.dtype)


def _qwen3_moe_forward(self, hidden_states):
    """``Qwen3MoeSparseMoeBlock.forward`` looping over every expert, not over those some token chose."""
    import torch
    import torch.nn.functional as F

    batch_size, sequence_length, hidden_dim = hidden_states.shape
    hidden_states = hidden_states.view(-1, hidden_dim)
    router_logits = self.gate(hidden_states)
    routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
    routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
    if self.norm_topk_prob:
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
    routing_weights = routing_weights.to(hidden_states.dtype)
    final = torch.zeros((batch_size * sequence_length, hidden_dim), dtype=hidden_states.dtype, device=hidden_states.device)
    expert_mask = torch.nn.functional.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
    for expert_idx in range(self.num_experts):
        idx, top_x = torch.where(expert_mask[expert_idx])
        current = self.experts[expert_idx](hidden_states[top_x]) * routing_weights[top_x, idx, None]
        final.index_add_(0, top_x, current.to(hidden_states.dtype))
    return final.reshape(batch_size, sequence_length, hidden_dim), router_logits


# (module, class, method, replacement): the MoE blocks of the architectures optimum exports for loraship
_PATCHES = (
    ("transformers.models.deepseek_v3.modeling_deepseek_v3", "DeepseekV3MoE", "moe", _deepseek_v3_moe),
    ("transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeSparseMoeBlock", "forward", _qwen3_moe_forward),
)


@contextmanager
def trace_every_expert() -> Iterator[None]:
    """While it is open, the MoE blocks of :data:`_PATCHES` run every expert (for a trace)."""
    import importlib

    with ExitStack() as stack:
        for module, cls, method, replacement in _PATCHES:
            try:
                owner = getattr(importlib.import_module(module), cls)
            except (ImportError, AttributeError):
                continue
            stack.enter_context(mock.patch.object(owner, method, replacement))
        yield
