"""``colengine serve`` over a sharded index: the HTTP server's service, backed by a
:class:`~colengine.distributed.ShardedRetriever` (one process; the shard actors do the
searching). Ray is joined through Ray's own ``RAY_ADDRESS`` variable, else started locally.

Searches run concurrently; a write (add or delete) holds off searches, is applied to the
owning shards and saved (the shards it touched, then the top manifest) before it is
acknowledged, so an acknowledged write is on disk. That is a save per write request: fine
for occasional writes, slow for a stream of them (no write-ahead log yet).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from colengine.server.service import (Limits, NotReady, RWLock, _check_limit,
                                      check_add_request, check_search_limits)

__all__ = ["ShardedService"]

log = logging.getLogger("colengine.server")


class ShardedService:
    """The same methods as :class:`colengine.server.service.IndexService`."""

    def __init__(self, path: str | os.PathLike, *, model: Any = None, device: str = "auto",
                 limits: Limits | None = None, trust_remote_code: bool | None = None,
                 **_single_index_options: Any) -> None:
        self.path = Path(path)
        self.model, self.device, self.trust_remote_code = model, device, trust_remote_code
        self.limits = limits or Limits()
        self.retriever: Any = None
        self.error: str | None = None
        self._rw = RWLock()

    @property
    def ready(self) -> bool:
        return self.retriever is not None

    def open(self) -> None:
        try:
            from colengine.distributed import ShardedRetriever

            self.retriever = ShardedRetriever.load(self.path, model=self.model,
                                                   device=self.device,
                                                   trust_remote_code=self.trust_remote_code)
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
            log.exception("loading %s failed", self.path)

    def close(self, checkpoint: bool = True) -> None:
        if self.retriever is not None:
            self.retriever.close()

    def _need_ready(self) -> Any:
        if self.retriever is None:
            raise NotReady(self.error or "the index is loading")
        return self.retriever

    def search(self, queries: Sequence[str], k: int = 10, *, pipeline: str = "late",
               candidates: int = 100, filter: Mapping[str, Any] | None = None,
               return_text: bool = False, return_metadata: bool = False,
               knobs: Mapping[str, Any] | None = None) -> list[list[Any]]:
        check_search_limits(self.limits, queries, k, pipeline, candidates)
        if pipeline != "late":
            raise ValueError(f"pipeline {pipeline!r}: a sharded index serves 'late' only")
        r = self._need_ready()
        with self._rw.read():
            return r.search_batch(list(queries), k, filter=filter, return_text=return_text,
                                  return_metadata=return_metadata, **dict(knobs or {}))

    def get(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        _check_limit(len(ids), self.limits.max_documents, "ids")
        r = self._need_ready()
        with self._rw.read():
            return r.get(list(ids))

    def rerank(self, query: str, **_: Any) -> list[Any]:
        raise ValueError("rerank is not available on a sharded index")

    def info(self) -> dict[str, Any]:
        r = self._need_ready()
        with self._rw.read():
            i = r.info()
        return {"documents": i["documents"], "index": i["index"], "model": i["model"],
                "bm25": False, "sharded": True, "shards": i["shards"],
                "generation": i["generation"], "limits": self.limits.as_dict(),
                "pid": os.getpid()}

    def add(self, documents: Sequence[Mapping[str, Any]]) -> int:
        checked = check_add_request(self.limits, documents)
        docs = [{k: d[k] for k in ("text", "title") if k in d} for d in checked]
        ids = [d["id"] for d in checked]
        metas = [d["metadata"] for d in checked]
        from colengine.retriever import _document_text

        r = self._need_ready()
        if all(i is None for i in ids):
            ids = None            # automatic ids
        encoded = r.encoder.encode_documents([_document_text(d, i) for i, d in enumerate(docs)],
                                             show_progress=False)
        with self._rw.write():
            r.add(docs, ids=ids, metadata=metas, encoded=encoded)
            r.save()
        return len(docs)

    def delete(self, ids: Sequence[str]) -> int:
        ids = list(ids)
        if not ids:
            raise ValueError("no ids to delete")
        _check_limit(len(ids), self.limits.max_documents, "ids")
        r = self._need_ready()
        with self._rw.write():
            r.delete(ids)
            r.save()
        return len(ids)
