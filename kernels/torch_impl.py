"""The torch implementation of MaxSim: the CPU and Apple MPS backend (``backend="torch"``),
chunked; the semantics every backend shares.

MaxSim(q, D) = sum over the first ``len(q)`` query tokens of the maximum, over the first
``len(D)`` document tokens, of the dot product. Accumulation is fp32 whatever the storage dtype.

Conventions (identical for every backend):

* a document of length 0 and a ``-1`` candidate score ``-inf``;
* a query of length 0 (and a non-empty document) scores ``0``: the sum over an empty set of query
  tokens, which is what the einsum reference gives;
* tokens past a length are never read, so padding may hold anything (even inf or nan).

How it is fast on a CPU. Every entry point reduces to one engine, :func:`segment_maxsim`: a set of
query token columns ``Q [M, d]`` against a set of document *segments* (start row, length) of a
token matrix. Segments are sorted by length and cut into chunks of bounded size. For a chunk of
``n`` segments whose longest has ``L`` tokens, the rows are gathered as an ``[n, L, d]`` block in
which a shorter document repeats its own last token (a repeated token cannot change a max, so no
mask and no ``-inf`` fill are needed, and since lengths are sorted the repetition wastes only a few
percent); the block is converted to fp32 once (fp16/bf16 GEMMs are slow on CPUs), multiplied by
``Q^T`` in ONE GEMM ``[n*L, d] x [d, M]`` and reduced with ``amax`` over the ``L`` axis. Batches of
queries that share candidates stack their tokens into ``M = sum(Lq)`` columns, so one GEMM serves
the whole batch and runs near the machine's matmul peak. Buffers are preallocated per call and
reused across chunks: the similarity tile never exceeds ``max_chunk_bytes`` (except for a single
document longer than the budget), whatever the number of candidates.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "segment_maxsim",
    "score_candidates_padded",
    "score_candidates_packed",
    "score_pairs_packed",
]

#: Budget, in bytes, of one chunk's fp32 similarity tile plus its fp32 token block.
#: Sized to stay in the last-level cache of a small CPU; see bench/bench_maxsim_cpu.py.
DEFAULT_CHUNK_BYTES = 2 << 20
#: Lower bound on rows per chunk so that per-chunk Python overhead stays small when M is large.
MIN_CHUNK_ROWS = 256

_NEG_INF = float("-inf")


def _chunk_rows(m: int, d: int, max_chunk_bytes: int | None) -> int:
    budget = DEFAULT_CHUNK_BYTES if max_chunk_bytes is None else int(max_chunk_bytes)
    rows = budget // (4 * (m + d))
    if max_chunk_bytes is None:
        rows = max(rows, MIN_CHUNK_ROWS)
    return max(rows, 1)


def segment_maxsim(
    q_cols: Tensor,
    col_query: Tensor | None,
    n_queries: int,
    tokens: Tensor | Callable[[Tensor], Tensor],
    starts: np.ndarray,
    lens: np.ndarray,
    *,
    max_chunk_bytes: int | None = None,
    row_scale: Tensor | None = None,
) -> Tensor:
    """Per-query MaxSim of ``n_queries`` queries against ``S`` non-empty token segments.

    Args:
        q_cols: ``[M, d]`` float, the valid tokens of all queries stacked (any float dtype).
        col_query: ``[M]`` int64 on ``tokens.device``: query index of every column; ``None`` means
            ``M`` is split evenly, ``M / n_queries`` consecutive columns per query.
        n_queries: number of queries ``B``.
        tokens: ``[T, d]`` fp32/fp16/bf16 token store, or int8 with ``row_scale``; or a
            function of int64 row numbers ``[r]`` returning those rows as fp32 ``[r, d]`` on
            ``q_cols.device`` (a compressed store decoded chunk by chunk, straight into the
            block the GEMM reads).
        starts, lens: int64 numpy arrays ``[S]``; segment ``s`` is ``tokens[starts[s]:starts[s]+lens[s]]``;
            every ``lens[s]`` must be >= 1.
        max_chunk_bytes: budget of one chunk's fp32 similarity + token block (``None``: default).
        row_scale: ``[T]`` fp32 on ``tokens.device``, optional: token ``t`` is
            ``tokens[t] * row_scale[t]`` (a per-token quantised store, e.g. PLAID's int8
            refinement vectors). The scale multiplies the similarities, not the tokens:
            ``[rows, M]`` products instead of ``[rows, d]``.

    Returns:
        ``[S, B]`` fp32 on ``tokens.device`` (``q_cols.device`` for a function).
    """
    take = tokens if callable(tokens) else None
    device = q_cols.device if take is not None else tokens.device
    n_seg = int(len(starts))
    m, d = int(q_cols.shape[0]), int(q_cols.shape[1] if take is not None else tokens.shape[1])
    out = torch.zeros((n_seg, n_queries), dtype=torch.float32, device=device)
    if n_seg == 0 or m == 0:
        return out  # no query token: every sum is over the empty set
    qt = q_cols.to(device=device, dtype=torch.float32).t().contiguous()  # [d, M]
    even = col_query is None
    per_q = m // n_queries if even else 0

    order = np.argsort(lens, kind="stable")
    s_lens = np.ascontiguousarray(lens[order])
    s_starts = np.ascontiguousarray(starts[order])
    cap = _chunk_rows(m, d, max_chunk_bytes)
    max_rows = max(cap, int(s_lens[-1]))

    need_convert = take is None and tokens.dtype != torch.float32
    gbuf = torch.empty((max_rows, d), dtype=tokens.dtype, device=device) if take is None else None
    fbuf = torch.empty((max_rows, d), dtype=torch.float32, device=device) if need_convert else None
    sim = torch.empty((max_rows, m), dtype=torch.float32, device=device)
    sbuf = (torch.empty(max_rows, dtype=torch.float32, device=device)
            if row_scale is not None else None)
    res = torch.empty((n_seg, n_queries), dtype=torch.float32, device=device)
    tok_c = tokens if take is not None or tokens.is_contiguous() else tokens.contiguous()
    on_cpu = device.type == "cpu"

    a = 0
    while a < n_seg:
        # largest b with (b - a) * s_lens[b - 1] <= cap (lengths ascend), at least one segment
        b = min(n_seg, a + max(1, cap // int(s_lens[a])))
        while b > a + 1 and (b - a) * int(s_lens[b - 1]) > cap:
            b = a + max(1, cap // int(s_lens[b - 1]))
        n = b - a
        L = int(s_lens[b - 1])
        rows = n * L
        st = s_starts[a:b]
        ln = s_lens[a:b]
        if take is None and int(ln[0]) == L and (n == 1 or bool(np.all(np.diff(st) == L))):
            x = tok_c[int(st[0]) : int(st[0]) + rows]  # consecutive equal-length docs: no gather
            if row_scale is not None:
                sc = row_scale[int(st[0]) : int(st[0]) + rows]
        else:
            idx = st[:, None] + np.minimum(np.arange(L, dtype=np.int64)[None, :], ln[:, None] - 1)
            idx_t = torch.from_numpy(idx.reshape(-1))
            if not on_cpu:
                idx_t = idx_t.to(device, non_blocking=True)
            x = take(idx_t) if take is not None else torch.index_select(tok_c, 0, idx_t,
                                                                          out=gbuf[:rows])
            if row_scale is not None:
                sc = torch.index_select(row_scale, 0, idx_t, out=sbuf[:rows])
        if need_convert:
            x = fbuf[:rows].copy_(x)
        s = torch.mm(x, qt, out=sim[:rows])
        if row_scale is not None:
            s.mul_(sc.unsqueeze(1))  # before the max: scales differ from token to token
        mx = torch.amax(s.view(n, L, m), dim=1)  # [n, M]
        if n_queries == 1:
            red = mx.sum(dim=1, keepdim=True)
        elif even:
            red = mx.view(n, n_queries, per_q).sum(dim=2)
        else:
            red = torch.zeros((n, n_queries), dtype=torch.float32, device=device)
            red.index_add_(1, col_query, mx)
        res[a:b] = red
        a = b
    out[torch.from_numpy(order).to(device)] = res
    return out


def _stack_queries(
    queries: Tensor, ql: np.ndarray
) -> tuple[Tensor, Tensor | None]:
    """Valid tokens of every query stacked ``[sum(ql), d]`` plus the column -> query map."""
    bsz, lq, _ = queries.shape
    if bsz and bool(np.all(ql == lq)):
        return queries.reshape(bsz * lq, -1), None
    if bsz and bool(np.all(ql == ql[0])):
        return queries[:, : int(ql[0])].reshape(bsz * int(ql[0]), -1), None
    cols = torch.cat([queries[i, : int(ql[i])] for i in range(bsz)], dim=0)
    col_query = torch.from_numpy(np.repeat(np.arange(bsz, dtype=np.int64), ql)).to(queries.device)
    return cols, col_query


def score_candidates_packed(
    queries: Tensor,
    query_lengths: Tensor,
    doc_tokens: Tensor | Callable[[Tensor], Tensor],
    doc_offsets: Tensor,
    candidates: Tensor,
    *,
    max_chunk_bytes: int | None = None,
    row_scale: Tensor | None = None,
) -> Tensor:
    """MaxSim of each query against its candidates, gathered from a packed store.

    Args:
        queries: ``[B, Lq, d]`` float; query ``b`` uses its first ``query_lengths[b]`` tokens.
        query_lengths: int ``[B]``.
        doc_tokens: ``[T, d]`` float token store; document ``i`` is rows
            ``doc_offsets[i]:doc_offsets[i+1]``. Or a function returning the rows it is
            given as fp32 (see :func:`segment_maxsim`).
        doc_offsets: int64 ``[N+1]``.
        candidates: int64 ``[B, C]`` document ids, ``-1`` for none; ids may repeat.
        row_scale: ``[T]`` fp32, optional: each token's scale (``doc_tokens`` may then be
            int8); see :func:`segment_maxsim`.

    Returns:
        ``[B, C]`` fp32 (``-inf`` for ``-1`` and for empty documents).

    Inputs are assumed validated (see :mod:`colengine.kernels`).
    """
    device = queries.device
    bsz, n_cand = candidates.shape
    out = torch.full((bsz, n_cand), _NEG_INF, dtype=torch.float32, device=device)
    if bsz * n_cand == 0:
        return out
    offs = doc_offsets.detach().to("cpu", torch.int64).numpy()
    cand = candidates.detach().to("cpu", torch.int64).numpy()
    ql = query_lengths.detach().to("cpu", torch.int64).numpy()
    valid = cand >= 0
    safe = np.where(valid, cand, 0)
    clen = np.where(valid, offs[safe + 1] - offs[safe], 0)
    live = clen > 0
    if not live.any():
        return out
    bi, ki = np.nonzero(live)
    ids = cand[bi, ki]
    uniq, inv = np.unique(ids, return_inverse=True)
    ulen = offs[uniq + 1] - offs[uniq]
    per_query_cost = float((clen.sum(axis=1) * ql).sum())
    union_cost = float(ulen.sum()) * float(ql.sum())
    if bsz == 1 or union_cost <= 1.5 * per_query_cost:
        # one GEMM serves the whole batch: every query against the union of the candidates
        cols, col_query = _stack_queries(queries, ql)
        res = segment_maxsim(
            cols, col_query, bsz, doc_tokens, offs[uniq], ulen, max_chunk_bytes=max_chunk_bytes,
            row_scale=row_scale,
        )
        inv_t = torch.from_numpy(inv.reshape(-1)).to(device)
        bi_t = torch.from_numpy(bi).to(device)
        out[bi_t, torch.from_numpy(ki).to(device)] = res[inv_t, bi_t]
        return out
    for b in range(bsz):
        kb = np.nonzero(live[b])[0]
        if kb.size == 0:
            continue
        ub, invb = np.unique(cand[b, kb], return_inverse=True)
        res = segment_maxsim(
            queries[b, : int(ql[b])],
            None,
            1,
            doc_tokens,
            offs[ub],
            offs[ub + 1] - offs[ub],
            max_chunk_bytes=max_chunk_bytes,
            row_scale=row_scale,
        )
        out[b, torch.from_numpy(kb).to(device)] = res[torch.from_numpy(invb.reshape(-1)).to(device), 0]
    return out


def score_candidates_padded(
    queries: Tensor,
    docs: Tensor,
    query_lengths: Tensor,
    doc_lengths: Tensor,
    *,
    max_chunk_bytes: int | None = None,
) -> Tensor:
    """MaxSim of each query against its own padded documents.

    Args:
        queries: ``[B, Lq, d]`` float; query_lengths: int ``[B]``.
        docs: ``[B, n, Ld, d]`` float; doc_lengths: int ``[B, n]``.

    Returns:
        ``[B, n]`` fp32. Padding is never read (each document is a segment of its own rows).
    """
    bsz, n, ld, d = docs.shape
    device = docs.device
    out = torch.full((bsz, n), _NEG_INF, dtype=torch.float32, device=device)
    if bsz * n == 0:
        return out
    ql = query_lengths.detach().to("cpu", torch.int64).numpy()
    dl = doc_lengths.detach().to("cpu", torch.int64).numpy()
    for b in range(bsz):
        kb = np.nonzero(dl[b] > 0)[0]
        if kb.size == 0:
            continue
        store = docs[b].reshape(n * ld, d)
        res = segment_maxsim(
            queries[b, : int(ql[b])],
            None,
            1,
            store,
            kb.astype(np.int64) * ld,
            dl[b, kb].astype(np.int64),
            max_chunk_bytes=max_chunk_bytes,
        )
        out[b, torch.from_numpy(kb).to(device)] = res[:, 0]
    return out


def score_pairs_packed(
    q_tokens: Tensor,
    q_offsets: Tensor,
    d_tokens: Tensor,
    d_offsets: Tensor,
    *,
    max_chunk_bytes: int | None = None,
) -> Tensor:
    """MaxSim of ``P`` ragged (query, document) pairs.

    Args:
        q_tokens: ``[Tq, d]`` float, query ``p`` is rows ``q_offsets[p]:q_offsets[p+1]``.
        q_offsets: int64 ``[P+1]``.
        d_tokens: ``[Td, d]`` float, document ``p`` is rows ``d_offsets[p]:d_offsets[p+1]``.
        d_offsets: int64 ``[P+1]``.

    Returns:
        ``[P]`` fp32.

    Pairs are sorted by document length and processed in chunks with one batched GEMM each:
    documents padded by repeating their last token, queries padded with zero rows (a zero query
    token has similarity 0 with every token, so it adds exactly 0 to a non-empty document's sum).
    """
    device = d_tokens.device
    n_pairs = int(q_offsets.shape[0]) - 1
    out = torch.full((n_pairs,), _NEG_INF, dtype=torch.float32, device=device)
    if n_pairs <= 0:
        return out
    qo = q_offsets.detach().to("cpu", torch.int64).numpy()
    do = d_offsets.detach().to("cpu", torch.int64).numpy()
    qlen = qo[1:] - qo[:-1]
    dlen = do[1:] - do[:-1]
    live = np.nonzero(dlen > 0)[0]
    if live.size == 0:
        return out
    d = int(d_tokens.shape[1])
    order = live[np.argsort(dlen[live], kind="stable")]
    lq_max = max(int(qlen.max()), 1)
    cap = _chunk_rows(lq_max, d, max_chunk_bytes)
    q_c = q_tokens if q_tokens.is_contiguous() else q_tokens.contiguous()
    d_c = d_tokens if d_tokens.is_contiguous() else d_tokens.contiguous()
    n_q_rows = int(q_tokens.shape[0])
    a = 0
    while a < order.size:
        b = min(order.size, a + max(1, cap // int(dlen[order[a]])))
        while b > a + 1 and (b - a) * int(dlen[order[b - 1]]) > cap:
            b = a + max(1, cap // int(dlen[order[b - 1]]))
        sel = order[a:b]
        n = sel.size
        L = int(dlen[sel[-1]])
        lq = max(int(qlen[sel].max()), 1)
        didx = do[sel, None] + np.minimum(np.arange(L)[None, :], dlen[sel, None] - 1)
        dblk = d_c.index_select(0, torch.from_numpy(didx.reshape(-1)).to(device))
        dblk = dblk.to(torch.float32).view(n, L, d)
        qpos = np.arange(lq)[None, :]
        qmask = qpos < qlen[sel, None]
        qidx = np.clip(qo[sel, None] + qpos, 0, max(n_q_rows - 1, 0))
        if n_q_rows == 0:
            qblk = torch.zeros((n, lq, d), dtype=torch.float32, device=device)
        else:
            qblk = q_c.index_select(0, torch.from_numpy(qidx.reshape(-1)).to(device))
            qblk = qblk.to(torch.float32).view(n, lq, d)
            qblk = qblk.masked_fill(~torch.from_numpy(qmask).to(device)[:, :, None], 0.0)
        sim = torch.bmm(dblk, qblk.transpose(1, 2))  # [n, L, lq]
        out[torch.from_numpy(sel).to(device)] = sim.amax(dim=1).sum(dim=1)
        a = b
    return out

