"""``colengine.Client``: the HTTP API with the :class:`~colengine.Retriever` interface.

An application switches between an in-process index and a server with one line::

    r = Retriever.load("my-index")                 # in process
    r = Client("http://127.0.0.1:8000")            # or remote: same calls, same types
    r.search("a question", k=5, filter={"lang": "en"})   # -> list[Hit]

Errors come back as the exceptions the Retriever raises: :class:`UnknownIdError` (404),
:class:`DuplicateIdError` (409), :class:`FilterError` / ``ValueError`` (400, 413),
``PermissionError`` (401) and :class:`ServerError` for the rest (503 while loading).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from colengine.errors import DuplicateIdError, FilterError, UnknownIdError
from colengine.types import Hit, Passage

__all__ = ["Client", "ServerError"]


class ServerError(RuntimeError):
    """The server failed, is loading (503) or answered something unexpected."""

    def __init__(self, status: int, message: str, kind: str = "") -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.kind = kind


def _document(doc: Any, i: int) -> dict[str, Any]:
    if isinstance(doc, str):
        return {"text": doc}
    if isinstance(doc, Mapping) and "text" in doc:
        d = {"text": doc["text"]}
        if doc.get("title"):
            d["title"] = doc["title"]
        return d
    raise TypeError(f"documents[{i}] must be str or a mapping with 'text'")


class Client:
    """A colengine server at ``url`` (``api_key``: sent as ``Authorization: Bearer``)."""

    def __init__(self, url: str, api_key: str | None = None, *, timeout: float = 60.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout,
                                  transport=transport)

    # -- plumbing --------------------------------------------------------------------
    def _call(self, method: str, path: str, body: Any = None) -> Any:
        resp = self._http.request(method, path, json=body)
        if resp.status_code == 200:
            return resp.json()
        try:
            err = resp.json()
            kind, message = err.get("error", ""), err.get("message") or str(err)
        except ValueError:
            kind, message = "", resp.text
        status = resp.status_code
        if status == 404 and kind == "UnknownIdError":
            raise UnknownIdError(message)
        if status == 409:
            raise DuplicateIdError(message)
        if status == 400 and kind == "FilterError":
            raise FilterError(message)
        if status in (400, 413):
            raise ValueError(message)
        if status == 401:
            raise PermissionError(message)
        raise ServerError(status, message, kind)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def health(self) -> dict[str, Any]:
        """``{"status": "ok"}`` once the index is loaded (raises :class:`ServerError` before)."""
        return self._call("GET", "/health")

    def wait_ready(self, timeout: float = 60.0) -> Client:
        """Block until the server answers ``/health`` with ok."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.health()
                return self
            except (httpx.TransportError, ServerError) as e:
                if isinstance(e, ServerError) and e.kind == "LoadError":
                    raise  # the index could not be loaded: waiting will not help
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.url} not ready after {timeout} s") from None
                time.sleep(0.1)

    # -- the Retriever interface -----------------------------------------------------
    def info(self) -> dict[str, Any]:
        return self._call("GET", "/info")

    def __len__(self) -> int:
        return int(self.info()["documents"])

    def search(self, query: str, k: int = 10, *, pipeline: str = "late", candidates: int = 100,
               filter: Mapping[str, Any] | None = None, return_text: bool = False,
               return_metadata: bool = False, **knobs: Any) -> list[Hit]:
        """Top-``k`` hits for one query (see :meth:`colengine.Retriever.search`)."""
        if not isinstance(query, str):
            raise TypeError(f"query must be str, got {type(query).__name__}")
        return self.search_batch([query], k, pipeline=pipeline, candidates=candidates,
                                 filter=filter, return_text=return_text,
                                 return_metadata=return_metadata, **knobs)[0]

    def search_batch(self, queries: Sequence[str], k: int = 10, *, pipeline: str = "late",
                     candidates: int = 100, filter: Mapping[str, Any] | None = None,
                     return_text: bool = False, return_metadata: bool = False,
                     **knobs: Any) -> list[list[Hit]]:
        if isinstance(queries, str):
            raise TypeError("search_batch takes a list of queries; use search() for one")
        body: dict[str, Any] = {"queries": list(queries), "k": k, "pipeline": pipeline,
                                "candidates": candidates, "return_text": return_text,
                                "return_metadata": return_metadata}
        if filter is not None:
            body["filter"] = filter
        if knobs:
            body["knobs"] = knobs
        out = self._call("POST", "/search", body)
        return [[Hit(h["id"], float(h["score"]), text=h.get("text"), metadata=h.get("metadata"),
                     passage=Passage(**h["passage"]) if h.get("passage") else None)
                 for h in row] for row in out["results"]]

    def add(self, documents: Sequence[Any], ids: Sequence[str] | None = None, *,
            metadata: Sequence[Mapping[str, Any] | None] | None = None) -> list[str]:
        """Add documents (strings or ``{"title", "text"}``); returns their ids. Without
        ``ids`` each gets a random UUID (the server cannot number documents for several
        writers at once)."""
        if isinstance(documents, (str, bytes)):
            raise TypeError("add takes a list of documents")
        docs = [_document(d, i) for i, d in enumerate(documents)]
        ids = [uuid.uuid4().hex for _ in docs] if ids is None else list(ids)
        if len(ids) != len(docs):
            raise ValueError(f"got {len(ids)} ids for {len(docs)} documents")
        if metadata is not None:
            if len(metadata) != len(docs):
                raise ValueError(f"got {len(metadata)} metadata entries for {len(docs)} documents")
            for d, m in zip(docs, metadata):
                if m is not None:
                    d["metadata"] = dict(m)
        for d, i in zip(docs, ids):
            d["id"] = i
        self._call("POST", "/documents", {"documents": docs})
        return ids

    def delete(self, ids: Sequence[str]) -> None:
        self._call("POST", "/documents/delete", {"ids": list(ids)})

    def get(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        """Documents by id: ``{"id", "text" (when stored), "title"?, "metadata"}``."""
        if isinstance(ids, str):
            raise TypeError("get takes a list of ids, not a single string")
        return self._call("POST", "/documents/get", {"ids": list(ids)})["documents"]

    def rerank(self, query: str, doc_ids: Sequence[str], k: int | None = None) -> list[Hit]:
        """Exact MaxSim of ``query`` against indexed documents ``doc_ids``."""
        body: dict[str, Any] = {"query": query, "ids": list(doc_ids)}
        if k is not None:
            body["k"] = k
        return [Hit(h["id"], float(h["score"]))
                for h in self._call("POST", "/rerank", body)["results"]]

    def rerank_texts(self, query: str, texts: Sequence[str], ids: Sequence[str] | None = None,
                     k: int | None = None) -> list[Hit]:
        """Exact MaxSim of ``query`` against texts not in the index (ids default "0".."n-1")."""
        body: dict[str, Any] = {"query": query, "documents": list(texts)}
        if k is not None:
            body["k"] = k
        hits = self._call("POST", "/rerank", body)["results"]
        if ids is None:
            return [Hit(h["id"], float(h["score"])) for h in hits]
        ids = list(ids)
        if len(ids) != len(texts):
            raise ValueError(f"got {len(ids)} ids for {len(texts)} texts")
        return [Hit(ids[int(h["id"])], float(h["score"])) for h in hits]
