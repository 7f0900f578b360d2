"""PLAID's stages 2 and 3 on the CPU as compiled loops (numba): the same definitions as the
torch stages of :mod:`colengine.index.plaid.search`, which stay the GPU and MPS path and the
reference these are tested against.

On the CPU the torch stages spend their time in dozens of small tensor ops per query (a
comparison and a ``nonzero`` over every centroid score, expansions of the inverted lists into
index arrays, a binary search or a ``[N, Lq]`` block, a scatter-max, sorting): on SciFact 2.4
ms for stage 2 and 1.3 ms for stage 3, most of a query. Here each query is one loop over its
centroid scores and the inverted lists it reads, with no intermediate arrays beyond its
candidates:

* stage 2 (:func:`stage2`): each valid query token's ``n_probe`` best centroids are found in
  one pass over the scores; the candidates are the documents of their lists (sorted, unique,
  minus tombstoned and filtered-out rows), located through an open-addressing hash table
  behind a filter of 64 bits a candidate, so that the memory a query needs follows its
  candidates, never the corpus size; then every
  kept (query token, centroid) entry raises its list's candidates' running max for that token
  (a probed entry is applied twice when it is above the threshold too: a max does not mind);
* stage 3 (:func:`stage3`): each (query, candidate) pair's score is the sum over query tokens
  of the max of the scores of the document's distinct centroids, read row by row.

Queries (stage 2; a single query's two scans over the centroids are cut into ranges instead)
and pairs (stage 3) are shared by numba's threads (:mod:`colengine.kernels._numba`).
"""

from __future__ import annotations

import types

import numba as nb
import numpy as np
import torch

from colengine.kernels._numba import jit, launch

__all__ = ["stage2", "stage3"]

#: a single query's stage 2 is cut over the threads from this many centroids up
_SPLIT_CENTROIDS = 4096
_GOLDEN = np.uint64(11400714819323198485)   # 2**64 / golden ratio: Fibonacci hashing


@nb.njit(inline="always")
def _hash(key, shift):
    """The top ``64 - shift`` bits of ``key`` times the golden-ratio constant (wrapping)."""
    return np.int64((np.uint64(key) * _GOLDEN) >> np.uint64(shift))


@nb.njit(inline="always")
def _slot(keys, key, shift):
    """Where ``key`` is (or would go) in the open-addressing table ``keys`` of ``2 **
    (64 - shift)`` entries (-1 = empty)."""
    mask = keys.shape[0] - 1
    h = _hash(key, shift)
    while keys[h] != key and keys[h] != -1:
        h = (h + 1) & mask
    return h


@nb.njit(inline="always")
def _maybe(bits, key, shift):
    """Whether ``key``'s bit is set in the filter ``bits`` (uint64 words, ``2 ** (64 -
    shift)`` bits): False means certainly not a candidate."""
    h = _hash(key, shift)
    return (bits[h >> 6] >> np.uint64(h & 63)) & np.uint64(1) != 0


#: fast-math flags for the row scans: reassociation and "no NaN" let a max over a row
#: vectorise (centroid scores are finite); no "no inf" promise (the scans start from -inf)
_FAST = {"nnan", "nsz", "arcp", "contract", "afn", "reassoc"}


@nb.njit(inline="always", fastmath=_FAST)
def _beats(row, bar, strict):
    """Whether some entry of ``row`` is above (``strict``) or at least its bar in ``bar``
    (a bar of +inf is never reached). Counted, not branched on: the loop vectorises."""
    n = 0
    if strict:
        for i in range(bar.shape[0]):
            n += row[i] > bar[i]
    else:
        for i in range(bar.shape[0]):
            n += row[i] >= bar[i]
    return n > 0


@jit(parallel=True, nogil=True, fastmath=_FAST)
def _stage2_kernel(SK, qlens, n_probe, threshold, prune, impute, starts, lens, docs, live,
                   allowed, out_v, out_p):
    """Stage 2 of every query of the batch, the queries shared by the threads."""
    for b in nb.prange(SK.shape[1]):
        _stage2_query(b, SK, qlens, n_probe, threshold, prune, impute, starts, lens, docs,
                      live, allowed, out_v, out_p, 1)


@nb.njit(inline="always", fastmath=_FAST)
def _top_scan(SK, b, lq, c0, c1, topv, topc):
    """Each valid token's ``width`` best centroids among ``c0 .. c1 - 1`` into ``topv`` /
    ``topc`` ``[Lq, width]`` (best first; ties: the lowest number first). A row is looked at
    entry by entry only when it beats some token's current last."""
    Lq, width = topv.shape
    bar = np.full(Lq, np.inf, dtype=np.float32)     # padded tokens: never beaten
    bar[:lq] = -np.inf
    for c in range(c0, c1):
        row = SK[c, b]
        if not _beats(row, bar, True):
            continue
        for i in range(lq):
            v = row[i]
            if v > topv[i, width - 1]:
                _insert(topv, topc, i, v, c)
                bar[i] = topv[i, width - 1]


@nb.njit(inline="always")
def _insert(topv, topc, i, v, c):
    """``(v, c)`` into token ``i``'s best-first list (after the entries of equal value)."""
    j = topv.shape[1] - 1
    if not v > topv[i, j]:
        return
    while j > 0 and v > topv[i, j - 1]:
        topv[i, j] = topv[i, j - 1]
        topc[i, j] = topc[i, j - 1]
        j -= 1
    topv[i, j] = v
    topc[i, j] = c


@nb.njit(inline="always", fastmath=_FAST)
def _scatter_rows(SK, b, lq, c0, c1, threshold, prune, starts, lens, docs, keys, where, bits,
                  tshift, fshift, M):
    """The entries of centroids ``c0 .. c1 - 1`` at or above the threshold (every one without
    pruning) raise their lists' candidates' running maxima ``M``. A row none of whose valid
    entries reaches the threshold is skipped whole; a list kept for several tokens is read
    once, each document looked up once."""
    Lq = M.shape[1]
    bar = np.full(Lq, np.inf, dtype=np.float32)
    for i in range(lq):
        bar[i] = threshold if prune else -np.inf
    kept = np.empty(Lq, dtype=np.int64)
    for c in range(c0, c1):
        s0 = starts[c]
        ln = lens[c]
        if ln == 0:
            continue
        row = SK[c, b]
        if prune and not _beats(row, bar, False):
            continue
        nk = 0
        for i in range(lq):
            if not prune or row[i] >= threshold:
                kept[nk] = i
                nk += 1
        for t in range(ln):
            dd = docs[s0 + t]
            if not _maybe(bits, dd, fshift):
                continue
            h = _slot(keys, dd, tshift)
            if keys[h] == -1:
                continue
            s = where[h]
            for r in range(nk):
                i = kept[r]
                if row[i] > M[s, i]:
                    M[s, i] = row[i]


def _stage2_query_py(b, SK, qlens, n_probe, threshold, prune, impute, starts, lens, docs, live,
                     allowed, out_v, out_p, parts):
    """Stage 2 of query ``b``: its row of ``out_v`` / ``out_p``. With ``parts > 1`` the two
    scans over the centroids run on that many ranges in parallel (each with its own best
    lists, then its own running maxima), merged after each; the result is the same."""
    K, B, Lq = SK.shape
    n_keep = out_v.shape[1]
    p = min(n_probe, K)
    floor_on = impute and p < K
    width = p + 1 if floor_on else p
    lq = qlens[b]
    step = (K + parts - 1) // parts
    # each token's `width` best centroids (per range, then merged in range order, so that
    # among equal scores the lowest centroid number stays first)
    tv = np.full((parts, Lq, width), -np.inf, dtype=np.float32)
    tc = np.full((parts, Lq, width), -1, dtype=np.int64)
    for r in nb.prange(parts):
        _top_scan(SK, b, lq, r * step, min(K, (r + 1) * step), tv[r], tc[r])
    topv = tv[0].copy()
    topc = tc[0].copy()
    for r in range(1, parts):
        for i in range(lq):
            for j in range(width):
                if tc[r, i, j] >= 0:
                    _insert(topv, topc, i, tv[r, i, j], tc[r, i, j])
    # candidates: the documents of the probed lists, sorted and unique, live and allowed
    total = 0
    for i in range(lq):
        for j in range(p):
            total += lens[topc[i, j]]
    raw = np.empty(total, dtype=np.int64)
    at = 0
    for i in range(lq):
        for j in range(p):
            c = topc[i, j]
            s0 = starts[c]
            for t in range(lens[c]):
                raw[at] = docs[s0 + t]
                at += 1
    raw = np.unique(raw)
    n = 0
    for s in range(raw.shape[0]):
        dd = raw[s]
        if (live.shape[0] == 0 or live[dd]) and (allowed.shape[0] == 0 or allowed[dd]):
            raw[n] = dd
            n += 1
    cand = raw[:n]
    # the candidates' table (at most half full) and, in front of it, a filter of 64 bits
    # per candidate: most documents of a kept list are not candidates, and one bit says
    # so for all but ~1/64 of them. Both grow with the candidates, not the corpus.
    m = 4
    while (1 << m) < 2 * n:
        m += 1
    keys = np.full(1 << m, -1, dtype=np.int64)
    where = np.empty(1 << m, dtype=np.int64)
    bits = np.zeros(1 << (m + 5 - 6), dtype=np.uint64)
    tshift = 64 - m
    fshift = 64 - m - 5
    for s in range(n):
        dd = cand[s]
        h = _slot(keys, dd, tshift)
        keys[h] = dd
        where[h] = s
        f = _hash(dd, fshift)
        bits[f >> 6] |= np.uint64(1) << np.uint64(f & 63)
    # running max of every candidate and token, from its floor
    M = np.zeros((n, Lq), dtype=np.float32)
    if floor_on:
        for i in range(lq):
            f = max(topv[i, p], np.float32(0.0))
            for s in range(n):
                M[s, i] = f
    if not impute:   # the entries at or above the threshold (every one without pruning)
        if parts == 1:
            _scatter_rows(SK, b, lq, 0, K, threshold, prune, starts, lens, docs, keys, where,
                          bits, tshift, fshift, M)
        else:
            Ms = np.empty((parts, n, Lq), dtype=np.float32)
            for r in nb.prange(parts):
                Ms[r] = M
                _scatter_rows(SK, b, lq, r * step, min(K, (r + 1) * step), threshold, prune,
                              starts, lens, docs, keys, where, bits, tshift, fshift, Ms[r])
            for r in range(parts):
                for s in range(n):
                    for i in range(lq):
                        if Ms[r, s, i] > M[s, i]:
                            M[s, i] = Ms[r, s, i]
    for i in range(lq):   # the probed entries
        for j in range(p):
            c = topc[i, j]
            v = topv[i, j]
            s0 = starts[c]
            for t in range(lens[c]):
                h = _slot(keys, docs[s0 + t], tshift)
                if keys[h] == -1:
                    continue   # tombstoned or filtered out
                s = where[h]
                if v > M[s, i]:
                    M[s, i] = v
    score = np.empty(n, dtype=np.float32)
    for s in range(n):
        tot = np.float32(0.0)
        for i in range(Lq):
            tot += M[s, i]
        score[s] = tot
    order = np.argsort(-score, kind="mergesort")   # stable: equal scores by document
    top = min(n_keep, n)
    for r in range(top):
        out_v[b, r] = score[order[r]]
        out_p[b, r] = cand[order[r]]
    for r in range(top, n_keep):
        out_v[b, r] = -np.inf
        out_p[b, r] = -1


def _renamed(fn, name: str):
    """A copy of the function ``fn`` named ``name`` (numba caches compiled code by name)."""
    out = types.FunctionType(fn.__code__, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    out.__qualname__ = name
    return out


#: one query of a batch, inside the batch's parallel loop (its own loops run serially)
_stage2_query = nb.njit(nogil=True, fastmath=_FAST)(_renamed(_stage2_query_py, "_stage2_query"))
#: one query alone: its scans over the centroids cut into ``parts`` ranges shared by the
#: threads (one query would otherwise keep one thread busy)
_stage2_split_kernel = jit(parallel=True, nogil=True, fastmath=_FAST)(
    _renamed(_stage2_query_py, "_stage2_split_kernel"))


def stage2(SK: torch.Tensor, qlens: torch.Tensor, st, n_probe: int, threshold: float | None,
           n_keep: int, allowed: torch.Tensor | None = None, impute: bool = False):
    """:func:`colengine.index.plaid.search._stage2` on the CPU, for ``n_probe`` below the
    number of centroids: (scores ``[B, n]``, document positions ``[B, n]``; -inf / -1 where a
    query has fewer than ``n = min(n_keep, N)`` candidates), best first."""
    K, B, Lq = SK.shape
    width = min(n_keep, st.n_docs)
    out_v = np.empty((B, width), dtype=np.float32)
    out_p = np.empty((B, width), dtype=np.int64)
    empty = np.zeros(0, dtype=np.bool_)
    live = empty if st.live is None else st.live.numpy()
    ok = empty if allowed is None else allowed.numpy()
    args = (SK.contiguous().numpy(), qlens.to(torch.int64).numpy(), int(n_probe),
            np.float32(0.0 if threshold is None else threshold), threshold is not None,
            bool(impute), st.ivf_starts.numpy(), st.ivf_lens.numpy(), st.ivf_docs.numpy(), live,
            ok, out_v, out_p)
    parts = torch.get_num_threads()
    if B == 1 and parts > 1 and K >= _SPLIT_CENTROIDS:
        launch(lambda *a: _stage2_split_kernel(0, *a), *args, parts)
    else:
        launch(_stage2_kernel, *args)
    return torch.from_numpy(out_v), torch.from_numpy(out_p)


@jit(parallel=True, nogil=True)
def _stage3_kernel(SK, pos, offsets, dcodes, out):
    K, B, Lq = SK.shape
    n = pos.shape[0] // B
    for pair in nb.prange(pos.shape[0]):
        d = pos[pair]
        if d < 0 or offsets[d + 1] <= offsets[d]:
            out[pair] = -np.inf
            continue
        b = pair // n
        a = offsets[d]
        mx = SK[dcodes[a], b].copy()
        for t in range(a + 1, offsets[d + 1]):
            row = SK[dcodes[t], b]
            for i in range(Lq):
                if row[i] > mx[i]:
                    mx[i] = row[i]
        tot = np.float32(0.0)
        for i in range(Lq):
            tot += mx[i]
        out[pair] = tot


def stage3(SK: torch.Tensor, pos: torch.Tensor, st, n_keep: int):
    """:func:`colengine.index.plaid.search._stage3` on the CPU: the full centroid interaction
    of the candidates ``pos`` ``[B, n]`` (-1 = none); (scores, positions) of the top
    ``n_keep`` of each query, best first, -inf / -1 where fewer."""
    B, n = pos.shape
    out = np.empty(B * n, dtype=np.float32)
    launch(_stage3_kernel, SK.contiguous().numpy(), pos.contiguous().numpy().reshape(-1),
           st.doc_code_offsets.numpy(), st.doc_codes.numpy(), out)
    from colengine.index.plaid.search import keep_top   # (search imports this module)

    return keep_top(torch.from_numpy(out).view(B, n), pos, n_keep)
