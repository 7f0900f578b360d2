"""Inverted lists (centroid -> documents) and per-document centroid lists, both as CSR.

Both come from the same deduplicated set of (document, centroid) pairs: sorted by document
they give each document's distinct centroids (used by the exact centroid interaction of
stage 3), sorted by centroid they give the inverted lists (candidate generation and the
pruned centroid interaction of stage 2). They are derived from the tokens' codes, so they are
not stored on disk (two int32 numbers for each of ~0.9 pairs a token: ~7 bytes a token) and
are rebuilt in about a quarter of a second per million tokens (23 s for 100M) when an index
is built or loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from colengine.csr import distinct_pairs, index_dtype

__all__ = ["Lists", "build_lists", "doc_of_token", "extend_lists", "drop_docs"]


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
    ``doc_code_offsets [N + 1]``, ``doc_codes [P]``: distinct centroids of each document (sorted).
    Offsets are int64; ``ivf_docs`` and ``doc_codes`` int32 while the numbers fit
    (:func:`~colengine.csr.index_dtype`)."""

    ivf_offsets: np.ndarray
    ivf_docs: np.ndarray
    doc_code_offsets: np.ndarray
    doc_codes: np.ndarray

    @property
    def n_pairs(self) -> int:
        return int(self.ivf_docs.shape[0])


def build_lists(codes: np.ndarray, doc_offsets: np.ndarray, n_centroids: int,
                deleted: np.ndarray | None = None) -> Lists:
    """Both CSR structures from token codes ``[T]`` and document offsets ``[N + 1]`` (vectorised).

    Documents flagged in ``deleted`` (bool ``[N]``, tombstones) are left out of the inverted
    lists (their own centroid lists are kept: they are never candidates, so never read)."""
    n_docs = doc_offsets.shape[0] - 1
    k = int(n_centroids)
    docs, cents = distinct_pairs(codes, doc_offsets, k, dtype=index_dtype(max(n_docs, k)))
    doc_code_offsets = _csr_offsets(docs, n_docs)
    order = np.argsort(cents, kind="stable")              # by code; docs stay sorted inside
    ivf_docs = docs[order]
    del docs, order
    ivf_offsets = _csr_offsets(cents, k)
    lists = Lists(ivf_offsets, ivf_docs, doc_code_offsets, cents)
    if deleted is not None and np.any(deleted):
        lists = drop_docs(lists, deleted)
    return lists


def extend_lists(lists: Lists, codes: np.ndarray, doc_offsets: np.ndarray, n_centroids: int) -> Lists:
    """``lists`` plus documents appended after its last one (their codes ``[T']`` and offsets
    ``[M + 1]``), without touching the old pairs' order: the new documents' pairs go to the end
    of each inverted list (their positions are larger than every old one, so lists stay sorted)."""
    k = int(n_centroids)
    first = lists.doc_code_offsets.shape[0] - 1
    n_new = doc_offsets.shape[0] - 1
    dt = np.promote_types(lists.ivf_docs.dtype, index_dtype(max(first + n_new, k)))
    docs, cents = distinct_pairs(codes, doc_offsets, k, first_row=first, dtype=dt)
    dco = np.concatenate([lists.doc_code_offsets,
                          lists.doc_code_offsets[-1] + _csr_offsets(docs - first, n_new)[1:]])
    doc_codes = np.concatenate([lists.doc_codes.astype(dt, copy=False), cents])
    # each new pair goes to the end of its centroid's list: an insertion at that list's old
    # end (new pairs by centroid, then document), one pass over the old pairs and no sort
    order = np.argsort(cents, kind="stable")
    ivf_docs = _insert_sorted(lists.ivf_docs.astype(dt, copy=False),
                              lists.ivf_offsets[cents[order] + 1], docs[order])
    ivf_offsets = lists.ivf_offsets + _csr_offsets(cents, k)
    return Lists(ivf_offsets, ivf_docs, dco, doc_codes)


#: a delete of up to this many (document, centroid) pairs finds them in their lists one
#: binary search each (:func:`drop_docs`); more are found by one pass over every posting
FEW_PAIRS = 4096


def drop_docs(lists: Lists, deleted: np.ndarray) -> Lists:
    """``lists`` with the documents flagged in ``deleted`` (bool ``[N]``) removed from the
    inverted lists (the per-document centroid lists are kept as they are).

    A few documents (a server's deletes) are looked up where they are: each of their
    centroids' lists is sorted by document, so a binary search finds each posting, and
    only the copy without them costs in proportion to the index (a million documents: ~0.1
    s instead of ~1.3 s for a pass that builds a centroid number for every posting)."""
    deleted = np.asarray(deleted, dtype=bool)
    dead = np.flatnonzero(deleted)
    dco = lists.doc_code_offsets
    n_pairs = int((dco[dead + 1] - dco[dead]).sum()) if dead.size else 0
    if n_pairs == 0:
        return lists
    if n_pairs <= FEW_PAIRS:
        return _drop_few(lists, dead)
    keep = ~deleted[lists.ivf_docs]
    if keep.all():
        return lists
    k = lists.ivf_offsets.shape[0] - 1
    cents = np.repeat(np.arange(k, dtype=np.int64), np.diff(lists.ivf_offsets))[keep]
    return Lists(_csr_offsets(cents, k), lists.ivf_docs[keep], lists.doc_code_offsets,
                 lists.doc_codes)


def _drop_few(lists: Lists, dead: np.ndarray) -> Lists:
    """:func:`drop_docs` for the documents ``dead`` (rows, few) by binary searches."""
    io, docs = lists.ivf_offsets, lists.ivf_docs
    where, cents = [], []
    for d in dead.tolist():
        for c in lists.doc_codes[lists.doc_code_offsets[d]:lists.doc_code_offsets[d + 1]].tolist():
            a, b = int(io[c]), int(io[c + 1])
            j = a + int(np.searchsorted(docs[a:b], d))
            if j < b and int(docs[j]) == d:   # (a document dropped before is not there)
                where.append(j)
                cents.append(c)
    if not where:
        return lists
    k = io.shape[0] - 1
    removed = np.zeros(k + 1, dtype=np.int64)
    np.cumsum(np.bincount(np.asarray(cents, dtype=np.int64), minlength=k), out=removed[1:])
    return Lists(io - removed, _delete_sorted(docs, np.sort(np.asarray(where, dtype=np.int64))),
                 lists.doc_code_offsets, lists.doc_codes)


#: up to this many insertions (deletions) are made by one slice copy per gap between them;
#: more by numpy's insert (delete), which builds a mask over the whole array first (88M
#: postings, 90 positions: 40 against 82 ms to insert, 50 against 89 to delete)
_FEW_EDITS = 4096


def _insert_sorted(a: np.ndarray, pos: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``np.insert(a, pos, values)`` for non-decreasing ``pos`` (1-d arrays): for a few
    positions one slice copy per gap between them (the copy of the inverted lists that an
    add of a few documents makes)."""
    n = int(pos.shape[0])
    if n > _FEW_EDITS:
        return np.insert(a, pos, values)
    out = np.empty(a.shape[0] + n, dtype=a.dtype)
    prev = 0
    for i, p in enumerate(pos.tolist()):
        out[prev + i:p + i] = a[prev:p]
        out[p + i] = values[i]
        prev = p
    out[prev + n:] = a[prev:]
    return out


def _delete_sorted(a: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """``np.delete(a, pos)`` for increasing, distinct ``pos`` (1-d arrays), like
    :func:`_insert_sorted`: one slice copy per gap for a few positions."""
    n = int(pos.shape[0])
    if n > _FEW_EDITS:
        return np.delete(a, pos)
    out = np.empty(a.shape[0] - n, dtype=a.dtype)
    prev = 0
    for i, p in enumerate(pos.tolist()):
        out[prev - i:p - i] = a[prev:p]
        prev = p + 1
    out[prev - n:] = a[prev:]
    return out
