"""Give freed heap memory back to the operating system.

glibc keeps the memory that large temporary arrays freed in its heap (its mmap threshold grows
after the first large free), so a process that builds a derived structure once (the inverted
lists of a loaded index: ~40 MB of temporaries for a million tokens) keeps that much resident
for its whole life. :func:`release_free_memory` asks the allocator to return it
(``malloc_trim``; a no-op where the C library has none, e.g. macOS or musl). It costs well
under a millisecond, but memory returned has to be faulted in again when it is reused, so the
engine calls it after one-off work (loading, building lists), not after every search.

>>> release_free_memory() in (True, False)
True
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

__all__ = ["release_free_memory"]


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None)
    except OSError:
        return None


def release_free_memory() -> bool:
    """Return the C heap's free memory to the OS; True when something was released."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
