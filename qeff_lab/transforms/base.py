"""Module swaps, the one helper every class-swapping transform uses (KV blocks, encoder masks, precision fixes,
the accuracy ladder's revert): change `__class__`, report each change, and undo it later.

Only `__class__` changes: the replacement classes subclass the originals and add no parameters, so every
parameter object and state-dict key stays the same (weight-preserving by construction; tests check it). Each
swapped module remembers what it was, per transform name, so `unswap_modules` restores exactly that.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from qeff_lab.pipeline import Change, TransformResult

_HISTORY = "_qeff_swaps"  # instance attribute: [(transform name, previous class), ...], newest last

# (path, module) -> (new class, why) to swap, or None to leave it
Chooser = Callable[[str, nn.Module], "tuple[type, str] | None"]


def swap_modules(model: nn.Module, table: dict[type, type] | Chooser, name: str,
                 why: dict[type, str] | str = "") -> TransformResult:
    """Swap the class of every module whose *exact* class is a key of `table` (or for which the chooser
    returns a class). Returns a TransformResult with one Change per swapped module."""
    choose = table if callable(table) else _table_chooser(table, why)
    result = TransformResult(name)
    for path, module in model.named_modules():
        choice = choose(path, module)
        if choice is None:
            continue
        new, reason = choice
        old = type(module)
        module.__dict__.setdefault(_HISTORY, []).append((name, old))
        module.__class__ = new
        result.changes.append(Change(path or "<root>", old.__name__, new.__name__, reason))
    if not result.changes and not callable(table):
        result.notes.append(f"no module of a known class ({', '.join(sorted(c.__name__ for c in table))})")
    return result


def unswap_modules(model: nn.Module, name: str, only: Callable[[str, nn.Module], bool] | None = None) -> TransformResult:
    """Undo transform `name` where it was the latest swap of a module (and `only(path, module)` agrees): each
    such module gets back the class it had before. Reports one Change per module restored."""
    result = TransformResult(f"undo {name}")
    for path, module in model.named_modules():
        history = module.__dict__.get(_HISTORY)
        if not history or history[-1][0] != name or (only is not None and not only(path, module)):
            continue
        _, previous = history.pop()
        current = type(module)
        module.__class__ = previous
        result.changes.append(Change(path or "<root>", current.__name__, previous.__name__, f"undo {name}"))
    if not result.changes:
        result.notes.append(f"no module swapped by {name}")
    return result


def swapped_by(module: nn.Module) -> list[str]:
    """Names of the transforms that swapped this module's class, oldest first."""
    return [name for name, _ in module.__dict__.get(_HISTORY, [])]


def _table_chooser(table: dict[type, type], why: dict[type, str] | str) -> Chooser:
    def choose(path: str, module: nn.Module):
        new = table.get(type(module))
        if new is None:
            return None
        return new, why if isinstance(why, str) else why.get(type(module), "")

    return choose
