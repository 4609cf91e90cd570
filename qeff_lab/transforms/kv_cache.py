"""Retained-state KV cache: the decoder blocks every family shares, and the swap transform that installs them.

After the swap a causal LM is called as `model(input_ids, position_ids, past_key_values[, batch_index])` where
`past_key_values` is a list of per-layer `(key, value)` buffers of fixed shape `[batch, kv_heads, ctx_len,
head_dim]` (with `batch_index`, continuous batching: `[full_batch_size, ...]`, row b using slot batch_index[b]). It returns `(logits [batch, 1, vocab] fp32 at each row's last valid position, new_past)`.

- The write is `ctx_scatter` at `position_ids`; padding carries position -1 and writes nothing.
- The read is `ctx_gather` of the whole context with every slot beyond the row's largest position marked
  invalid (exact zeros via `where`); attention masks `kv_index > query_position` with `where`.
- RoPE comes from cos/sin tables precomputed for `max_position_embeddings`, indexed by `position_ids`.

Families provide thin subclasses (one file each in `families/`) that say where their pieces are; the swap
only changes `__class__`, so every parameter object and state-dict key stays the same.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn

from qeff_lab.ops import ctx_gather, ctx_gather_cb, ctx_scatter, ctx_scatter_cb, rms_norm
from qeff_lab.contracts import MASK_VALUE
from qeff_lab.pipeline import Change, TransformResult
from qeff_lab.transforms.base import swap_modules, swapped_by

# Rope types whose frequencies do not depend on the sequence length: they fit in a precomputed table.
STATIC_ROPE_TYPES = {"default", "linear", "llama3", "yarn"}


class UnsupportedConfigError(ValueError):
    """A model configuration the retained-state blocks cannot reproduce exactly."""


# ----------------------------------------------------------------------------- shared pieces
def kv_masks(position_ids: torch.Tensor, ctx_len: int, window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention mask [B,1,S,ctx] True = masked, ctx_indices [B,ctx] with -1 beyond each row's last position).
    With a sliding `window` a query at position q also masks kv_index <= q - window (HF's sliding_window_overlay):
    the window moves over the retained buffer, so ctx_len is not limited by it."""
    kv_index = torch.arange(ctx_len, device=position_ids.device)
    masked = kv_index[None, None, None, :] > position_ids[:, None, :, None]
    if window is not None:
        masked = masked | (kv_index[None, None, None, :] <= position_ids[:, None, :, None] - window)
    limit = position_ids.max(dim=1, keepdim=True).values
    ctx_indices = torch.where(kv_index[None, :] > limit, torch.full_like(limit, -1), kv_index[None, :])
    return masked, ctx_indices


def kept_logit_indices(position_ids: torch.Tensor, num_logits_to_keep: torch.Tensor | None = None) -> torch.Tensor:
    """[B, n] sequence indices whose logits the graph returns: each row's last valid one (argmax of position_ids,
    n = 1), or, for a speculative-decoding target, the n = num_logits_to_keep.shape[0] indices ending there (from 0
    when fewer precede it), as QEfficient's `filter_hidden_states`."""
    last = position_ids.argmax(dim=1, keepdim=True)  # [B, 1]
    if num_logits_to_keep is None:
        return last
    n = num_logits_to_keep.shape[0]
    lower = torch.where(last < n, torch.zeros_like(last), last + 1 - n)
    return lower + torch.arange(n, device=position_ids.device)[None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = int(x.shape[-1]) // 2  # head sizes are static: a constant in the graph, not a Shape/Gather/Div chain
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q, k [B,H,S,D]; cos, sin [B,S,R] with R <= D (partial rotary leaves the last D-R dims alone)."""
    cos, sin = cos[:, None], sin[:, None]
    r = int(cos.shape[-1])
    if r == int(q.shape[-1]):
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    q_rot, q_pass, k_rot, k_pass = q[..., :r], q[..., r:], k[..., :r], k[..., r:]
    return (torch.cat([q_rot * cos + rotate_half(q_rot) * sin, q_pass], dim=-1),
            torch.cat([k_rot * cos + rotate_half(k_rot) * sin, k_pass], dim=-1))


def cached_attention(q, k, v, past_key, past_value, position_ids, masked, ctx_indices, scaling: float,
                     batch_index=None):
    """Write k, v into the retained buffers, read the context back and attend. Returns (out [B,S,H*D], key, value).
    With `batch_index` [B,1] (continuous batching) the buffers hold `full_batch_size` slots and row b uses slot
    `batch_index[b]` (CtxScatterCB / CtxGatherCB).

    Grouped-query heads are handled by folding the query heads of one KV head into the sequence axis
    (no copy of the cache per query head)."""
    if batch_index is None:
        key = ctx_scatter(past_key, position_ids, k)
        value = ctx_scatter(past_value, position_ids, v)
        keys = ctx_gather(key, ctx_indices)
        values = ctx_gather(value, ctx_indices)
    else:
        key = ctx_scatter_cb(past_key, batch_index, position_ids, k)
        value = ctx_scatter_cb(past_value, batch_index, position_ids, v)
        keys = ctx_gather_cb(key, batch_index, ctx_indices)
        values = ctx_gather_cb(value, batch_index, ctx_indices)
    b, s = q.shape[0], q.shape[2]
    heads, d, kv_heads = int(q.shape[1]), int(q.shape[3]), int(keys.shape[1])  # static sizes: graph constants
    rep = heads // kv_heads
    qg = q.reshape(b, kv_heads, rep * s, d)
    scores = torch.matmul(qg, keys.transpose(2, 3)) * scaling
    if rep > 1 and masked.shape[2] != rep * s:  # the model folds the mask once per call; a direct caller may not
        masked = masked[:, :, None].expand(b, 1, rep, s, masked.shape[-1]).reshape(b, 1, rep * s, -1)
    scores = torch.where(masked, torch.full((), MASK_VALUE, dtype=scores.dtype), scores)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs, values).reshape(b, heads, s, d)
    return out.transpose(1, 2).reshape(b, s, heads * d), key, value


# ----------------------------------------------------------------------------- replacement blocks (mixins)
class KVRMSNorm:
    """RMSNorm as the CustomRMSNorm op (fp32 inside). `_rms_weight` lets Gemma scale by 1 + weight."""

    def _rms_eps(self) -> float:
        return getattr(self, "variance_epsilon", getattr(self, "eps", 1e-6))

    def _rms_weight(self) -> torch.Tensor:
        return self.weight

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self._rms_weight(), self._rms_eps())


class KVRotaryTable:
    """RoPE cos/sin as tables over every position, built once at swap time from the module's own frequencies
    (non-persistent buffers: the state dict does not change)."""

    def qeff_init(self) -> None:
        rope_type = getattr(self, "rope_type", "default")
        if rope_type not in STATIC_ROPE_TYPES:
            raise UnsupportedConfigError(
                f"rope_type {rope_type!r} changes with the sequence length; the retained-state blocks index "
                f"precomputed tables and support {sorted(STATIC_ROPE_TYPES)}.")
        positions = torch.arange(self.original_max_seq_len, dtype=torch.float32)
        freqs = positions[:, None] * self.inv_freq.to(torch.float32)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_table", emb.cos() * self.attention_scaling, persistent=False)
        self.register_buffer("sin_table", emb.sin() * self.attention_scaling, persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        index = position_ids.clamp(min=0)  # padding (-1) reads row 0; its result is masked anyway
        return self.cos_table[index].to(x.dtype), self.sin_table[index].to(x.dtype)


class KVAttention:
    """Attention over the retained cache. Families override `project_qkv` / `project_out` when their
    projections differ (fused qkv, Conv1D)."""

    def kv_heads_and_dim(self) -> tuple[int, int]:
        return self.config.num_key_value_heads, self.head_dim

    def project_qkv(self, hidden_states: torch.Tensor):
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        return q, k, v

    def project_out(self, attn_output: torch.Tensor) -> torch.Tensor:
        return self.o_proj(attn_output)

    def forward(self, hidden_states, rope, position_ids, masked, ctx_indices, past_key, past_value, batch_index=None):
        q, k, v = self.project_qkv(hidden_states)
        if rope is not None:
            q, k = apply_rope(q, k, *rope)
        out, key, value = cached_attention(q, k, v, past_key, past_value, position_ids, masked, ctx_indices,
                                           self.scaling, batch_index)
        return self.project_out(out), key, value


class KVDecoderLayer:
    """Pre-norm block: x + attn(norm1(x)), then x + mlp(norm2(x)). Names of the four parts per family."""

    norm1_name, attn_name, norm2_name, mlp_name = "input_layernorm", "self_attn", "post_attention_layernorm", "mlp"

    def forward(self, hidden_states, rope, position_ids, masked, ctx_indices, past_key, past_value, batch_index=None):
        attn_out, key, value = getattr(self, self.attn_name)(
            getattr(self, self.norm1_name)(hidden_states), rope, position_ids, masked, ctx_indices, past_key, past_value,
            batch_index)
        hidden_states = hidden_states + attn_out
        hidden_states = hidden_states + getattr(self, self.mlp_name)(getattr(self, self.norm2_name)(hidden_states))
        return hidden_states, key, value


class KVDecoderModel:
    """The decoder stack: embeddings, layers over the retained cache, final norm."""

    layers_name, norm_name, rotary_name = "layers", "norm", "rotary_emb"

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def sliding_windows(self, num_layers: int) -> list[int | None]:
        """Each layer's sliding window (None: full causal attention). As HF Mistral / Phi-3: one mask for every
        layer, sliding when `config.sliding_window` is set; Qwen2 overrides it per layer type."""
        return [getattr(self.config, "sliding_window", None)] * num_layers

    def forward(self, input_ids, position_ids, past_key_values, batch_index=None):
        hidden = self.embed(input_ids, position_ids)
        rotary = getattr(self, self.rotary_name) if self.rotary_name else None
        rope = rotary(hidden, position_ids) if rotary is not None else None
        ctx_len = past_key_values[0][0].shape[2]
        windows = self.sliding_windows(len(past_key_values))
        rep = self.config.num_attention_heads // past_key_values[0][0].shape[1]
        masks = {}
        for window in dict.fromkeys(windows):  # one mask per distinct window, built once, not in every layer
            masked, ctx_indices = kv_masks(position_ids, ctx_len, window)
            if rep > 1:  # grouped-query heads: the mask folded to [B, 1, rep * S, ctx]
                b, _, s, ctx = masked.shape
                masked = masked[:, :, None].expand(b, 1, rep, s, ctx).reshape(b, 1, rep * s, ctx)
            masks[window] = masked
        new_past = []
        for layer, window, (past_key, past_value) in zip(getattr(self, self.layers_name), windows, past_key_values):
            hidden, key, value = layer(hidden, rope, position_ids, masks[window], ctx_indices, past_key, past_value,
                                       batch_index)
            new_past.append((key, value))
        return getattr(self, self.norm_name)(hidden), new_past


class KVCausalLM:
    """`model(input_ids, position_ids, past_key_values, batch_index=None) -> (logits [B,1,V] fp32, new_past)`;
    logits only at each row's last valid position (argmax of position_ids). With `batch_index` [B,1] the cache
    has `full_batch_size` slots and row b reads and writes slot `batch_index[b]` (continuous batching). With
    `num_logits_to_keep` [n, 1] (a speculative-decoding target) logits [B, n, V] (see kept_logit_indices)."""

    base_name, head_name = "model", "lm_head"

    def forward(self, input_ids, position_ids, past_key_values, batch_index=None, num_logits_to_keep=None):
        hidden, new_past = getattr(self, self.base_name)(input_ids, position_ids, past_key_values, batch_index)
        index = kept_logit_indices(position_ids, num_logits_to_keep)  # [B, n]
        hidden = torch.gather(hidden, 1, index[:, :, None].expand(-1, -1, hidden.shape[-1]))
        if num_logits_to_keep is None:
            hidden = hidden.reshape(-1, hidden.shape[-1])[:, None]  # a static 1 in the graph: logits [B, 1, vocab]
        logits = self.final_logits(getattr(self, self.head_name)(hidden))
        return logits.to(torch.float32), new_past

    def final_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def kv_cache_layout(self) -> list[tuple[int, int]]:
        """(kv_heads, head_dim) of each layer, in order."""
        return [m.kv_heads_and_dim() for m in self.modules() if isinstance(m, KVAttention)]

    def new_kv_cache(self, batch_size: int, ctx_len: int, dtype=torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(torch.zeros(batch_size, h, ctx_len, d, dtype=dtype), torch.zeros(batch_size, h, ctx_len, d, dtype=dtype))
                for h, d in self.kv_cache_layout()]


# ----------------------------------------------------------------------------- families and the swap
@dataclass
class Family:
    """One model family: its HF causal-LM class, the exact-class swap table, and the reasons shown per swap."""

    name: str
    model_type: str
    causal_lm: type
    swaps: dict[type, type]
    why: dict[type, str] = field(default_factory=dict)
    hf_module: str = ""  # module holding the family's HF classes (for the "left unswapped" report)
    uses_rope: bool = True

    def __post_init__(self):
        self.hf_module = self.hf_module or self.causal_lm.__module__
        self.why = {**default_why(self.swaps), **self.why}

    def check(self, config) -> None:
        """Raise UnsupportedConfigError for a configuration these blocks would not reproduce exactly."""
        if self.uses_rope:
            rope = getattr(config, "rope_parameters", None) or {}
            rope_type = rope.get("rope_type", "default")
            if rope_type not in STATIC_ROPE_TYPES:
                raise UnsupportedConfigError(
                    f"{self.name}: rope_type {rope_type!r} changes with the sequence length; the retained-state "
                    f"blocks index precomputed tables and support {sorted(STATIC_ROPE_TYPES)}.")
        if getattr(config, "add_cross_attention", False):
            raise UnsupportedConfigError(f"{self.name}: cross-attention decoders are not supported.")

    def max_ctx_len(self, config) -> tuple[int, str]:
        """The largest ctx_len these blocks reproduce exactly for `config`, and why. A sliding window does not
        limit it: every layer keeps the whole ctx_len buffer and the mask applies the window at real positions."""
        return (getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None),
                "max_position_embeddings")


STANDARD_WHY = {
    KVCausalLM: "logits only at the last valid position (argmax of position_ids), in fp32; cache in and out",
    KVDecoderModel: "retained KV buffers per layer; mask kv_index > position; gather limit per row",
    KVDecoderLayer: "passes the layer's cache buffers through",
    KVAttention: "CtxScatter at position_ids, CtxGather of the context, where-mask, fp32 softmax",
    KVRMSNorm: "CustomRMSNorm op (fp32 inside; x*x overflows fp16 when |x| > 256)",
    KVRotaryTable: "cos/sin tables for max_position_embeddings indexed by position_ids (no trig in graph)",
}


def default_why(table: dict[type, type]) -> dict[type, str]:
    out = {}
    for old, new in table.items():
        for base, reason in STANDARD_WHY.items():
            if issubclass(new, base):
                out[old] = reason
    return out


@dataclass
class SwapResult(TransformResult):
    """A module-swap report: `changes` are the swapped modules; `kept` the family's modules left as they are."""

    kept: list[Change] = field(default_factory=list)

    def to_frame(self) -> pd.DataFrame:
        rows = [{**vars(c), "status": "swapped"} for c in self.changes] + [{**vars(c), "status": "kept"} for c in self.kept]
        return pd.DataFrame(rows, columns=["place", "before", "after", "status", "why"])

    def summary_frame(self) -> pd.DataFrame:
        """One row per (class, replacement): how many modules, swapped or kept."""
        df = self.to_frame()
        if df.empty:
            return pd.DataFrame(columns=["before", "after", "status", "count"])
        return (df.groupby(["before", "after", "status"], sort=False).size().reset_index(name="count"))

    def summary(self) -> str:
        base = super().summary()
        return base + (f", {len(self.kept)} kept" if self.kept else "")

    def __repr__(self) -> str:
        return f"<SwapResult {self.summary()}>"


KEPT_WHY = "works on one token's hidden state; runs unchanged over the retained cache"


def kv_cache_transform(model: nn.Module, family: Family) -> SwapResult:
    """Swap `family`'s HF classes for the retained-state blocks (exact classes only) and report the modules
    of that family's classes that stay as they are (and any subclass the table does not know)."""
    family.check(model.config)
    swapped = swap_modules(model, family.swaps, "RetainedStateKVCache", family.why)
    result = SwapResult(swapped.name, swapped.changes)
    for path, module in model.named_modules():
        cls = type(module)
        if "RetainedStateKVCache" in swapped_by(module):
            continue
        if cls.__module__ == family.hf_module:
            result.kept.append(Change(path or "<root>", cls.__name__, cls.__name__, KEPT_WHY))
        elif any(issubclass(cls, k) for k in family.swaps):
            result.kept.append(Change(path or "<root>", cls.__name__, cls.__name__,
                                      "subclass of a known class: not swapped (exact classes only)"))
    for module in model.modules():
        if "RetainedStateKVCache" in swapped_by(module):
            init = getattr(module, "qeff_init", None)
            if init is not None:
                init()
    if not result.changes:
        result.notes.append(f"no module of {family.name}'s classes ({', '.join(sorted(c.__name__ for c in family.swaps))})")
    return result
