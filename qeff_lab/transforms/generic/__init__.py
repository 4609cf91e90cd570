"""The generic retained-state path: transformers' own extension points (Cache, AttentionInterface,
AttentionMaskInterface, ExpertsInterface) instead of per-model attention copies.

Design
------
`generic_kv_transform(model)` keeps the model's own code for everything but the KV cache:
- a `RetainedStateCache` (cache.py) built each call from explicit `[batch, kv_heads, ctx_len, head_dim]` buffers:
  `update()` = `CtxScatter` at position_ids (out of place; padding -1 writes nothing) then `CtxGather` of the
  whole context (slots beyond the row's last position read as exact zeros, so stale/NaN values cannot leak);
- an attention function registered in `AttentionInterface` (interfaces.py) that calls the module's own
  `eager_attention_forward`: RoPE variants, qk-norm, partial rotary, soft-capping, sinks, parallel blocks,
  MQA/GQA stay the model's code;
- a mask function registered in `AttentionMaskInterface` that evaluates the model's own `mask_function`
  (causal / sliding / chunked per layer type) at real query positions against `arange(ctx_len)`;
- for MoE, a dense experts function registered in `ExpertsInterface`;
- named overrides, one small file each with its why at the top: RoPE cos/sin tables (rope_tables.py), ONNX
  symbolics (onnx_symbolics.py), and per model type the interfaces cannot reach as it is (hand-written attention:
  bloom, falcon, gpt_neo, mpt, ...; JetMoE's data-dependent MoE routing) a file in overrides/ (the mechanism:
  overrides/__init__.py).
The graph contract is the family path's: input_ids, position_ids, past_key.{i}/past_value.{i} -> logits
[B,1,V] fp32 at argmax(position_ids), *_RetainedState; CtxScatter/CtxGather as ONNX functions. Continuous batching
as the families: a last input batch_index [B,1], KV buffers of full_batch_size rows, CtxScatterCB/CtxGatherCB.

Traps handled
-------------
- Mask registered through the class method, with the same name as the attention: a name missing from
  `AttentionMaskInterface._global_mapping` makes masking_utils return mask=None silently.
- No 4D mask is passed in (it would be used unchanged by every layer: sliding layers wrong); attention_mask=None
  and the cache hands `[B, S]` positions out as the mask's `q_offset`.
- Position ids sit on the cache (gpt_neox calls `update(k, v, layer_idx)` without cache kwargs).
- Padding (-1): CtxScatter drops the write; the mask puts padding query rows at position 0 (never a fully
  masked row); the model gets position_ids.clamp(min=0) (learned tables such as gpt2's raise on -1).
- `get_seq_length()` returns ctx_len - new tokens (past + new spans the buffer): models that size a padding mask or
  ALiBi key positions from it (opt, biogpt, ctrl) cover every slot; one that builds positions from it even when
  position_ids are given is refused by reading its source (support.py) unless it has a named override
  (llama4_text's attention temperature, trocr's positional embedding: overrides/).
- BERT-style stacks (config.is_decoder read by the modeling code) with is_decoder=False attend bidirectionally and
  keep no cache: refused at load, naming is_decoder=True (support.py).
- `set_attn_implementation` only warns when a model cannot take it: checked after the call.
- MoE "eager" experts loop over the experts hit (data-dependent, frozen by tracing); "grouped_mm" has no ONNX
  lowering: dense experts instead.
- logits: a forward pre-hook on the output embeddings gathers each row's last valid hidden state (argmax of
  position_ids) before the vocab projection, so the model's own final soft-capping / logit scaling runs on
  [B, 1, V]. Not HF's `logits_to_keep` with a [B, 1] tensor: that lowers to `take_along_dim`, which the
  TorchScript ONNX exporter (opset 17) cannot export.
"""
from qeff_lab.transforms.generic.cache import RetainedStateCache, UnsupportedArchitectureError
from qeff_lab.transforms.generic.support import Support, check_support
from qeff_lab.transforms.generic.transform import (RetainedStateCausalLM, generic_kv_transform, max_ctx_len,
                                                   undo_generic_kv_transform)

__all__ = ["RetainedStateCache", "RetainedStateCausalLM", "Support", "UnsupportedArchitectureError", "check_support",
           "generic_kv_transform", "max_ctx_len", "undo_generic_kv_transform"]
