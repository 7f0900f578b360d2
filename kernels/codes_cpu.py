"""MaxSim straight from compressed tokens on the CPU (numba): PLAID's stage 4 without a
decompressed copy, the CPU twin of the Triton kernel in :mod:`colengine.kernels.codes`.

A PLAID token is stored as its centroid number and ``packed_dim`` residual bytes; byte ``m``
with value ``v`` decodes, through the codec's table ``lut [packed_dim * 256, per]``, to
dimensions ``m * per .. m * per + per - 1``. The torch path (:func:`colengine.kernels.
torch_impl.score_candidates_packed` fed by a decoding function) rebuilds every candidate token
in a float32 block with a dozen tensor ops (gathers of the table and of the centroids, a norm,
a scale), then multiplies the block by the query: on SciFact's 64 stage-4 documents (14k
tokens) the decoding took half of stage 4. Here one compiled loop per (query, document) pair
decodes four tokens at a time into a ``[4, d]`` buffer that stays in L1, renormalises them, and
takes their dot products with the query tokens four at a time (16 running sums per step, so
each loaded value serves four products), keeping each query token's running max: the decoded
tokens never exist beyond four rows, and the scores equal the decode-then-MaxSim reference
(:func:`colengine.kernels.codes.reference`) within float32 rounding.

The (query, document) pairs are shared by numba's threads (:mod:`colengine.kernels._numba`:
as many as torch uses, safe under concurrent searches).

Numba compiles each kernel on its first call in a process (about 2 s; cached on disk next to
this file when that is writable).
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np
import torch
from numba.extending import overload
from torch import Tensor

from ._numba import jit
from ._numba import launch as _launch

__all__ = ["score_candidates_codes_cpu"]

#: tokens decoded and scored together (the 4 x 4 block of running sums below)
_TOK = 4


def _centroid_into(x, cent, c):   # pragma: no cover - replaced by the overloads below
    raise NotImplementedError


@overload(_centroid_into, inline="always")
def _centroid_into_impl(x, cent, c):
    """Centroid ``c`` of ``cent`` into ``x`` as float32: ``cent`` is float32, or the bits of
    bfloat16 centroids as int16 (a bfloat16 value is the high half of its float32)."""
    if cent.dtype == nb.types.int16:
        def impl(x, cent, c):
            bits = x.view(np.uint32)
            for k in range(x.shape[0]):
                bits[k] = np.uint32(np.uint16(cent[c, k])) << np.uint32(16)
        return impl

    def impl(x, cent, c):
        for k in range(x.shape[0]):
            x[k] = cent[c, k]
    return impl


@nb.njit(inline="always", fastmath=True)
def _decode_token(X, u, t, codes, resid, lut, cent, normalize):
    """Token ``t`` decoded into row ``u`` of ``X``: its centroid plus its residual bytes'
    table entries, renormalised when ``normalize``."""
    d = X.shape[1]
    x = X[u]
    _centroid_into(x, cent, codes[t])
    per = lut.shape[1]
    for m in range(resid.shape[1]):
        r = m * 256 + resid[t, m]
        for j in range(per):
            k = m * per + j
            if k < d:
                x[k] += lut[r, j]
    if normalize:
        s2 = np.float32(0.0)
        for k in range(d):
            s2 += x[k] * x[k]
        inv = np.float32(1.0) / max(np.float32(math.sqrt(s2)), np.float32(1e-12))
        for k in range(d):
            x[k] *= inv


@jit(parallel=True, nogil=True, fastmath=True)
def _score_pairs(q, qlens, pos, offs, codes, resid, lut, cent, normalize, out):
    """Scores of the flattened (query, candidate) pairs ``pos`` [B * C] into ``out``."""
    n_cand = pos.shape[0] // q.shape[0]
    d = q.shape[2]
    for pair in nb.prange(pos.shape[0]):
        X = np.empty((_TOK, d), dtype=np.float32)
        mx = np.empty(q.shape[1], dtype=np.float32)
        p = pos[pair]
        if p < 0:
            out[pair] = -np.inf
            continue
        a = offs[p]
        e = offs[p + 1]
        if e <= a:
            out[pair] = -np.inf
            continue
        b = pair // n_cand
        lq = qlens[b]
        qb = q[b]
        for i in range(lq):
            mx[i] = -np.inf
        for t0 in range(a, e, _TOK):
            last = min(e, t0 + _TOK) - 1
            for u in range(_TOK):
                # past the document's end the last token is repeated: it cannot change a max
                _decode_token(X, u, min(t0 + u, last), codes, resid, lut, cent, normalize)
            i = 0
            while i + 4 <= lq:
                a00 = a01 = a02 = a03 = np.float32(0.0)
                a10 = a11 = a12 = a13 = np.float32(0.0)
                a20 = a21 = a22 = a23 = np.float32(0.0)
                a30 = a31 = a32 = a33 = np.float32(0.0)
                for k in range(d):
                    x0 = X[0, k]
                    x1 = X[1, k]
                    x2 = X[2, k]
                    x3 = X[3, k]
                    q0 = qb[i, k]
                    q1 = qb[i + 1, k]
                    q2 = qb[i + 2, k]
                    q3 = qb[i + 3, k]
                    a00 += x0 * q0
                    a01 += x0 * q1
                    a02 += x0 * q2
                    a03 += x0 * q3
                    a10 += x1 * q0
                    a11 += x1 * q1
                    a12 += x1 * q2
                    a13 += x1 * q3
                    a20 += x2 * q0
                    a21 += x2 * q1
                    a22 += x2 * q2
                    a23 += x2 * q3
                    a30 += x3 * q0
                    a31 += x3 * q1
                    a32 += x3 * q2
                    a33 += x3 * q3
                mx[i] = max(mx[i], max(max(a00, a10), max(a20, a30)))
                mx[i + 1] = max(mx[i + 1], max(max(a01, a11), max(a21, a31)))
                mx[i + 2] = max(mx[i + 2], max(max(a02, a12), max(a22, a32)))
                mx[i + 3] = max(mx[i + 3], max(max(a03, a13), max(a23, a33)))
                i += 4
            while i < lq:
                for u in range(_TOK):
                    s = np.float32(0.0)
                    for k in range(d):
                        s += X[u, k] * qb[i, k]
                    mx[i] = max(mx[i], s)
                i += 1
        tot = np.float32(0.0)
        for i in range(lq):
            tot += mx[i]
        out[pair] = tot


def score_candidates_codes_cpu(
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
    """MaxSim of each query against its candidate documents, decoded four tokens at a time
    in a compiled loop; the arguments and result of
    :func:`colengine.kernels.codes.score_candidates_codes`, on CPU tensors.

    ``centroids`` may be float32 or bfloat16 (read as stored: no float32 copy); ``queries``
    are computed in float32; the pairs are shared by ``torch.get_num_threads()`` threads
    (:mod:`colengine.kernels._numba`). The caller guarantees
    the values (candidates in range, codes below the number of centroids, offsets ascending):
    this is the engine's internal entry point, called with a search state's own arrays.

    >>> import torch
    >>> from colengine.kernels.codes import reference
    >>> g = torch.Generator().manual_seed(0)
    >>> cent = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=1)
    >>> lut = torch.randn(2 * 256, 4, generator=g) * 0.05
    >>> codes = torch.randint(0, 4, (9,), generator=g)
    >>> res = torch.randint(0, 256, (9, 2), generator=g, dtype=torch.uint8)
    >>> off = torch.tensor([0, 4, 4, 9])
    >>> q = torch.randn(2, 5, 8, generator=g)
    >>> ql, cand = torch.tensor([5, 3]), torch.tensor([[0, 1, 2], [2, -1, 0]])
    >>> got = score_candidates_codes_cpu(q, ql, codes, res, lut, cent, off, cand)
    >>> ref = reference(q, ql, codes, res, lut, cent, off, cand)
    >>> bool(torch.allclose(got, ref, atol=1e-5)), got[0, 1].item(), got[1, 1].item()
    (True, -inf, -inf)
    """
    bsz, n_cand = candidates.shape
    out = np.empty(bsz * n_cand, dtype=np.float32)
    if bsz * n_cand == 0:
        return torch.from_numpy(out.reshape(bsz, n_cand))
    q = queries.detach().to(torch.float32).contiguous().numpy()
    ql = query_lengths.detach().to(torch.int64).contiguous().numpy()
    pos = candidates.detach().to(torch.int64).contiguous().numpy().reshape(-1)
    off = tok_offsets.detach().to(torch.int64).contiguous().numpy()
    cent = centroids.detach().contiguous()
    cent = (cent.view(torch.int16) if cent.dtype == torch.bfloat16 else cent.float()).numpy()
    rest = (off, codes.detach().contiguous().numpy(), residuals.detach().contiguous().numpy(),
            lut.detach().to(torch.float32).contiguous().numpy(), cent, bool(normalize), out)
    _launch(_score_pairs, q, ql, pos, *rest)
    return torch.from_numpy(out.reshape(bsz, n_cand))
