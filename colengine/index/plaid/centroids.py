"""Centroids: spherical k-means (faiss) on a sample of token vectors, token assignment, and
the centroids' storage form.

Storage: a trained centroid is rounded to ``q * 2**e`` with ``q`` an int8 vector and ``e`` one
int8 exponent per centroid, the smallest power of two that keeps ``|q| <= 127``
(:func:`quantize_centroids`). Such values are exact in float16, so the index keeps the float16
array it always had in memory while the files hold one byte a dimension
(:func:`centroid_arrays` / :func:`centroids_from_arrays`, which round-trip bit for bit). The
rounding moves a centroid by at most ``max|c| / 127`` a dimension (~0.003 for unit
centroids in 128 dimensions): the residuals are taken against the rounded centroid, so it
only shifts what the residual codec encodes. On SciFact (K = 16,384) the centroids were 3.8
of the 38 bytes per token.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["MIN_POINTS_PER_CENTROID", "HNSW_MIN_CENTROIDS", "default_n_centroids",
           "cap_n_centroids", "plaid_rule", "sample_rows", "train_centroids", "assign", "centroid_index",
           "CentroidGroups",
           "quantize_centroids", "centroid_arrays", "centroids_from_arrays"]

#: faiss warns below 39 training points per centroid; we never ask for more centroids than that.
MIN_POINTS_PER_CENTROID = 39
#: From this many centroids on, k-means and token assignment find the nearest centroid through
#: an HNSW graph over the centroids instead of a brute-force scan. On SciFact (1.1M MiniLM
#: tokens, K = 16,384) that cut k-means from 37 s to 14 s and assignment from 43 s to 11 s on
#: 2 cores, with the same k-means objective (mean best inner product 0.8903 vs 0.8905) and
#: 99.7% of tokens given the exact nearest centroid (the rest get a near one, which only
#: widens their residual a little). Below it the exact scan is cheap and is kept.
HNSW_MIN_CENTROIDS = 4096
#: From this many centroids on, k-means and token assignment no longer use HNSW. k-means
#: assigns through a faiss inverted file (``K / 64`` lists, :data:`_KMEANS_IVF_NPROBE`
#: probed, its coarse level trained once on the sample); on the synthetic corpus (K = 131,072,
#: 2M sampled tokens, 2 cores; bench/bench_assign.py, 2026-12-07) an iteration took 94 s
#: instead of HNSW's 181 s and ended at a higher objective (mean best inner product of held-out
#: tokens 0.590 vs 0.575 after one iteration; 16 probes: 55 s, 0.570). Token assignment goes
#: through :class:`CentroidGroups` (two levels of matrix products).
IVF_MIN_CENTROIDS = 65536
_KMEANS_IVF_LIST_SIZE = 64
_KMEANS_IVF_NPROBE = 32
#: :class:`CentroidGroups`: centroids a group, groups probed a token
_GROUP_SIZE = 256
_GROUP_PROBE = 8
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


def _kmeans_ivf(x: np.ndarray, k: int, seed: int):
    """An inverted file for k-means' assignments to ``k`` centroids: its ``k / 64`` lists are
    trained once on a sample of ``x`` (64 points a list); k-means refills it with the
    centroids of each iteration, which stay near the data the lists were trained on."""
    import faiss

    nlist = max(1, k // _KMEANS_IVF_LIST_SIZE)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(x.shape[1]), x.shape[1], nlist,
                               faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = int(seed)
    index.train(x[sample_rows(x.shape[0], nlist * _KMEANS_IVF_LIST_SIZE, seed + 2)])
    index.nprobe = min(nlist, _KMEANS_IVF_NPROBE)
    return index


def train_centroids(sample: np.ndarray, k: int, *, niter: int = 4, seed: int = 0) -> np.ndarray:
    """Spherical k-means of ``sample`` (float ``[n, d]``) into ``k`` unit centroids ``[k, d]`` float32.

    ``k`` is lowered to the number of points when there are fewer. faiss is told not to
    subsample and not to warn: the caller already chose the sample size and ``k``. From
    :data:`HNSW_MIN_CENTROIDS` on, each iteration's assignment goes through an HNSW graph,
    from :data:`IVF_MIN_CENTROIDS` on through an inverted file.
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
    if k >= IVF_MIN_CENTROIDS:
        km.index = _kmeans_ivf(x, k, seed)        # faiss resets and refills it every iteration
    elif k >= HNSW_MIN_CENTROIDS:
        km.index = _hnsw_ip(d, _HNSW_EF_KMEANS)
    km.train(x)
    return _normalise(np.asarray(km.centroids, dtype=np.float32).reshape(k, d))


_ASSIGN_BLOCK = 4096


class CentroidGroups:
    """Nearest-centroid search for many centroids (:data:`IVF_MIN_CENTROIDS` and up) in two
    levels of matrix products: the centroids are grouped by spherical k-means into groups of
    about ``group_size``; a token is compared with every group's centre, then with every
    centroid of its ``n_probe`` best groups, and takes the best of those.

    A faiss inverted file does the same with a per-token scan of each list; here the second
    level is one matrix product a group over all the tokens that probe it. On the synthetic
    corpus's 131,072 trained centroids (bench/bench_assign.py, 2 cores, 2026-12-07) it assigned
    1.24x the tokens a second of faiss IVF (``K / 64`` lists, 8 probed: 72.8k vs 58.5k) and
    found the exact nearest more often (43% vs 41% of tokens; mean inner-product gap to it 0.096
    vs 0.107: that corpus's tokens have many near-equal centroids).
    With ``n_probe`` >= the number of groups it is exact.

    >>> rng = np.random.default_rng(0)
    >>> C = rng.standard_normal((512, 16)).astype(np.float32)
    >>> C /= np.linalg.norm(C, axis=1, keepdims=True)
    >>> g = CentroidGroups(C, group_size=64, n_probe=8)     # 8 groups, all probed: exact
    >>> x = torch.from_numpy(rng.standard_normal((100, 16)).astype(np.float32))
    >>> bool(torch.equal(g.nearest(x), (x @ torch.from_numpy(C).T).argmax(1)))
    True
    """

    def __init__(self, centroids: np.ndarray, group_size: int = _GROUP_SIZE,
                 n_probe: int = _GROUP_PROBE, seed: int = 0, block: int = 1 << 16) -> None:
        import faiss

        c = np.ascontiguousarray(centroids, dtype=np.float32)
        k, d = c.shape
        g = max(1, k // int(group_size))
        if g > 1:
            km = faiss.Kmeans(d, g, niter=10, spherical=True, seed=int(seed), verbose=False,
                              min_points_per_centroid=1, max_points_per_centroid=256)
            km.train(c)
            heads = np.asarray(km.centroids, dtype=np.float32).reshape(g, d)
            group = (torch.from_numpy(c) @ torch.from_numpy(heads).T).argmax(1).numpy()
            # a centre no centroid is nearest to (duplicate centroids give equal centres)
            # would be probed for nothing: keep the groups that have members
            used = np.unique(group)
            heads, group, g = heads[used], np.searchsorted(used, group), used.size
        else:
            heads, group = c.mean(axis=0, keepdims=True), np.zeros(k, dtype=np.int64)
        order = np.argsort(group, kind="stable")
        self.heads = torch.from_numpy(np.ascontiguousarray(heads))
        self.order = torch.from_numpy(order.astype(np.int64))
        self.members = torch.from_numpy(c[order])
        self.starts = np.searchsorted(group[order], np.arange(g + 1)).tolist()
        self.n_probe = max(1, min(int(n_probe), g))
        self.block = int(block)

    def nearest(self, tokens: torch.Tensor) -> torch.Tensor:
        """Number of the (near-)nearest centroid of each row of ``tokens`` (float32 ``[n, d]``,
        CPU); int64 ``[n]``."""
        out = torch.empty(tokens.shape[0], dtype=torch.int64)
        g, p = self.heads.shape[0], self.n_probe
        for a in range(0, tokens.shape[0], self.block):
            x = tokens[a:a + self.block]
            n = x.shape[0]
            probe = (x @ self.heads.T).topk(p, dim=1).indices.reshape(-1)   # [n * p]
            by_group = torch.argsort(probe, stable=True)
            tok = by_group // p
            bounds = torch.searchsorted(probe[by_group], torch.arange(g + 1)).tolist()
            best = torch.empty(n * p)
            arg = torch.empty(n * p, dtype=torch.int64)
            for j in range(g):
                u, v = bounds[j], bounds[j + 1]
                if u == v:
                    continue
                lo, hi = self.starts[j], self.starts[j + 1]
                m = (x[tok[u:v]] @ self.members[lo:hi].T).max(dim=1)
                rows = by_group[u:v]
                best[rows] = m.values
                arg[rows] = m.indices + lo
            pick = best.view(n, p).argmax(dim=1, keepdim=True)
            out[a:a + n] = self.order[arg.view(n, p).gather(1, pick)[:, 0]]
        return out


def assign(tokens: torch.Tensor, centroids: torch.Tensor, index=None) -> torch.Tensor:
    """Nearest centroid (max inner product) of each row of ``tokens``; int64 ``[n]``.

    On the CPU pass ``index`` (:func:`centroid_index` of the centroids): faiss either fuses
    the blocked matrix product with the arg-max (no ``[n, K]`` score block is materialised) or
    walks an HNSW graph, or :class:`CentroidGroups` searches two levels. Without it (GPU) the
    exact arg-max is taken in blocks.
    """
    if tokens.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64, device=centroids.device)
    if index is not None and tokens.device.type == "cpu":
        if isinstance(index, CentroidGroups):
            return index.nearest(tokens.to(torch.float32))
        _, ids = index.search(np.ascontiguousarray(tokens.numpy(), dtype=np.float32), 1)
        return torch.from_numpy(ids[:, 0].astype(np.int64))
    out = torch.empty(tokens.shape[0], dtype=torch.int64, device=centroids.device)
    for a in range(0, tokens.shape[0], _ASSIGN_BLOCK):
        x = tokens[a:a + _ASSIGN_BLOCK].to(centroids.dtype)
        out[a:a + _ASSIGN_BLOCK] = (x @ centroids.T).argmax(dim=1)
    return out


def centroid_index(centroids: np.ndarray):
    """A nearest-centroid index over ``centroids`` (float32 ``[K, d]``) for :func:`assign`:
    a faiss exact scan below :data:`HNSW_MIN_CENTROIDS` centroids, faiss HNSW below
    :data:`IVF_MIN_CENTROIDS`, :class:`CentroidGroups` above."""
    import faiss

    c = np.ascontiguousarray(centroids, dtype=np.float32)
    k, d = c.shape
    if k >= IVF_MIN_CENTROIDS:
        return CentroidGroups(c, _GROUP_SIZE, _GROUP_PROBE)
    index = faiss.IndexFlatIP(d) if k < HNSW_MIN_CENTROIDS else _hnsw_ip(d, _HNSW_EF_ASSIGN)
    index.add(c)
    return index


# -- storage form ----------------------------------------------------------------------------
#: int8 exponents that keep ``q * 2**e`` (``|q| <= 127``) exact and finite in float16
_EXP_MIN, _EXP_MAX = -24, 8


def _row_absmax(c: np.ndarray) -> np.ndarray:
    return np.abs(c).max(axis=1) if c.shape[1] else np.zeros(c.shape[0], dtype=np.float32)


def _split(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row exponents ``e`` (int8 ``[K]``, the smallest power of two with
    ``max|row| / 2**e <= 127``, clipped to float16's exact range) and ``q = round(c / 2**e)``
    (int8 ``[K, d]``) of float ``c``."""
    c = np.asarray(c, dtype=np.float32)
    amax = _row_absmax(c)
    with np.errstate(divide="ignore"):
        e = np.ceil(np.log2(np.where(amax > 0, amax, 1.0) / 127.0))
    e = np.clip(e, _EXP_MIN, _EXP_MAX).astype(np.int8)
    q = np.clip(np.rint(np.ldexp(c, -e.astype(np.int32)[:, None])), -127, 127).astype(np.int8)
    return q, e


def _join(q: np.ndarray, e: np.ndarray) -> np.ndarray:
    return np.ldexp(q.astype(np.float32), e.astype(np.int32)[:, None]).astype(np.float16)


def quantize_centroids(c: np.ndarray) -> np.ndarray:
    """``c`` (float ``[K, d]``) rounded to the storage grid, as float16 (exact).

    >>> c = np.array([[0.6, -0.8, 0.0], [0.01, 0.02, -0.03]], dtype=np.float32)
    >>> cq = quantize_centroids(c)
    >>> cq.dtype, bool(np.all(np.abs(cq - c) <= np.abs(c).max(axis=1, keepdims=True) / 127))
    (dtype('float16'), True)
    >>> sorted(centroid_arrays(cq))          # stored as one byte a dimension
    ['centroid_exponents', 'centroid_q']
    >>> bool(np.array_equal(centroids_from_arrays(centroid_arrays(cq)), cq))
    True
    """
    c = np.asarray(c, dtype=np.float32)
    out = _join(*_split(c))
    # beyond 127 * 2**8 the grid cannot hold a row: it keeps plain float16 (and the whole
    # array is then stored as float16, see centroid_arrays)
    big = _row_absmax(c) > 127 * 2.0 ** _EXP_MAX
    out[big] = c[big].astype(np.float16)
    return out


def centroid_arrays(c16: np.ndarray) -> dict[str, np.ndarray]:
    """The arrays that store float16 centroids ``[K, d]``: ``centroid_q`` (int8) and
    ``centroid_exponents`` (int8 ``[K]``) when they lie on the grid of
    :func:`quantize_centroids` (every centroid trained since that grid), otherwise the
    float16 array itself as ``centroids`` (an index trained before it keeps its values)."""
    c16 = np.asarray(c16)
    q, e = _split(c16)
    if c16.dtype == np.float16 and np.array_equal(_join(q, e).view(np.uint16), c16.view(np.uint16)):
        return {"centroid_q": q, "centroid_exponents": e}
    return {"centroids": np.asarray(c16, dtype=np.float16)}


def centroids_from_arrays(arrays) -> np.ndarray:
    """Float16 centroids ``[K, d]`` from stored arrays (either form of
    :func:`centroid_arrays`); ``ValueError`` naming the problem when they do not fit."""
    if "centroids" in arrays:
        c = arrays["centroids"]
        if c.dtype != np.float16 or c.ndim != 2:
            raise ValueError(f"centroids must be float16 [K, d], got {c.dtype} {c.shape}")
        return c
    q, e = np.asarray(arrays["centroid_q"]), np.asarray(arrays["centroid_exponents"])
    if q.dtype != np.int8 or q.ndim != 2:
        raise ValueError(f"centroid_q must be int8 [K, d], got {q.dtype} {q.shape}")
    if e.dtype != np.int8 or e.shape != (q.shape[0],):
        raise ValueError(f"centroid_exponents must be int8 [{q.shape[0]}], got {e.dtype} {e.shape}")
    if e.size and (int(e.min()) < _EXP_MIN or int(e.max()) > _EXP_MAX):
        raise ValueError(f"centroid_exponents must lie in [{_EXP_MIN}, {_EXP_MAX}], got "
                         f"[{int(e.min())}, {int(e.max())}]")
    if q.size and int(q.min()) < -127:
        raise ValueError("centroid_q holds -128 (the grid is -127..127)")
    return _join(q, e)
