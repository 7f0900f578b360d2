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

import base64
import json
import os
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from colengine.errors import IndexFormatError

__all__ = [
    "add_record",
    "added_documents",
    "append_records",
    "apply_record",
    "delete_record",
    "encode_record",
    "pack_vectors",
    "prune_logs",
    "read_records",
    "record_vectors",
    "unpack_vectors",
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


def pack_vectors(encoded: Any) -> dict[str, Any]:
    """The added documents' token vectors (a :class:`~colengine.embeddings.PackedEmbeddings`,
    or :class:`~colengine.longdocs.EncodedPassages` for an index of passages) as an add
    record's ``vectors`` field: the float16 bytes in base64 (little-endian) and the lengths,
    so that whoever replays the record (another worker, a load after a crash) applies exactly
    what the writer applied without encoding the texts again.

    >>> from colengine.embeddings import PackedEmbeddings
    >>> v = pack_vectors(PackedEmbeddings.from_list([np.ones((2, 4)), np.ones((1, 4))]))
    >>> v["kind"], v["dim"], v["lengths"]
    ('documents', 4, [2, 1])
    >>> unpack_vectors(v, n_documents=2, dim=4).lengths.tolist()
    [2, 1]
    """
    from colengine.longdocs import EncodedPassages

    docs = encoded.docs if isinstance(encoded, EncodedPassages) else encoded
    tokens = np.ascontiguousarray(np.asarray(docs.tokens), dtype="<f2")
    out: dict[str, Any] = {
        "kind": "passages" if isinstance(encoded, EncodedPassages) else "documents",
        "dim": int(tokens.shape[1]), "lengths": np.diff(np.asarray(docs.offsets)).tolist(),
        "float16": base64.b64encode(tokens.tobytes()).decode("ascii")}
    if isinstance(encoded, EncodedPassages):
        out.update(n_texts=int(encoded.n_texts), report=encoded.report,
                   **{k: np.asarray(getattr(encoded, k)).tolist()
                      for k in ("doc", "window", "start", "end")})
    return out


def unpack_vectors(field: Any, *, n_documents: int, dim: int) -> Any:
    """The embeddings of an add record's ``vectors`` field (:func:`pack_vectors`), checked
    against the record's ``n_documents`` and the index's ``dim``: data only, read with
    ``numpy.frombuffer``; anything malformed is an :class:`IndexFormatError`."""
    from colengine.embeddings import PackedEmbeddings
    from colengine.longdocs import EncodedPassages

    def bad(why: str) -> IndexFormatError:
        return IndexFormatError(f"write-ahead log: an add record's vectors are malformed ({why})")

    if not isinstance(field, dict) or field.get("kind") not in ("documents", "passages"):
        raise bad("not a vectors object")
    lengths = field.get("lengths")
    if (not isinstance(lengths, list) or field.get("dim") != dim
            or not all(type(x) is int and x >= 0 for x in lengths)):
        raise bad(f"dim {field.get('dim')!r} for an index of dim {dim}, or bad lengths")
    try:
        raw = base64.b64decode(field.get("float16", ""), validate=True)
    except (TypeError, ValueError) as e:
        raise bad(f"not base64: {e}") from None
    n_tokens = sum(lengths)
    if len(raw) != n_tokens * dim * 2:
        raise bad(f"{len(raw)} bytes for {n_tokens} tokens of dim {dim}")
    tokens = np.frombuffer(raw, dtype="<f2").reshape(n_tokens, dim).astype(np.float16)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    docs = PackedEmbeddings(tokens, offsets)
    if field["kind"] == "documents":
        if len(lengths) != n_documents:
            raise bad(f"{len(lengths)} documents' vectors for {n_documents} documents")
        return docs
    try:
        cols = [np.asarray(field[k], dtype=np.int64) for k in ("doc", "window", "start", "end")]
        report = field["report"]
        if field["n_texts"] != n_documents or not isinstance(report, dict):
            raise ValueError(f"{field['n_texts']!r} texts for {n_documents} documents")
        return EncodedPassages(docs, *cols, n_documents, report)
    except (KeyError, TypeError, ValueError) as e:
        raise bad(f"passages: {e}") from None


def record_vectors(record: dict[str, Any], dim: int) -> Any:
    """The embeddings an add record carries (:func:`pack_vectors`), or None when it has none
    (a log written before records carried them: its texts are encoded again)."""
    if record["op"] != "add" or "vectors" not in record:
        return None
    return unpack_vectors(record["vectors"], n_documents=len(record["documents"]), dim=dim)


def apply_record(retriever: Any, record: dict[str, Any], encoded: Any = None) -> None:
    """Apply one log record to a :class:`~colengine.Retriever` (``encoded``: the added
    documents' embeddings when the caller already has them; else the ones the record
    carries, else the texts are encoded)."""
    if record["op"] == "add":
        if encoded is None:
            encoded = record_vectors(record, retriever.encoder.dim)
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


def add_record(documents: list[dict[str, Any]], encoded: Any = None) -> dict[str, Any]:
    """The log record of an add: ``documents`` are ``{"id", "text", "title"?, "metadata"?}``;
    ``encoded``, their embeddings, are carried along (:func:`pack_vectors`)."""
    record: dict[str, Any] = {"op": "add", "documents": documents}
    if encoded is not None:
        record["vectors"] = pack_vectors(encoded)
    return record


def delete_record(ids: list[str]) -> dict[str, Any]:
    return {"op": "delete", "ids": list(ids)}
