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

__all__ = ["model_fingerprint", "texts_fingerprint", "cached_encode_documents", "default_cache_dir",
           "EncodedChunks"]


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
    return _load_or_encode(encoder, texts, root / "encoded" / key, show_progress)


def _load_or_encode(encoder: Encoder, texts: Sequence[str], path: Path,
                    show_progress: bool) -> PackedEmbeddings:
    """The cache entry at ``path`` (memory-mapped), or ``texts`` encoded and saved there."""
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


class EncodedChunks:
    """``(ids, PackedEmbeddings)`` chunks of a corpus, encoded on first use and spooled to disk.

    A re-iterable for :meth:`PlaidIndex.build_from_iterator`: the first pass encodes each
    chunk of ``chunk_size`` texts and saves it under ``spool_dir`` (an ordinary cache entry,
    keyed by model and chunk texts); later passes, and a build resumed after a crash, read
    the saved chunks memory-mapped instead of encoding again. Only one chunk of float vectors
    is in memory at a time; the spool takes ``tokens x dim x 2`` bytes of disk.
    """

    def __init__(self, encoder: Encoder, texts: Sequence[str], ids: Sequence[str], *,
                 chunk_size: int, spool_dir: str | os.PathLike) -> None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        self.encoder, self.texts, self.ids = encoder, texts, list(ids)
        self.chunk_size = chunk_size
        self.root = Path(spool_dir)
        self._model_key = model_fingerprint(encoder)

    def __len__(self) -> int:
        return -(-len(self.texts) // self.chunk_size)

    def __iter__(self):
        for a in range(0, len(self.texts), self.chunk_size):
            chunk = self.texts[a:a + self.chunk_size]
            path = self.root / f"{self._model_key}-{texts_fingerprint(chunk)}"
            yield self.ids[a:a + self.chunk_size], _load_or_encode(self.encoder, chunk, path, False)
