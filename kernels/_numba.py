"""How the engine's numba kernels (the CPU search stages) are compiled and run in parallel: the
one place that sets their thread count, keeps them safe under concurrent callers, and caches
their machine code where it can.

Compiled code is cached on disk (next to the source, else in the user's cache folder, as numba
finds one) so that a process does not compile again; where neither is writable (a read-only
install without a home folder), numba refuses ``cache=True`` when the module is imported, and
:func:`jit` compiles without caching instead.

A kernel compiled with ``parallel=True`` spreads its ``prange`` loop over numba's threading
layer. The count follows torch (``torch.get_num_threads()``, the process's setting for CPU
work, which a server or a test may lower), set per call because numba's setting is per
calling thread. Numba's ``omp`` and ``tbb`` layers take concurrent launches from several
threads (a server's searches); its fallback ``workqueue`` layer does not, so while that is
the layer in use (or not yet known: before the first launch) launches are serialised by a
lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numba
import torch

__all__ = ["launch", "jit"]

_LOCK = threading.Lock()
_SAFE: bool | None = None   # whether the loaded threading layer takes concurrent launches


def launch(kernel: Callable[..., Any], *args: Any) -> Any:
    """``kernel(*args)`` on ``torch.get_num_threads()`` numba threads (at most numba's own
    limit), serialised with other launches unless the threading layer is thread-safe."""
    global _SAFE
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    if _SAFE:
        return kernel(*args)
    with _LOCK:
        out = kernel(*args)
        if _SAFE is None:
            try:
                _SAFE = numba.threading_layer() in ("omp", "tbb")
            except ValueError:   # no parallel region has run yet
                pass
        return out


def jit(**options: Any) -> Callable[[Callable[..., Any]], Any]:
    """``numba.njit(cache=True, **options)``, or without ``cache`` where numba has nowhere to
    write it (it raises ``RuntimeError`` at decoration then)."""
    def wrap(fn: Callable[..., Any]) -> Any:
        try:
            return numba.njit(cache=True, **options)(fn)
        except RuntimeError:   # "cannot cache function ...: no locator available"
            return numba.njit(**options)(fn)
    return wrap
