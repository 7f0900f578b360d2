"""Triton MaxSim straight from compressed tokens: PLAID's stage 4 without a decompressed copy.

A PLAID token is stored as its centroid number and ``packed_dim`` residual bytes; a byte ``m``
with value ``v`` decodes, through the codec's lookup table ``lut [packed_dim * 256, per]``, to
the values of dimensions ``m * per .. m * per + per - 1`` (both codecs of
:mod:`colengine.index.plaid.codec` decode this way). The engine's CPU path rebuilds every
candidate token as ``centroid + decoded residual`` in memory (then renormalises it) and hands
the float copy to the MaxSim kernel. Here each program decodes a ``[BLOCK_D, d]`` tile of its
document in registers (one centroid row and ``d`` table entries per token), renormalises it, and
takes ``q @ tile^T`` with ``tl.dot`` as :func:`~colengine.kernels.padded.maxsim_tile` does: the
decompressed tokens never exist in memory, and a token costs ``packed_dim + 4`` bytes of reads
(plus its centroid row, shared by the tokens of a cell and cached) instead of ``4 d``.

This is WARP's implicit decompression on a GPU: WARP sums per-byte query-table entries, which
needs no decoding but cannot renormalise the token; decoding the tile keeps exactly the scores
of the decompress-then-MaxSim path (the reference, :func:`reference`).

This module imports triton at import time; :mod:`colengine.kernels` imports it lazily.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._interpret import interpret_mode
from .packed import candidate_span
from .padded import INTERPRET_BLOCK_D, _configs, bucket, launch_params, query_tile

__all__ = ["score_candidates_codes", "reference"]


@triton.jit
def _codes_tile(
    q_ptr, stride_qt, q_len,
    codes_ptr, res_ptr, start, d_len,
    LUT, CENT, D, PDIM,
    PER: tl.constexpr, NORMALIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
):
    """MaxSim of one query (``q_len`` rows of ``D`` fp32 at ``q_ptr``) and one compressed
    document (tokens ``start .. start + d_len - 1``). Returns an fp32 scalar (``-inf`` when
    ``d_len == 0`` and ``q_len > 0``; the caller applies the empty-document rule)."""
    offs_t = tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    k_valid = offs_k < D
    byte_of_k = offs_k // PER                 # [BLOCK_K]: the byte holding each dimension
    slot_of_k = offs_k % PER
    total = tl.sum(tl.zeros([BLOCK_Q], dtype=tl.float32), axis=0)
    for q0 in range(0, q_len, BLOCK_Q):
        q, q_valid = query_tile(q_ptr, stride_qt, q_len, q0, D, BLOCK_Q, BLOCK_K, EVEN_K)
        run_max = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)
        for t0 in range(0, d_len, BLOCK_D):
            t_valid = (t0 + offs_t) < d_len
            tok = start + t0 + offs_t                                           # [BLOCK_D]
            code = tl.load(codes_ptr + tok, mask=t_valid, other=0).to(tl.int64)
            m2 = t_valid[None, :] & k_valid[:, None]                            # [BLOCK_K, BLOCK_D]
            # the tile transposed, [BLOCK_K, BLOCK_D]: centroid rows plus decoded residuals
            x = tl.load(CENT + code[None, :] * D + offs_k[:, None], mask=m2, other=0.0)
            byte = tl.load(res_ptr + tok[None, :] * PDIM + byte_of_k[:, None], mask=m2, other=0)
            idx = (byte_of_k[:, None] * 256 + byte.to(tl.int32)) * PER + slot_of_k[:, None]
            x += tl.load(LUT + idx, mask=m2, other=0.0)
            if NORMALIZE:
                norm = tl.sqrt(tl.sum(x * x, axis=0))                          # [BLOCK_D]
                x = x / tl.maximum(norm, 1e-12)[None, :]
            s = tl.dot(q, x, input_precision="ieee")                            # [BLOCK_Q, BLOCK_D]
            s = tl.where(t_valid[None, :], s, float("-inf"))
            run_max = tl.maximum(run_max, tl.max(s, axis=1))
        total += tl.sum(tl.where(q_valid, run_max, 0.0), axis=0)
    return total


@triton.jit
def _codes_kernel(
    Q, QL, CODES, RES, LUT, CENT, OFF, CAND, OUT,
    n_cand, D, PDIM,
    stride_qb, stride_qt, stride_cb, stride_cc,
    LQ_BUCKET, LD_BUCKET,  # autotune keys only
    PER: tl.constexpr, NORMALIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_c = tl.program_id(0).to(tl.int64)
    pid_b = tl.program_id(1).to(tl.int64)
    start, d_len = candidate_span(CAND, OFF, pid_b, pid_c, stride_cb, stride_cc)
    q_len = tl.load(QL + pid_b).to(tl.int32)
    score = _codes_tile(
        Q + pid_b * stride_qb, stride_qt, q_len,
        CODES, RES, start, d_len, LUT, CENT, D, PDIM,
        PER, NORMALIZE, BLOCK_Q, BLOCK_D, BLOCK_K, EVEN_K,
    )
    score = tl.where(d_len > 0, score, float("-inf"))
    tl.store(OUT + pid_b * n_cand + pid_c, score)


_codes_tuned = triton.autotune(configs=_configs(), key=["D", "LQ_BUCKET", "LD_BUCKET"])(
    _codes_kernel
)


def _check(queries, query_lengths, codes, residuals, lut, centroids, tok_offsets, candidates):
    dev = residuals.device
    for name, t in (("query_lengths", query_lengths), ("codes", codes), ("lut", lut),
                    ("centroids", centroids), ("tok_offsets", tok_offsets),
                    ("candidates", candidates), ("queries", queries)):
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device}, the residuals on {dev}")
    if queries.ndim != 3 or centroids.ndim != 2 or queries.shape[2] != centroids.shape[1]:
        raise ValueError(f"queries {tuple(queries.shape)} and centroids "
                         f"{tuple(centroids.shape)} must be [B, Lq, d] and [K, d]")
    if residuals.ndim != 2 or residuals.dtype != torch.uint8:
        raise ValueError(f"residuals must be uint8 [T, packed_dim], got {residuals.dtype} "
                         f"{tuple(residuals.shape)}")
    pdim = residuals.shape[1]
    if lut.ndim != 2 or lut.shape[0] != pdim * 256 or lut.shape[1] * pdim < centroids.shape[1]:
        raise ValueError(f"lut {tuple(lut.shape)} does not decode {pdim} bytes to "
                         f"{centroids.shape[1]} dimensions")
    if codes.shape != (residuals.shape[0],):
        raise ValueError(f"codes {tuple(codes.shape)} must hold one centroid per token "
                         f"({residuals.shape[0]})")
    if candidates.ndim != 2 or candidates.shape[0] != queries.shape[0]:
        raise ValueError(f"candidates {tuple(candidates.shape)} must be [B, C] for "
                         f"{queries.shape[0]} queries")


def score_candidates_codes(
    queries: Tensor,
    query_lengths: Tensor,
    codes: Tensor,
    residuals: Tensor,
    lut: Tensor,
    centroids: Tensor,
    tok_offsets: Tensor,
    candidates: Tensor,
    *,
    normalize: bool = True,
) -> Tensor:
    """MaxSim of each query against its candidate documents, decoded tile by tile in the kernel.

    Args:
        queries: ``[B, Lq, d]`` float (computed in fp32); query ``b`` uses its first
            ``query_lengths[b]`` tokens.
        query_lengths: int ``[B]``.
        codes: int ``[T]`` each token's centroid; residuals: uint8 ``[T, packed_dim]``.
        lut: float32 ``[packed_dim * 256, per]`` (:meth:`ResidualCodec.lut`).
        centroids: float32 ``[K, d]``.
        tok_offsets: int64 ``[N + 1]``: document ``i`` is tokens ``tok_offsets[i] ..
            tok_offsets[i + 1] - 1``.
        candidates: int64 ``[B, C]`` document numbers, ``-1`` for none.
        normalize: renormalise each decoded token to unit length (as the index does when its
            vectors are unit-norm).

    Returns:
        ``[B, C]`` fp32, ``-inf`` for ``-1`` and for empty documents. Shapes and devices are
        checked; values (candidate numbers in range) are the caller's contract.
    """
    _check(queries, query_lengths, codes, residuals, lut, centroids, tok_offsets, candidates)
    bsz, n_cand = candidates.shape
    d = centroids.shape[1]
    lq = queries.shape[1]
    out = torch.empty((bsz, n_cand), dtype=torch.float32, device=residuals.device)
    if bsz * n_cand == 0:
        return out
    q = queries.to(torch.float32).contiguous()
    cent = centroids.to(torch.float32).contiguous()
    lut32 = lut.to(torch.float32).contiguous()
    res = residuals.contiguous()
    cd = codes.contiguous()
    ql = query_lengths.to(torch.int32).contiguous()
    off = tok_offsets.to(torch.int64).contiguous()
    cand = candidates.to(torch.int64)
    params = launch_params(lq, d, torch.float32)
    n_docs = off.shape[0] - 1
    args = (
        q, ql, cd, res, lut32, cent, off, cand, out, n_cand, d, res.shape[1],
        q.stride(0), q.stride(1), cand.stride(0), cand.stride(1),
        bucket(lq), bucket(max(1, res.shape[0] // max(1, n_docs))),
    )
    grid = (n_cand, bsz)
    kw = dict(PER=lut32.shape[1], NORMALIZE=bool(normalize), **params)
    if interpret_mode():
        _codes_kernel[grid](*args, BLOCK_D=INTERPRET_BLOCK_D, **kw)
    else:
        _codes_tuned[grid](*args, **kw)
    return out


def reference(queries: Tensor, query_lengths: Tensor, codes: Tensor, residuals: Tensor,
              lut: Tensor, centroids: Tensor, tok_offsets: Tensor, candidates: Tensor, *,
              normalize: bool = True) -> Tensor:
    """The same scores the plain way (decode every token, renormalise, MaxSim by einsum), in
    fp32 on the inputs' device: what the kernel is tested against."""
    pdim, per = residuals.shape[1], lut.shape[1]
    d = centroids.shape[1]
    idx = residuals.long() + torch.arange(pdim, device=residuals.device) * 256
    x = lut.float()[idx].reshape(residuals.shape[0], pdim * per)[:, :d]
    x = x + centroids.float()[codes.long()]
    if normalize:
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    bsz, n_cand = candidates.shape
    out = torch.full((bsz, n_cand), float("-inf"), dtype=torch.float32, device=x.device)
    off = tok_offsets.tolist()
    for b in range(bsz):
        qb = queries[b, : int(query_lengths[b])].float()
        for c in range(n_cand):
            j = int(candidates[b, c])
            if j < 0 or off[j + 1] == off[j]:
                continue
            sim = torch.einsum("qd,td->qt", qb, x[off[j]:off[j + 1]])
            out[b, c] = sim.max(dim=1).values.sum() if qb.shape[0] else 0.0
    return out
