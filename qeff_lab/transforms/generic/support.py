"""Can the generic retained-state path run this model? One line naming the model type, the obstacle and what to do.

Checks from the config and the model's own source, before anything is loaded or changed; the transform then
confirms with one probe forward (which also catches what source reading cannot, e.g. a model that never calls
`cache.update`).
"""
from __future__ import annotations

import ast
import importlib
import inspect
from dataclasses import dataclass
from functools import lru_cache

from qeff_lab.transforms.generic.overrides import override_for

# Config fields that only state-space / recurrent / linear-attention models carry.
RECURRENT_FIELDS = ("ssm_state_size", "state_size", "mamba_d_state", "mamba_expand", "conv_kernel", "d_conv",
                    "layers_block_type", "hybrid_override_pattern", "attn_layer_period", "block_types",
                    "linear_attn_config", "rwkv_version", "time_step_rank", "lru_width")
ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention", "chunked_attention"}
DYNAMIC_ROPE = {"dynamic", "longrope"}


@dataclass(frozen=True)
class Support:
    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok

    def __repr__(self) -> str:
        return "<Support ok>" if self.ok else f"<Support no: {self.reason}>"


def _modeling_module(config):
    """The modeling file of the config's causal-LM class (llama4_text lives in models/llama4), else by model type."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return importlib.import_module(MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].__module__)
    except (KeyError, ValueError, ImportError, AttributeError):
        pass
    model_type = getattr(config, "model_type", "")
    try:
        return importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    except ImportError:
        return None


@lru_cache(maxsize=None)
def _positions_from_seq_length(module_name: str) -> tuple[str, ...]:
    """Methods that build positions from `cache.get_seq_length()` (a name assigned from it, then used in an
    `arange`) outside an `if position_ids is None:` branch. The retained cache's get_seq_length is only a buffer
    size (ctx_len - new tokens): fine for sizing a padding mask or ALiBi, wrong as a position."""
    source = inspect.getsource(importlib.import_module(module_name))
    found = []

    class Visitor(ast.NodeVisitor):
        def __init__(self):
            self.cls, self.func, self.guarded, self.names = None, None, 0, set()

        def visit_ClassDef(self, node):
            outer, self.cls = self.cls, node.name
            self.generic_visit(node)
            self.cls = outer

        def visit_FunctionDef(self, node):
            outer, outer_names, self.func, self.names = self.func, self.names, node.name, set()
            self.generic_visit(node)
            self.func, self.names = outer, outer_names

        def visit_If(self, node):
            guard = "position_ids" in ast.unparse(node.test) and "None" in ast.unparse(node.test)
            self.guarded += guard
            for child in node.body:
                self.visit(child)
            self.guarded -= guard
            for child in node.orelse:
                self.visit(child)

        def visit_Assign(self, node):
            text = ast.unparse(node.value)
            if "get_seq_length" in text:
                self.names.update(t.id for t in node.targets if isinstance(t, ast.Name))
            elif not self.guarded and "arange" in text and any(n in text for n in self.names):
                found.append(f"{self.cls}.{self.func}")
            self.generic_visit(node)

    Visitor().visit(ast.parse(source))
    return tuple(dict.fromkeys(found))


@lru_cache(maxsize=None)
def _classes_calling(module_name: str, methods: tuple[str, ...]) -> tuple[str, ...]:
    """Classes of a modeling file whose methods call any of `methods` (e.g. the recurrent-state updates)."""
    tree = ast.parse(inspect.getsource(importlib.import_module(module_name)))
    found = []
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        if any(isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute) and c.func.attr in methods
               for c in ast.walk(cls)):
            found.append(cls.name)
    return tuple(found)


@lru_cache(maxsize=None)
def _reads_is_decoder(module_name: str) -> bool:
    """Whether the modeling code reads `config.is_decoder` (BERT-style stacks: causal and cached only when set)."""
    tree = ast.parse(inspect.getsource(importlib.import_module(module_name)))
    return any(isinstance(n, ast.Attribute) and n.attr == "is_decoder" and isinstance(n.ctx, ast.Load)
               and "config" in ast.unparse(n.value) for n in ast.walk(tree))


RECURRENT_CALLS = ("update_conv_state", "update_recurrent_state", "get_recurrent_state", "get_conv_state")
UNSUPPORTED_TODO = "not supported by the retained-state path (run it with transformers' own generate instead)"


def _recurrent_layers(config) -> str:
    module = _modeling_module(config)
    names = _classes_calling(module.__name__, RECURRENT_CALLS) if module is not None else ()
    return ", ".join(names[:2]) or "its recurrent layers"


KV_CACHE_ARGS = ("cache", "past_key_values")


def _own_recurrent_state(config) -> str:
    """What carries the model's state between calls when it is no transformers `Cache` of keys and values: a
    `state` argument of the causal-LM forward in place of a cache (rwkv), or a `...Cache` class of the modeling
    file that is not a transformers Cache (xlstm's xLSTMCache). '' when neither."""
    from transformers.cache_utils import Cache
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        model_cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except (KeyError, ValueError):
        return ""
    params = inspect.signature(model_cls.forward).parameters
    if "state" in params and not any(a in params for a in KV_CACHE_ARGS):
        return f"{model_cls.__name__}.forward takes a `state` in place of a cache"
    module = inspect.getmodule(model_cls)
    own = [name for name, obj in vars(module).items() if isinstance(obj, type) and obj.__module__ == module.__name__
           and name.endswith("Cache") and not issubclass(obj, Cache)]
    return f"{own[0]} (not a transformers Cache) holds its state" if own else ""


def check_support(config_or_model) -> Support:
    """Whether `generic_kv_transform` can run this config / model exactly; if not, a one-line reason."""
    config = getattr(config_or_model, "config", config_or_model)
    mt = getattr(config, "model_type", None) or type(config).__name__
    if getattr(config, "is_encoder_decoder", False):
        return Support(False, f"{mt}: encoder-decoder (its decoder's cross-attention reads encoder states, which a "
                              "retained self-attention cache does not hold); use a decoder-only model, or an "
                              "encoder-decoder override that exports encoder and decoder separately.")
    if getattr(config, "add_cross_attention", False):
        return Support(False, f"{mt}: cross-attention layers (add_cross_attention=True) read encoder states the "
                              "retained cache does not hold; load the model without cross-attention.")
    layer_types = getattr(config, "layer_types", None) or []
    other = sorted(set(layer_types) - ATTENTION_LAYER_TYPES)
    if other:
        return Support(False, f"{mt}: {_recurrent_layers(config)} (layer type {', '.join(other)}) keeps a "
                              "state-space / recurrent state, not a [kv_heads, ctx_len, head_dim] KV cache; "
                              f"{UNSUPPORTED_TODO}.")
    fields = [f for f in RECURRENT_FIELDS if getattr(config, f, None) is not None]
    if fields:
        return Support(False, f"{mt}: {_recurrent_layers(config)} keeps a state-space / recurrent state (config has "
                              f"{', '.join(fields)}), not a [kv_heads, ctx_len, head_dim] KV cache; {UNSUPPORTED_TODO}.")
    if getattr(config, "kv_lora_rank", None) is not None:
        return Support(False, f"{mt}: multi-head latent attention (kv_lora_rank={config.kv_lora_rank}); keys and "
                              "values are rebuilt from a compressed latent with different K/V head sizes, so a "
                              "retained [kv_heads, ctx_len, head_dim] buffer pair does not fit; needs an MLA override that retains "
                              "the compressed latent.")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_types = {rope.get("rope_type", rope.get("type"))} if isinstance(rope, dict) else set()
    if isinstance(rope, dict) and all(isinstance(v, dict) for v in rope.values()):  # per layer type
        rope_types = {v.get("rope_type") for v in rope.values()}
    if rope_types & DYNAMIC_ROPE:
        return Support(False, f"{mt}: rope_type {sorted(rope_types & DYNAMIC_ROPE)} recomputes frequencies from the "
                              "sequence length seen in each call; a compiled graph needs static frequencies. Use a "
                              "checkpoint with a static rope type (default, linear, llama3, yarn).")
    module = _modeling_module(config)
    if module is not None:
        calls = _positions_from_seq_length(module.__name__)
        if calls and override_for(mt) is None:
            return Support(False, f"{mt}: {calls[0]} builds positions from cache.get_seq_length() even when "
                                  "position_ids are given (a retained cache has no single length; each row's "
                                  "positions are its position_ids); needs a named override or the family swap path.")
        if (getattr(config, "is_decoder", None) is False and _reads_is_decoder(module.__name__)
                and override_for(mt) is None):  # trocr: TrOCRForCausalLM sets is_decoder=True itself
            return Support(False, f"{mt}: is_decoder=False makes its attention bidirectional (each token also sees "
                                  "the later ones, so earlier keys/values change with every new token) and turns "
                                  "its cache off; a retained KV cache needs causal attention. Load it with "
                                  "is_decoder=True (its causal decoder mode).")
        source = inspect.getsource(module)
        if "update_recurrent_state" in source or "update_conv_state" in source:
            return Support(False, f"{mt}: {_recurrent_layers(config)} keeps a recurrent / convolutional state "
                                  f"(cache.update_recurrent_state), not a KV cache; {UNSUPPORTED_TODO}.")
        if "ALL_ATTENTION_FUNCTIONS" not in source and override_for(mt) is None and (own := _own_recurrent_state(config)):
            return Support(False, f"{mt}: {own}, a state-space / recurrent state, not a [kv_heads, ctx_len, head_dim] "
                                  f"KV cache; {UNSUPPORTED_TODO}.")
        if "ALL_ATTENTION_FUNCTIONS" not in source and override_for(mt) is None:
            return Support(False, f"{mt}: its attention does not dispatch through AttentionInterface "
                                  "(set_attn_implementation cannot reach it); needs a named override.")
    return Support(True)
