"""Sharded indexes on Ray (extra: ``pip install 'colengine[ray]'``).

``ShardedRetriever`` (:mod:`colengine.distributed.sharded`) needs Ray and is imported on first
use; without Ray installed, asking for it raises an ``ImportError`` that says how to install
it, and the rest of colengine is unchanged. Routing (:func:`shard_of`) needs no Ray.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from colengine.distributed.routing import ShardUnavailableError, is_sharded, shard_of

__all__ = ["ShardUnavailableError", "ShardedHits", "ShardedRetriever", "is_sharded", "shard_of"]

_LAZY = {"ShardedRetriever", "ShardedHits"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'colengine.distributed' has no attribute {name!r}")
    try:
        module = importlib.import_module("colengine.distributed.sharded")
    except ImportError as e:
        raise ImportError(f"colengine.distributed.{name} needs Ray, which is not installed: "
                          "pip install 'colengine[ray]'") from e
    value = getattr(module, name)
    globals()[name] = value
    return value


if TYPE_CHECKING:  # pragma: no cover
    from colengine.distributed.sharded import ShardedHits, ShardedRetriever
