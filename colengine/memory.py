"""Give memory back to the operating system: freed heap memory, and the pages of memory-mapped
files already written or read once.

glibc keeps the memory that large temporary arrays freed in its heap (its mmap threshold grows
after the first large free), so a process that builds a derived structure once (the inverted
lists of a loaded index: ~40 MB of temporaries for a million tokens) keeps that much resident
for its whole life. :func:`release_free_memory` asks the allocator to return it
(``malloc_trim``; a no-op where the C library has none, e.g. macOS or musl). It costs well
under a millisecond, but memory returned has to be faulted in again when it is reused, so the
engine calls it after one-off work (loading, building lists), not after every search.

Pages of a file mapped shared (``np.memmap`` in modes ``r``, ``r+``, ``w+``) count in a
process's resident memory once touched, and stay there while the mapping lives, so a build
that writes a 13 GB memory-mapped array chunk by chunk, or a save that copies one, ends with
13 GB resident although nothing needs it in memory. :func:`release_mapped` drops a range of
such pages from the process (``madvise(MADV_DONTNEED)``): the data stays in the file and the
page cache (written pages are written back as usual), and a later access maps it again. A
private (copy-on-write, mode ``c``) mapping or an ordinary array is left alone.

The opposite also helps: a search that is about to read a few hundred scattered documents of
a memory-mapped file larger than the page cache takes one page fault after another, each
waiting for the disk. :func:`will_need` asks the kernel for all their pages at once
(``madvise(MADV_WILLNEED)``: reads started, none waited for), so the disk serves them side by
side and the faults that follow find most pages already read. Pages already resident cost a
system call each span and nothing else.

>>> release_free_memory() in (True, False)
True
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap

import numpy as np

__all__ = ["page_spans", "release_free_memory", "release_mapped", "will_need"]


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library (None where it cannot be found or loaded)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None


def _malloc_trim():
    return getattr(_libc(), "malloc_trim", None)


def release_free_memory() -> bool:
    """Return the C heap's free memory to the OS; True when something was released."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


def _shared_mapping(arr: np.ndarray) -> mmap.mmap | None:
    """The ``mmap`` behind ``arr`` when it is a view of a shared file mapping, else None."""
    shared = False
    base: object = arr
    while base is not None and not isinstance(base, mmap.mmap):
        if isinstance(base, np.memmap):
            shared = shared or base.mode in ("r", "r+", "w+")
            if base.mode == "c":
                return None
        base = getattr(base, "base", None)
    return base if shared and isinstance(base, mmap.mmap) else None


def release_mapped(arr: np.ndarray, start: int = 0, stop: int | None = None) -> int:
    """Drop the resident pages of rows ``start:stop`` of a memory-mapped (shared) ``arr`` from
    this process; returns the bytes of the range released (0 when ``arr`` is not such a
    mapping, or where the platform has no ``madvise``). Whole pages are released, so a page
    shared with a neighbouring row is released too; its data stays in the file.

    >>> import os, tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> a = np.lib.format.open_memmap(os.path.join(tmp.name, "a.npy"), mode="w+",
    ...                               dtype=np.float32, shape=(4096, 64))
    >>> a[:] = 1.0
    >>> release_mapped(a) >= a.nbytes, float(a.sum())   # still readable: from the file
    (True, 262144.0)
    >>> release_mapped(np.ones(3))
    0
    >>> del a; tmp.cleanup()
    """
    mm = _shared_mapping(arr)
    advise = getattr(mm, "madvise", None)
    flag = getattr(mmap, "MADV_DONTNEED", None)
    if mm is None or advise is None or flag is None or arr.size == 0 \
            or not arr.flags.c_contiguous:
        return 0
    n = arr.shape[0] if arr.ndim else 1
    stop = n if stop is None else min(int(stop), n)
    start = max(0, int(start))
    if stop <= start:
        return 0
    row = arr.strides[0] if arr.ndim else arr.itemsize
    origin = np.frombuffer(mm, dtype=np.uint8).ctypes.data
    lo = arr.ctypes.data - origin + start * row
    hi = arr.ctypes.data - origin + stop * row
    lo -= lo % mmap.PAGESIZE
    hi = min(len(mm), hi + (-hi) % mmap.PAGESIZE)
    if hi <= lo:
        return 0
    advise(flag, lo, hi - lo)
    return hi - lo


@functools.cache
def _madvise():
    """libc's ``madvise`` (address based: any mapping a tensor's memory lives in), or None."""
    fn = getattr(_libc(), "madvise", None) if hasattr(mmap, "MADV_WILLNEED") else None
    if fn is not None:
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        fn.restype = ctypes.c_int
    return fn


def page_spans(addr: int, row_bytes: int, starts: np.ndarray, stops: np.ndarray,
               page: int = mmap.PAGESIZE) -> tuple[np.ndarray, np.ndarray]:
    """The pages that rows ``[starts[i], stops[i])`` of a row-major array at address ``addr``
    (``row_bytes`` a row) lie on, as sorted disjoint spans ``[lo, hi)`` of page-aligned
    addresses (spans that touch or share a page are merged); empty row ranges are ignored.

    >>> lo, hi = page_spans(4096 * 10, 1000, np.array([0, 3, 100]), np.array([2, 5, 101]))
    >>> [(int(a) // 4096, int(b) // 4096) for a, b in zip(lo, hi)]   # pages 10-11, 34-35
    [(10, 12), (34, 35)]
    """
    starts = np.asarray(starts, dtype=np.int64)
    stops = np.asarray(stops, dtype=np.int64)
    keep = stops > starts
    lo = addr + starts[keep] * row_bytes
    hi = addr + stops[keep] * row_bytes
    if lo.shape[0] == 0:
        return lo, hi
    lo -= lo % page
    hi += (-hi) % page
    order = np.argsort(lo, kind="stable")
    lo, hi = lo[order], np.maximum.accumulate(hi[order])
    # a span starts where it begins past everything before it
    new = np.ones(lo.shape[0], dtype=bool)
    new[1:] = lo[1:] > hi[:-1]
    first = np.flatnonzero(new)
    last = np.append(first[1:], lo.shape[0]) - 1
    return lo[first], hi[last]


def will_need(addr: int, row_bytes: int, starts: np.ndarray, stops: np.ndarray) -> int:
    """Ask the kernel to read ahead the pages of rows ``[starts[i], stops[i])`` of the
    row-major array at ``addr`` (``madvise(MADV_WILLNEED)`` on :func:`page_spans`): for a
    memory-mapped file, reads of every page not resident are started at once and not waited
    for. Returns the bytes advised (0 where the platform has no ``madvise``). Harmless on
    memory that is not a file mapping; the array's contents never change.
    """
    fn = _madvise()
    if fn is None:
        return 0
    lo, hi = page_spans(addr, row_bytes, starts, stops)
    flag = mmap.MADV_WILLNEED
    for a, b in zip(lo.tolist(), hi.tolist()):
        fn(a, b - a, flag)
    return int((hi - lo).sum())
