"""Module swaps driven by tables (exact HF class -> qeff_lab class), reported change by change."""
from __future__ import annotations

from torch import nn

from qeff_lab.pipeline import Change, TransformResult


def swap_modules(model: nn.Module, table: dict[type, type], name: str, why: dict[type, str] | str) -> TransformResult:
    """Replace the class of every module whose *exact* class is a key of `table`.

    Only `__class__` changes: the replacement classes subclass the originals and add no parameters, so
    every parameter object and state-dict key stays the same (the swap is weight-preserving by
    construction, and tests check it).
    """
    result = TransformResult(name)
    for path, module in model.named_modules():
        old = type(module)
        new = table.get(old)
        if new is None:
            continue
        module.__class__ = new
        reason = why if isinstance(why, str) else why.get(old, "")
        result.changes.append(Change(path or "<root>", old.__name__, new.__name__, reason))
    if not result.changes:
        result.notes.append(f"no module of a known class ({', '.join(sorted(c.__name__ for c in table))})")
    return result
