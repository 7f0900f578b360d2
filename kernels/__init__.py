"""MaxSim kernels (installed as ``colengine.kernels``).

MaxSim(q, D) = sum over query tokens of the max over document tokens of the dot product.

Three public entry points, with the shapes of the erikkaum/maxsim kernel::

    score_candidates_padded(queries, docs, query_lengths, doc_lengths, *, backend="auto")
        # queries [B, Lq, d], docs [B, n, Ld, d], query_lengths int [B], doc_lengths int [B, n]
        # -> [B, n]
    score_candidates_packed(queries, query_lengths, doc_tokens, doc_offsets, candidates, *, backend="auto")
        # doc_tokens [T, d], doc_offsets int64 [N+1], candidates int64 [B, C] (-1 = none) -> [B, C]
    score_pairs_packed(q_tokens, q_offsets, d_tokens, d_offsets, *, backend="auto")
        # P ragged (query, document) pairs, offsets int64 [P+1] -> [P]

A fourth op scores candidates straight from PLAID's compressed tokens. In Triton (GPU, or the
interpreter in tests) it decodes them tile by tile inside the kernel
(:mod:`colengine.kernels.codes`, imported on demand; PLAID's stage 4 uses it on CUDA)::

    codes.score_candidates_codes(queries, query_lengths, codes, residuals, lut, centroids,
                                 tok_offsets, candidates, *, normalize=True)   # -> [B, C]

and its CPU twin, compiled by numba (:mod:`colengine.kernels.codes_cpu`, same arguments, CPU
tensors; PLAID's exact scoring on the CPU uses it): ``codes_cpu.score_candidates_codes_cpu``.

Inputs may be float32, float16 or bfloat16 (queries and documents may differ: the Triton backend
casts the queries to the documents' dtype, the torch backend computes in fp32); outputs are
float32 on the inputs' device. Lengths and offsets are int64 (int32 accepted). Forward only.

Semantics (all backends):

* tokens past a length are never read: padding may contain anything;
* a document of length 0, and a ``-1`` candidate, score ``-inf``;
* a query of length 0 scores ``0`` against a non-empty document (the sum over an empty set of
  query tokens, as the einsum reference gives);
* accumulation is fp32.

``backend``: ``"auto"`` (Triton for CUDA tensors when triton is installed and d is a multiple of 16
up to 256, the torch fallback otherwise, e.g. on CPU and Apple MPS), ``"triton"`` or ``"torch"``.
``backend="triton"`` on CPU tensors works only under ``TRITON_INTERPRET=1`` (tests); triton is
imported lazily, so this package imports fine where triton is not installed (macOS).
Every mistake in rank, shape, dimension, dtype, device, length, offset or candidate id raises a
``ValueError`` that says what was expected.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
from torch import Tensor

from . import _validate as V
from . import torch_impl
from ._interpret import interpret_mode

__all__ = [
    "score_candidates_padded",
    "score_candidates_packed",
    "score_pairs_packed",
    "triton_available",
    "resolve_backend",
]

_TRITON_MAX_D = 256


def triton_available() -> bool:
    """True when the ``triton`` package can be imported (never imports it)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # e.g. sys.modules["triton"] = None
        return False


def _triton_d_ok(d: int) -> bool:
    return d % 16 == 0 and 16 <= d <= _TRITON_MAX_D


def resolve_backend(backend: str, device: torch.device, d: int) -> str:
    """The backend a call with these inputs runs on: ``"triton"`` or ``"torch"``."""
    V.check_backend(backend)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        if device.type == "cuda" and triton_available() and _triton_d_ok(d):
            return "triton"
        return "torch"
    # explicit triton
    if not triton_available():
        raise ValueError(
            "backend='triton' needs the triton package, which is not installed "
            "(use backend='torch' or 'auto')"
        )
    if device.type == "cuda":
        pass
    elif device.type == "cpu" and interpret_mode():
        pass
    else:
        raise ValueError(
            f"backend='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), "
            f"got tensors on {device}; use backend='torch' or 'auto'"
        )
    if not _triton_d_ok(d):
        raise ValueError(
            f"backend='triton' supports embedding dims that are multiples of 16 up to "
            f"{_TRITON_MAX_D}, got d={d}; use backend='torch'"
        )
    return "triton"


def score_candidates_padded(
    queries: Tensor,
    docs: Tensor,
    query_lengths: Tensor,
    doc_lengths: Tensor,
    *,
    backend: str = "auto",
) -> Tensor:
    """MaxSim of each query against its own padded candidate documents.

    Args:
        queries: ``[B, Lq, d]`` fp32/fp16/bf16.
        docs: ``[B, n, Ld, d]`` fp32/fp16/bf16.
        query_lengths: int ``[B]``, each in ``[0, Lq]``.
        doc_lengths: int ``[B, n]``, each in ``[0, Ld]``.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.

    Returns:
        ``[B, n]`` fp32: ``out[b, k] = MaxSim(queries[b, :ql[b]], docs[b, k, :dl[b, k]])``.
    """
    V.check_backend(backend)
    V.check_float("queries", queries, 3)
    V.check_float("docs", docs, 4)
    bsz, lq, d = queries.shape
    if docs.shape[0] != bsz:
        raise ValueError(f"docs must have shape [B={bsz}, n, Ld, d], got {tuple(docs.shape)}")
    V.check_dim("docs", docs.shape[3], "queries", d)
    V.check_int("query_lengths", query_lengths, (bsz,))
    V.check_int("doc_lengths", doc_lengths, (bsz, docs.shape[1]))
    device = V.check_same_device(
        queries=queries, docs=docs, query_lengths=query_lengths, doc_lengths=doc_lengths
    )
    V.check_lengths("query_lengths", query_lengths, lq)
    V.check_lengths("doc_lengths", doc_lengths, docs.shape[2])
    if resolve_backend(backend, device, d) == "triton":
        from . import padded

        return padded.score_candidates_padded(queries, docs, query_lengths, doc_lengths)
    return torch_impl.score_candidates_padded(queries, docs, query_lengths, doc_lengths)


def score_candidates_packed(
    queries: Tensor,
    query_lengths: Tensor,
    doc_tokens: Tensor,
    doc_offsets: Tensor,
    candidates: Tensor,
    *,
    backend: str = "auto",
) -> Tensor:
    """MaxSim of each query against candidate documents taken straight from a packed store.

    Args:
        queries: ``[B, Lq, d]`` fp32/fp16/bf16.
        query_lengths: int ``[B]``, each in ``[0, Lq]``.
        doc_tokens: ``[T, d]`` fp32/fp16/bf16; document ``i`` is ``doc_tokens[o[i]:o[i+1]]``.
        doc_offsets: int64 ``[N+1]``, ``o[0] = 0``, non-decreasing, ``o[N] = T``.
        candidates: int64 ``[B, C]`` ids in ``[0, N)``, or ``-1`` for "no candidate"; ids may
            repeat. No padded copy of the candidates is built.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.

    Returns:
        ``[B, C]`` fp32 (``-inf`` for ``-1`` and for empty documents).
    """
    V.check_backend(backend)
    V.check_float("queries", queries, 3)
    V.check_float("doc_tokens", doc_tokens, 2)
    bsz, lq, d = queries.shape
    V.check_dim("doc_tokens", doc_tokens.shape[1], "queries", d)
    V.check_int("query_lengths", query_lengths, (bsz,))
    if not isinstance(doc_offsets, Tensor) or not isinstance(candidates, Tensor):
        raise ValueError("doc_offsets and candidates must be torch.Tensors")
    V.check_same_device(
        queries=queries,
        query_lengths=query_lengths,
        doc_tokens=doc_tokens,
        doc_offsets=doc_offsets,
        candidates=candidates,
    )
    V.check_lengths("query_lengths", query_lengths, lq)
    n_docs = V.check_offsets("doc_offsets", doc_offsets, doc_tokens.shape[0], "doc_tokens")
    V.check_candidates(candidates, bsz, n_docs)
    return score_candidates_packed_unchecked(
        queries, query_lengths, doc_tokens, doc_offsets, candidates, backend=backend
    )


def score_candidates_packed_unchecked(
    queries: Tensor,
    query_lengths: Tensor,
    doc_tokens: Tensor | Callable[[Tensor], Tensor],
    doc_offsets: Tensor,
    candidates: Tensor,
    *,
    backend: str = "auto",
    row_scale: Tensor | None = None,
) -> Tensor:
    """:func:`score_candidates_packed` without the input checks: for colengine's own calls (PLAID's exact stage, the exhaustive index), which build these
    inputs themselves from validated data.

    The public function checks lengths, offsets and candidate ids by value on every call (on a
    GPU each check is a device -> host sync); this one trusts the caller: same device, int64
    (or int32) lengths in ``[0, Lq]``, offsets ``0 = o[0] <= ... <= o[N] = T``, candidates in
    ``[-1, N)``. Bad inputs give wrong scores or, on a GPU, out-of-bounds reads. Not public.

    ``row_scale`` (float32 ``[T]``, torch backend only): token ``t`` is
    ``doc_tokens[t] * row_scale[t]``, and ``doc_tokens`` may be int8 (PLAID's int8
    refinement vectors, scored where they are stored). ``doc_tokens`` may also be a function
    of int64 row numbers returning those rows as float32 (torch backend only: PLAID's
    residuals decoded chunk by chunk into the block the GEMM reads).
    """
    stored = isinstance(doc_tokens, Tensor)
    if resolve_backend(backend, queries.device, queries.shape[2]) == "triton":
        if row_scale is not None or not stored or not doc_tokens.is_floating_point():
            raise ValueError("row_scale, int8 token stores and token functions are scored by "
                             "the torch backend only; take float copies for backend='triton'")
        from . import packed

        return packed.score_candidates_packed(
            queries, query_lengths, doc_tokens, doc_offsets, candidates
        )
    return torch_impl.score_candidates_packed(
        queries, query_lengths, doc_tokens, doc_offsets, candidates, row_scale=row_scale
    )


def score_pairs_packed(
    q_tokens: Tensor,
    q_offsets: Tensor,
    d_tokens: Tensor,
    d_offsets: Tensor,
    *,
    backend: str = "auto",
) -> Tensor:
    """MaxSim of ``P`` ragged (query, document) pairs, both sides packed.

    Args:
        q_tokens: ``[Tq, d]``; query ``p`` is ``q_tokens[q_offsets[p]:q_offsets[p+1]]``.
        q_offsets: int64 ``[P+1]`` (0 first, non-decreasing, ``Tq`` last).
        d_tokens: ``[Td, d]``; document ``p`` is ``d_tokens[d_offsets[p]:d_offsets[p+1]]``.
        d_offsets: int64 ``[P+1]``.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.

    Returns:
        ``[P]`` fp32.
    """
    V.check_backend(backend)
    V.check_float("q_tokens", q_tokens, 2)
    V.check_float("d_tokens", d_tokens, 2)
    d = q_tokens.shape[1]
    V.check_dim("d_tokens", d_tokens.shape[1], "q_tokens", d)
    if not isinstance(q_offsets, Tensor) or not isinstance(d_offsets, Tensor):
        raise ValueError("q_offsets and d_offsets must be torch.Tensors")
    device = V.check_same_device(
        q_tokens=q_tokens, q_offsets=q_offsets, d_tokens=d_tokens, d_offsets=d_offsets
    )
    n_q = V.check_offsets("q_offsets", q_offsets, q_tokens.shape[0], "q_tokens")
    n_d = V.check_offsets("d_offsets", d_offsets, d_tokens.shape[0], "d_tokens")
    if n_q != n_d:
        raise ValueError(
            f"q_offsets and d_offsets must both have P+1 entries, got {n_q + 1} and {n_d + 1}"
        )
    if resolve_backend(backend, device, d) == "triton":
        from . import packed

        return packed.score_pairs_packed(q_tokens, q_offsets, d_tokens, d_offsets)
    return torch_impl.score_pairs_packed(q_tokens, q_offsets, d_tokens, d_offsets)
