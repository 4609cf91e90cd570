"""jetmoe: its MoE MLP and mixture-of-attention route with data-dependent split sizes (frozen by tracing); dense here.

`JetMoeTopKGating` turns the per-expert token counts into a Python list (`expert_size.tolist()`) and
`JetMoeParallelExperts` splits the sorted tokens by it, so tracing freezes the counts of the example input into the
graph (ONNX Runtime: "Split size 16 exceeds the remaining size"). These classes do not go through ExpertsInterface,
so the generic dense experts cannot reach them.

Here every expert runs on every token (one batched MatMul per projection, as `dense_experts_forward` does) and the
router's own top-k picks and softmax gates select and weigh the results: the same numbers as JetMoE's grouped
computation (each token's expert outputs are gathered, not mixed with zeros, and the top-k sum is over the same
terms). Only `__class__` changes: same parameters, same state-dict keys.
"""
from __future__ import annotations

import torch
from transformers.models.jetmoe import modeling_jetmoe as hf


def _route(router: hf.JetMoeTopKGating, x: torch.Tensor):
    """x [T, H] -> (top-k expert ids [T, K], their softmax gates [T, K], router logits [T, E]), as JetMoE's gating."""
    logits = router.layer(x).float()
    top_logits, top_ids = logits.topk(router.top_k, dim=1)
    return top_ids, torch.softmax(top_logits, dim=1).type_as(x), logits


def _every_expert(experts: hf.JetMoeParallelExperts, x: torch.Tensor) -> torch.Tensor:
    """x [..., in] -> [E, ..., out]: each expert's linear map (weights [E, out, in]) on every row."""
    weight = experts.weight.transpose(1, 2)  # [E, in, out]
    flat = x.reshape(1, -1, x.shape[-1])
    return torch.matmul(flat, weight).reshape(weight.shape[0], *x.shape[:-1], weight.shape[-1])


def _pick(per_expert: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """per_expert [E, T, K, D] (or [E, T, D], broadcast over K), ids [T, K] -> [T, K, D]: row (t, k) of expert ids[t, k]."""
    if per_expert.dim() == 3:
        per_expert = per_expert[:, :, None].expand(-1, -1, ids.shape[1], -1)
    index = ids[None, :, :, None].expand(1, -1, -1, per_expert.shape[-1])
    return torch.gather(per_expert, 0, index)[0]


class DenseJetMoeMoE(hf.JetMoeMoE):
    def forward(self, layer_input):
        bsz, length, emb_size = layer_input.size()
        x = layer_input.reshape(-1, emb_size)
        ids, gates, _ = _route(self.router, x)
        gate, up = _every_expert(self.input_linear, x).chunk(2, dim=-1)
        hidden = self.activation(gate) * up  # [E, T, hidden]: expert e's rows go through expert e's output map
        out = torch.matmul(hidden, self.output_linear.weight.transpose(1, 2))  # [E, T, H]
        picked = _pick(out, ids) * gates[:, :, None]  # [T, K, H]
        return picked.sum(1).view(bsz, length, self.input_size) + self.bias


class DenseJetMoeMoA(hf.JetMoeMoA):
    def map(self, layer_input):
        bsz, length, emb_size = layer_input.size()
        x = layer_input.reshape(-1, emb_size)
        ids, gates, logits = _route(self.router, x)
        queries = _pick(_every_expert(self.input_linear, x), ids)  # [T, K, hidden]
        return queries.view(bsz, length, self.top_k, -1), logits, (ids, gates)

    def reduce(self, layer_input, topo_info):
        bsz, length, k, hidden_size = layer_input.size()
        ids, gates = topo_info
        out = _every_expert(self.output_linear, layer_input.reshape(-1, k, hidden_size))  # [E, T, K, H]
        picked = _pick(out, ids) * gates[:, :, None]
        return picked.sum(1).view(bsz, length, self.input_size) + self.bias


SWAPS = {hf.JetMoeMoE: DenseJetMoeMoE, hf.JetMoeMoA: DenseJetMoeMoA}
