"""Input validation shared by every backend: one clear ``ValueError`` per mistake.

Checks are split in two: cheap metadata checks (rank, shape, dtype, device) and value checks
(lengths within bounds, offsets monotone, candidate ids in range). Value checks read the index
tensors once (a single device->host copy per tensor on GPU; the torch fallback needs them on the
host anyway to plan its chunks).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "FLOAT_DTYPES",
    "INT_DTYPES",
    "check_backend",
    "check_float",
    "check_int",
    "check_same_device",
    "check_lengths",
    "check_offsets",
    "check_candidates",
]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT_DTYPES = (torch.int64, torch.int32)
BACKENDS = ("auto", "triton", "torch")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def check_float(name: str, t: object, ndim: int) -> Tensor:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    return t


def check_int(name: str, t: object, shape: tuple[int, ...]) -> Tensor:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in INT_DTYPES:
        raise ValueError(f"{name} must be an int64 (or int32) tensor, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    return t


def check_same_device(**tensors: Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    for name, dev in devices.items():
        if dev != first:
            listing = ", ".join(f"{k}={v}" for k, v in devices.items())
            raise ValueError(f"all inputs must be on the same device, got {listing}")
    return first


def check_dim(name: str, d: int, other: str, d_other: int) -> None:
    if d != d_other:
        raise ValueError(f"{name} has embedding dim {d} but {other} has {d_other}")
    if d == 0:
        raise ValueError(f"embedding dim of {name} must be positive")


# Below this many elements a tensor is checked on the host (one small copy is cheaper than the
# reduction kernels); above it the checks reduce where the tensor lives and bring back scalars.
_HOST_CHECK_MAX = 1 << 16


def _min_max(t: Tensor) -> tuple[int, int]:
    t = t.detach()
    if t.device.type != "cpu" and t.numel() <= _HOST_CHECK_MAX:
        t = t.to("cpu")
    lo, hi = torch.aminmax(t.to(torch.int64))
    return int(lo), int(hi)


def check_lengths(name: str, lengths: Tensor, max_len: int) -> None:
    """Checks 0 <= length <= max_len (one device sync, a few bytes back)."""
    if lengths.numel():
        lo, hi = _min_max(lengths)
        if lo < 0 or hi > max_len:
            raise ValueError(
                f"{name} must lie in [0, {max_len}] (the padded length), got values in [{lo}, {hi}]"
            )


def check_offsets(name: str, offsets: Tensor, n_tokens: int, tokens_name: str) -> int:
    """Checks 0 = o[0] <= ... <= o[-1] = T and returns N (= len(offsets) - 1).

    Small offsets are checked on the host after one copy; large ones (a whole store's) reduce on
    their device and bring back three scalars in one sync, so they are never copied to the
    host on the hot path (only to name the first bad entry in an error)."""
    if not isinstance(offsets, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(offsets).__name__}")
    if offsets.dtype not in INT_DTYPES:
        raise ValueError(f"{name} must be an int64 tensor, got {offsets.dtype}")
    if offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError(f"{name} must be 1-D with N+1 >= 1 entries, got shape {tuple(offsets.shape)}")
    o = offsets.detach()
    if o.device.type != "cpu" and o.numel() <= _HOST_CHECK_MAX:
        o = o.to("cpu")
    decreasing = (o[1:] < o[:-1]).any() if o.numel() > 1 else torch.zeros((), dtype=torch.bool,
                                                                          device=o.device)
    if o.device.type == "cpu":
        first, last, bad_order = int(o[0]), int(o[-1]), bool(decreasing)
    else:  # one sync for the three
        first, last, bad_order = torch.stack([o[0].to(torch.int64), o[-1].to(torch.int64),
                                              decreasing.to(torch.int64)]).tolist()
    if first != 0:
        raise ValueError(f"{name}[0] must be 0, got {first}")
    if last != n_tokens:
        raise ValueError(
            f"{name}[-1] must equal the number of rows of {tokens_name} ({n_tokens}), got {last}"
        )
    if bad_order:
        host = o.to("cpu", torch.int64)
        bad = int(torch.nonzero(host[1:] < host[:-1])[0, 0])
        raise ValueError(
            f"{name} must be non-decreasing, but {name}[{bad + 1}]={int(host[bad + 1])} < "
            f"{name}[{bad}]={int(host[bad])}"
        )
    return o.numel() - 1


def check_candidates(candidates: Tensor, batch: int, n_docs: int) -> None:
    """Checks shape [B, C] and -1 <= id < N (one device sync, no copy of the candidates)."""
    if not isinstance(candidates, Tensor):
        raise ValueError(f"candidates must be a torch.Tensor, got {type(candidates).__name__}")
    if candidates.dtype not in INT_DTYPES:
        raise ValueError(f"candidates must be an int64 tensor, got {candidates.dtype}")
    if candidates.dim() != 2 or candidates.shape[0] != batch:
        raise ValueError(
            f"candidates must have shape [B={batch}, C], got {tuple(candidates.shape)}"
        )
    if candidates.numel():
        lo, hi = _min_max(candidates)
        if lo < -1 or hi >= n_docs:
            raise ValueError(
                f"candidates must be document ids in [0, {n_docs}) or -1 for 'no candidate', "
                f"got values in [{lo}, {hi}]"
            )
