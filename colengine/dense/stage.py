"""A dense encoder and its index, kept by a :class:`colengine.Retriever` next to the
late-interaction index (``Retriever.build(..., dense=...)``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from colengine.dense.encoder import DenseEncoder, cached_encode_raw
from colengine.dense.index import DenseIndex
from colengine.storage import Bundle
from colengine.types import Hit

__all__ = ["INDEX_OPTIONS", "DenseStage", "as_dense_encoder"]

#: ``Retriever.build(..., dense_options=)`` keys: :meth:`DenseIndex.build`'s options
INDEX_OPTIONS = ("rescore", "ann", "hnsw_m", "ef_search")


def as_dense_encoder(dense: Any, *, device: str | torch.device = "auto",
                     trust_remote_code: bool | None = None, announce=None) -> DenseEncoder:
    """``dense`` as a :class:`DenseEncoder`: one already built, or ``True`` / a name / a
    folder (float32, all dimensions; build a ``DenseEncoder`` for ``dims`` / ``precision``)."""
    if isinstance(dense, DenseEncoder):
        return dense
    return DenseEncoder(dense, device=device, trust_remote_code=trust_remote_code,
                        announce=announce)


def check_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """``dense_options`` checked by name (values are checked by :meth:`DenseIndex.build`)."""
    options = dict(options or {})
    bad = sorted(set(options) - set(INDEX_OPTIONS))
    if bad:
        raise TypeError(f"unknown dense option(s) {', '.join(map(repr, bad))}; valid: "
                        f"{', '.join(INDEX_OPTIONS)}")
    return options


class DenseStage:
    """Encoder + index: texts in, :class:`Hit` lists out."""

    def __init__(self, encoder: DenseEncoder, index: DenseIndex) -> None:
        if encoder.dim != index.dims or encoder.precision != index.precision:
            raise ValueError(f"dense encoder ({encoder.dim} dims, {encoder.precision}) does not "
                             f"match its index ({index.dims} dims, {index.precision})")
        self.encoder, self.index = encoder, index

    @classmethod
    def build(cls, encoder: DenseEncoder, texts: Sequence[str], ids: Sequence[str], *,
              cache_dir: str | os.PathLike | None = None, show_progress: bool = False,
              **options: Any) -> DenseStage:
        """Encode ``texts`` (cached under ``cache_dir`` when given) and index them."""
        options = check_options(options)
        if cache_dir is not None:
            raw = cached_encode_raw(encoder, texts, cache_dir=cache_dir,
                                    show_progress=show_progress)
        else:
            raw = encoder.encode_raw(texts, is_query=False, show_progress=show_progress)
        index = DenseIndex.build(encoder.finish(raw), ids, precision=encoder.precision, **options)
        return cls(encoder, index)

    def __len__(self) -> int:
        return len(self.index)

    def search(self, queries: Sequence[str], k: int, *, allowed_ids: Sequence[str] | None = None,
               vectors: np.ndarray | None = None) -> list[list[Hit]]:
        """Top-``k`` documents per query text; ``allowed_ids``: only these are searched."""
        q = self.encoder.encode_queries(list(queries)) if vectors is None else vectors
        rows = None if allowed_ids is None else self.index.rows_of(allowed_ids)
        return self.index.search(q, k, allowed_rows=rows)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Documents' vectors for :meth:`add` (the slow part, outside any lock)."""
        return self.encoder.encode_documents(list(texts), show_progress=len(texts) > 256)

    def add(self, vectors: np.ndarray, ids: Sequence[str]) -> None:
        self.index.add(vectors, ids)

    def delete(self, ids: Sequence[str]) -> None:
        self.index.delete(ids)

    def describe(self) -> dict[str, Any]:
        return {**self.encoder.describe(), **self.index.stats()}

    # -- persistence -------------------------------------------------------------------
    def to_bundle(self) -> Bundle:
        ib = self.index.to_bundle()
        return Bundle("dense", {"encoder": self.encoder.describe(), "index": ib.meta}, ib.arrays)

    @classmethod
    def from_bundle(cls, b: Bundle, *, model: Any = None, device: str | torch.device = "auto",
                    trust_remote_code: bool | None = None) -> DenseStage:
        """The stage :meth:`to_bundle` saved; ``model`` overrides the recorded model name
        (its dimension must match). The recorded name never makes remote code trusted."""
        from colengine.errors import IndexFormatError

        try:
            enc_meta, imeta = b.meta["encoder"], b.meta["index"]
            index = DenseIndex.from_bundle(Bundle("dense", imeta, b.arrays))
        except (KeyError, TypeError, ValueError) as e:
            raise IndexFormatError(f"the dense index is malformed ({type(e).__name__}: {e})"
                                   ) from None
        if isinstance(model, DenseEncoder):
            encoder = model
        else:
            encoder = DenseEncoder(model or enc_meta["name"], dims=index.dims,
                                   precision=index.precision, device=device,
                                   trust_remote_code=trust_remote_code)
        if encoder.model_dim != enc_meta["model_dim"]:
            raise ValueError(f"dense model {encoder.name!r} has dimension {encoder.model_dim}, "
                             f"the index was built with {enc_meta['model_dim']} "
                             f"({enc_meta['name']!r})")
        return cls(encoder, index)
