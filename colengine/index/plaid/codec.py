"""Residual codec: per-dimension quantile buckets of ``token - centroid``, 1, 2 or 4 bits, packed.

Each dimension ``j`` has ``2**nbits - 1`` cutoffs (the residual quantiles at ``i / 2**nbits``)
and ``2**nbits`` bucket weights (the quantiles at the bucket midpoints ``(i + 0.5) / 2**nbits``).
A residual value is coded as the number of cutoffs below it; it decodes to its bucket's weight.
Codes are packed dimension-major, ``8 // nbits`` dimensions per byte, most significant bits
first (the layout ``np.packbits`` gives for the codes' bits), so a token takes
``ceil(dim * nbits / 8)`` bytes. Decompression is PLAID's byte lookup table: one table row per
(byte position, byte value) holds the weights of that byte's dimensions, so a token decodes
with ``ceil(dim * nbits / 8)`` row gathers, on any torch device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["ResidualCodec", "VALID_NBITS"]

VALID_NBITS = (1, 2, 4)
_FIT_SAMPLE = 1 << 18


@dataclass
class ResidualCodec:
    """Bucket cutoffs ``[dim, 2**nbits - 1]`` and weights ``[dim, 2**nbits]`` (float32).

    >>> rng = np.random.default_rng(0)
    >>> r = rng.standard_normal((1000, 16)).astype(np.float32) * 0.1
    >>> codec = ResidualCodec.fit(r, nbits=2)
    >>> packed = codec.compress(torch.from_numpy(r))
    >>> tuple(packed.shape), packed.dtype
    ((1000, 4), torch.uint8)
    >>> codec.decompress(packed).shape
    torch.Size([1000, 16])
    """

    nbits: int
    cutoffs: np.ndarray
    weights: np.ndarray
    _luts: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.nbits not in VALID_NBITS:
            raise ValueError(f"nbits must be one of {VALID_NBITS}, got {self.nbits!r}")
        self.cutoffs = np.ascontiguousarray(self.cutoffs, dtype=np.float32)
        self.weights = np.ascontiguousarray(self.weights, dtype=np.float32)
        nb = 1 << self.nbits
        if self.cutoffs.ndim != 2 or self.cutoffs.shape[1] != nb - 1 or self.weights.shape != (
                self.cutoffs.shape[0], nb):
            raise ValueError(
                f"codec shapes do not fit nbits={self.nbits}: cutoffs {self.cutoffs.shape}, "
                f"weights {self.weights.shape}")
        if not (np.isfinite(self.cutoffs).all() and np.isfinite(self.weights).all()):
            raise ValueError("codec cutoffs/weights are not finite")

    # -- shape facts -----------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.cutoffs.shape[0]

    @property
    def dims_per_byte(self) -> int:
        return 8 // self.nbits

    @property
    def packed_dim(self) -> int:
        """Bytes per token."""
        return -(-self.dim // self.dims_per_byte)

    # -- fitting ---------------------------------------------------------------------
    @classmethod
    def fit(cls, residuals: np.ndarray, nbits: int = 2, *, seed: int = 0) -> "ResidualCodec":
        """Per-dimension quantile cutoffs and weights from sample residuals ``[n, dim]``."""
        if nbits not in VALID_NBITS:
            raise ValueError(f"nbits must be one of {VALID_NBITS}, got {nbits!r}")
        r = np.asarray(residuals, dtype=np.float32)
        if r.ndim != 2 or r.shape[0] == 0:
            raise ValueError(f"need a non-empty [n, dim] residual sample, got shape {r.shape}")
        if r.shape[0] > _FIT_SAMPLE:
            rows = np.random.default_rng(seed).choice(r.shape[0], _FIT_SAMPLE, replace=False)
            r = r[np.sort(rows)]
        nb = 1 << nbits
        cut_q = np.arange(1, nb, dtype=np.float64) / nb
        w_q = (np.arange(nb, dtype=np.float64) + 0.5) / nb
        cutoffs = np.quantile(r, cut_q, axis=0).T if nb > 1 else np.zeros((r.shape[1], 0))
        weights = np.quantile(r, w_q, axis=0).T
        return cls(nbits, cutoffs.astype(np.float32), weights.astype(np.float32))

    # -- compress --------------------------------------------------------------------
    def buckets(self, residuals: torch.Tensor) -> torch.Tensor:
        """Bucket index of every value, uint8 ``[n, dim]`` (number of cutoffs strictly below it)."""
        from colengine.embeddings import readonly_tensor

        cut = readonly_tensor(self.cutoffs).to(residuals.device)   # memory-mapped after load
        # at most 15 cutoffs per dimension: counting them beats searchsorted (3x on the CPU)
        return (residuals.float().unsqueeze(2) > cut).sum(dim=2, dtype=torch.uint8)

    def compress(self, residuals: torch.Tensor) -> torch.Tensor:
        """Residuals float ``[n, dim]`` -> packed codes uint8 ``[n, packed_dim]``."""
        if residuals.ndim != 2 or residuals.shape[1] != self.dim:
            raise ValueError(f"residuals must be [n, {self.dim}], got {tuple(residuals.shape)}")
        n = residuals.shape[0]
        per = self.dims_per_byte
        b = self.buckets(residuals)
        pad = self.packed_dim * per - self.dim
        if pad:
            b = torch.cat([b, b.new_zeros(n, pad)], dim=1)
        b = b.view(n, self.packed_dim, per).to(torch.int32)
        shifts = torch.arange(per - 1, -1, -1, device=b.device, dtype=torch.int32) * self.nbits
        return (b << shifts).sum(dim=2).to(torch.uint8)

    # -- decompress ------------------------------------------------------------------
    def lut(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """``[packed_dim * 256, dims_per_byte]`` float32: the weights each byte value decodes to."""
        key = str(device)
        if key not in self._luts:
            per, nb = self.dims_per_byte, 1 << self.nbits
            pdim = self.packed_dim
            values = np.arange(256)[:, None]
            shifts = (np.arange(per - 1, -1, -1) * self.nbits)[None, :]
            bucket = (values >> shifts) & (nb - 1)                       # [256, per]
            w = np.zeros((pdim * per, nb), dtype=np.float32)
            w[: self.dim] = self.weights
            dims = np.arange(pdim)[:, None, None] * per + np.arange(per)[None, None, :]
            table = w[dims, bucket[None, :, :]]                          # [pdim, 256, per]
            self._luts[key] = torch.from_numpy(
                np.ascontiguousarray(table.reshape(pdim * 256, per))).to(device)
        return self._luts[key]

    def decompress(self, packed: torch.Tensor) -> torch.Tensor:
        """Packed codes uint8 ``[n, packed_dim]`` -> residuals float32 ``[n, dim]``."""
        if packed.ndim != 2 or packed.shape[1] != self.packed_dim:
            raise ValueError(f"packed codes must be [n, {self.packed_dim}], got {tuple(packed.shape)}")
        n = packed.shape[0]
        lut = self.lut(packed.device)
        base = torch.arange(self.packed_dim, device=packed.device, dtype=torch.int64) * 256
        idx = packed.to(torch.int64) + base
        out = torch.nn.functional.embedding(idx, lut)                     # [n, pdim, per]
        out = out.reshape(n, self.packed_dim * self.dims_per_byte)
        return out[:, : self.dim] if out.shape[1] != self.dim else out

    # -- persistence -----------------------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"bucket_cutoffs": self.cutoffs, "bucket_weights": self.weights}

    @classmethod
    def from_arrays(cls, arrays, nbits: int) -> "ResidualCodec":
        return cls(nbits, np.asarray(arrays["bucket_cutoffs"]), np.asarray(arrays["bucket_weights"]))
