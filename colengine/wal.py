"""The write-ahead log: acknowledged changes that are not yet in a saved generation.

A save rewrites every array of an index, too slow to run for each small write. So a server
appends each accepted change (documents added, ids deleted) to a log file in the index folder,
fsyncs it and only then answers; the next save (a *checkpoint*) folds the log into a new
generation. The log is named after the generation it applies to::

    index_dir/
      manifest.json      generation 7
      g000007/ ...
      wal-000007.jsonl   changes made on top of generation 7, one record a line

A log whose generation is not the current one is stale (a checkpoint saved its changes and was
stopped before deleting it) and is ignored, so a crash between a save and the deletion of its
log never applies a change twice. Each line is ``<crc32 hex> <json>``: a line cut short by a
crash (no newline) is dropped, a line whose checksum does not match is an error.

:meth:`colengine.Retriever.load` replays the log of the generation it loads, so every reader
of an index folder (the CLI, the server, a script) sees the acknowledged changes.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from colengine.errors import IndexFormatError

__all__ = [
    "add_record",
    "added_documents",
    "append_records",
    "apply_record",
    "delete_record",
    "encode_record",
    "prune_logs",
    "read_records",
    "wal_path",
]

_WAL_RE = re.compile(r"^wal-(\d{6})\.jsonl$")


def wal_path(root: str | os.PathLike, generation: int) -> Path:
    """The log file of ``generation`` inside the index folder ``root``."""
    return Path(root) / f"wal-{int(generation):06d}.jsonl"


def encode_record(record: dict[str, Any]) -> bytes:
    """One log line: crc32 of the JSON, a space, the JSON, a newline."""
    body = json.dumps(record, ensure_ascii=False, allow_nan=False,
                      separators=(",", ":")).encode("utf-8")
    return b"%08x " % zlib.crc32(body) + body + b"\n"


def read_records(path: str | os.PathLike, offset: int = 0
                 ) -> tuple[list[dict[str, Any]], int]:
    """The complete records of a log from byte ``offset`` on, and the offset after the last
    complete line (a torn last line is left unread). A missing log holds no records."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    records = [_decode(line, path) for line in data[:end].splitlines() if line]
    return records, offset + end


def _decode(line: bytes, path: str | os.PathLike) -> dict[str, Any]:
    crc, _, body = line.partition(b" ")
    try:
        ok = int(crc, 16) == zlib.crc32(body)
        record = json.loads(body) if ok else None
    except ValueError:
        ok, record = False, None
    if not ok or not isinstance(record, dict) or record.get("op") not in ("add", "delete"):
        raise IndexFormatError(f"{path}: corrupt write-ahead log record")
    return record


def append_records(path: str | os.PathLike, lines: list[bytes], valid_end: int) -> int:
    """Append encoded records after byte ``valid_end`` (anything beyond it, a line torn by a
    crash, is cut off first), fsync, and return the new end offset. The caller holds the
    writer lock."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_size != valid_end:
            os.ftruncate(fd, valid_end)
        os.lseek(fd, valid_end, os.SEEK_SET)
        data = b"".join(lines)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    if valid_end == 0:  # a new file: make its directory entry durable too
        _fsync_dir(path.parent)
    return valid_end + len(data)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _logs(root: Path) -> Iterator[tuple[int, Path]]:
    for child in root.iterdir():
        m = _WAL_RE.match(child.name)
        if m:
            yield int(m.group(1)), child


def prune_logs(root: str | os.PathLike, generation: int) -> None:
    """Delete the logs of generations before ``generation`` (their changes are saved)."""
    for gen, path in _logs(Path(root)):
        if gen < generation:
            path.unlink(missing_ok=True)


def apply_record(retriever: Any, record: dict[str, Any], encoded: Any = None) -> None:
    """Apply one log record to a :class:`~colengine.Retriever` (``encoded``: the added
    documents' embeddings when the caller already has them)."""
    if record["op"] == "add":
        docs = record["documents"]
        retriever.add(added_documents(record), [d["id"] for d in docs],
                      metadata=[d.get("metadata") for d in docs], encoded=encoded)
    else:
        retriever.delete(record["ids"])


def added_documents(record: dict[str, Any]) -> list[str | dict[str, str]]:
    """The documents of an add record as ``Retriever.add`` takes them (text, or a
    ``{"title", "text"}`` mapping)."""
    return [{"title": d["title"], "text": d["text"]} if d.get("title") else d["text"]
            for d in record["documents"]]


def add_record(documents: list[dict[str, Any]]) -> dict[str, Any]:
    """The log record of an add: ``documents`` are ``{"id", "text", "title"?, "metadata"?}``."""
    return {"op": "add", "documents": documents}


def delete_record(ids: list[str]) -> dict[str, Any]:
    return {"op": "delete", "ids": list(ids)}
