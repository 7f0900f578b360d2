"""A single-vector index on faiss: float32, int8 or binary codes, exact or HNSW.

=========  ======================================  ======================================
precision  ``ann="flat"`` (up to HNSW_MIN_DOCS)    ``ann="hnsw"`` (above)
=========  ======================================  ======================================
float32    ``IndexFlatIP``                         ``IndexHNSWFlat`` (inner product)
int8       ``IndexScalarQuantizer`` (8-bit codes)  ``IndexHNSWSQ`` (8-bit codes)
ubinary    ``IndexBinaryFlat`` (Hamming)           ``IndexBinaryHNSW`` (Hamming)
=========  ======================================  ======================================

Scores: the inner product (float32); the inner product of the dequantised query and
document (int8, :func:`colengine.dense.quantize.int8_query_terms`); ``dims - 2 * hamming``
(ubinary), or, with ``rescore="int8" | "float32"``, the float query's inner product with the
stored int8 (dequantised) or float32 vector of each of the ``rescore_multiplier * k`` best
binary candidates.

Deleted documents are tombstoned (their rows stay, marked in ``deleted``) and filtered
inside faiss with an ``IDSelectorBitmap``, as are the rows a metadata filter keeps; when
at most ``EXACT_ROWS`` rows are allowed they are scored exactly with numpy instead (an
HNSW graph walk through a small allowed set misses documents); above it, a filtered HNSW
search widens ``efSearch`` by ``1 / selectivity`` (at most ``MAX_EF_SEARCH``).

Persistence is the bundle format (:mod:`colengine.storage`): the vectors or codes, the
int8 ranges and the ids are ``.npy`` arrays; a flat faiss index is rebuilt from them at
load, an HNSW graph is stored as ``faiss.serialize_index`` bytes (a ``uint8`` array) and
checked against the arrays after it is read. Nothing is pickled.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from colengine.dense.encoder import check_precision, normalize
from colengine.dense.quantize import (
    binary_similarity,
    dequantize_int8,
    int8_query,
    int8_ranges,
    quantize_int8,
    quantize_ubinary,
)
from colengine.ids import IdMap, RowIds, as_id_list, default_ids
from colengine.index.base import check_k, check_positive_int
from colengine.storage import Bundle
from colengine.types import Hit

__all__ = ["EXACT_ROWS", "HNSW_MIN_DOCS", "RESCORE", "DenseIndex"]

#: ``ann="auto"`` builds a flat (exact) index up to this many documents, HNSW above.
HNSW_MIN_DOCS = 100_000
#: a filter (or the live rows after deletes) keeping at most this many rows is scored
#: exactly with numpy over those rows instead of going through faiss.
EXACT_ROWS = 16_384
RESCORE = (None, "int8", "float32")
#: a filtered HNSW search widens ``efSearch`` to ``candidates / selectivity``, up to this
MAX_EF_SEARCH = 16_384
_ADD_CHUNK = 65_536
_FORMAT = "dense-1"


class DenseIndex:
    """Unit vectors (one per document) under string ids; top-k by inner product.

    Build with :meth:`build` from float vectors (``DenseEncoder.encode_documents``):

    >>> x = np.array([[1, 0, 0, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0, 0, 0]], dtype=np.float32)
    >>> idx = DenseIndex.build(x, ["a", "b"], precision="int8")
    >>> [h.doc_id for h in idx.search(x[1], k=2)[0]]
    ['b', 'a']
    >>> idx.delete(["b"]); [h.doc_id for h in idx.search(x[1], k=2)[0]]
    ['a']
    """

    kind = "dense"

    def __init__(self, ids: RowIds, *, precision: str, dims: int, ann: str = "flat",
                 rescore: str | None = None, vectors: np.ndarray | None = None,
                 codes: np.ndarray | None = None, ranges: np.ndarray | None = None,
                 bits: np.ndarray | None = None, hnsw_m: int = 32, ef_search: int = 64,
                 hnsw_blob: np.ndarray | None = None) -> None:
        self.ids = ids
        self.precision = check_precision(precision)
        self.dims = int(dims)
        if ann not in ("flat", "hnsw"):
            raise ValueError(f"ann must be 'flat' or 'hnsw', got {ann!r}")
        self.ann = ann
        self.rescore = rescore
        self.hnsw_m = check_positive_int("hnsw_m", hnsw_m)
        self.ef_search = check_positive_int("ef_search", ef_search)
        self.vectors, self.codes, self.ranges, self.bits = vectors, codes, ranges, bits
        self._check_arrays()
        self._faiss = self._read_hnsw(hnsw_blob) if hnsw_blob is not None else self._new_faiss()
        if hnsw_blob is None:
            self._faiss_add(0, len(self.ids))

    # -- construction ----------------------------------------------------------------
    @classmethod
    def build(cls, vectors: np.ndarray, ids: Sequence[str] | None = None, *,
              precision: str = "float32", rescore: str | None = "auto", ann: str = "auto",
              hnsw_m: int = 32, ef_search: int = 64) -> DenseIndex:
        """Index unit vectors ``[n, d]`` (float). ``precision``: ``"float32"``, ``"int8"``
        (ranges calibrated on ``vectors``, kept for adds and queries) or ``"ubinary"``
        (``d`` divisible by 8). ``rescore`` (ubinary only): ``"int8"`` (default), ``"float32"``
        or ``None``. ``ann``: ``"flat"``, ``"hnsw"`` or ``"auto"`` (HNSW above
        :data:`HNSW_MIN_DOCS` documents)."""
        precision = check_precision(precision)
        rescore = _check_rescore(precision, rescore)
        x = _check_vectors(vectors, None)
        n, d = x.shape
        if precision == "ubinary" and d % 8:
            raise ValueError(f"precision 'ubinary' needs a dimension divisible by 8, got {d}")
        ids = default_ids(0, n) if ids is None else as_id_list(ids)
        if len(ids) != n:
            raise ValueError(f"got {len(ids)} ids for {n} vectors")
        if ann == "auto":
            ann = "hnsw" if n > HNSW_MIN_DOCS else "flat"
        arrays = _encode_rows(x, precision, rescore,
                              int8_ranges(x) if "int8" in (precision, rescore) else None)
        return cls(RowIds(ids), precision=precision, dims=d, ann=ann, rescore=rescore,
                   hnsw_m=hnsw_m, ef_search=ef_search, **arrays)

    @property
    def dim(self) -> int:
        return self.dims

    def __len__(self) -> int:
        return self.ids.n_live

    # -- faiss -------------------------------------------------------------------------
    def _new_faiss(self) -> Any:
        import faiss

        d, m = self.dims, self.hnsw_m
        if self.precision == "ubinary":
            return faiss.IndexBinaryHNSW(d, m) if self.ann == "hnsw" else faiss.IndexBinaryFlat(d)
        if self.precision == "int8":
            # faiss' 8-bit quantizer with the index's own ranges as its trained parameters
            # (vmin, vdiff): its codes are then exactly sentence-transformers' (+128), and it
            # scores a float query against the decoded bucket middles
            qt, ip = faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
            idx = (faiss.IndexHNSWSQ(d, qt, m, ip) if self.ann == "hnsw"
                   else faiss.IndexScalarQuantizer(d, qt, ip))
            store = faiss.downcast_index(idx.storage) if self.ann == "hnsw" else idx
            trained = np.concatenate([self.ranges[0], self.ranges[1] - self.ranges[0]])
            faiss.copy_array_to_vector(trained.astype(np.float32), store.sq.trained)
            store.is_trained = idx.is_trained = True
            return idx
        if self.ann == "hnsw":
            return faiss.IndexHNSWFlat(d, m, faiss.METRIC_INNER_PRODUCT)
        return faiss.IndexFlatIP(d)

    def _faiss_add(self, start: int, stop: int) -> None:
        for a in range(start, stop, _ADD_CHUNK):
            b = min(stop, a + _ADD_CHUNK)
            if self.precision == "ubinary":
                self._faiss.add(np.ascontiguousarray(self.bits[a:b]))
            elif self.precision == "int8":   # bucket middles: faiss encodes them to the codes
                self._faiss.add(dequantize_int8(self.codes[a:b], self.ranges))
            else:
                self._faiss.add(np.ascontiguousarray(self.vectors[a:b], dtype=np.float32))

    def _read_hnsw(self, blob: np.ndarray) -> Any:
        import faiss

        blob = np.ascontiguousarray(blob, dtype=np.uint8)
        if self.precision == "ubinary":
            idx, want = faiss.deserialize_index_binary(blob), faiss.IndexBinaryHNSW
        else:
            idx = faiss.deserialize_index(blob)
            want = faiss.IndexHNSWSQ if self.precision == "int8" else faiss.IndexHNSWFlat
        ok = type(idx) is want and idx.d == self.dims and idx.ntotal == len(self.ids)
        if ok and self.precision == "int8":
            trained = faiss.vector_to_array(faiss.downcast_index(idx.storage).sq.trained)
            ok = np.array_equal(trained, np.concatenate([self.ranges[0],
                                                         self.ranges[1] - self.ranges[0]]))
        if not ok:
            raise ValueError(f"the stored HNSW index ({type(idx).__name__}, d={idx.d}, "
                             f"{idx.ntotal} vectors) does not match the arrays "
                             f"({want.__name__}, d={self.dims}, {len(self.ids)} rows)")
        return idx

    # -- search ----------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int = 10, *, allowed_rows: np.ndarray | None = None,
               rescore_multiplier: int = 4, ef_search: int | None = None) -> list[list[Hit]]:
        """Top-``k`` live documents for each query vector (``[B, dims]``, unit length).

        ``allowed_rows``: int64 rows (:meth:`rows_of` of the ids a filter keeps); only
        those are searched. ``rescore_multiplier``: binary candidates rescored per hit.
        ``ef_search``: HNSW search depth (default ``max(self.ef_search, candidates)``)."""
        check_k(k)
        check_positive_int("rescore_multiplier", rescore_multiplier)
        q = normalize(_check_vectors(queries, self.dims))
        rows = self._selected(allowed_rows)
        if rows is not None and len(rows) == 0:
            return [[] for _ in range(len(q))]
        kk = k * rescore_multiplier if self.rescore is not None else k
        if rows is not None and len(rows) <= EXACT_ROWS:
            scores, found = self._exact(q, rows, kk)
        else:
            scores, found = self._approx(q, kk, rows, ef_search)
        if self.rescore is not None:
            scores, found = self._rescored(q, found, k)
        return [[Hit(self.ids[r], float(s)) for s, r in zip(srow, rrow) if r >= 0][:k]
                for srow, rrow in zip(scores.tolist(), found.tolist())]

    def rows_of(self, ids: Sequence[str]) -> np.ndarray:
        """The rows of live ``ids`` (``UnknownIdError`` names the first unknown)."""
        return self.ids.rows(ids)

    def _selected(self, allowed_rows: np.ndarray | None) -> np.ndarray | None:
        if allowed_rows is not None:
            rows = np.unique(np.asarray(allowed_rows, dtype=np.int64))
            if len(rows) and (rows[0] < 0 or rows[-1] >= len(self.ids)):
                raise ValueError(f"allowed_rows must lie in [0, {len(self.ids)})")
            return rows[~self.ids.deleted[rows]]
        return self.ids.live_rows() if self.ids.n_deleted else None

    def _first_stage_scores(self, q: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """What the faiss index computes, with numpy, for the given rows: ``[B, len(rows)]``."""
        if self.precision == "float32":
            return q @ np.asarray(self.vectors[rows], dtype=np.float32).T
        if self.precision == "int8":
            return int8_query(q, self.ranges) @ dequantize_int8(self.codes[rows], self.ranges).T
        return binary_similarity(quantize_ubinary(q), self.bits[rows], self.dims)

    def _exact(self, q: np.ndarray, rows: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        s = self._first_stage_scores(q, rows)
        kk_ = min(kk, len(rows))
        order = np.argsort(-s, axis=1, kind="stable")[:, :kk_]
        return np.take_along_axis(s, order, axis=1), rows[order]

    def _approx(self, q: np.ndarray, kk: int, rows: np.ndarray | None,
                ef_search: int | None) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        kw: dict[str, Any] = {}
        bitmap = None
        if rows is not None:
            mask = np.zeros(len(self.ids), dtype=bool)
            mask[rows] = True
            bitmap = np.packbits(mask, bitorder="little")
            kw["sel"] = faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bitmap))
        if self.ann == "hnsw":
            ef = max(ef_search or self.ef_search, kk)
            if rows is not None:   # a walk through a graph where few nodes count goes wider
                ef = min(max(ef, int(kk * len(self.ids) / max(1, len(rows)))), MAX_EF_SEARCH)
            kw["efSearch"] = ef
            params = faiss.SearchParametersHNSW(**kw)
        else:
            params = faiss.SearchParameters(**kw) if kw else None
        if self.precision == "int8":
            d, i = self._faiss.search(int8_query(q, self.ranges), kk, params=params)
        elif self.precision == "ubinary":
            d, i = self._faiss.search(quantize_ubinary(q), kk, params=params)
            d = (self.dims - 2 * d.astype(np.int64)).astype(np.float32)
        else:
            d, i = self._faiss.search(q, kk, params=params)
        del bitmap   # (the selector reads it during the search)
        return d.astype(np.float32), i.astype(np.int64)

    def _rescored(self, q: np.ndarray, found: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores = np.full(found.shape, -np.inf, dtype=np.float32)
        for b in range(len(q)):
            ok = found[b] >= 0
            r = found[b][ok]
            v = (np.asarray(self.vectors[r], dtype=np.float32) if self.rescore == "float32"
                 else dequantize_int8(self.codes[r], self.ranges))
            scores[b, ok] = v @ q[b]
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        top = np.take_along_axis(scores, order, axis=1)
        return top, np.where(np.isfinite(top), np.take_along_axis(found, order, axis=1), -1)

    # -- mutation --------------------------------------------------------------------
    def add(self, vectors: np.ndarray, ids: Sequence[str]) -> list[str]:
        """Append documents (unit vectors ``[n, dims]``); int8 codes use the build's ranges."""
        ids = IdMap.check_new(as_id_list(ids), self.ids)  # type: ignore[arg-type]
        x = _check_vectors(vectors, self.dims)
        if len(ids) != len(x):
            raise ValueError(f"got {len(ids)} ids for {len(x)} vectors")
        new = _encode_rows(x, self.precision, self.rescore, self.ranges)
        start = len(self.ids)
        for name, arr in new.items():
            if name != "ranges":
                setattr(self, name, np.concatenate([np.asarray(getattr(self, name)), arr]))
        self.ids.extend(list(ids))
        self._faiss_add(start, len(self.ids))
        return list(ids)

    def delete(self, ids: Sequence[str]) -> None:
        """Tombstone live ``ids`` (never returned again); every id must exist."""
        self.ids.tombstone(self.ids.rows(as_id_list(ids)))

    def compact(self) -> DenseIndex:
        """A new index without the deleted rows (faiss index rebuilt)."""
        live = self.ids.live_rows()
        arrays = {n: (a if n == "ranges" else np.asarray(a)[live]) for n, a in
                  (("vectors", self.vectors), ("codes", self.codes), ("ranges", self.ranges),
                   ("bits", self.bits)) if a is not None}
        return DenseIndex(self.ids.compacted(), precision=self.precision, dims=self.dims,
                          ann=self.ann, rescore=self.rescore, hnsw_m=self.hnsw_m,
                          ef_search=self.ef_search, **arrays)

    # -- persistence -------------------------------------------------------------------
    def to_bundle(self) -> Bundle:
        import faiss

        arrays: dict[str, np.ndarray] = dict(self.ids.to_arrays())
        for name in ("vectors", "codes", "ranges", "bits"):
            if getattr(self, name) is not None:
                arrays[name] = np.asarray(getattr(self, name))
        if self.ann == "hnsw":
            ser = (faiss.serialize_index_binary if self.precision == "ubinary"
                   else faiss.serialize_index)
            arrays["hnsw"] = ser(self._faiss)
        meta = {"format": _FORMAT, "precision": self.precision, "dims": self.dims,
                "ann": self.ann, "rescore": self.rescore, "hnsw_m": self.hnsw_m,
                "ef_search": self.ef_search}
        return Bundle(self.kind, meta, arrays)

    @classmethod
    def from_bundle(cls, b: Bundle) -> DenseIndex:
        """The index saved by :meth:`to_bundle`; inconsistent arrays are a ``ValueError``."""
        m = b.meta
        if m.get("format") != _FORMAT:
            raise ValueError(f"unknown dense index format {m.get('format')!r}")
        a = b.arrays
        ids = RowIds.from_arrays(a)
        return cls(ids, precision=m["precision"], dims=int(m["dims"]), ann=m["ann"],
                   rescore=m["rescore"], hnsw_m=int(m["hnsw_m"]), ef_search=int(m["ef_search"]),
                   vectors=a.get("vectors"), codes=a.get("codes"), ranges=a.get("ranges"),
                   bits=a.get("bits"), hnsw_blob=a.get("hnsw"))

    def _check_arrays(self) -> None:
        n, d = len(self.ids), self.dims
        _check_rescore(self.precision, self.rescore)
        need = {"float32": {"vectors"}, "int8": {"codes", "ranges"}, "ubinary": {"bits"}}[
            self.precision] | {None: set(), "int8": {"codes", "ranges"},
                               "float32": {"vectors"}}[self.rescore]
        shapes = {"vectors": ((n, d), np.float32), "codes": ((n, d), np.int8),
                  "ranges": ((2, d), np.float32), "bits": ((n, d // 8), np.uint8)}
        for name, (shape, dtype) in shapes.items():
            arr = getattr(self, name)
            if (arr is None) != (name not in need):
                raise ValueError(f"dense index ({self.precision}, rescore={self.rescore}) "
                                 f"{'needs' if arr is None else 'does not take'} {name!r}")
            if arr is not None and (arr.shape != shape or arr.dtype != dtype):
                raise ValueError(f"dense index array {name!r} is {arr.dtype} {arr.shape}, "
                                 f"expected {np.dtype(dtype)} {shape}")
        if self.ranges is not None and not (np.isfinite(self.ranges).all()
                                            and (self.ranges[1] > self.ranges[0]).all()):
            raise ValueError("dense index int8 ranges must be finite with max > min")

    def stats(self) -> dict[str, Any]:
        """JSON-able facts: documents, precision, dims, ANN structure, bytes per vector."""
        per = {"float32": 4 * self.dims, "int8": self.dims, "ubinary": self.dims // 8}
        extra = {None: 0, "int8": self.dims, "float32": 4 * self.dims}[self.rescore]
        return {"kind": self.kind, "documents": len(self), "deleted_rows": self.ids.n_deleted,
                "precision": self.precision, "dims": self.dims, "ann": self.ann,
                "rescore": self.rescore, "bytes_per_vector": per[self.precision] + extra}


def _check_rescore(precision: str, rescore: object) -> str | None:
    if rescore == "auto":
        return "int8" if precision == "ubinary" else None
    if rescore == "none":
        rescore = None
    if rescore not in RESCORE:
        raise ValueError(f"unknown rescore {rescore!r}; choose from None, 'int8', 'float32'")
    if rescore is not None and precision != "ubinary":
        raise ValueError(f"rescore={rescore!r} is for precision 'ubinary'; {precision!r} "
                         "vectors are scored directly")
    return rescore  # type: ignore[return-value]


def _check_vectors(x: object, dims: int | None) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype.kind != "f":
        raise TypeError(f"dense vectors must be float, got dtype {a.dtype}")
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(f"dense vectors must be [n >= 1, d], got shape {a.shape}")
    if dims is not None and a.shape[1] != dims:
        raise ValueError(f"vector dimension {a.shape[1]} does not match the index's {dims}")
    a = np.ascontiguousarray(a, dtype=np.float32)
    if not np.isfinite(a).all():
        raise ValueError("dense vectors contain NaN or Inf")
    return a


def _encode_rows(x: np.ndarray, precision: str, rescore: str | None,
                 ranges: np.ndarray | None) -> dict[str, np.ndarray]:
    """The stored arrays of unit vectors ``x`` for a precision and rescore choice."""
    out: dict[str, np.ndarray] = {}
    if "float32" in (precision, rescore):
        out["vectors"] = x
    if "int8" in (precision, rescore):
        out["codes"], out["ranges"] = quantize_int8(x, ranges), ranges
    if precision == "ubinary":
        out["bits"] = quantize_ubinary(x)
    return out
