"""Refinement vectors: a second, finer copy of every stored token for the exact stage.

PLAID's residual codes (32 bytes a token at nbits 2) cap how faithful stage 4 can be: scored
on decoded vectors, even *every* document ranked by exact MaxSim finds only ~0.88 of the
exhaustive top-10 on SciFact with the MiniLM stand-in (bench/bench_codec_ceiling.py). Like
faiss's ``IndexRefine``, a PLAID index built with ``refine=`` keeps each token once more at a
finer precision, and the exact stage (stage 4, exact scoring of a filter's allowed documents,
:meth:`~colengine.index.plaid.PlaidIndex.score`, reranking, tuning's reference) reads those
instead of decoding residuals. Candidate generation (stages 2 and 3) reads centroid ids only,
so it is unchanged. The file is memory-mapped: a search reads only its candidates' rows, and
on the torch backend (CPU, MPS) the MaxSim kernel reads them where they are stored: int8 rows
are converted a chunk at a time and each token's scale multiplies its similarities
(:func:`colengine.kernels.torch_impl.segment_maxsim`), so no float32 copy of the candidates
is made (Triton, which multiplies float tiles, gets :func:`take`'s float32 copies).

Kinds (bytes a token on top of the PLAID index, ``d = 128``):

* ``"float16"``: the vectors as float16 (``2 d`` = 256 bytes): the exhaustive index's own
  precision, so stage 4 gives exhaustive's scores.
* ``"int8"``: per-token symmetric int8 (``d`` + 4 = 132 bytes): each token scaled by its
  largest absolute coordinate / 127; scores within ~1e-3 of float16's.

>>> import numpy as np, torch
>>> x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
>>> vec, scale = encode(x, "int8")
>>> vec.dtype, scale.dtype, vec.shape, scale.shape
(dtype('int8'), dtype('float32'), (5, 8), (5,))
>>> y = take(torch.from_numpy(vec), torch.from_numpy(scale), torch.arange(5))
>>> bool(np.abs(y.numpy() - x).max() <= np.abs(x).max() / 254 + 1e-6)
True
>>> check_refine("bfloat16")
Traceback (most recent call last):
ValueError: refine must be one of None, 'float16', 'int8'; got 'bfloat16'
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["REFINE_KINDS", "check_refine", "encode", "empty", "kind_of", "take"]

#: the refinement kinds and the dtype each stores its vectors in
REFINE_KINDS: dict[str, np.dtype] = {"float16": np.dtype(np.float16), "int8": np.dtype(np.int8)}

_CHUNK = 1 << 16   # tokens encoded at a time (bounds the float32 temporaries)


def check_refine(kind: object) -> str | None:
    """``kind`` if it is ``None`` or one of :data:`REFINE_KINDS`, else ``ValueError``."""
    if kind is None or (isinstance(kind, str) and kind in REFINE_KINDS):
        return kind
    raise ValueError(f"refine must be one of None, {', '.join(map(repr, REFINE_KINDS))}; got {kind!r}")


def kind_of(vectors: np.ndarray | None) -> str | None:
    """The kind of stored refinement ``vectors`` (by dtype; ``None`` for none)."""
    if vectors is None:
        return None
    for kind, dt in REFINE_KINDS.items():
        if vectors.dtype == dt:
            return kind
    raise ValueError(f"refinement vectors of dtype {vectors.dtype} (expected float16 or int8)")


def empty(kind: str, n_tokens: int, dim: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Uninitialised (vectors ``[T, d]``, scales ``[T]`` or ``None``) of ``kind``."""
    vec = np.empty((n_tokens, dim), dtype=REFINE_KINDS[kind])
    return vec, (np.empty(n_tokens, dtype=np.float32) if kind == "int8" else None)


def encode(tokens, kind: str, out: tuple[np.ndarray, np.ndarray | None] | None = None
           ) -> tuple[np.ndarray, np.ndarray | None]:
    """Token vectors ``[T, d]`` (any float array or tensor) as refinement (vectors, scales):
    float16 vectors and no scales, or int8 vectors and float32 scales. Written into ``out``
    (from :func:`empty`, e.g. memory-mapped files) when given."""
    check_refine(kind)
    n, d = tokens.shape
    vec, scale = out if out is not None else empty(kind, n, d)
    for a in range(0, n, _CHUNK):
        part = tokens[a:a + _CHUNK]   # a float32 copy of one chunk (inputs may be read-only)
        x = (part.to(torch.float32) if isinstance(part, torch.Tensor)
             else torch.from_numpy(np.array(part, dtype=np.float32)))
        if kind == "float16":
            vec[a:a + x.shape[0]] = x.to(torch.float16).numpy()
            continue
        s = x.abs().amax(dim=1).div_(127.0)
        q = torch.round(x / s.clamp_min(1e-30).unsqueeze(1)).clamp_(-127, 127)
        vec[a:a + x.shape[0]] = q.to(torch.int8).numpy()
        scale[a:a + x.shape[0]] = s.numpy()   # type: ignore[index]
    return vec, scale


def take(vectors: torch.Tensor, scales: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    """float32 ``[len(rows), d]``: the refinement vectors of token ``rows``."""
    x = vectors.index_select(0, rows).to(torch.float32)
    if scales is not None:
        x.mul_(scales.index_select(0, rows).unsqueeze(1))
    return x
