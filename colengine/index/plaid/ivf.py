"""Inverted lists (centroid -> documents) and per-document centroid lists, both as CSR.

Both come from the same deduplicated set of (document, centroid) pairs: sorted by document
they give each document's distinct centroids (used by the exact centroid interaction of
stage 3), sorted by centroid they give the inverted lists (candidate generation and the
pruned centroid interaction of stage 2). They are derived from the tokens' codes, so they are
not stored on disk (they would cost ~3 bytes per token) and are rebuilt in well under a
second per million tokens when an index is built or loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Lists", "build_lists", "doc_of_token"]


def doc_of_token(doc_offsets: np.ndarray) -> np.ndarray:
    """int64 ``[T]``: the document of every token."""
    lens = np.diff(doc_offsets)
    return np.repeat(np.arange(lens.size, dtype=np.int64), lens)


def _csr_offsets(keys: np.ndarray, n: int) -> np.ndarray:
    off = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(keys, minlength=n), out=off[1:])
    return off


@dataclass
class Lists:
    """``ivf_offsets [K + 1]``, ``ivf_docs [P]``: documents containing each centroid (sorted).
    ``doc_code_offsets [N + 1]``, ``doc_codes [P]``: distinct centroids of each document (sorted)."""

    ivf_offsets: np.ndarray
    ivf_docs: np.ndarray
    doc_code_offsets: np.ndarray
    doc_codes: np.ndarray

    @property
    def n_pairs(self) -> int:
        return int(self.ivf_docs.shape[0])


def build_lists(codes: np.ndarray, doc_offsets: np.ndarray, n_centroids: int) -> Lists:
    """Both CSR structures from token codes ``[T]`` and document offsets ``[N + 1]`` (vectorised)."""
    n_docs = doc_offsets.shape[0] - 1
    k = int(n_centroids)
    key = doc_of_token(doc_offsets) * k + np.asarray(codes, dtype=np.int64)
    key = np.unique(key)                                  # sorted by (doc, code), deduplicated
    docs = key // k
    cents = key - docs * k
    doc_code_offsets = _csr_offsets(docs, n_docs)
    order = np.argsort(cents, kind="stable")              # by code; docs stay sorted inside
    ivf_docs = docs[order]
    ivf_offsets = _csr_offsets(cents, k)
    return Lists(ivf_offsets, ivf_docs, doc_code_offsets, cents)
