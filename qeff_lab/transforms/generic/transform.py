"""`generic_kv_transform(model)`: the retained-state contract on any HF causal LM the interfaces reach.

After it, `model(input_ids, position_ids, past_key_values[, batch_index]) -> (logits [B, 1, V] fp32, new_past)`
exactly like the family swaps (with `batch_index` [B, 1], continuous batching: buffers of `full_batch_size` rows),
plus `model.kv_cache_layout()` and `model.new_kv_cache(batch, ctx_len)`. The HF class is replaced by a subclass
(`__class__` only: same parameter objects, same state-dict keys) whose `forward` builds a RetainedStateCache from the
explicit buffers and calls the HF forward with it.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from qeff_lab.pipeline import Change, TransformResult
from qeff_lab.transforms.base import swap_modules, unswap_modules
from qeff_lab.transforms.generic import interfaces, onnx_symbolics
from qeff_lab.transforms.generic.cache import ProbeCache, RetainedStateCache, UnsupportedArchitectureError
from qeff_lab.transforms.generic.overrides import apply_override, undo_override
from qeff_lab.transforms.generic.rope_tables import apply_rope_tables, remove_rope_tables
from qeff_lab.transforms.generic.support import check_support
from qeff_lab.transforms.kv_cache import kept_logit_indices

NAME = "GenericRetainedStateKVCache"


class RetainedStateCausalLM:
    """Mixin placed in front of the HF causal-LM class (see `generic_kv_transform`)."""

    _qeff_layout: list[tuple[int, int]]
    _qeff_sliding: list[bool]

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, past_key_values, batch_index=None,
                num_logits_to_keep=None):
        cache = RetainedStateCache(past_key_values, position_ids, self._qeff_sliding, self.config.model_type,
                                   batch_index)
        last = kept_logit_indices(position_ids, num_logits_to_keep)  # [B, 1] (each row's last valid position) or [B, n]
        head = self.get_output_embeddings() if self._qeff_head_hook else None
        if head is not None:
            head._qeff_last_index = last  # read by the pre-hook on the head: gather before the vocab projection
        try:
            # learned position tables (gpt2) index with position_ids: padding (-1) reads row 0, the cache keeps -1
            out = super().forward(input_ids=input_ids, position_ids=position_ids.clamp(min=0),
                                  **{self._qeff_cache_kw: cache}, use_cache=True)
        finally:
            if head is not None:
                head._qeff_last_index = None
        logits = out.logits if hasattr(out, "logits") else out[0]
        if head is None:  # no output-embedding module to hook: every position was projected, keep the last valid
            logits = _gather_rows(logits, last)
        return logits.to(torch.float32), cache.buffers()

    def kv_cache_layout(self) -> list[tuple[int, int]]:
        """(kv_heads, head_dim) of each layer, in order."""
        return list(self._qeff_layout)

    def new_kv_cache(self, batch_size: int, ctx_len: int, dtype=torch.float32):
        return [(torch.zeros(batch_size, h, ctx_len, d, dtype=dtype), torch.zeros(batch_size, h, ctx_len, d, dtype=dtype))
                for h, d in self._qeff_layout]


def _gather_rows(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """hidden [B, S, X], index [B, n] -> [B, n, X] (torch.gather: the TorchScript exporter has no take_along_dim)."""
    return torch.gather(hidden, 1, index[:, :, None].expand(-1, -1, hidden.shape[-1]))


def _gather_last_hidden(head: nn.Module, args):
    """Forward pre-hook on the output embeddings: only each row's last valid hidden state reaches the vocab
    projection, so the model's own final steps (soft-capping, logit scaling) run on [B, 1, V]."""
    index = getattr(head, "_qeff_last_index", None)
    if index is None:
        return None
    return (_gather_rows(args[0], index), *args[1:])


_CLASSES: dict[type, type] = {}


def _retained_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Retained{cls.__name__}", (RetainedStateCausalLM, cls), {"__module__": __name__})
    return _CLASSES[cls]


def _sliding_layers(config, n: int) -> list[bool]:
    types = getattr(config, "layer_types", None)
    if types:
        # cache layers past the model's own (dory's per-loop copies of its looped layers) too: each one needs its
        # buffers (a shorter list would drop them from the cache); the model's mask applies any window
        return [t != "full_attention" for t in types[:n]] + [False] * max(0, n - len(types))
    return [getattr(config, "sliding_window", None) is not None] * n


def max_positions(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def max_ctx_len(config) -> tuple[int | None, str]:
    """The largest ctx_len the generic path reproduces exactly, and why. Sliding windows do not limit it: every
    layer keeps the full ctx_len buffer and the model's own sliding mask applies the window at real positions."""
    return max_positions(config), "max_position_embeddings (position tables / RoPE tables)"


def _probe(model: nn.Module, cache_kw: str) -> list[tuple[int, int]]:
    """One token through the model with a recording cache: the KV shape of every layer, and any runtime obstacle."""
    mt = model.config.model_type
    ids = torch.zeros(1, 1, dtype=torch.long, device=model.device)
    pos = torch.zeros(1, 1, dtype=torch.long, device=model.device)
    cache = ProbeCache(pos, mt)
    try:
        with torch.no_grad():
            model(input_ids=ids, position_ids=pos, **{cache_kw: cache}, use_cache=True)
    except UnsupportedArchitectureError:
        raise
    except Exception as e:  # the model's own code refused the retained cache: say where
        raise UnsupportedArchitectureError(
            f"{mt}: a probe forward with the retained-state cache failed ({type(e).__name__}: {e}); this model "
            "needs a named override.") from e
    layout = []
    for i, layer in enumerate(cache.layers):
        if layer.key_shape is None:
            raise UnsupportedArchitectureError(
                f"{mt}: layer {i} writes no KV (shared-KV or non-attention layer); the retained-state path needs "
                "one KV pair per layer index.")
        if layer.key_shape[1] != layer.value_shape[1] or layer.key_shape[3] != layer.value_shape[3]:
            raise UnsupportedArchitectureError(
                f"{mt}: layer {i} keys {layer.key_shape} and values {layer.value_shape} differ in heads or head size; "
                "one [kv_heads, ctx_len, head_dim] layout per layer cannot hold them.")
        layout.append((int(layer.key_shape[1]), int(layer.key_shape[3])))
    if not layout:
        raise UnsupportedArchitectureError(f"{mt}: no layer called cache.update(); there is no KV cache to retain.")
    return layout


def generic_kv_transform(model: nn.Module, rope_tables: bool = True) -> TransformResult:
    """Put `model` (an HF causal LM, in place) on the generic retained-state path and report every change.

    Raises UnsupportedArchitectureError (one line: model type, obstacle, what to do) before changing anything
    when the model cannot run exactly."""
    config = model.config
    mt = config.model_type
    support = check_support(config)
    if not support:
        raise UnsupportedArchitectureError(support.reason)
    if isinstance(model, RetainedStateCausalLM):
        return TransformResult(NAME, notes=["already on the generic retained-state path"])
    interfaces.register()
    onnx_symbolics.register()
    params = inspect.signature(type(model).forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    result = TransformResult(NAME)
    undo = {"attn": config._attn_implementation,
            "experts": getattr(config, "_experts_implementation", None)}

    old_attn = config._attn_implementation
    override = apply_override(model, interfaces.ATTENTION_NAME)  # None: the interfaces reach the attention
    if override is None:
        model.set_attn_implementation(interfaces.ATTENTION_NAME)
    if config._attn_implementation != interfaces.ATTENTION_NAME:  # transformers only warns when it cannot
        raise UnsupportedArchitectureError(
            f"{mt}: {type(model).__name__} does not accept set_attn_implementation (its attention does not go through "
            "AttentionInterface); needs a named override.")
    undo["override"] = override is not None
    try:
        experts = [m for m in model.modules() if hasattr(m, "_apply_gate") and hasattr(m, "has_gate")]
        if experts:
            old_experts = config._experts_implementation
            model.set_experts_implementation(interfaces.EXPERTS_NAME)
        layout = _probe(model, cache_kw)
    except BaseException:
        if override is not None:
            undo_override(model, old_attn)
        else:
            model.set_attn_implementation(old_attn)
        if undo["experts"] is not None and getattr(config, "_experts_implementation", None) != undo["experts"]:
            model.set_experts_implementation(undo["experts"])
        raise

    model._qeff_generic_undo = undo
    model._qeff_layout = layout
    model._qeff_sliding = _sliding_layers(config, len(layout))
    model._qeff_cache_kw = cache_kw
    head = model.get_output_embeddings()
    model._qeff_head_hook = head is not None
    if head is not None:
        undo["hook"] = head.register_forward_pre_hook(_gather_last_hidden)
    why = ("forward(input_ids, position_ids, past) -> (logits [B,1,V] fp32 at argmax(position_ids), new past); "
           "builds a RetainedStateCache from the explicit buffers each call")
    swap = swap_modules(model, lambda path, m: (_retained_class(type(m)), why) if m is model else None, NAME)
    result.changes.extend(swap.changes)
    kinds = sorted({interfaces.eager_for(m)[1].split(".")[-2] + ".eager_attention_forward"
                    if interfaces.eager_for(m)[1] != "generic" else "generic eager"
                    for m in model.modules() if type(m).__name__.endswith("Attention")})
    if override is not None:
        result.changes.extend(override)
    else:
        result.changes.append(Change("config._attn_implementation", old_attn, interfaces.ATTENTION_NAME,
                                     "AttentionInterface: the model's own eager attention over the gathered context ("
                                     + (", ".join(kinds) or "eager_attention_forward") + ")"))
    result.changes.append(Change("AttentionMaskInterface", "-", interfaces.ATTENTION_NAME,
                                 "the model's own mask_function (causal / sliding / chunked) at position_ids vs "
                                 "arange(ctx_len); additive MASK_VALUE"))
    if experts:
        result.changes.append(Change("config._experts_implementation", str(old_experts), interfaces.EXPERTS_NAME,
                                     f"ExpertsInterface: {len(experts)} experts module(s) run densely (all experts, "
                                     "weighted by top-k routing); no data-dependent loop in the graph"))
    for i, ((h, d), sliding) in enumerate(zip(layout, model._qeff_sliding)):
        result.changes.append(Change(f"cache.layers.{i}", "DynamicLayer", "RetainedStateLayer",
                                     f"[batch, {h}, ctx_len, {d}]; CtxScatter at position_ids, CtxGather of the context"
                                     + ("; sliding window applied by the model's mask" if sliding else "")))
    if head is None:
        result.notes.append("no output embeddings module: logits for every position are computed, then gathered")
    else:
        result.changes.append(Change(_path_of(model, head), type(head).__name__, f"{type(head).__name__} (+ pre-hook)",
                                     "only each row's last valid hidden state (argmax of position_ids) is projected "
                                     "to the vocabulary; logits [B, 1, V]"))
    if rope_tables and max_positions(config):
        changes, notes = apply_rope_tables(model, max_positions(config))
        result.changes.extend(changes)
        result.notes.extend(notes)
    return result


def _path_of(model: nn.Module, target: nn.Module) -> str:
    return next((path for path, m in model.named_modules() if m is target), "?")


def undo_generic_kv_transform(model: nn.Module) -> None:
    """Back to the HF class, attention / experts implementations and rotary modules as they were."""
    undo = getattr(model, "_qeff_generic_undo", None)
    if undo is None:
        return
    unswap_modules(model, NAME, only=lambda path, m: m is model)
    if undo.get("override"):
        undo_override(model, undo["attn"])
    else:
        model.set_attn_implementation(undo["attn"])
    if undo["experts"] is not None and model.config._experts_implementation != undo["experts"]:
        model.set_experts_implementation(undo["experts"])
    remove_rope_tables(model)
    if "hook" in undo:
        undo["hook"].remove()
    for name in ("_qeff_generic_undo", "_qeff_layout", "_qeff_sliding", "_qeff_cache_kw", "_qeff_head_hook"):
        model.__dict__.pop(name, None)
