"""Named overrides: model types the generic interfaces cannot reach as they are, one small file each.

Most are models whose attention does not dispatch through AttentionInterface (transformers refuses
`set_attn_implementation` for them) but still does what the retained-state path needs: it calls
`cache.update(k, v, layer_idx)` and adds the 4D mask that `create_causal_mask` builds from
`config._attn_implementation`. An override therefore:
- sets `config._attn_implementation` to the retained attention name directly, so `create_causal_mask` reaches the
  retained mask (AttentionMaskInterface: the causal mask at position_ids against arange(ctx_len)); the model's own
  attention reads the name only to pick its sdpa / flash branches, so any other name runs its eager code;
- replaces, where a module-level helper does not export (falcon's ALiBi builder), that helper by a twin computing
  the same values (`install()` in the file);
- swaps (`SWAPS` in the file), where the model's own code cannot take the retained cache as it is, a module class
  for a subclass: gpt_neo (a mask buffer sliced as if the queries were the last key slots), openai-gpt (no KV cache
  at all), llama4_text (complex rotary; positions from cache.get_seq_length()), trocr (positions from
  cache.get_seq_length(): the decoder has no position_ids), jetmoe (MoE routing with data-dependent split sizes,
  run densely), dbrx (experts loop over the experts hit, outside ExpertsInterface: run densely).
support.py skips its source checks (AttentionInterface dispatch, positions from the cache length) for the types
listed here; the transform's probe forward and the tests still run them. Each file's first line says why it exists;
MLP, norms, rotary and ALiBi stay the model's own code wherever they can.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from torch import nn

from qeff_lab.pipeline import Change
from qeff_lab.transforms.base import swap_modules, unswap_modules

NAME = "GenericRetainedStateOverride"
# model type -> file in this package
OVERRIDES = {"bloom": "bloom", "dbrx": "dbrx", "falcon": "falcon", "gpt_neo": "gpt_neo",
             "gpt_neox_japanese": "gpt_neox_japanese", "jetmoe": "jetmoe", "llama4_text": "llama4_text",
             "mpt": "mpt", "openai-gpt": "openai_gpt", "trocr": "trocr", "xglm": "xglm"}


def override_for(model_type: str) -> ModuleType | None:
    """The override module of a model type, or None when the generic interfaces reach it."""
    name = OVERRIDES.get(model_type)
    return importlib.import_module(f"{__name__}.{name}") if name else None


def why(module: ModuleType) -> str:
    return (module.__doc__ or "").strip().splitlines()[0]


def apply_override(model: nn.Module, attention_name: str) -> list[Change] | None:
    """Put `model` on its named override (None when it has none): config attention name, then the file's swaps."""
    config = model.config
    module = override_for(config.model_type)
    if module is None:
        return None
    if hasattr(module, "install"):  # a value-identical, exportable twin of a module-level function
        module.install()
    old = config._attn_implementation
    config._attn_implementation = attention_name
    changes = [Change("config._attn_implementation", str(old), attention_name,
                      f"named override {module.__name__.rsplit('.', 1)[-1]}.py: {why(module)}")]
    swaps = getattr(module, "SWAPS", {})
    if swaps:
        changes.extend(swap_modules(model, swaps, NAME, why(module)).changes)
    return changes


def undo_override(model: nn.Module, old_attention: str) -> None:
    model.config._attn_implementation = old_attention
    unswap_modules(model, NAME)
