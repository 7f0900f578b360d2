"""Row stores in two parts: a read-only base followed by rows appended in memory.

An index loaded memory-mapped keeps its token stores (codes, residuals, refinement vectors)
in the saved files. Appending documents to such a store must not copy the base into memory:
at a million documents the refinement vectors alone are 12.8 GB. :class:`AppendedRows` keeps
the base where it is (the mapped file, untouched) and the appended rows in a buffer this
process owns, which grows by a quarter when full (amortised: only the appended rows are ever
copied). :class:`AppendedTensor` is the same store as torch tensors sharing that memory, for
the search stages: it gathers rows from either part (:meth:`AppendedTensor.index_select`).

Appends never change rows a reader may hold: :meth:`AppendedRows.append` writes past the end
of every earlier view and returns a new, longer store (earlier stores keep their length).

>>> base = np.arange(6, dtype=np.int32).reshape(3, 2)
>>> base.flags.writeable = False
>>> a = AppendedRows.of(base, np.array([[6, 7]], dtype=np.int32))
>>> a.shape, a.n_base
((4, 2), 3)
>>> a.take(np.array([3, 0])).tolist()
[[6, 7], [0, 1]]
>>> b = a.append(np.array([[8, 9]], dtype=np.int32))
>>> len(a), len(b), np.asarray(b)[-2:].tolist()
(4, 5, [[6, 7], [8, 9]])
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from colengine.embeddings import readonly_tensor

__all__ = ["AppendedRows", "AppendedTensor", "is_appended", "parts", "take_rows"]


class AppendedRows:
    """``base`` (read-only, e.g. memory-mapped) followed by ``n_tail`` rows of ``buffer``
    (owned, with spare capacity past them). Rows are the first axis."""

    __slots__ = ("base", "buffer", "n_tail")

    def __init__(self, base: np.ndarray, buffer: np.ndarray, n_tail: int) -> None:
        if buffer.dtype != base.dtype or buffer.shape[1:] != base.shape[1:]:
            raise ValueError(f"appended rows {buffer.dtype} {buffer.shape[1:]} do not match the "
                             f"base's {base.dtype} {base.shape[1:]}")
        if not 0 <= n_tail <= buffer.shape[0]:
            raise ValueError(f"{n_tail} appended rows in a buffer of {buffer.shape[0]}")
        self.base, self.buffer, self.n_tail = base, buffer, int(n_tail)

    @classmethod
    def of(cls, base: np.ndarray, rows: np.ndarray) -> "AppendedRows":
        """``base`` followed by a copy of ``rows`` (in a new buffer with spare capacity)."""
        rows = np.asarray(rows, dtype=base.dtype)
        buf = np.empty((_capacity(rows.shape[0]), *base.shape[1:]), dtype=base.dtype)
        buf[:rows.shape[0]] = rows
        return cls(base, buf, rows.shape[0])

    @property
    def tail(self) -> np.ndarray:
        """The appended rows (a view of the buffer)."""
        return self.buffer[:self.n_tail]

    @property
    def n_base(self) -> int:
        return int(self.base.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.n_base + self.n_tail, *self.base.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.base.dtype

    @property
    def ndim(self) -> int:
        return self.base.ndim

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def append(self, rows: np.ndarray) -> "AppendedRows":
        """This store followed by ``rows``: written past the end of the buffer's rows in use
        (a new buffer, the appended rows copied, when it is full or read-only); this store is
        unchanged."""
        rows = np.asarray(rows, dtype=self.dtype)
        n, m = self.n_tail, rows.shape[0]
        buf = self.buffer
        if buf.shape[0] < n + m or not buf.flags.writeable:   # (a loaded tail is read-only)
            buf = np.empty((_capacity(n + m), *buf.shape[1:]), dtype=buf.dtype)
            buf[:n] = self.tail
        buf[n:n + m] = rows
        return AppendedRows(self.base, buf, n + m)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The rows numbered ``rows`` (int array, any order), from either part: a new array."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((rows.shape[0], *self.base.shape[1:]), dtype=self.dtype)
        in_tail = rows >= self.n_base
        out[~in_tail] = self.base[rows[~in_tail]]
        out[in_tail] = self.tail[rows[in_tail] - self.n_base]
        return out

    def __getitem__(self, key: slice) -> np.ndarray:
        """Rows ``start:stop`` (step 1) as one new array."""
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("an appended store is sliced by start:stop only (use take())")
        a, b, _ = key.indices(len(self))
        b = max(a, b)
        nb = self.n_base
        return np.concatenate([self.base[min(a, nb):min(b, nb)],
                               self.tail[max(a, nb) - nb:max(b, nb) - nb]])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """Both parts as one new array (the whole store in memory: what this class avoids;
        for small stores and whole-store rewrites only)."""
        out = np.concatenate([self.base, self.tail])
        return out if dtype is None else out.astype(dtype, copy=False)

    def tensor(self) -> "AppendedTensor":
        """The same rows as torch tensors sharing this store's memory (CPU; either part may be
        a read-only map: a loaded tail is one)."""
        return AppendedTensor(readonly_tensor(self.base), readonly_tensor(self.tail))


class AppendedTensor:
    """:class:`AppendedRows` as CPU tensors: what the search stages read."""

    __slots__ = ("base", "tail")

    def __init__(self, base: torch.Tensor, tail: torch.Tensor) -> None:
        self.base, self.tail = base, tail

    @property
    def n_base(self) -> int:
        return int(self.base.shape[0])

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.n_base + int(self.tail.shape[0]), *self.base.shape[1:]))

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    @property
    def device(self) -> torch.device:
        return self.base.device

    def __len__(self) -> int:
        return self.shape[0]

    def index_select(self, dim: int, index: torch.Tensor) -> torch.Tensor:
        """``torch.index_select`` along rows (``dim`` 0) across both parts."""
        if dim != 0:
            raise ValueError("an appended store gathers rows (dim 0) only")
        nb = self.n_base
        in_tail = index >= nb
        if not bool(in_tail.any()):
            return self.base.index_select(0, index)
        out = torch.empty((index.shape[0], *self.base.shape[1:]), dtype=self.dtype)
        at = torch.nonzero(in_tail, as_tuple=True)[0]
        rest = torch.nonzero(~in_tail, as_tuple=True)[0]
        out[at] = self.tail.index_select(0, index[at] - nb)
        out[rest] = self.base.index_select(0, index[rest])
        return out


def is_appended(a: Any) -> bool:
    """Whether ``a`` is a two-part store (:class:`AppendedRows` or :class:`AppendedTensor`)."""
    return isinstance(a, (AppendedRows, AppendedTensor))


def parts(a: np.ndarray | AppendedRows) -> Iterator[np.ndarray]:
    """The contiguous pieces of a store, in row order (one for a plain array)."""
    if isinstance(a, AppendedRows):
        yield a.base
        if a.n_tail:
            yield a.tail
    else:
        yield a


def take_rows(a: np.ndarray | AppendedRows, mask: np.ndarray) -> np.ndarray:
    """The rows of ``a`` where the boolean ``mask`` is True, as one new array, reading each
    part once (no whole-store copy first)."""
    if not isinstance(a, AppendedRows):
        return np.asarray(a)[mask]
    nb = a.n_base
    return np.concatenate([a.base[mask[:nb]], a.tail[mask[nb:]]])


def _capacity(need: int) -> int:
    """Rows of a tail buffer that must hold ``need`` rows: a quarter more, at least 1024."""
    return need + max(1024, need // 4)
