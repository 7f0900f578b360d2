"""On-disk cache of encoded corpora, keyed by model and texts, so re-runs never re-encode."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from colengine.embeddings import PackedEmbeddings
from colengine.encoder import Encoder
from colengine.storage import Bundle, is_index, load_bundle, save_bundle

__all__ = ["model_fingerprint", "texts_fingerprint", "cached_encode_documents", "default_cache_dir"]


def default_cache_dir() -> Path:
    """``$COLENGINE_CACHE`` or ``~/.cache/colengine``."""
    return Path(os.environ.get("COLENGINE_CACHE", Path.home() / ".cache" / "colengine"))


def model_fingerprint(encoder: Encoder) -> str:
    """Hash of the encoder's settings and weights (names, shapes and sums of every tensor)."""
    h = hashlib.blake2b(digest_size=12)
    h.update(json.dumps(encoder.describe(), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in encoder.model.state_dict().items():
            h.update(f"{name}{tuple(p.shape)}{float(p.double().sum()):.10e}".encode())
    return h.hexdigest()


def texts_fingerprint(texts: Sequence[str]) -> str:
    h = hashlib.blake2b(digest_size=12)
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def cached_encode_documents(
    encoder: Encoder,
    texts: Sequence[str],
    *,
    cache_dir: str | os.PathLike | None = None,
    show_progress: bool = True,
) -> PackedEmbeddings:
    """``encoder.encode_documents(texts)``, read from / written to ``cache_dir`` (float16).

    The key is (model fingerprint, texts fingerprint), so a changed model or corpus never
    reuses stale vectors. Entries are ordinary colengine bundles (atomic, checksummed).
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = f"{model_fingerprint(encoder)}-{texts_fingerprint(texts)}"
    path = root / "encoded" / key
    if is_index(path):
        b = load_bundle(path, kind="encoded-corpus", mmap=True, verify=False)
        return PackedEmbeddings(b.arrays["tokens"], np.asarray(b.arrays["offsets"]))
    docs = encoder.encode_documents(texts, show_progress=show_progress)
    save_bundle(path, Bundle(
        kind="encoded-corpus",
        meta={"model": encoder.describe(), "n_documents": len(docs)},
        arrays={"tokens": docs.tokens, "offsets": docs.offsets},
    ))
    return docs
