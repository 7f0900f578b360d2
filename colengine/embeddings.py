"""Packed token embeddings: every document's token vectors in one array plus offsets."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch

__all__ = ["PackedEmbeddings", "as_packed", "DocEmbeddingsLike", "readonly_tensor"]

_FLOATS = (np.float16, np.float32, np.float64)


def readonly_tensor(a: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy`` without a copy, also for read-only memory maps.

    torch warns on non-writable arrays because writing through the tensor would be undefined;
    colengine only ever reads these tensors, so the zero-copy view is what we want.
    """
    if a.flags.writeable:
        return torch.from_numpy(a)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a)


@dataclass
class PackedEmbeddings:
    """Documents as one packed token matrix.

    tokens:  float16 or float32 ``[T, d]``, the token vectors of all documents back to back.
    offsets: int64 ``[N + 1]``; document ``i`` is ``tokens[offsets[i]:offsets[i + 1]]``.

    >>> p = PackedEmbeddings.from_list([np.ones((2, 4)), np.ones((3, 4))])
    >>> len(p), p.dim, p.lengths.tolist()
    (2, 4, [2, 3])
    """

    tokens: np.ndarray
    offsets: np.ndarray

    def __post_init__(self) -> None:
        if self.tokens.ndim != 2:
            raise ValueError(f"tokens must be [T, d], got shape {self.tokens.shape}")
        if self.offsets.ndim != 1 or self.offsets.size < 1 or self.offsets[0] != 0:
            raise ValueError("offsets must be int64 [N + 1] starting at 0")
        if self.offsets.size > 1 and bool((np.diff(self.offsets) < 0).any()):
            raise ValueError("offsets must never decrease (each document has >= 0 tokens)")
        if int(self.offsets[-1]) != self.tokens.shape[0]:
            raise ValueError(
                f"offsets end at {int(self.offsets[-1])} but there are {self.tokens.shape[0]} tokens"
            )

    @classmethod
    def from_list(cls, docs: Sequence[np.ndarray | torch.Tensor], dtype=np.float16) -> "PackedEmbeddings":
        mats = [_to_numpy(m, i) for i, m in enumerate(docs)]
        if not mats:
            raise ValueError("no documents given")
        dims = {m.shape[1] for m in mats}
        if len(dims) != 1:
            raise ValueError(f"documents have different embedding dims: {sorted(dims)}")
        offsets = np.zeros(len(mats) + 1, dtype=np.int64)
        np.cumsum([m.shape[0] for m in mats], out=offsets[1:])
        with np.errstate(over="ignore"):   # an overflow is reported by as_packed, by name
            tokens = np.concatenate(mats, axis=0).astype(dtype, copy=False) if offsets[-1] else \
                np.zeros((0, dims.pop()), dtype=dtype)
        return cls(tokens, offsets)

    def __len__(self) -> int:
        return self.offsets.shape[0] - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    @property
    def dim(self) -> int:
        return self.tokens.shape[1]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def to_list(self) -> list[np.ndarray]:
        return [self[i] for i in range(len(self))]

    def select(self, rows: np.ndarray) -> "PackedEmbeddings":
        """The documents at positions ``rows`` (int array), packed anew."""
        rows = np.asarray(rows, dtype=np.int64)
        lens = self.lengths[rows]
        offsets = np.zeros(rows.size + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        idx = np.repeat(self.offsets[rows] - offsets[:-1], lens) + np.arange(offsets[-1])
        return PackedEmbeddings(np.ascontiguousarray(self.tokens[idx]), offsets)

    @staticmethod
    def concat(parts: Sequence["PackedEmbeddings"]) -> "PackedEmbeddings":
        parts = [p for p in parts if len(p)]
        if not parts:
            raise ValueError("nothing to concatenate")
        tokens = np.concatenate([p.tokens for p in parts], axis=0)
        offsets = np.concatenate(
            [[0]] + [p.offsets[1:] + base for p, base in
                     zip(parts, np.cumsum([0] + [p.n_tokens for p in parts[:-1]]))]
        ).astype(np.int64)
        return PackedEmbeddings(tokens, offsets)


DocEmbeddingsLike = Union[
    PackedEmbeddings, Sequence[np.ndarray], Sequence[torch.Tensor], tuple[np.ndarray, np.ndarray]
]


def _to_numpy(m: np.ndarray | torch.Tensor, i: int) -> np.ndarray:
    if isinstance(m, torch.Tensor):
        m = m.detach().to("cpu")
        if m.dtype == torch.bfloat16:
            m = m.float()
        m = m.numpy()
    m = np.asarray(m)
    if m.ndim != 2:
        raise ValueError(f"document {i}: expected a [L, d] matrix, got shape {m.shape}")
    if m.dtype.type not in _FLOATS:
        raise TypeError(f"document {i}: expected a float array, got dtype {m.dtype}")
    return m


def _overflow_message(dtype) -> str:
    return (f"embeddings are finite but overflow {np.dtype(dtype).name} (largest magnitude "
            f"{np.finfo(dtype).max:g}); token vectors are expected to be L2-normalised")


def as_packed(docs: DocEmbeddingsLike, *, dim: int | None = None, dtype=np.float16) -> PackedEmbeddings:
    """Normalise any accepted document-embedding input to :class:`PackedEmbeddings`.

    Accepts a :class:`PackedEmbeddings`, a ``(tokens [T, d], offsets [N + 1])`` tuple, or a
    sequence of ``[L_i, d]`` arrays / tensors. Checks the dim, float dtype and finiteness.
    """
    if isinstance(docs, PackedEmbeddings):
        p = docs
    elif isinstance(docs, tuple) and len(docs) == 2 and np.asarray(docs[1]).ndim == 1 \
            and np.asarray(docs[0]).ndim == 2:
        tokens = _to_numpy(docs[0], 0)
        p = PackedEmbeddings(tokens, np.asarray(docs[1], dtype=np.int64))
    else:
        src = list(docs)
        p = PackedEmbeddings.from_list(src, dtype=dtype)
        if p.n_tokens and not np.isfinite(p.tokens).all() and all(
                np.isfinite(_to_numpy(d, i)).all() for i, d in enumerate(src)):
            raise ValueError(_overflow_message(dtype))
    if p.tokens.dtype.type not in _FLOATS:
        raise TypeError(f"embeddings must be float16/32/64, got {p.tokens.dtype}")
    if dim is not None and p.dim != dim:
        raise ValueError(f"embedding dim {p.dim} does not match the index dim {dim}")
    if p.n_tokens and not np.isfinite(p.tokens).all():
        raise ValueError("embeddings contain NaN or Inf")
    if p.tokens.dtype != dtype:
        p = PackedEmbeddings(p.tokens.astype(dtype), p.offsets)
        if p.n_tokens and not np.isfinite(p.tokens).all():
            raise ValueError(_overflow_message(dtype))
    return p
