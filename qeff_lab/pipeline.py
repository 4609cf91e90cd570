"""Step reports, transform results and the content-addressed artifact cache shared by every step."""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pandas as pd


# ----------------------------------------------------------------------------- views (filled by views/)
_VIEWS: dict[tuple[type, str], Callable[..., Any]] = {}


def register_view(cls: type, kind: str, view_fn: Callable[..., Any]) -> None:
    """views/ registers what it can show for a report type ("html", "dashboard", "report", ...); the report
    types never import views/ (the layer contract in tests/test_layers.py)."""
    _VIEWS[(cls, kind)] = view_fn


def show(obj: Any, kind: str = "html", *args: Any, **kwargs: Any) -> Any:
    """The view of `kind` registered for `obj`'s class (or a base class). The first call loads qeff_lab.views,
    which registers them all: a plugin lookup, so plain-data modules never import the views."""
    if not _VIEWS:
        importlib.import_module("qeff_lab.views")
    for klass in type(obj).__mro__:
        if (klass, kind) in _VIEWS:
            return _VIEWS[(klass, kind)](obj, *args, **kwargs)
    if kind == "html":
        import html

        return f"<pre>{html.escape(repr(obj))}</pre>"
    raise TypeError(f"No {kind!r} view for {type(obj).__name__}.")


class HtmlRepr:
    """Mixin for plain-data reports: in a notebook they render through the views registry."""

    def _repr_html_(self) -> str:
        return show(self, "html")


# ----------------------------------------------------------------------------- reports
@dataclass
class Change:
    """One change a transform made: where, what it was, what it became, and why."""

    place: str
    before: str
    after: str
    why: str


@dataclass
class TransformResult(HtmlRepr):
    """What a transform did. `changes` is empty when it found nothing to do, and `notes` says why."""

    name: str
    changes: list[Change] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def modified(self) -> bool:
        return bool(self.changes)

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([vars(c) for c in self.changes], columns=["place", "before", "after", "why"])

    def summary(self) -> str:
        if not self.changes:
            return f"{self.name}: nothing to change" + (f" ({self.notes[0]})" if self.notes else "")
        return f"{self.name}: {len(self.changes)} change(s)"

    def __repr__(self) -> str:
        return f"<TransformResult {self.summary()}>"


@dataclass
class StepReport(HtmlRepr):
    """One pipeline step as the user sees it: name, status, time taken, a one-line summary, details.

    `details` is plain data (a DataFrame, a dict, or a list of TransformResults) that views and tests read.
    """

    step: str
    status: str  # "done" | "reused" | "failed" | "skipped"
    seconds: float
    summary: str
    details: Any = None

    def __repr__(self) -> str:
        return f"<{self.step}: {self.status}, {self.summary}>"


@contextmanager
def timed() -> Iterator[Callable[[], float]]:
    """`with timed() as elapsed: ...; elapsed()` gives seconds since entry."""
    start = time.perf_counter()
    yield lambda: time.perf_counter() - start


# ----------------------------------------------------------------------------- hashing
def fingerprint(obj: Any) -> str:
    """A stable short hash of JSON-able data (dict keys sorted)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def state_dict_fingerprint(module) -> str:
    """Hash of every parameter and buffer (names, dtypes, shapes and bytes): two models with the same
    config and different weights never share an export."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- artifact cache
def cache_root() -> Path:
    """Where exports and compiles live: $QEFF_LAB_CACHE, else ~/.cache/qeff_lab."""
    return Path(os.environ.get("QEFF_LAB_CACHE", Path.home() / ".cache" / "qeff_lab"))


MANIFEST = "manifest.json"


def verify_artifact(folder: Path) -> bool:
    """True only if the folder holds a manifest and every file it lists with the recorded size and hash."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return False
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return False
    for rel, meta in files.items():
        p = folder / rel
        if not p.is_file() or p.stat().st_size != meta["size"] or file_sha256(p) != meta["sha256"]:
            return False
    return True


def build_artifact(folder: Path, key: dict, build: Callable[[Path], None]) -> tuple[Path, bool]:
    """Return (folder, reused). The folder is reused only when verify_artifact passes; otherwise it is
    removed and rebuilt: `build(tmp)` writes into a temporary sibling, which is renamed when complete, so
    a crash leaves either a complete folder or none. An exclusive lock on a sibling `.lock` file makes a
    second process that asks for the same folder wait and then reuse what the first one built."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _folder_lock(folder):
        if folder.exists():
            if verify_artifact(folder):
                return folder, True
            shutil.rmtree(folder)
        tmp = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.mkdir()
        try:
            build(tmp)
            files = {
                str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": file_sha256(p)}
                for p in sorted(tmp.rglob("*"))
                if p.is_file()
            }
            (tmp / MANIFEST).write_text(json.dumps({"key": key, "files": files}, indent=1, default=str))
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return folder, False


@contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """Exclusive advisory lock (fcntl.flock) on `.<name>.lock` beside `folder`; released when the process ends."""
    import fcntl

    with open(folder.with_name(f".{folder.name}.lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
