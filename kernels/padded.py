"""Triton MaxSim over padded candidates ``docs [B, n, Ld, d]`` (and the shared tile routine).

One program scores one (query, document) pair. It holds the query tile ``[BLOCK_Q, d]`` in
registers, streams the document in ``[BLOCK_D, d]`` tiles, computes ``q @ tile^T`` with ``tl.dot``
(fp32 accumulation), masks tokens past the length with ``-inf`` and keeps a running per-query-token
max in registers. The similarity matrix is never written to memory: every document byte is read
once, which makes the op memory-bound (roofline = device copy bandwidth).

This module imports triton at import time; :mod:`colengine.kernels` imports it lazily.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._interpret import apply_compat, interpret_mode

__all__ = ["maxsim_tile", "query_tile", "score_candidates_padded", "launch_params"]

if interpret_mode():
    apply_compat()


@triton.jit
def query_tile(q_ptr, stride_qt, q_len, q0, D,
               BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """Query rows ``q0 .. q0 + BLOCK_Q - 1`` as a ``[BLOCK_Q, BLOCK_K]`` tile (zeros past
    ``q_len`` and ``D``), and which rows are real."""
    offs_q = tl.arange(0, BLOCK_Q)
    offs_k = tl.arange(0, BLOCK_K)
    q_valid = (q0 + offs_q) < q_len
    q_ptrs = q_ptr + (q0 + offs_q)[:, None] * stride_qt + offs_k[None, :]
    if EVEN_K:
        q = tl.load(q_ptrs, mask=q_valid[:, None], other=0.0)
    else:
        q = tl.load(q_ptrs, mask=q_valid[:, None] & (offs_k[None, :] < D), other=0.0)
    return q, q_valid


@triton.jit
def maxsim_tile(
    q_ptr,
    stride_qt,
    q_len,
    d_ptr,
    stride_dt,
    d_len,
    D,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """MaxSim of one query (``q_len`` rows at ``q_ptr``) and one document (``d_len`` rows at
    ``d_ptr``); rows are ``D`` contiguous elements. Returns an fp32 scalar (``-inf`` if
    ``d_len == 0`` and ``q_len > 0``; the caller applies the empty-document rule)."""
    offs_q = tl.arange(0, BLOCK_Q)
    offs_t = tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    total = tl.sum(tl.zeros([BLOCK_Q], dtype=tl.float32), axis=0)
    for q0 in range(0, q_len, BLOCK_Q):
        q, q_valid = query_tile(q_ptr, stride_qt, q_len, q0, D, BLOCK_Q, BLOCK_K, EVEN_K)
        run_max = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)
        for t0 in range(0, d_len, BLOCK_D):
            t_valid = (t0 + offs_t) < d_len
            # document tile loaded transposed: [BLOCK_K, BLOCK_D]
            d_ptrs = d_ptr + (t0 + offs_t)[None, :] * stride_dt + offs_k[:, None]
            if EVEN_K:
                dt = tl.load(d_ptrs, mask=t_valid[None, :], other=0.0)
            else:
                dt = tl.load(d_ptrs, mask=t_valid[None, :] & (offs_k[:, None] < D), other=0.0)
            if UPCAST:  # interpreter only: its bf16 tl.dot is wrong, bf16 products are exact in fp32
                s = tl.dot(q.to(tl.float32), dt.to(tl.float32), input_precision="ieee")
            elif IEEE:
                s = tl.dot(q, dt, input_precision="ieee")
            else:
                s = tl.dot(q, dt)
            s = tl.where(t_valid[None, :], s, float("-inf"))
            run_max = tl.maximum(run_max, tl.max(s, axis=1))
        total += tl.sum(tl.where(q_valid, run_max, 0.0), axis=0)
    return total


def _configs() -> list:
    # small, bounded search space: 3 tile heights x 2 warp counts x 2 pipeline depths
    return [
        triton.Config({"BLOCK_D": bd}, num_warps=w, num_stages=s)
        for bd in (32, 64, 128)
        for w in (4, 8)
        for s in (2, 3)
    ]


@triton.jit
def _padded_kernel(
    Q, QL, DOCS, DL, OUT,
    n_docs, D,
    stride_qb, stride_qt,
    stride_db, stride_dn, stride_dt,
    stride_lb, stride_ln,
    LQ_BUCKET, LD_BUCKET,  # autotune keys only (bucketed, bounded)
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    pid_b = tl.program_id(1).to(tl.int64)
    q_len = tl.load(QL + pid_b).to(tl.int32)
    d_len = tl.load(DL + pid_b * stride_lb + pid_n * stride_ln).to(tl.int32)
    score = maxsim_tile(
        Q + pid_b * stride_qb, stride_qt, q_len,
        DOCS + pid_b * stride_db + pid_n * stride_dn, stride_dt, d_len,
        D, BLOCK_Q, BLOCK_D, BLOCK_K, EVEN_K, IEEE, UPCAST,
    )
    score = tl.where(d_len > 0, score, float("-inf"))
    tl.store(OUT + pid_b * n_docs + pid_n, score)


_padded_tuned = triton.autotune(configs=_configs(), key=["D", "LQ_BUCKET", "LD_BUCKET"])(
    _padded_kernel
)

#: block height used under TRITON_INTERPRET=1 (small so that tests cross tile boundaries)
INTERPRET_BLOCK_D = 16


def unit_stride(t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``t`` (cast to ``dtype``) with a unit stride on the last dim, as ``tl.dot`` tiles load it."""
    t = t if dtype is None else t.to(dtype)
    return t if t.stride(-1) == 1 else t.contiguous()


def bucket(n: int) -> int:
    """Power-of-two bucket (>= 16) used as an autotune key: bounded number of keys."""
    return max(16, triton.next_power_of_2(max(int(n), 1)))


def launch_params(lq_max: int, d: int, dtype: torch.dtype) -> dict:
    block_k = triton.next_power_of_2(d)
    return {
        "BLOCK_Q": min(64, max(16, triton.next_power_of_2(max(lq_max, 1)))),
        "BLOCK_K": block_k,
        "EVEN_K": block_k == d,
        "IEEE": dtype == torch.float32,
        "UPCAST": interpret_mode() and dtype == torch.bfloat16,
    }


def score_candidates_padded(
    queries: Tensor, docs: Tensor, query_lengths: Tensor, doc_lengths: Tensor
) -> Tensor:
    """Triton launcher. queries ``[B, Lq, d]`` (cast to ``docs.dtype``), docs ``[B, n, Ld, d]``,
    lengths int ``[B]`` / ``[B, n]`` -> ``[B, n]`` fp32. Inputs are assumed validated."""
    bsz, n, ld, d = docs.shape
    lq = queries.shape[1]
    out = torch.empty((bsz, n), dtype=torch.float32, device=docs.device)
    if bsz * n == 0:
        return out
    q = unit_stride(queries, docs.dtype)
    docs = unit_stride(docs)
    ql = query_lengths.to(torch.int32).contiguous()
    dl = doc_lengths.to(torch.int32)
    params = launch_params(lq, d, docs.dtype)
    args = (
        q, ql, docs, dl, out, n, d,
        q.stride(0), q.stride(1),
        docs.stride(0), docs.stride(1), docs.stride(2),
        dl.stride(0), dl.stride(1),
        bucket(lq), bucket(ld),
    )
    grid = (n, bsz)
    if interpret_mode():
        _padded_kernel[grid](*args, BLOCK_D=INTERPRET_BLOCK_D, **params)
    else:
        _padded_tuned[grid](*args, **params)
    return out
