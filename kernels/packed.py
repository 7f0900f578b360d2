"""Triton MaxSim over packed stores: candidates gathered from ``doc_tokens [T, d]`` by id, and
ragged (query, document) pairs.

Same tile routine as the padded kernel (:func:`colengine.kernels.padded.maxsim_tile`), but each
program reads its document's row range from the offsets array, so the inner loop runs over the
document's real tokens only: ragged lengths cost no padding bandwidth, and no padded copy of the
candidates is ever built.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._interpret import interpret_mode
from .padded import (INTERPRET_BLOCK_D, _configs, bucket, launch_params, maxsim_tile,
                     unit_stride)

__all__ = ["candidate_span", "score_candidates_packed", "score_pairs_packed"]


@triton.jit
def candidate_span(CAND, OFF, pid_b, pid_c, stride_cb, stride_cc):
    """The row range of query ``pid_b``'s candidate ``pid_c``: (first row, length; 0 for a
    ``-1`` candidate)."""
    cand = tl.load(CAND + pid_b * stride_cb + pid_c * stride_cc).to(tl.int64)
    valid = cand >= 0
    safe = tl.where(valid, cand, 0)
    start = tl.load(OFF + safe).to(tl.int64)
    end = tl.load(OFF + safe + 1).to(tl.int64)
    return start, tl.where(valid, end - start, 0).to(tl.int32)


@triton.jit
def _candidates_kernel(
    Q, QL, TOK, OFF, CAND, OUT,
    n_cand, D,
    stride_qb, stride_qt, stride_tt,
    stride_cb, stride_cc,
    LQ_BUCKET, LD_BUCKET,  # autotune keys only
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_c = tl.program_id(0).to(tl.int64)
    pid_b = tl.program_id(1).to(tl.int64)
    start, d_len = candidate_span(CAND, OFF, pid_b, pid_c, stride_cb, stride_cc)
    q_len = tl.load(QL + pid_b).to(tl.int32)
    score = maxsim_tile(
        Q + pid_b * stride_qb, stride_qt, q_len,
        TOK + start * stride_tt, stride_tt, d_len,
        D, BLOCK_Q, BLOCK_D, BLOCK_K, EVEN_K, IEEE, UPCAST,
    )
    score = tl.where(d_len > 0, score, float("-inf"))
    tl.store(OUT + pid_b * n_cand + pid_c, score)


@triton.jit
def _pairs_kernel(
    QT, QOFF, DT, DOFF, OUT,
    D, stride_qt, stride_dt,
    LQ_BUCKET, LD_BUCKET,  # autotune keys only
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    q_start = tl.load(QOFF + pid).to(tl.int64)
    q_len = (tl.load(QOFF + pid + 1).to(tl.int64) - q_start).to(tl.int32)
    d_start = tl.load(DOFF + pid).to(tl.int64)
    d_len = (tl.load(DOFF + pid + 1).to(tl.int64) - d_start).to(tl.int32)
    score = maxsim_tile(
        QT + q_start * stride_qt, stride_qt, q_len,
        DT + d_start * stride_dt, stride_dt, d_len,
        D, BLOCK_Q, BLOCK_D, BLOCK_K, EVEN_K, IEEE, UPCAST,
    )
    score = tl.where(d_len > 0, score, float("-inf"))
    tl.store(OUT + pid, score)


_candidates_tuned = triton.autotune(configs=_configs(), key=["D", "LQ_BUCKET", "LD_BUCKET"])(
    _candidates_kernel
)
_pairs_tuned = triton.autotune(configs=_configs(), key=["D", "LQ_BUCKET", "LD_BUCKET"])(
    _pairs_kernel
)


def _mean_len(offsets: Tensor, n_tokens: int) -> int:
    """Mean document length; ``offsets[-1] == n_tokens`` was validated, so no device read."""
    n = offsets.shape[0] - 1
    return 1 if n <= 0 else max(1, n_tokens // n)


def score_candidates_packed(
    queries: Tensor,
    query_lengths: Tensor,
    doc_tokens: Tensor,
    doc_offsets: Tensor,
    candidates: Tensor,
) -> Tensor:
    """Triton launcher: queries ``[B, Lq, d]`` (cast to ``doc_tokens.dtype``), query_lengths int
    ``[B]``, doc_tokens ``[T, d]``, doc_offsets int64 ``[N+1]``, candidates int64 ``[B, C]`` ->
    ``[B, C]`` fp32. Inputs are assumed validated."""
    bsz, n_cand = candidates.shape
    d = doc_tokens.shape[1]
    lq = queries.shape[1]
    out = torch.empty((bsz, n_cand), dtype=torch.float32, device=doc_tokens.device)
    if bsz * n_cand == 0:
        return out
    q = unit_stride(queries, doc_tokens.dtype)
    tok = unit_stride(doc_tokens)
    ql = query_lengths.to(torch.int32).contiguous()
    off = doc_offsets.to(torch.int64).contiguous()
    cand = candidates.to(torch.int64)
    params = launch_params(lq, d, tok.dtype)
    args = (
        q, ql, tok, off, cand, out, n_cand, d,
        q.stride(0), q.stride(1), tok.stride(0),
        cand.stride(0), cand.stride(1),
        bucket(lq), bucket(_mean_len(off, tok.shape[0])),
    )
    grid = (n_cand, bsz)
    if interpret_mode():
        _candidates_kernel[grid](*args, BLOCK_D=INTERPRET_BLOCK_D, **params)
    else:
        _candidates_tuned[grid](*args, **params)
    return out


def score_pairs_packed(
    q_tokens: Tensor, q_offsets: Tensor, d_tokens: Tensor, d_offsets: Tensor
) -> Tensor:
    """Triton launcher: ``P`` ragged pairs -> ``[P]`` fp32. Inputs are assumed validated."""
    n_pairs = q_offsets.shape[0] - 1
    d = d_tokens.shape[1]
    out = torch.empty((max(n_pairs, 0),), dtype=torch.float32, device=d_tokens.device)
    if n_pairs <= 0:
        return out
    qt = unit_stride(q_tokens, d_tokens.dtype)
    dt = unit_stride(d_tokens)
    qo = q_offsets.to(torch.int64).contiguous()
    do = d_offsets.to(torch.int64).contiguous()
    lq_max = int((qo[1:] - qo[:-1]).max().item())
    params = launch_params(lq_max, d, dt.dtype)
    args = (
        qt, qo, dt, do, out, d, max(qt.stride(0), 1), dt.stride(0),
        bucket(lq_max), bucket(_mean_len(do, dt.shape[0])),
    )
    grid = (n_pairs,)
    if interpret_mode():
        _pairs_kernel[grid](*args, BLOCK_D=INTERPRET_BLOCK_D, **params)
    else:
        _pairs_tuned[grid](*args, **params)
    return out
