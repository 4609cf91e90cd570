"""Override (named, small): RoPE cos/sin from tables indexed by position_ids. Why: the device runs the graph in fp16,
where `position * inv_freq` then cos/sin loses the angle at large positions; AI 100 graphs index precomputed tables.

Generic over every HF rotary module of the usual shape (`inv_freq` buffer, `forward(x, position_ids) -> (cos, sin)`):
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


def is_rotary(module: nn.Module) -> bool:
    if not isinstance(getattr(module, "inv_freq", None), torch.Tensor):
        return False
    params = list(inspect.signature(type(module).forward).parameters)
    return params[1:] == ["x", "position_ids"]


def _table_forward(self, x: torch.Tensor, position_ids: torch.Tensor):
    index = position_ids.clamp(min=0)
    return self.qeff_cos_table[index].to(x.dtype), self.qeff_sin_table[index].to(x.dtype)


def apply_rope_tables(model: nn.Module, max_positions: int) -> tuple[list[Change], list[str]]:
    """(changes, notes): rotary modules of another shape keep computing cos/sin at run time, and are noted."""
    changes, notes = [], []
    for path, module in model.named_modules():
        if "qeff_cos_table" in module._buffers:
            continue
        if not is_rotary(module):
            if (isinstance(getattr(module, "inv_freq", None), torch.Tensor)
                    or type(module).__name__.endswith("RotaryEmbedding")):
                notes.append(f"{path} ({type(module).__name__}): forward{inspect.signature(type(module).forward)} is "
                             "not (x, position_ids); cos/sin stay computed at run time (trigonometry in the graph)")
            continue
        with torch.no_grad():
            positions = torch.arange(max_positions, device=module.inv_freq.device)[None]
            cos, sin = type(module).forward(module, torch.zeros((), dtype=torch.float32), positions)
        module.register_buffer("qeff_cos_table", cos[0].float(), persistent=False)
        module.register_buffer("qeff_sin_table", sin[0].float(), persistent=False)
        module.forward = types.MethodType(_table_forward, module)
        name = type(module).__name__
        changes.append(Change(path, name, f"{name} (tables [{max_positions}, {cos.shape[-1]}])", WHY))
    return changes, notes


def remove_rope_tables(model: nn.Module) -> None:
    for module in model.modules():
        if "qeff_cos_table" in module._buffers:
            del module._buffers["qeff_cos_table"], module._buffers["qeff_sin_table"]
            del module.forward
