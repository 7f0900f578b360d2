"""int8 and binary codes of unit vectors, with sentence-transformers' ``quantize_embeddings``.

* ``int8``: per-dimension ranges (min, max over a calibration set: the corpus at build) split
  into 256 buckets; a code ``c`` stands for ``start + (c + 128) * step``. Values outside the
  ranges (documents added later, queries) are clipped to them first, so a code never wraps.
  Scores are dot products of the dequantised vectors (bucket middles), query and document
  both quantised with the index's ranges.
* ``ubinary``: one bit a dimension (``x > 0``), packed 8 to a byte; the similarity of two
  codes is ``dims - 2 * hamming``, the dot product of their +-1 vectors.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "binary_similarity",
    "dequantize_int8",
    "int8_query",
    "int8_ranges",
    "quantize_int8",
    "quantize_ubinary",
]


def int8_ranges(x: np.ndarray) -> np.ndarray:
    """Calibration ranges ``[2, d]`` (row 0 minimum, row 1 maximum) of vectors ``x``; a
    dimension that never varies gets a tiny width, so its step is never zero."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"int8 calibration needs vectors [n >= 1, d], got shape {x.shape}")
    r = np.vstack([x.min(axis=0), x.max(axis=0)]).astype(np.float32)
    flat = r[1] - r[0] < 1e-6
    r[1, flat] = r[0, flat] + 1e-6
    return r


def _steps(ranges: np.ndarray) -> np.ndarray:
    return ((ranges[1] - ranges[0]) / 255).astype(np.float32)


def quantize_int8(x: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """int8 codes ``[n, d]`` of ``x`` under ``ranges`` (clipped to them first)."""
    from sentence_transformers.quantization import quantize_embeddings

    x = np.clip(np.asarray(x, dtype=np.float32), ranges[0], ranges[1])
    return quantize_embeddings(x, precision="int8", ranges=ranges)


def dequantize_int8(codes: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """float32 vectors the int8 ``codes`` stand for, their buckets' middles:
    ``start + (c + 128.5) * step`` (what faiss' 8-bit scalar quantizer decodes them to)."""
    return ranges[0] + (np.asarray(codes, dtype=np.float32) + 128.5) * _steps(ranges)


def int8_query(q: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """A query as the index scores it: quantised with the index's ranges, dequantised."""
    return dequantize_int8(quantize_int8(q, ranges), ranges).astype(np.float32)


def quantize_ubinary(x: np.ndarray) -> np.ndarray:
    """Packed sign bits ``uint8 [n, d / 8]`` (``x > 0``)."""
    from sentence_transformers.quantization import quantize_embeddings

    return quantize_embeddings(np.asarray(x, dtype=np.float32), precision="ubinary")


def binary_similarity(q_bits: np.ndarray, d_bits: np.ndarray, dims: int) -> np.ndarray:
    """``dims - 2 * hamming`` of every query code against every document code: ``[B, N]``.

    >>> b = quantize_ubinary(np.array([[1, -1, 1, 1, -1, -1, 1, 1], [1] * 8], dtype=np.float32))
    >>> binary_similarity(b[:1], b, 8).tolist()
    [[8.0, 2.0]]
    """
    d_bits = np.asarray(d_bits, dtype=np.uint8)
    out = np.empty((len(q_bits), len(d_bits)), dtype=np.float32)
    for i, q in enumerate(np.asarray(q_bits, dtype=np.uint8)):
        ham = _POPCOUNT[np.bitwise_xor(d_bits, q)].sum(axis=1, dtype=np.int64)
        out[i] = dims - 2 * ham
    return out


_POPCOUNT = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(axis=1).astype(np.uint8)
