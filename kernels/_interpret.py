"""Triton's interpreter (``TRITON_INTERPRET=1``, how the kernels are tested on a CPU): the one
place that says whether it is on, and its NumPy >= 2.4 compatibility fix.

The fix: Triton 3.6's interpreter stores scalars as 1-element 1-D NumPy arrays and converts
them with ``int(array)``, which NumPy 2.4 turned from a deprecation warning into a
``TypeError`` ("only 0-dimensional arrays can be converted to Python scalars"). Any kernel
whose loop bound is a loaded value (every MaxSim kernel: lengths come from memory) then fails
under the interpreter. :func:`apply_compat` wraps the interpreter's tensor patching so that
``__index__`` reads the single element. Only ever applied in interpreter mode; compiled kernels
are unaffected.
"""

from __future__ import annotations

import os

__all__ = ["interpret_mode", "apply_compat"]

_APPLIED = False


def interpret_mode() -> bool:
    """True when Triton kernels run under its interpreter (``TRITON_INTERPRET=1``), read at
    each call (tests switch it)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def apply_compat() -> None:
    """Patch the interpreter for NumPy >= 2.4 (idempotent; a no-op on other triton layouts)."""
    global _APPLIED
    if _APPLIED:
        return
    try:
        from triton.runtime import interpreter as _interp
    except ImportError:  # pragma: no cover - other triton layouts
        return
    original = getattr(_interp, "_patch_lang_tensor", None)
    if original is None:  # pragma: no cover
        return

    def _patched(tensor, scope):  # type: ignore[no-untyped-def]
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interp._patch_lang_tensor = _patched
    _APPLIED = True
