"""Building a PLAID index as plain functions: train (centroids + codec on a token sample),
assign and encode (tokens -> centroid codes + packed residuals).

:meth:`PlaidIndex.build`, the streaming build (:mod:`.streaming`), ``add`` and ``retrain`` all
go through these; they take arrays and return arrays or a small frozen dataclass, and know
nothing of the index object, its lifecycle or its files.

>>> rng = np.random.default_rng(0)
>>> x = rng.standard_normal((2000, 16)).astype(np.float32)
>>> x /= np.linalg.norm(x, axis=1, keepdims=True)
>>> t = train(x, n_centroids=8, nbits=2, seed=0, kmeans_niter=4, device=torch.device("cpu"))
>>> t.centroids.shape, t.centroids.dtype, t.normalized, t.codec.kind
((8, 16), dtype('float16'), True, 'product')
>>> enc = encode_tokens(x[:5], t.assigner, t.codec)
>>> enc.codes.dtype, enc.residuals.shape
(dtype('int16'), (5, 4))
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from colengine.index.plaid.centroids import (MIN_POINTS_PER_CENTROID, assign, cap_n_centroids,
                                             centroid_index, default_n_centroids, plaid_rule,
                                             quantize_centroids, sample_rows,
                                             train_centroids)
from colengine.index.plaid.codec import CODECS, VALID_NBITS, ResidualCodec, fit_codec

__all__ = ["EXACT_ASSIGN_TOKENS", "Assigner", "Encoded", "Trained", "check_build_args",
           "centroid_rule", "code_dtype", "encode_tokens", "make_assigner", "n_centroids_for", "train"]

#: fewer tokens than this are assigned to centroids by an exact arg-max, without building a
#: faiss centroid index (small, frequent adds: a server's stream of writes).
EXACT_ASSIGN_TOKENS = 16_384
#: tokens per compression chunk
CHUNK = 1 << 16
#: residuals the codec is fitted on
CODEC_SAMPLE = 1 << 16


def check_build_args(nbits, n_centroids, codec: str = "product") -> None:
    """Clear errors for a bad ``codec``, ``nbits`` or ``n_centroids``, before any work."""
    if codec not in CODECS:
        raise ValueError(f"codec must be one of {sorted(CODECS)}, got {codec!r}")
    if nbits not in VALID_NBITS:
        raise ValueError(f"nbits must be one of {VALID_NBITS}, got {nbits!r}")
    if n_centroids is not None and (
            isinstance(n_centroids, bool) or not isinstance(n_centroids, (int, np.integer))
            or n_centroids < 1):
        raise ValueError(f"n_centroids must be a positive int, got {n_centroids!r}")


def n_centroids_for(n_tokens: int, n_centroids: int | None) -> int:
    """PLAID's rule for ``n_tokens`` tokens, or ``n_centroids`` capped by what they support."""
    if n_centroids is None:
        return default_n_centroids(n_tokens)
    return cap_n_centroids(int(n_centroids), n_tokens)


def centroid_rule(n_tokens: int, n_centroids: int | None, *, warn: bool = False) -> dict:
    """How the number of centroids was chosen, for the manifest (nothing is capped silently):
    ``used``, PLAID's ``rule`` for ``n_tokens``, the ``asked`` number (``None``: the rule) and
    ``capped`` (``None`` or why fewer than asked / the rule were used); builds take ``used``
    from it and store the record. With ``warn``, a
    capped number the caller asked for explicitly is also a warning (the rule is capped for
    every corpus under ~390k tokens, which is expected and only recorded).

    >>> centroid_rule(1_000_000, None)
    {'used': 8192, 'rule': 8192, 'asked': None, 'capped': None}
    >>> centroid_rule(10_000, 4096)["capped"]
    'at most one centroid per 39 tokens (k-means needs them): 4096 asked, 256 used'
    """
    rule = plaid_rule(n_tokens)
    used = n_centroids_for(n_tokens, n_centroids)
    want = rule if n_centroids is None else int(n_centroids)
    capped = None
    if used < want:
        capped = (f"at most one centroid per {MIN_POINTS_PER_CENTROID} tokens (k-means needs "
                  f"them): {want} {'asked' if n_centroids is not None else 'by the rule'}, "
                  f"{used} used")
        if warn and n_centroids is not None:
            warnings.warn(f"n_centroids capped: {capped}", stacklevel=3)
    return {"used": used, "rule": rule, "asked": n_centroids, "capped": capped}


def code_dtype(n_centroids: int):
    """The narrowest signed integer type holding every centroid number."""
    return np.int16 if n_centroids <= 32768 else np.int32


@dataclass(frozen=True)
class Assigner:
    """Float32 centroids on the assignment device, and a faiss centroid index (CPU, many
    tokens) or ``None`` (exact arg-max)."""

    C: torch.Tensor
    index: object = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return assign(x, self.C, self.index)


def make_assigner(centroids: np.ndarray, device: torch.device,
                  n_tokens: int | None = None) -> Assigner:
    """An :class:`Assigner` for ``centroids``. For fewer than :data:`EXACT_ASSIGN_TOKENS`
    tokens to assign no index is built: building it (HNSW over thousands of centroids: a
    second or more) costs far more than the exact arg-max of a few documents."""
    C = torch.from_numpy(np.asarray(centroids).astype(np.float32, copy=False)).to(device)
    small = n_tokens is not None and n_tokens < EXACT_ASSIGN_TOKENS
    return Assigner(C, centroid_index(C.numpy()) if device.type == "cpu" and not small else None)


@dataclass(frozen=True)
class Trained:
    """What training produces: float16 centroids (on the storage grid of
    :func:`~colengine.index.plaid.centroids.quantize_centroids`), the residual codec, whether
    the tokens are unit vectors, and an assigner for the centroids."""

    centroids: np.ndarray
    codec: ResidualCodec
    normalized: bool
    assigner: Assigner


def train(sample: np.ndarray, n_centroids: int, nbits: int, seed: int, kmeans_niter: int,
          device: torch.device, codec: str = "product") -> Trained:
    """Spherical k-means centroids on a token ``sample`` ``[n, d]``, then the codec fitted on
    the residuals of a sub-sample of it."""
    sample = np.asarray(sample, dtype=np.float32)
    norms = np.linalg.norm(sample, axis=1)
    normalized = bool(np.all(np.abs(norms - 1.0) < 1e-2))
    cent16 = quantize_centroids(train_centroids(sample, n_centroids, niter=kmeans_niter, seed=seed))
    asg = make_assigner(cent16, device)
    s = torch.from_numpy(sample[sample_rows(sample.shape[0], CODEC_SAMPLE, seed + 1)]).to(device)
    residuals = s - asg.C[asg(s)]
    rcodec = fit_codec(codec, residuals.cpu().numpy(), nbits, seed=seed)
    return Trained(cent16, rcodec, normalized, asg)


@dataclass(frozen=True)
class Encoded:
    """Tokens encoded: centroid codes ``[T]``, packed residuals uint8 ``[T, packed_dim]`` and
    the sum of the residuals' L2 norms (drift statistics)."""

    codes: np.ndarray
    residuals: np.ndarray
    norm_sum: float


def encode_tokens(tokens: np.ndarray, assigner: Assigner, codec: ResidualCodec) -> Encoded:
    """Assign every token to its nearest centroid and compress its residual, in chunks."""
    T = tokens.shape[0]
    C = assigner.C
    codes = np.empty(T, dtype=code_dtype(C.shape[0]))
    residuals = np.empty((T, codec.packed_dim), dtype=np.uint8)
    norm_sum = 0.0
    for a in range(0, T, CHUNK):
        b = min(T, a + CHUNK)
        x = torch.from_numpy(np.asarray(tokens[a:b], dtype=np.float32)).to(C.device)
        c = assigner(x)
        r = x - C[c]
        norm_sum += float(torch.linalg.vector_norm(r, dim=1).double().sum())
        residuals[a:b] = codec.compress(r).cpu().numpy()
        codes[a:b] = c.cpu().numpy()
    return Encoded(codes, residuals, norm_sum)
