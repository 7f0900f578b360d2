"""A corpus read from disk on access, so that a build never holds every text in memory.

:class:`JsonlCorpus` indexes a JSON-lines file once (a byte offset, the id and the metadata
of each document: a few dozen bytes a document) and parses a document's row again each time
it is read. ``Retriever.build`` takes it like a list: with ``stream=True`` the encoder, the
BM25 tokeniser and the metadata store read it a chunk at a time, so texts are never all in
memory at once (``colengine index`` reads ``.jsonl`` corpora this way).

>>> import json, tempfile, pathlib
>>> p = pathlib.Path(tempfile.mkdtemp()) / "corpus.jsonl"
>>> rows = [{"_id": "a", "title": "T", "text": "x"}, {"_id": "b", "text": " "},
...         {"_id": "c", "text": "z", "metadata": {"n": 1}}]
>>> _ = p.write_text("".join(json.dumps(r) + "\\n" for r in rows))
>>> c = JsonlCorpus(p)
>>> len(c), c.ids, c.skipped, c[1], c.metadata
(2, ['a', 'c'], 1, {'title': '', 'text': 'z'}, [None, {'n': 1}])
"""

from __future__ import annotations

import gzip
import json
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["JsonlCorpus"]

ID_FIELDS = ("_id", "docid", "id")


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


class JsonlCorpus(Sequence[dict]):
    """The documents of a ``.jsonl`` (or ``.jsonl.gz``) file, one JSON object a line, as a
    read-only sequence of ``{"title", "text"}`` dicts parsed on access.

    path: the file. id_field: the field holding the id (default: the first of ``_id``,
    ``docid``, ``id`` present). text_field: the text (default ``text``); ``title`` is kept
    when present. A row's ``metadata`` object goes to :attr:`metadata`. skip_empty: leave out
    documents whose title and text are blank (counted in :attr:`skipped`); ``False`` makes
    one an error.

    Every row is checked while indexing, before any encoding: a row that is not a JSON object,
    lacks the id or text, or has a text, title or metadata of the wrong type is a
    ``ValueError`` naming the file and line. ``.gz`` files are read forward (a pass over the
    corpus decompresses it once); plain files are read with a seek per document.
    """

    def __init__(self, path: str | os.PathLike, *, id_field: str | None = None,
                 text_field: str = "text", skip_empty: bool = True) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such file")
        self.text_field = text_field
        self._keys = (id_field,) if id_field else ID_FIELDS
        self.ids: list[str] = []
        self.metadata: list[dict[str, Any] | None] = []
        self.skipped = 0
        offsets = []
        pos = 0
        with _open_binary(self.path) as f:
            for n, raw in enumerate(f, 1):
                start, pos = pos, pos + len(raw)
                if not raw.strip():
                    continue
                doc_id, doc, meta = self._parse(raw, n)
                if not doc["text"].strip() and not doc["title"].strip():
                    if not skip_empty:
                        raise ValueError(f"{self.path}:{n}: document {doc_id!r} is empty "
                                         "(skip_empty=True, CLI --skip-empty, leaves such "
                                         "documents out)")
                    self.skipped += 1
                    continue
                self.ids.append(doc_id)
                self.metadata.append(meta)
                offsets.append(start)
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._file = None
        self._lock = threading.Lock()

    def _parse(self, raw: bytes, n: int) -> tuple[str, dict[str, str], dict | None]:
        where = f"{self.path}:{n}"
        try:
            row = json.loads(raw)
        except UnicodeDecodeError as e:
            raise ValueError(f"{where}: not UTF-8 text ({e.reason})") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        doc_id = next((row[k] for k in self._keys if row.get(k) is not None), None)
        if doc_id is None or self.text_field not in row:
            raise ValueError(f"{where}: a corpus row needs {' or '.join(map(repr, self._keys))} "
                             f"and {self.text_field!r} (see --id-field / --text-field)")
        text = row[self.text_field]
        if not isinstance(text, str):
            raise ValueError(f"{where}: document {doc_id!r}: {self.text_field!r} must be a "
                             f"string, got {'null' if text is None else type(text).__name__}")
        meta = row.get("metadata")
        if meta is not None and not isinstance(meta, dict):
            raise ValueError(f"{where}: 'metadata' must be an object")
        title = row.get("title") or ""
        if not isinstance(title, str):
            raise ValueError(f"{where}: 'title' must be a string")
        return str(doc_id), {"title": title, "text": text}, meta or None

    def __len__(self) -> int:
        return int(self._offsets.shape[0])

    def _read(self, i: int) -> dict[str, str]:
        if self._file is None:
            self._file = _open_binary(self.path)
        self._file.seek(int(self._offsets[i]))
        raw = self._file.readline()
        try:
            return self._parse(raw, i)[1]
        except ValueError as e:
            raise ValueError(f"{self.path}: document {i} ({self.ids[i]!r}) can no longer be "
                             f"read; was the file changed after it was indexed? ({e})") from None

    def __getitem__(self, i):
        if isinstance(i, slice):
            rows = range(*i.indices(len(self)))
            with self._lock:
                return [self._read(j) for j in rows]
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"JsonlCorpus indices must be int or slice, not {type(i).__name__}")
        j = int(i) + len(self) if i < 0 else int(i)
        if not 0 <= j < len(self):
            raise IndexError(f"document {i} of a corpus of {len(self)}")
        with self._lock:
            return self._read(j)

    def __iter__(self) -> Iterator[dict[str, str]]:
        for a in range(0, len(self), 1024):
            yield from self[a:a + 1024]

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __repr__(self) -> str:
        return f"JsonlCorpus({str(self.path)!r}, documents={len(self)})"
