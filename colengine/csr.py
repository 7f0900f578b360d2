"""Ragged rows stored as CSR (values ``[T]`` + offsets ``[N + 1]``): their distinct
(row, value) pairs, computed a block of rows at a time.

Both the PLAID inverted lists (documents x centroids, :mod:`colengine.index.plaid.ivf`) and
the BM25 score matrix (documents x terms, :mod:`colengine.bm25`) start from these pairs.
"""

from __future__ import annotations

import numpy as np

__all__ = ["BLOCK_ITEMS", "distinct_pairs", "index_dtype"]

#: values whose int64 (row, value) keys are made and deduplicated at once: the keys of every
#: value never exist together (at 100M tokens they were 800 MB, and sorting them twice that)
BLOCK_ITEMS = 1 << 23


def distinct_pairs(values: np.ndarray, offsets: np.ndarray, n_values: int, *,
                   first_row: int = 0, counts: bool = False, dtype=np.int64):
    """Sorted distinct (row, value) pairs of CSR rows, as arrays ``(rows, values)`` of
    ``dtype`` (int64 by default; :func:`index_dtype` gives the smallest that holds them), and
    with ``counts`` also how often each pair occurs (int64). ``values[i]`` belongs to position
    ``offsets[0] + i``; values lie in ``[0, n_values)``; row numbers start at ``first_row``.
    Rows are deduplicated a block of whole rows (about :data:`BLOCK_ITEMS` values) at a time:
    rows are contiguous, so the blocks' sorted pairs follow each other.

    >>> r, v, c = distinct_pairs(np.array([3, 1, 3, 0]), np.array([0, 3, 4]), 4, counts=True)
    >>> r.tolist(), v.tolist(), c.tolist()
    ([0, 0, 1], [1, 3, 0], [1, 2, 1])
    """
    n = offsets.shape[0] - 1
    base = int(offsets[0]) if n >= 0 else 0
    rows, vals, cnts = [], [], []
    a = 0
    while a < n:
        b = int(np.searchsorted(offsets, offsets[a] + BLOCK_ITEMS, side="right")) - 1
        b = min(n, max(b, a + 1))                  # at least one row per block
        t0, t1 = int(offsets[a]) - base, int(offsets[b]) - base
        key = np.repeat(np.arange(a, b, dtype=np.int64), np.diff(offsets[a:b + 1])) * n_values
        key += np.asarray(values[t0:t1], dtype=np.int64)
        key, c = _sorted_unique(key, counts)              # sorted by (row, value)
        if counts:
            cnts.append(c)
        r = key // n_values
        key -= r * n_values
        r += first_row
        rows.append(r.astype(dtype, copy=False))
        vals.append(key.astype(dtype, copy=False))
        a = b
    out = [rows, vals] + ([cnts] if counts else [])
    return tuple(p[0] if len(p) == 1 else (np.concatenate(p) if p else np.zeros(0, dtype=dt))
                 for p, dt in zip(out, (dtype, dtype, np.int64)))


def _sorted_unique(key: np.ndarray, counts: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """``np.unique(key, return_counts=counts)`` by one in-place sort and a comparison of
    neighbours: NumPy 2.3+ deduplicates integers through a hash table and then sorts its
    output, which took 80 + 16 s for the 100M (document, centroid) keys of a million documents
    where a sort and a mask take ~16 s (``key`` is sorted in place)."""
    key.sort()
    if key.shape[0] == 0:
        return key, (np.zeros(0, dtype=np.int64) if counts else None)
    first = np.empty(key.shape[0], dtype=bool)
    first[0] = True
    np.not_equal(key[1:], key[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    c = np.diff(np.append(starts, key.shape[0])).astype(np.int64) if counts else None
    return key[starts], c


def index_dtype(n: int):
    """int32 when every number in ``[0, n)`` fits it, else int64: row and centroid numbers
    in int32 halve the inverted lists (held in memory for every search).

    >>> index_dtype(5_000).__name__, index_dtype(2**31 + 1).__name__
    ('int32', 'int64')
    """
    return np.int32 if n <= 2**31 else np.int64
