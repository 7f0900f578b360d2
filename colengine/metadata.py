"""Documents' texts and metadata in SQLite, and the filter language compiled to SQL.

One table, ``documents(id TEXT PRIMARY KEY, text, title, metadata JSON)``. A store lives in
memory while documents are built, added and deleted, and is written as one SQLite file
(WAL mode) into each index generation by :func:`colengine.storage.save_bundle`, so that the
vectors and the metadata of a generation always describe the same documents: the manifest
swap that publishes the arrays publishes the database with them. A loaded store reads that
file read-only (``mode=ro&immutable=1``: a generation never changes once written) and is
copied into memory on its first change.

Filters (:func:`compile_filter`) are JSON objects in the Chroma/Mongo style::

    {"lang": "en"}                                   equality
    {"year": {"$gte": 2020}}                         $eq $ne $gt $gte $lt $lte
    {"tag": {"$in": ["a", "b"]}}                     $in $nin
    {"$and": [...]}, {"$or": [...]}, {"$not": {...}}
    {"lang": {"$exists": true}}

Semantics: values compare within their kind only (numbers with numbers, ``1 == 1.0``;
strings with strings; booleans with booleans; ``None`` matches a stored ``null``); a document
whose field is missing or of another kind does not match ``$eq``/``$gt``/... /``$in``, and
does match ``$ne`` and ``$nin`` (their exact negation). Several keys in one object are
ANDed. Field names must match ``[A-Za-z_][A-Za-z0-9_]{0,63}`` and every value is a bound
parameter, so a filter cannot inject SQL; anything else raises :class:`FilterError`.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from colengine.errors import FilterError, UnknownIdError

__all__ = ["MetadataStore", "compile_filter", "check_metadata", "FIELD_RE"]

#: Field names allowed in metadata and filters.
FIELD_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
#: Most values one ``$in``/``$nin`` list may hold, and deepest nesting of a filter.
MAX_IN_VALUES = 1000
MAX_DEPTH = 32
_SCHEMA_VERSION = 1
_COMPARE = {"$eq": "=", "$ne": "!=", "$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}
_OPS = (*_COMPARE, "$in", "$nin", "$exists")
_Scalar = (str, int, float, bool, type(None))


# -- metadata values -------------------------------------------------------------------
def check_metadata(meta: object, where: str = "metadata") -> dict[str, Any]:
    """A document's metadata: a dict of field name -> str/int/float/bool/None (finite)."""
    if meta is None:
        return {}
    if not isinstance(meta, Mapping):
        raise TypeError(f"{where} must be a dict or None, got {type(meta).__name__}")
    out: dict[str, Any] = {}
    for key, value in meta.items():
        if not isinstance(key, str) or not FIELD_RE.match(key):
            raise ValueError(f"{where}: field name {key!r} must match {FIELD_RE.pattern}")
        if not isinstance(value, _Scalar):
            raise TypeError(f"{where}[{key!r}] must be str, int, float, bool or None, "
                            f"got {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{where}[{key!r}] must be finite, got {value}")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
            raise ValueError(f"{where}[{key!r}] is outside the 64-bit integer range")
        out[key] = value
    return out


# -- the filter language ---------------------------------------------------------------
def _kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    return "text"


def _check_value(v: Any, where: str) -> Any:
    if not isinstance(v, _Scalar):
        raise FilterError(f"{where}: value must be str, int, float, bool or null, "
                          f"got {type(v).__name__}")
    if isinstance(v, float) and not math.isfinite(v):
        raise FilterError(f"{where}: value must be finite, got {v}")
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 2**63:
        raise FilterError(f"{where}: integer {v} is outside the 64-bit range")
    return v


def _type_sql(kind: str) -> str:
    return {"null": "= 'null'", "bool": "IN ('true', 'false')", "number": "IN ('integer', 'real')",
            "text": "= 'text'"}[kind]


def _eq_sql(v: Any, params: list[Any], path: str) -> str:
    """``field == v`` within v's kind; always 0 or 1 (never NULL)."""
    kind = _kind(v)
    if kind == "null":
        params.append(path)
        return "coalesce(json_type(metadata, ?) = 'null', 0)"
    if kind == "bool":
        params.append(path)
        return f"coalesce(json_type(metadata, ?) = '{'true' if v else 'false'}', 0)"
    params.extend([path, path, v])
    return f"coalesce(json_type(metadata, ?) {_type_sql(kind)} AND json_extract(metadata, ?) = ?, 0)"


def _field_sql(field: str, cond: Any, params: list[Any]) -> str:
    if not isinstance(field, str) or not FIELD_RE.match(field):
        raise FilterError(f"invalid field name {field!r}: must match {FIELD_RE.pattern} "
                          "(operators start with '$': $and, $or, $not)")
    path = f"$.{field}"
    if not isinstance(cond, Mapping):
        if isinstance(cond, (list, tuple)):
            raise FilterError(f"field {field!r}: a list is not a value; use {{'$in': [...]}}")
        return _eq_sql(_check_value(cond, f"field {field!r}"), params, path)
    if not cond:
        raise FilterError(f"field {field!r}: empty operator object")
    parts = []
    for op, v in cond.items():
        where = f"field {field!r} {op}"
        if op not in _OPS:
            raise FilterError(f"field {field!r}: unknown operator {op!r}; valid: {list(_OPS)}")
        if op == "$exists":
            if not isinstance(v, bool):
                raise FilterError(f"{where}: expects true or false, got {v!r}")
            params.append(path)
            parts.append(f"(json_type(metadata, ?) IS {'NOT ' if v else ''}NULL)")
        elif op in ("$in", "$nin"):
            if not isinstance(v, (list, tuple)):
                raise FilterError(f"{where}: expects a list of values, got {type(v).__name__}")
            if len(v) > MAX_IN_VALUES:
                raise FilterError(f"{where}: more than {MAX_IN_VALUES} values ({len(v)})")
            eqs = [_eq_sql(_check_value(x, where), params, path) for x in v]
            sql = "(" + " OR ".join(eqs) + ")" if eqs else "0"
            parts.append(sql if op == "$in" else f"(NOT {sql})")
        elif op in ("$eq", "$ne"):
            sql = _eq_sql(_check_value(v, where), params, path)
            parts.append(sql if op == "$eq" else f"(NOT {sql})")
        else:
            v = _check_value(v, where)
            kind = _kind(v)
            if kind not in ("number", "text"):
                raise FilterError(f"{where}: expects a number or a string, got {v!r}")
            params.extend([path, path, v])
            parts.append(f"coalesce(json_type(metadata, ?) {_type_sql(kind)} "
                         f"AND json_extract(metadata, ?) {_COMPARE[op]} ?, 0)")
    return "(" + " AND ".join(parts) + ")"


def _filter_sql(flt: Any, params: list[Any], depth: int) -> str:
    if depth > MAX_DEPTH:
        raise FilterError(f"filter nested deeper than {MAX_DEPTH} levels")
    if not isinstance(flt, Mapping):
        raise FilterError(f"a filter must be an object (dict), got {type(flt).__name__}")
    if not flt:
        raise FilterError("empty filter object; pass filter=None to search everything")
    parts = []
    for key, cond in flt.items():
        if key in ("$and", "$or"):
            if not isinstance(cond, (list, tuple)) or not cond:
                raise FilterError(f"{key} expects a non-empty list of filters")
            subs = [_filter_sql(c, params, depth + 1) for c in cond]
            parts.append("(" + f" {key[1:].upper()} ".join(subs) + ")")
        elif key == "$not":
            parts.append(f"(NOT {_filter_sql(cond, params, depth + 1)})")
        elif isinstance(key, str) and key.startswith("$"):
            raise FilterError(f"unknown top-level operator {key!r}; valid: $and, $or, $not "
                              "(field operators go inside a field: {'year': {'$gte': 2020}})")
        else:
            parts.append(_field_sql(key, cond, params))
    return "(" + " AND ".join(parts) + ")"


def compile_filter(flt: Any) -> tuple[str, list[Any]]:
    """A filter as a SQL boolean expression over ``metadata`` and its bound parameters.

    >>> compile_filter({"year": {"$gte": 2020}})[1]
    ['$.year', '$.year', 2020]
    """
    params: list[Any] = []
    sql = _filter_sql(flt, params, 0)
    return sql, params


# -- the store -------------------------------------------------------------------------
_CREATE = """
CREATE TABLE IF NOT EXISTS documents (
    id TEXT PRIMARY KEY NOT NULL,
    text TEXT,
    title TEXT,
    metadata TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(metadata))
) WITHOUT ROWID
"""


class MetadataStore:
    """Texts, titles and metadata by document id, in SQLite; thread-safe.

    >>> s = MetadataStore()
    >>> s.add(["a", "b"], texts=["x", "y"], metadata=[{"n": 1}, None])
    >>> s.matching_ids({"n": {"$gte": 1}}), s.get(["b"])
    (['a'], [{'id': 'b', 'text': 'y', 'metadata': {}}])
    """

    def __init__(self, *, store_texts: bool = True,
                 _conn: sqlite3.Connection | None = None) -> None:
        self.store_texts = store_texts
        self._lock = threading.RLock()
        self._readonly = _conn is not None
        if _conn is None:
            # "": SQLite's private temporary database, deleted on close; unlike ":memory:" it
            # spills to a temporary file past its page cache, so a million documents' texts
            # are not all held in memory while an index is built or changed
            _conn = sqlite3.connect("", check_same_thread=False)
            _conn.execute(_CREATE)
            _conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
        self._conn = _conn

    # -- persistence -----------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, *, store_texts: bool = True) -> "MetadataStore":
        """Open a saved store read-only (the file is never written; changes go to a private
        temporary copy)."""
        from colengine.errors import IndexFormatError

        uri = Path(path).resolve().as_uri() + "?mode=ro&immutable=1"
        try:
            conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            cols = [r[1] for r in conn.execute("PRAGMA table_info(documents)")]
        except sqlite3.DatabaseError as e:
            raise IndexFormatError(f"{path}: not a readable metadata database ({e})") from e
        if version != _SCHEMA_VERSION or cols != ["id", "text", "title", "metadata"]:
            conn.close()
            raise IndexFormatError(f"{path}: metadata database has an unexpected schema "
                                   f"(version {version}, columns {cols})")
        return cls(store_texts=store_texts, _conn=conn)

    def write(self, path: str | Path) -> None:
        """Write the whole store to a new SQLite file at ``path`` (WAL mode, checkpointed,
        so the file alone holds everything)."""
        path = Path(path)
        if path.exists():
            raise FileExistsError(f"{path} exists")
        dst = sqlite3.connect(path)
        try:
            with self._lock:
                self._conn.backup(dst)
            dst.execute("PRAGMA journal_mode = WAL")
            dst.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            dst.close()

    def _writable(self) -> sqlite3.Connection:
        """The connection, copied first (to a private temporary database) if it is a
        read-only saved file."""
        if self._readonly:
            mem = sqlite3.connect("", check_same_thread=False)   # (temporary, as in __init__)
            self._conn.backup(mem)
            self._conn.close()
            self._conn, self._readonly = mem, False
        return self._conn

    # -- content ---------------------------------------------------------------------
    def __len__(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT count(*) FROM documents").fetchone()[0])

    def add(self, ids: Sequence[str], *, texts: Sequence[str | None] | None = None,
            titles: Sequence[str | None] | None = None,
            metadata: Sequence[Mapping[str, Any] | None] | None = None) -> None:
        """Insert documents (all or nothing). Texts are kept only when ``store_texts``."""
        n = len(ids)
        for name, col in (("texts", texts), ("titles", titles), ("metadata", metadata)):
            if col is not None and len(col) != n:
                raise ValueError(f"got {len(col)} {name} for {n} documents")
        metas = [json.dumps(check_metadata(m, f"metadata[{i}]"), ensure_ascii=False,
                            allow_nan=False)
                 for i, m in enumerate(metadata if metadata is not None else [None] * n)]
        keep = self.store_texts
        rows = [(ids[i], texts[i] if keep and texts is not None else None,
                 titles[i] if keep and titles is not None else None, metas[i]) for i in range(n)]
        with self._lock:
            conn = self._writable()
            try:
                with conn:
                    conn.executemany("INSERT INTO documents(id, text, title, metadata) "
                                     "VALUES (?, ?, ?, ?)", rows)
            except sqlite3.IntegrityError as e:
                from colengine.errors import DuplicateIdError

                raise DuplicateIdError(f"a document id is already in the metadata store ({e})") from e

    def delete(self, ids: Iterable[str]) -> None:
        with self._lock:
            conn = self._writable()
            with conn:
                conn.executemany("DELETE FROM documents WHERE id = ?", [(i,) for i in ids])

    def get(self, ids: Sequence[str], *, strict: bool = True) -> list[dict[str, Any]]:
        """``{"id", "text" (when stored), "title" (when given), "metadata"}`` per id, in order.
        Unknown ids raise :class:`UnknownIdError` (``strict``) or give ``None``."""
        found: dict[str, dict[str, Any]] = {}
        ids = list(ids)
        with self._lock:
            for a in range(0, len(ids), 500):
                chunk = ids[a:a + 500]
                q = ("SELECT id, text, title, metadata FROM documents WHERE id IN ("
                     + ",".join("?" * len(chunk)) + ")")
                for i, text, title, meta in self._conn.execute(q, chunk):
                    d: dict[str, Any] = {"id": i}
                    if text is not None:
                        d["text"] = text
                    if title is not None:
                        d["title"] = title
                    d["metadata"] = json.loads(meta)
                    found[i] = d
        out = []
        for i in ids:
            if i not in found and strict:
                raise UnknownIdError(f"unknown document id {i!r}")
            out.append(found.get(i))
        return out

    def matching_ids(self, flt: Mapping[str, Any]) -> list[str]:
        """Ids of the documents that ``flt`` keeps (see :func:`compile_filter`)."""
        sql, params = compile_filter(flt)
        with self._lock:
            try:
                return [r[0] for r in self._conn.execute(
                    f"SELECT id FROM documents WHERE {sql}", params)]
            except sqlite3.Error as e:  # e.g. a filter too large for SQLite's limits
                raise FilterError(f"filter could not be evaluated: {e}") from e

    def ids(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._conn.execute("SELECT id FROM documents")]
