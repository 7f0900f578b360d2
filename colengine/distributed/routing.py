"""Which shard owns a document, and the top manifest of a sharded index (no Ray needed here).

A document belongs to shard ``blake2b(id) mod n_shards`` (:func:`shard_of`): stable across
processes, machines and Python versions (unlike ``hash()``), so a build, an ``add`` and a
``delete`` always agree on the owner.

The top manifest is an ordinary colengine bundle (:func:`colengine.storage.save_bundle`:
versioned JSON, new generation + atomic manifest swap) of kind ``"sharded"``: its meta lists
the shards (folder name, generation, documents, tokens), its arrays hold the centroids and
residual codec every PLAID shard shares.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from colengine.errors import IndexFormatError

__all__ = [
    "SHARDED_FORMAT",
    "SHARDED_KIND",
    "ShardUnavailableError",
    "check_top_meta",
    "is_sharded",
    "route",
    "shard_name",
    "shard_of",
]

SHARDED_KIND = "sharded"
#: version of the top manifest's meta layout
SHARDED_FORMAT = 1
ROUTING = "blake2b-64-mod"
_NAME_RE = re.compile(r"^shard-\d{4,6}$")


def shard_of(doc_id: str, n_shards: int) -> int:
    """The shard that owns ``doc_id``: the first 8 bytes of its UTF-8 blake2b digest, as a
    little-endian integer, modulo ``n_shards``.

    >>> shard_of("doc0", 3), shard_of("doc0", 3) == shard_of("doc0", 3)
    (2, True)
    """
    digest = hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % n_shards


def route(ids: Sequence[str], n_shards: int) -> dict[int, list[int]]:
    """Positions in ``ids`` grouped by owning shard (shards with none left out), in order."""
    out: dict[int, list[int]] = {}
    for pos, doc_id in enumerate(ids):
        out.setdefault(shard_of(doc_id, n_shards), []).append(pos)
    return dict(sorted(out.items()))


def shard_name(i: int) -> str:
    """Folder name of shard ``i`` under the index path: ``shard-0003``."""
    return f"shard-{i:04d}"


def is_sharded(path: str | os.PathLike) -> bool:
    """True when ``path`` holds the top manifest of a sharded index (reads only the JSON)."""
    import json

    from colengine.storage import FORMAT_NAME, MANIFEST

    m = Path(path) / MANIFEST
    try:
        if m.is_symlink() or not m.is_file() or m.stat().st_size > 64 << 20:
            return False
        doc = json.loads(m.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("format") == FORMAT_NAME \
        and doc.get("kind") == SHARDED_KIND


def check_top_meta(root: Path, meta: Any) -> dict[str, Any]:
    """The top manifest's meta checked field by field; :class:`IndexFormatError` naming the
    field otherwise."""
    def bad(field: str, why: str) -> IndexFormatError:
        return IndexFormatError(f"{root}: sharded manifest field {field!r} {why}")

    if not isinstance(meta, dict):
        raise bad("meta", "must be an object")
    if meta.get("sharded_format") != SHARDED_FORMAT:
        raise bad("sharded_format", f"is {meta.get('sharded_format')!r}; this colengine reads "
                  f"{SHARDED_FORMAT}")
    if meta.get("state") != "ready":
        raise IndexFormatError(f"{root}: the sharded build did not finish (state "
                               f"{meta.get('state')!r}); build it again")
    if meta.get("routing") != ROUTING:
        raise bad("routing", f"is {meta.get('routing')!r}, expected {ROUTING!r}")
    if meta.get("index_kind") not in ("plaid", "exhaustive"):
        raise bad("index_kind", "must be 'plaid' or 'exhaustive'")
    model = meta.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("name"), str) \
            or not isinstance(model.get("dim"), int):
        raise bad("model", "must hold a model 'name' and 'dim'")
    shards = meta.get("shards")
    if not isinstance(shards, list) or not shards:
        raise bad("shards", "must be a non-empty list")
    for i, s in enumerate(shards):
        if not isinstance(s, dict) or s.get("name") != shard_name(i) \
                or not _NAME_RE.match(str(s.get("name"))):
            raise bad(f"shards[{i}]", f"must be an object named {shard_name(i)!r}")
        for key in ("generation", "documents", "tokens"):
            v = s.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise bad(f"shards[{i}].{key}", "must be a non-negative integer")
    nxt = meta.get("next_auto_id")
    if not isinstance(nxt, int) or isinstance(nxt, bool) or nxt < 0:
        raise bad("next_auto_id", "must be a non-negative integer")
    return meta


class ShardUnavailableError(RuntimeError):
    """A shard did not answer (its actor is dead or kept failing) within the timeout; the
    message names the shard. Pass ``allow_partial=True`` to search without it instead."""

    def __init__(self, message: str, shards: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.shards = tuple(shards)
