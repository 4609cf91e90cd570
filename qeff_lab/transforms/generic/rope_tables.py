"""Override (named, small): RoPE cos/sin from tables indexed by position_ids. Why: the device runs the graph in fp16,
where `position * inv_freq` then cos/sin loses the angle at large positions; AI 100 graphs index precomputed tables.

Generic over every HF rotary module of the usual shapes (`inv_freq` buffer, `forward(x, position_ids) -> (cos, sin)`;
or one `{layer_type}_inv_freq` buffer per layer type, `forward(x, position_ids, layer_type)`, one table per type):
the table is the module's *own* forward evaluated once over `arange(max_positions)` in fp32, so every static rope
variant (default, linear, llama3, yarn, partial rotary, attention scaling) is reproduced bit for bit (each angle
is one product, the same in the table as at run time). Tables are non-persistent buffers: the state dict does not
change. Dynamic rope types (frequencies that depend on the sequence length) are refused by `support.py`.
"""
from __future__ import annotations

import inspect
import types

import torch
from torch import nn

from qeff_lab.pipeline import Change

WHY = ("cos/sin tables over max_position_embeddings from the module's own forward, indexed by position_ids "
       "(no trigonometry in the graph; exact)")


def rotary_kinds(module: nn.Module) -> list[str | None] | None:
    """The tables a rotary module needs: [None] for `forward(x, position_ids)` over `inv_freq`; the layer types
    for `forward(x, position_ids, layer_type)` over `{layer_type}_inv_freq` buffers (and None too when
    `layer_type` may be omitted and an `inv_freq` exists); None when the module is not a rotary of these shapes."""
    params = inspect.signature(type(module).forward).parameters
    names = list(params)[1:]
    plain = isinstance(getattr(module, "inv_freq", None), torch.Tensor)
    if names == ["x", "position_ids"]:
        return [None] if plain else None
    if names != ["x", "position_ids", "layer_type"]:
        return None
    kinds = [n[:-len("_inv_freq")] for n, b in module.named_buffers(recurse=False)
             if n.endswith("_inv_freq") and not n.endswith("_original_inv_freq") and n != "inv_freq"]
    if plain and params["layer_type"].default is not inspect.Parameter.empty:
        kinds.append(None)
    return kinds or None


def is_rotary(module: nn.Module) -> bool:
    return rotary_kinds(module) is not None


def _suffix(kind: str | None) -> str:
    return "" if kind is None else f"_{kind}"


def _table_forward(self, x: torch.Tensor, position_ids: torch.Tensor, layer_type: str | None = None):
    index = position_ids.clamp(min=0)
    suffix = _suffix(layer_type)
    return (getattr(self, "qeff_cos_table" + suffix)[index].to(x.dtype),
            getattr(self, "qeff_sin_table" + suffix)[index].to(x.dtype))


def _has_tables(module: nn.Module) -> bool:
    return any(name.startswith("qeff_cos_table") for name in module._buffers)


def apply_rope_tables(model: nn.Module, max_positions: int) -> tuple[list[Change], list[str]]:
    """(changes, notes): rotary modules of another shape keep computing cos/sin at run time, and are noted."""
    changes, notes = [], []
    for path, module in model.named_modules():
        if _has_tables(module):
            continue
        kinds = rotary_kinds(module)
        if kinds is None:
            if (isinstance(getattr(module, "inv_freq", None), torch.Tensor)
                    or type(module).__name__.endswith("RotaryEmbedding")):
                notes.append(f"{path} ({type(module).__name__}): forward{inspect.signature(type(module).forward)} is "
                             "not (x, position_ids[, layer_type]); cos/sin stay computed at run time (trigonometry in "
                             "the graph)")
            continue
        sizes = []
        for kind in kinds:
            buffer = getattr(module, "inv_freq" if kind is None else f"{kind}_inv_freq")
            with torch.no_grad():
                positions = torch.arange(max_positions, device=buffer.device)[None]
                args = () if kind is None else (kind,)
                cos, sin = type(module).forward(module, torch.zeros((), dtype=torch.float32), positions, *args)
            module.register_buffer("qeff_cos_table" + _suffix(kind), cos[0].float(), persistent=False)
            module.register_buffer("qeff_sin_table" + _suffix(kind), sin[0].float(), persistent=False)
            sizes.append(f"{kind + ': ' if kind else ''}[{max_positions}, {cos.shape[-1]}]")
        module.forward = types.MethodType(_table_forward, module)
        name = type(module).__name__
        changes.append(Change(path, name, f"{name} (tables {', '.join(sizes)})", WHY))
    return changes, notes


def remove_rope_tables(model: nn.Module) -> None:
    for module in model.modules():
        if _has_tables(module):
            for name in [n for n in module._buffers if n.startswith(("qeff_cos_table", "qeff_sin_table"))]:
                del module._buffers[name]
            del module.forward
