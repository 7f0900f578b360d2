"""Exhaustive MaxSim index: every document's token vectors, scored exactly.

It is the ground truth every approximate index is measured against, and a fine index for
corpora small enough to scan (MaxSim over 1M tokens takes well under a second per query on
a laptop CPU). Scoring goes through :func:`colengine.kernels.score_candidates_packed` in
chunks of documents, so memory stays bounded whatever the corpus size.
"""

from __future__ import annotations

import os

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from colengine.embeddings import DocEmbeddingsLike, PackedEmbeddings, as_packed, readonly_tensor
from colengine.errors import IndexFormatError
from colengine.ids import AutoIdCounter, IdMap, as_id_list, auto_ids
from colengine.index.base import (as_query_batch, build_inputs, check_allowed, check_k,
                                  expected_generation, hits_from_topk)
from colengine.kernels import score_candidates_packed, score_candidates_packed_unchecked
from colengine.pooling import check_pool_factor, pool_packed
from colengine.storage import Bundle, load_bundle, save_bundle
from colengine.types import Hit

__all__ = ["ExhaustiveIndex"]

# Documents scored per kernel call: bounds the [B, chunk] score block and the kernel's work set.
_DOC_CHUNK = 8192


class ExhaustiveIndex:
    """All token vectors packed in one float16 array; exact MaxSim over every document.

    Parameters
    ----------
    docs:
        Packed embeddings (``tokens [T, d]`` float16, ``offsets [N + 1]`` int64).
    ids:
        One unique string id per document.
    original_lengths:
        int64 ``[N]``, each document's tokens before pooling; only for a pooled index
        (``meta["pool_factor"]`` > 1, see :meth:`build`).

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> docs = [rng.standard_normal((n, 8)).astype(np.float32) for n in (3, 5, 2)]
    >>> idx = ExhaustiveIndex.build(docs, ["a", "b", "c"])
    >>> [h.doc_id for h in idx.search(docs[1], k=1)[0]]
    ['b']
    """

    kind = "exhaustive"

    def __init__(self, docs: PackedEmbeddings, ids: IdMap, *, meta: dict[str, Any] | None = None,
                 original_lengths: np.ndarray | None = None):
        if len(ids) != len(docs):
            raise ValueError(f"{len(ids)} ids for {len(docs)} documents")
        self.docs = docs
        self.ids = ids
        self.meta = dict(meta or {})
        pf = check_pool_factor(self.meta.get("pool_factor", 1))
        self.original_lengths = None if original_lengths is None else \
            np.asarray(original_lengths, dtype=np.int64)
        if (pf > 1) != (self.original_lengths is not None) or (
                self.original_lengths is not None and self.original_lengths.shape != (len(docs),)):
            raise ValueError(f"pool_factor {pf} needs original_lengths [N] exactly when > 1")
        self.meta.setdefault("next_auto_id", len(ids))   # the persistent id counter
        self._tokens_t: torch.Tensor | None = None

    # -- construction ----------------------------------------------------------------
    @classmethod
    def build(cls, doc_embeddings: DocEmbeddingsLike, ids: Sequence[str] | None = None, *,
              pool_factor: int = 1, **meta: Any) -> "ExhaustiveIndex":
        """Pack ``doc_embeddings`` (float16). ``pool_factor`` (1..8, default 1: off) pools
        each document's tokens first (:func:`colengine.pooling.pool_packed`); the index then
        pools added documents alike."""
        pool_factor = check_pool_factor(pool_factor)
        docs, ids = build_inputs(doc_embeddings, ids)
        if pool_factor == 1:
            return cls(docs, IdMap(ids), meta=meta)
        return cls(pool_packed(docs, pool_factor), IdMap(ids),
                   meta={**meta, "pool_factor": pool_factor}, original_lengths=docs.lengths)

    @property
    def pool_factor(self) -> int:
        """The build's token pool factor (1: not pooled)."""
        return int(self.meta.get("pool_factor", 1))

    @property
    def dim(self) -> int:
        return self.docs.dim

    def __len__(self) -> int:
        return len(self.docs)

    def _tokens(self) -> torch.Tensor:
        if self._tokens_t is None:
            self._tokens_t = readonly_tensor(np.ascontiguousarray(self.docs.tokens))
        return self._tokens_t

    # -- search ----------------------------------------------------------------------
    def score(self, query_embeddings: torch.Tensor | np.ndarray, ids: Sequence[str],
              query_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Exact MaxSim of each query against the documents ``ids``: float32 ``[B, len(ids)]``,
        in the order of ``ids`` (reranking). Unknown ids raise :class:`UnknownIdError`."""
        return self.score_positions(query_embeddings, self.ids.positions(as_id_list(ids, "ids")),
                                    query_lengths)

    def score_positions(self, query_embeddings: torch.Tensor | np.ndarray, positions: np.ndarray,
                        query_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Exact MaxSim of each query against documents at internal ``positions`` (int64
        ``[B, C]`` or ``[C]``, ``-1`` = none): float32 ``[B, C]``, ``-inf`` for ``-1``. For
        evaluation code that already holds positions (see :meth:`score` for ids)."""
        q, ql = as_query_batch(query_embeddings, self.dim, query_lengths)
        cand = torch.as_tensor(np.asarray(positions, dtype=np.int64))
        if cand.ndim == 1:
            cand = cand.unsqueeze(0).expand(q.shape[0], -1)
        return score_candidates_packed(q, ql, self._tokens(), readonly_tensor(self.docs.offsets),
                                       cand.contiguous())

    def search(self, query_embeddings: torch.Tensor | np.ndarray, k: int = 10,
               query_lengths: torch.Tensor | None = None,
               allowed: np.ndarray | None = None) -> list[list[Hit]]:
        """Top-``k`` documents by exact MaxSim for each query.

        query_embeddings: float ``[B, Lq, d]`` or ``[Lq, d]``. ``allowed``: optional bool
        ``[len(self)]`` over :attr:`ids` positions; only those documents are scored. Returns
        ``B`` lists of :class:`Hit`, best first (ties broken by lower internal position).
        """
        check_k(k)
        q, ql = as_query_batch(query_embeddings, self.dim, query_lengths)
        rows = torch.from_numpy(check_allowed(allowed, len(self))) if allowed is not None \
            else torch.arange(len(self))
        n = rows.shape[0]
        kk = min(k, n)
        best_s = torch.full((q.shape[0], 0), float("-inf"))
        best_i = torch.zeros((q.shape[0], 0), dtype=torch.int64)
        offsets = readonly_tensor(self.docs.offsets)
        for start in range(0, n, _DOC_CHUNK):
            cand = rows[start:start + _DOC_CHUNK].unsqueeze(0).expand(q.shape[0], -1)
            s = score_candidates_packed_unchecked(q, ql, self._tokens(), offsets,
                                                  cand.contiguous())
            all_s = torch.cat([best_s, s], dim=1)
            all_i = torch.cat([best_i, cand], dim=1)
            top = torch.topk(all_s, k=min(kk, all_s.shape[1]), dim=1, sorted=True)
            best_s, best_i = top.values, torch.gather(all_i, 1, top.indices)
        return hits_from_topk(best_s, best_i, self.ids)

    # -- mutation --------------------------------------------------------------------
    def add(self, doc_embeddings: DocEmbeddingsLike, ids: Sequence[str] | None = None) -> list[str]:
        """Append documents; returns their ids. Without ids they get automatic ones from the
        index's persistent counter (:attr:`next_auto_id`; never reused)."""
        new = as_packed(doc_embeddings, dim=self.dim)
        auto = ids is None
        if auto:
            ids, counter = auto_ids(self.next_auto_id, len(new), self.ids)
        ids = IdMap.check_new(ids, self.ids)
        if len(ids) != len(new):
            raise ValueError(f"got {len(ids)} ids for {len(new)} documents")
        new_original = new.lengths
        new = pool_packed(new, self.pool_factor)
        self.docs = PackedEmbeddings.concat([self.docs, new])
        if self.original_lengths is not None:
            self.original_lengths = np.concatenate([self.original_lengths, new_original])
        self.ids.extend(ids)
        self._tokens_t = None
        if auto:
            self.next_auto_id = counter
        return ids

    #: the persistent counter of automatic ids (saved with the index; never reused)
    next_auto_id = AutoIdCounter(lambda index: len(index.ids))

    def delete(self, ids: Sequence[str]) -> None:
        """Remove documents by id (all must exist; nothing changes otherwise)."""
        pos = self.ids.positions(as_id_list(ids))
        keep = np.ones(len(self), dtype=bool)
        keep[pos] = False
        if not keep.any():
            raise ValueError("deleting every document would leave an empty index")
        self.docs = self.docs.select(np.flatnonzero(keep))
        if self.original_lengths is not None:
            self.original_lengths = self.original_lengths[keep]
        self.ids = self.ids.keep(keep)
        self._tokens_t = None

    def embeddings_of(self, ids: Sequence[str]) -> list[np.ndarray]:
        """The stored float16 token matrices of ``ids``."""
        return [self.docs[int(p)] for p in self.ids.positions(list(ids))]

    # -- persistence -----------------------------------------------------------------
    def to_bundle(self) -> Bundle:
        arrays = {"tokens": self.docs.tokens, "offsets": self.docs.offsets, **self.ids.to_arrays(),
                  **({} if self.original_lengths is None
                     else {"original_lengths": self.original_lengths})}
        meta = {**self.meta, "dim": self.dim, "n_documents": len(self), "n_tokens": self.docs.n_tokens}
        return Bundle(kind=self.kind, meta=meta, arrays=arrays)

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> "ExhaustiveIndex":
        a = bundle.arrays
        try:
            docs = PackedEmbeddings(a["tokens"], np.asarray(a["offsets"]))
            ids = IdMap.from_arrays(a)
        except (KeyError, ValueError) as e:
            raise IndexFormatError(f"exhaustive index arrays are inconsistent: {e}") from e
        meta = {k: v for k, v in bundle.meta.items() if k not in ("n_documents", "n_tokens")}
        try:
            return cls(docs, ids, meta=meta, original_lengths=(
                np.asarray(a["original_lengths"]) if "original_lengths" in a else None))
        except ValueError as e:
            raise IndexFormatError(f"exhaustive index is inconsistent: {e}") from e

    def save(self, path) -> None:
        """Write atomically under the writer lock; :class:`StaleIndexError` if ``path`` is
        the index this one was loaded from and another writer saved there since."""
        bundle = self.to_bundle()
        save_bundle(path, bundle, expected_generation=expected_generation(self, path))
        self._saved = (os.path.abspath(path), bundle.generation)

    @classmethod
    def load(cls, path, *, mmap: bool = True, verify: bool = True) -> "ExhaustiveIndex":
        b = load_bundle(path, kind=cls.kind, mmap=mmap, verify=verify)
        try:
            idx = cls.from_bundle(b)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise IndexFormatError(f"{path}: malformed exhaustive index ({type(e).__name__}: {e})") from None
        idx._saved = (os.path.abspath(path), b.generation)
        return idx

    def stats(self) -> dict[str, Any]:
        nbytes = self.docs.tokens.nbytes + self.docs.offsets.nbytes
        original = self.docs.n_tokens if self.original_lengths is None \
            else int(self.original_lengths.sum())
        return {
            "kind": self.kind,
            "documents": len(self),
            "tokens": self.docs.n_tokens,
            "dim": self.dim,
            "bytes_per_token": nbytes / max(1, self.docs.n_tokens),
            "pool_factor": self.pool_factor,
            "original_tokens": original,
            "bytes_per_original_token": nbytes / max(1, original),
        }
