"""dbrx: its experts loop over the experts hit (data-dependent, frozen by tracing) outside ExpertsInterface; dense here.

`DbrxExperts.forward` loops over `expert_mask.nonzero()` and gathers each expert's tokens with `torch.where`, so
tracing freezes the example input's routing into the graph (ONNX Runtime: "Cannot split using values in 'split'
attribute"). The class does not go through ExpertsInterface, so the generic dense experts cannot reach it.

Here every expert runs on every token (one batched MatMul per projection, as `dense_experts_forward` does) and
the router's own top-k weights (zero for the experts not picked) weigh the results. Attention dispatches through
AttentionInterface as it is. Only `__class__` changes: same parameters, same state-dict keys.
"""
from __future__ import annotations

import torch
from transformers.models.dbrx import modeling_dbrx as hf


class DenseDbrxExperts(hf.DbrxExperts):
    def forward(self, hidden_states, top_k_index, top_k_weights):
        batch_size = hidden_states.shape[0]
        x = hidden_states.reshape(-1, self.hidden_size)  # [T, H]
        shape = (self.num_experts, self.ffn_hidden_size, self.hidden_size)
        w1, v1, w2 = (p.view(shape) for p in (self.mlp.w1, self.mlp.v1, self.mlp.w2))  # [E, F, H] each
        gate = self.mlp.activation_fn(torch.matmul(x[None], w1.transpose(1, 2)))  # [E, T, F]
        out = torch.matmul(gate * torch.matmul(x[None], v1.transpose(1, 2)), w2)  # [E, T, H]
        experts = torch.arange(self.num_experts, device=x.device)
        routing = ((top_k_index[..., None] == experts).to(top_k_weights.dtype) * top_k_weights[..., None]).sum(1)
        return (out * routing.transpose(0, 1)[..., None].to(out.dtype)).sum(0).view(batch_size, -1, self.hidden_size)


SWAPS = {hf.DbrxExperts: DenseDbrxExperts}
