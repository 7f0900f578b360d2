"""Centroids: spherical k-means (faiss) on a sample of token vectors, and token assignment."""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["MIN_POINTS_PER_CENTROID", "HNSW_MIN_CENTROIDS", "default_n_centroids",
           "cap_n_centroids", "plaid_rule", "sample_rows", "train_centroids", "assign", "centroid_index"]

#: faiss warns below 39 training points per centroid; we never ask for more centroids than that.
MIN_POINTS_PER_CENTROID = 39
#: From this many centroids on, k-means and token assignment find the nearest centroid through
#: an HNSW graph over the centroids instead of a brute-force scan. On SciFact (1.1M MiniLM
#: tokens, K = 16,384) that cut k-means from 37 s to 14 s and assignment from 43 s to 11 s on
#: 2 cores, with the same k-means objective (mean best inner product 0.8903 vs 0.8905) and
#: 99.7% of tokens given the exact nearest centroid (the rest get a near one, which only
#: widens their residual a little). Below it the exact scan is cheap and is kept.
HNSW_MIN_CENTROIDS = 4096
#: From this many centroids on, token assignment (not k-means) goes through an inverted file
#: over the centroids instead (faiss IVF: ``K / 64`` lists, :data:`_IVF_NPROBE` probed). On
#: the synthetic corpus's 131,072 centroids it assigned 2.7x more tokens a second than HNSW
#: (37k vs 14k on 2 busy cores) with as many exact nearest centroids (56% vs 58%: that
#: corpus's tokens sit between many near-equal centroids; the others get a near one).
IVF_MIN_CENTROIDS = 65536
_IVF_LIST_SIZE = 64
_IVF_NPROBE = 8
_HNSW_M = 32
_HNSW_EF_CONSTRUCTION = 40
_HNSW_EF_KMEANS = 16
_HNSW_EF_ASSIGN = 16


def _pow2_floor(x: float) -> int:
    return 1 if x < 2 else 2 ** int(math.floor(math.log2(x)))


def cap_n_centroids(k: int, n_tokens: int) -> int:
    """``k`` limited to what ``n_tokens`` supports (>= 39 points per centroid), at least 1."""
    return max(1, min(int(k), _pow2_floor(n_tokens / MIN_POINTS_PER_CENTROID)))


def plaid_rule(n_tokens: int) -> int:
    """PLAID's number of centroids for ``n_tokens`` tokens, ``2 ** floor(log2(16 * sqrt(T)))``
    (uncapped).

    >>> plaid_rule(815_632), plaid_rule(10_000)
    (8192, 1024)
    """
    return _pow2_floor(16 * math.sqrt(max(1, n_tokens)))


def default_n_centroids(n_tokens: int) -> int:
    """PLAID's rule (:func:`plaid_rule`), capped by :func:`cap_n_centroids`.

    >>> default_n_centroids(815_632), default_n_centroids(3), default_n_centroids(10_000)
    (8192, 1, 256)
    """
    return cap_n_centroids(plaid_rule(n_tokens), n_tokens)


def sample_rows(n: int, size: int, seed: int) -> np.ndarray:
    """Sorted positions of ``min(n, size)`` distinct rows, reproducible for a seed."""
    if size >= n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=size, replace=False)).astype(np.int64)


def _normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    out = x / np.maximum(norms, 1e-12)
    dead = norms[:, 0] < 1e-12  # an all-zero centroid (all-zero data): any unit vector will do
    if dead.any():
        out[dead] = 0.0
        out[dead, 0] = 1.0
    return out.astype(np.float32)


def _hnsw_ip(d: int, ef_search: int):
    import faiss

    index = faiss.IndexHNSWFlat(d, _HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = _HNSW_EF_CONSTRUCTION
    index.hnsw.efSearch = ef_search
    return index


def train_centroids(sample: np.ndarray, k: int, *, niter: int = 4, seed: int = 0) -> np.ndarray:
    """Spherical k-means of ``sample`` (float ``[n, d]``) into ``k`` unit centroids ``[k, d]`` float32.

    ``k`` is lowered to the number of points when there are fewer. faiss is told not to
    subsample and not to warn: the caller already chose the sample size and ``k``. From
    :data:`HNSW_MIN_CENTROIDS` on, each iteration's assignment goes through an HNSW graph.
    """
    x = np.ascontiguousarray(sample, dtype=np.float32)
    n, d = x.shape
    if n == 0:
        raise ValueError("cannot train centroids on zero tokens")
    k = max(1, min(int(k), n))
    if k == 1:
        return _normalise(x.mean(axis=0, keepdims=True))
    import faiss

    km = faiss.Kmeans(d, k, niter=max(1, int(niter)), spherical=True, seed=int(seed), verbose=False,
                      min_points_per_centroid=1, max_points_per_centroid=max(1, -(-n // k)))
    if k >= HNSW_MIN_CENTROIDS:
        km.index = _hnsw_ip(d, _HNSW_EF_KMEANS)   # faiss resets and refills it every iteration
    km.train(x)
    return _normalise(np.asarray(km.centroids, dtype=np.float32).reshape(k, d))


_ASSIGN_BLOCK = 4096


def assign(tokens: torch.Tensor, centroids: torch.Tensor, index=None) -> torch.Tensor:
    """Nearest centroid (max inner product) of each row of ``tokens``; int64 ``[n]``.

    On the CPU pass ``index`` (:func:`centroid_index` of the centroids): faiss either fuses
    the blocked matrix product with the arg-max (no ``[n, K]`` score block is materialised) or
    walks an HNSW graph. Without it (GPU) the exact arg-max is taken in blocks.
    """
    if tokens.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64, device=centroids.device)
    if index is not None and tokens.device.type == "cpu":
        _, ids = index.search(np.ascontiguousarray(tokens.numpy(), dtype=np.float32), 1)
        return torch.from_numpy(ids[:, 0].astype(np.int64))
    out = torch.empty(tokens.shape[0], dtype=torch.int64, device=centroids.device)
    for a in range(0, tokens.shape[0], _ASSIGN_BLOCK):
        x = tokens[a:a + _ASSIGN_BLOCK].to(centroids.dtype)
        out[a:a + _ASSIGN_BLOCK] = (x @ centroids.T).argmax(dim=1)
    return out


def centroid_index(centroids: np.ndarray):
    """A faiss inner-product index over ``centroids`` (float32 ``[K, d]``) for :func:`assign`:
    an exact scan below :data:`HNSW_MIN_CENTROIDS` centroids, HNSW below
    :data:`IVF_MIN_CENTROIDS`, an inverted file above."""
    import faiss

    c = np.ascontiguousarray(centroids, dtype=np.float32)
    k, d = c.shape
    if k < HNSW_MIN_CENTROIDS:
        index = faiss.IndexFlatIP(d)
    elif k < IVF_MIN_CENTROIDS:
        index = _hnsw_ip(d, _HNSW_EF_ASSIGN)
    else:
        nlist = max(1, k // _IVF_LIST_SIZE)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = 0
        index.train(c)            # k-means of the centroids into nlist groups
        index.nprobe = _IVF_NPROBE
    index.add(c)
    return index
