"""What every index shares: the protocol the Retriever relies on and small helpers."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from colengine.embeddings import DocEmbeddingsLike, PackedEmbeddings, as_packed
from colengine.ids import IdMap, default_ids
from colengine.storage import Bundle
from colengine.types import Hit

__all__ = ["Index", "as_query_batch", "check_k", "check_positive_int", "check_allowed",
           "hits_from_topk", "build_inputs"]


@runtime_checkable
class Index(Protocol):
    """The seam between :class:`colengine.Retriever` and an index implementation.

    An index maps external string ids to documents' token vectors and answers MaxSim
    top-k queries. ``kind`` names it in the saved manifest. ``search`` takes an optional
    ``allowed`` bool mask over ``ids`` positions (a metadata filter): only those documents
    are considered.
    """

    kind: str
    ids: IdMap

    @property
    def dim(self) -> int: ...

    def __len__(self) -> int: ...

    def search(self, query_embeddings: torch.Tensor | np.ndarray, k: int = 10,
               **knobs: Any) -> list[list[Hit]]: ...

    def add(self, doc_embeddings: DocEmbeddingsLike, ids: Sequence[str] | None = None) -> list[str]: ...

    def delete(self, ids: Sequence[str]) -> None: ...

    def embeddings_of(self, ids: Sequence[str]) -> list[np.ndarray]: ...

    def score(self, query_embeddings: torch.Tensor | np.ndarray, ids: Sequence[str],
              query_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Exact MaxSim of each query against documents ``ids``: float32 ``[B, len(ids)]``."""
        ...

    def to_bundle(self) -> Bundle: ...

    def stats(self) -> dict[str, Any]: ...


def build_inputs(doc_embeddings: DocEmbeddingsLike,
                 ids: Sequence[str] | None) -> tuple[PackedEmbeddings, list[str]]:
    """A build's documents as packed embeddings and their ids (``"0" .. "n-1"`` by default);
    an empty corpus or a count mismatch raises ``ValueError``."""
    docs = as_packed(doc_embeddings)
    if len(docs) == 0:
        raise ValueError("cannot build an index from an empty corpus")
    ids = default_ids(0, len(docs)) if ids is None else list(ids)
    if len(ids) != len(docs):
        raise ValueError(f"got {len(ids)} ids for {len(docs)} documents")
    return docs, ids


def check_positive_int(name: str, v: Any) -> int:
    """``v`` as an ``int`` when it is a (numpy) integer >= 1: the one check behind ``k``,
    ``candidates`` and the search knobs. ``TypeError`` for a non-integer (bools and floats
    included), ``ValueError`` for zero or less.

    >>> check_positive_int("k", np.int64(3))
    3
    >>> check_positive_int("n_probe", 1.5)
    Traceback (most recent call last):
    TypeError: n_probe must be an int, got float
    """
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v <= 0:
        raise ValueError(f"{name} must be positive, got {v}")
    return int(v)


def check_k(k: int) -> None:
    check_positive_int("k", k)


def check_allowed(allowed: np.ndarray, n: int) -> np.ndarray:
    """A filter's allowed set, a bool mask ``[n]`` over an index's ``ids`` positions, as the
    sorted int64 positions it keeps."""
    a = np.asarray(allowed)
    if a.dtype != np.bool_ or a.shape != (n,):
        raise ValueError(f"allowed must be a bool array of shape ({n},), got {a.dtype} {a.shape}")
    return np.flatnonzero(a).astype(np.int64)


def as_query_batch(
    q: torch.Tensor | np.ndarray, dim: int, lengths: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate query embeddings; returns float32 ``[B, Lq, d]`` on the CPU and int64 lengths ``[B]``."""
    if isinstance(q, np.ndarray):
        if q.dtype.type not in (np.float16, np.float32, np.float64):
            raise TypeError(f"query embeddings must be float, got dtype {q.dtype}")
        q = torch.from_numpy(np.ascontiguousarray(q))
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"query embeddings must be a tensor or array, got {type(q).__name__}")
    if not q.is_floating_point():
        raise TypeError(f"query embeddings must be float, got dtype {q.dtype}")
    if q.ndim == 2:
        q = q.unsqueeze(0)
    if q.ndim != 3:
        raise ValueError(f"query embeddings must be [Lq, d] or [B, Lq, d], got shape {tuple(q.shape)}")
    if q.shape[-1] != dim:
        raise ValueError(f"query dim {q.shape[-1]} does not match the index dim {dim}")
    if q.shape[0] == 0 or q.shape[1] == 0:
        raise ValueError(f"empty query batch (shape {tuple(q.shape)})")
    q = q.detach().to("cpu", torch.float32).contiguous()
    if not torch.isfinite(q).all():
        raise ValueError("query embeddings contain NaN or Inf")
    if lengths is None:
        lengths = torch.full((q.shape[0],), q.shape[1], dtype=torch.int64)
    else:
        lengths = torch.as_tensor(lengths, dtype=torch.int64).reshape(-1)
        if lengths.shape[0] != q.shape[0]:
            raise ValueError(f"{lengths.shape[0]} query lengths for {q.shape[0]} queries")
        if int(lengths.min()) < 0 or int(lengths.max()) > q.shape[1]:
            raise ValueError(f"query lengths must lie in [0, {q.shape[1]}] (the padded length), "
                             f"got values in [{int(lengths.min())}, {int(lengths.max())}]")
    return q, lengths


def hits_from_topk(scores: torch.Tensor, positions: torch.Tensor, ids: IdMap) -> list[list[Hit]]:
    """Turn ``[B, k]`` scores/positions into Hit lists, dropping ``-inf`` / negative positions."""
    out: list[list[Hit]] = []
    for s_row, p_row in zip(scores.tolist(), positions.tolist()):
        out.append([Hit(ids[p], float(s)) for s, p in zip(s_row, p_row)
                    if p >= 0 and s != float("-inf")])
    return out


def expected_generation(index: object, path: str | os.PathLike) -> int | None:
    """The generation an index must still find at ``path`` when it saves there: the one it
    was loaded from or last saved, if ``path`` is that same index; else ``None`` (a new
    place, or a deliberate replacement)."""
    saved = getattr(index, "_saved", None)
    if saved is None or saved[0] != os.path.abspath(path):
        return None
    return saved[1]
