"""Token pooling at build time: fewer stored vectors per document, hierarchical clustering.

Each document's token vectors, except the first one (the ``[CLS]`` / ``[D]`` marker, kept
as it is), are grouped by Ward's agglomerative clustering (:func:`scipy.cluster.hierarchy.linkage`
on the token vectors) and the tree is cut with ``fcluster(criterion="maxclust")``; each group is
replaced by the mean of its tokens, re-normalised to unit length when the input tokens were
unit-length. This is the pooling PyLate offers (Clavié et al., 2024), done here once at build.

The rule, for a document of ``L`` tokens and ``pool_factor`` ``f``:

* ``f == 1`` or ``L <= 2``: the document is returned unchanged (the same values).
* otherwise the first token is kept, and the ``m = L - 1`` others become
  ``c = max(1, ceil(m / f))`` pooled tokens, ordered by the position of each cluster's first
  token. ``fcluster`` yields exactly ``c`` clusters unless merge heights tie at the cut (for
  example several identical tokens); then it yields fewer, never more.

So a pooled document holds ``1 + ceil((L - 1) / f)`` tokens (generic inputs), and a corpus of
``T`` tokens shrinks to about ``T / f``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from colengine.embeddings import PackedEmbeddings

__all__ = ["MAX_POOL_FACTOR", "check_pool_factor", "is_unit_norm", "pool_packed", "pool_tokens",
           "pooled_length"]

#: largest pool factor accepted at the door (beyond it a document keeps too little)
MAX_POOL_FACTOR = 8
#: a token counts as unit-length when its L2 norm is within this of 1 (float16 inputs included)
_UNIT_TOL = 1e-2


def check_pool_factor(pool_factor: Any) -> int:
    """``pool_factor`` as an ``int`` in ``1 .. MAX_POOL_FACTOR``; ``ValueError`` otherwise
    (bools and floats included).

    >>> check_pool_factor(2)
    2
    >>> check_pool_factor(2.0)
    Traceback (most recent call last):
    ValueError: pool_factor must be an int in 1..8, got 2.0 (float)
    """
    if isinstance(pool_factor, bool) or not isinstance(pool_factor, (int, np.integer)) \
            or not 1 <= pool_factor <= MAX_POOL_FACTOR:
        raise ValueError(f"pool_factor must be an int in 1..{MAX_POOL_FACTOR}, got "
                         f"{pool_factor!r} ({type(pool_factor).__name__})")
    return int(pool_factor)


def pooled_length(n_tokens: int, pool_factor: int) -> int:
    """Tokens a document of ``n_tokens`` keeps (generic inputs; ties may leave fewer).

    >>> [pooled_length(n, 2) for n in (0, 1, 2, 3, 4, 5, 300)]
    [0, 1, 2, 2, 3, 3, 151]
    >>> pooled_length(10, 3)
    4
    """
    if pool_factor == 1 or n_tokens <= 2:
        return n_tokens
    return 1 + max(1, math.ceil((n_tokens - 1) / pool_factor))


def is_unit_norm(tokens: np.ndarray) -> bool:
    """Whether every row of ``tokens [T, d]`` has L2 norm 1 (within 1e-2)."""
    if tokens.shape[0] == 0:
        return False
    norms = np.linalg.norm(np.asarray(tokens, dtype=np.float32), axis=1)
    return bool(np.all(np.abs(norms - 1.0) < _UNIT_TOL))


def pool_tokens(doc: np.ndarray, pool_factor: int, *, normalize: bool | None = None) -> np.ndarray:
    """One document's token vectors ``[L, d]`` pooled to ``[L', d]`` (same dtype).

    ``normalize``: re-normalise the pooled means to unit length; ``None`` (default) does so
    when every input token is unit-length. See the module docstring for the exact rule.

    >>> x = np.array([[1, 0], [0, 1], [0, 1], [1, 0], [1, 0]], dtype=np.float32)
    >>> pool_tokens(x, 2).tolist()   # [D] kept; {1, 2} and {3, 4} pooled
    [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]
    >>> pool_tokens(x, 1) is x
    True
    """
    from scipy.cluster.hierarchy import fcluster, linkage

    f = check_pool_factor(pool_factor)
    x = np.asarray(doc)
    if x.ndim != 2:
        raise ValueError(f"a document must be [L, d], got shape {x.shape}")
    L = x.shape[0]
    if f == 1 or L <= 2:
        return doc if isinstance(doc, np.ndarray) else x
    rest = np.asarray(x[1:], dtype=np.float64)
    c = pooled_length(L, f) - 1
    labels = fcluster(linkage(rest, method="ward"), t=c, criterion="maxclust")
    # clusters in the order of their first token, so the output follows the text
    _, first = np.unique(labels, return_index=True)
    order = np.argsort(first, kind="stable")
    uniq = np.unique(labels)[order]
    remap = np.empty(int(labels.max()) + 1, dtype=np.int64)
    remap[uniq] = np.arange(uniq.size)
    g = remap[labels]
    sums = np.zeros((uniq.size, x.shape[1]), dtype=np.float64)
    np.add.at(sums, g, rest)
    means = sums / np.bincount(g, minlength=uniq.size)[:, None]
    if normalize is None:
        normalize = is_unit_norm(x)
    if normalize:
        means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    return np.concatenate([x[:1], means.astype(x.dtype)], axis=0)


def pool_packed(docs: PackedEmbeddings, pool_factor: int, *,
                normalize: bool | None = None) -> PackedEmbeddings:
    """Every document of a packed corpus pooled (:func:`pool_tokens`); ``pool_factor=1``
    returns ``docs`` itself. ``normalize=None`` decides per document (re-normalise when its
    tokens are unit-length), so the result does not depend on how a corpus is chunked.

    >>> p = PackedEmbeddings.from_list([np.eye(7, 4), np.eye(2, 4)])
    >>> q = pool_packed(p, 3)
    >>> q.lengths.tolist(), q.tokens.dtype.name
    ([3, 2], 'float16')
    """
    f = check_pool_factor(pool_factor)
    if f == 1:
        return docs
    tokens, offsets = docs.tokens, np.asarray(docs.offsets)
    out = [pool_tokens(tokens[a:b], f, normalize=normalize)
           for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
    new_off = np.zeros(len(out) + 1, dtype=np.int64)
    np.cumsum([o.shape[0] for o in out], out=new_off[1:])
    new_tok = np.concatenate(out, axis=0) if new_off[-1] else tokens[:0].copy()
    return PackedEmbeddings(np.ascontiguousarray(new_tok, dtype=tokens.dtype), new_off)
