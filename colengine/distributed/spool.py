"""Encoded documents on their way to the shards: one set of files per (batch, shard).

Encoders (Ray Data actors, or a caller with vectors already encoded) write each batch's
documents into the folder of the shard that owns them::

    <spool>/s0002/<key>.tokens.npy    float16 [T, d]
    <spool>/s0002/<key>.offsets.npy   int64 [n + 1]
    <spool>/s0002/<key>.docs.jsonl    one {"id", "text", "title", "metadata"} line per document

``key`` is a digest of the part's ids, so a batch that Ray runs twice writes the same files
again instead of a second copy; each file goes through a temporary name and ``os.replace``,
the ``.docs.jsonl`` last (a part without it is incomplete and ignored). A shard's build task
then reads only its own folder. Arrays are plain ``.npy`` read with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from colengine.embeddings import PackedEmbeddings

__all__ = ["list_parts", "read_shard", "sample_tokens", "write_part"]


def _shard_dir(spool: Path, shard: int) -> Path:
    return spool / f"s{shard:04d}"


def _replace_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_part(spool: str | os.PathLike, shard: int, ids: Sequence[str],
               docs: Sequence[dict[str, Any]], tokens: np.ndarray,
               offsets: np.ndarray) -> dict[str, Any]:
    """Write one part of shard ``shard``: documents ``docs`` (``{"text", "title",
    "metadata"}``, one per id) and their packed vectors. Returns ``{"shard", "key", "docs",
    "tokens"}``."""
    if len(ids) != len(docs) or offsets.shape != (len(ids) + 1,):
        raise ValueError(f"part of {len(ids)} ids, {len(docs)} documents, offsets "
                         f"{offsets.shape}")
    key = hashlib.blake2b("\x00".join(ids).encode("utf-8"), digest_size=16).hexdigest()
    d = _shard_dir(Path(spool), shard)
    d.mkdir(parents=True, exist_ok=True)
    tok = np.ascontiguousarray(tokens, dtype=np.float16)
    off = np.ascontiguousarray(offsets, dtype=np.int64)
    _replace_write(d / f"{key}.tokens.npy", lambda f: np.save(f, tok, allow_pickle=False))
    _replace_write(d / f"{key}.offsets.npy", lambda f: np.save(f, off, allow_pickle=False))
    lines = "".join(json.dumps({"id": i, **doc}, ensure_ascii=False) + "\n"
                    for i, doc in zip(ids, docs))
    _replace_write(d / f"{key}.docs.jsonl", lambda f: f.write(lines.encode("utf-8")))
    return {"shard": shard, "key": key, "docs": len(ids), "tokens": int(off[-1])}


def list_parts(spool: str | os.PathLike, shard: int) -> list[str]:
    """Keys of the complete parts of ``shard``, sorted (the order its documents are stored)."""
    d = _shard_dir(Path(spool), shard)
    if not d.is_dir():
        return []
    return sorted(p.name[:-len(".docs.jsonl")] for p in d.iterdir()
                  if p.name.endswith(".docs.jsonl") and not p.name.startswith("."))


def _part_arrays(spool: Path, shard: int, key: str, mmap: bool) -> tuple[np.ndarray, np.ndarray]:
    d = _shard_dir(spool, shard)
    mode = "r" if mmap else None
    return (np.load(d / f"{key}.tokens.npy", mmap_mode=mode, allow_pickle=False),
            np.load(d / f"{key}.offsets.npy", allow_pickle=False))


def read_shard(spool: str | os.PathLike, shard: int
               ) -> tuple[list[str], list[dict[str, Any]], PackedEmbeddings]:
    """Every document of ``shard``: (ids, ``{"text", "title", "metadata"}`` records, packed
    float16 vectors)."""
    spool = Path(spool)
    ids: list[str] = []
    docs: list[dict[str, Any]] = []
    toks: list[np.ndarray] = []
    offs: list[np.ndarray] = []
    base = 0
    for key in list_parts(spool, shard):
        with open(_shard_dir(spool, shard) / f"{key}.docs.jsonl", encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                ids.append(row.pop("id"))
                docs.append(row)
        t, o = _part_arrays(spool, shard, key, mmap=False)
        toks.append(t)
        offs.append(o[1:] + base if offs else o + base)
        base += int(o[-1])
    if not ids:
        raise ValueError(f"shard {shard} has no documents")
    offsets = np.concatenate(offs).astype(np.int64)
    if offsets.shape[0] != len(ids) + 1:
        raise ValueError(f"shard {shard}: {len(ids)} documents but {offsets.shape[0] - 1} "
                         "vector ranges in its spooled parts")
    return ids, docs, PackedEmbeddings(np.concatenate(toks), offsets)


def sample_tokens(spool: str | os.PathLike, parts: Sequence[dict[str, Any]],
                  positions: np.ndarray) -> np.ndarray:
    """The token vectors at global ``positions`` (sorted) of the concatenation of ``parts``
    (``write_part`` results, in the given order), read from memory-mapped files."""
    spool = Path(spool)
    counts = np.asarray([p["tokens"] for p in parts], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)])
    out: list[np.ndarray] = []
    which = np.searchsorted(starts, positions, side="right") - 1
    for j in np.unique(which):
        p = parts[int(j)]
        tok, _ = _part_arrays(spool, int(p["shard"]), str(p["key"]), mmap=True)
        out.append(np.asarray(tok[positions[which == j] - starts[j]], dtype=np.float32))
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)
