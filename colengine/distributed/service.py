"""``colengine serve`` over a sharded index: the HTTP server's service, backed by a
:class:`~colengine.distributed.ShardedRetriever` (one process; the shard actors do the
searching). Ray is joined through Ray's own ``RAY_ADDRESS`` variable, else started locally.

Searches run concurrently. Writes (adds and deletes) are encoded in a thread of lower CPU
priority (:data:`~colengine.server.service.BACKGROUND_NICE`, as is the checkpoint thread) and
queued for a group commit (:mod:`colengine.server.commit`, as in the single-index server): the
leading thread takes the queue, checks its writes in order against the owning shards (one
question per shard; a bad write fails alone), appends the good ones to the write-ahead log in
the top folder (``wal-<generation>.jsonl``, :mod:`colengine.wal`, with the added documents'
vectors) with one write and one fsync, applies them to the shards (each add prepared on its
shards while searches go on, then swapped in on all of them with searches held off), and only
then are they acknowledged: an acknowledged write survives ``kill -9`` (a load
replays the log). A checkpoint (:meth:`ShardedService.checkpoint`: the shards that changed
and the top manifest saved, then the log deleted) runs once the log holds
``checkpoint_docs`` documents or is ``checkpoint_seconds`` old, and at a clean shutdown, so
a stream of small writes does not save shards for each. Writes wait for a checkpoint;
searches do not (the shard actors search while they save).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from colengine import wal
from colengine.errors import DuplicateIdError
from colengine.ids import IdMap
from colengine.server.commit import GroupCommit, Write, added, append_batch, runs
from colengine.server.encoding import WriteEncoder, check_write_encoder, write_encoder_for
from colengine.server.service import (
    BACKGROUND_NICE,
    Limits,
    NotReady,
    RWLock,
    _check_limit,
    _texts,
    check_add_request,
    check_delete_request,
    check_nice,
    check_search_limits,
    lower_thread_priority,
)

__all__ = ["ShardedService"]

log = logging.getLogger("colengine.server")


class ShardedService:
    """The same methods as :class:`colengine.server.service.IndexService`."""

    def __init__(self, path: str | os.PathLike, *, model: Any = None, device: str = "auto",
                 limits: Limits | None = None, trust_remote_code: bool | None = None,
                 checkpoint_docs: int = 1000, checkpoint_seconds: float = 30.0,
                 write_nice: int = BACKGROUND_NICE, write_encoder: str = "auto",
                 **_single_index_options: Any) -> None:
        self.path = Path(path)
        self.write_nice = check_nice(write_nice)
        self.write_encoder = check_write_encoder(write_encoder)
        self.model, self.device, self.trust_remote_code = model, device, trust_remote_code
        self.limits = limits or Limits()
        self.checkpoint_docs, self.checkpoint_seconds = checkpoint_docs, checkpoint_seconds
        self.retriever: Any = None
        self.error: str | None = None
        self._rw = RWLock()                   # searches share it; a write's swap has it alone
        self._writer = threading.Lock()       # commits and checkpoints, one at a time
        self._commit = GroupCommit(self._commit_batch)
        self._offset = 0                      # end of the log's last record, applied
        self._log_docs = 0                    # documents the log holds
        self._log_since: float | None = None  # when its oldest record was written
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stats = {"log_appends": 0, "records_logged": 0, "checkpoints": 0}
        #: called with the encoded lines just before each log append + fsync (a metrics or
        #: test hook; it runs in the committing thread)
        self.on_log_append: Callable[[list[bytes]], None] | None = None
        self._encoder: WriteEncoder | None = None   # made by open()

    @property
    def ready(self) -> bool:
        return self.retriever is not None

    def open(self) -> None:
        try:
            from colengine.distributed import ShardedRetriever

            r = ShardedRetriever.load(self.path, model=self.model, device=self.device,
                                      trust_remote_code=self.trust_remote_code)
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
            log.exception("loading %s failed", self.path)
            return
        try:
            self._encoder = write_encoder_for(
                self.write_encoder, r, model=self.model, device=self.device,
                trust_remote_code=self.trust_remote_code, nice=self.write_nice,
                encode=lambda texts: r.encoder.encode_documents(texts, show_progress=False))
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
            log.exception("starting the write encoder of %s failed", self.path)
            r.close()
            return
        self._offset = r.log_end
        if r.log_end:   # a log replayed: fold it into a saved generation soon
            self._log_since = time.monotonic()
        self.retriever = r
        self._thread = threading.Thread(target=self._checkpoints, name="colengine-checkpoint",
                                        daemon=True)
        self._thread.start()

    def close(self, checkpoint: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        if self._encoder is not None:
            self._encoder.close()
        if self.retriever is not None:
            if checkpoint:
                try:
                    self.checkpoint()
                except Exception:  # the log keeps the writes; the next load replays them
                    log.exception("checkpoint at shutdown failed")
            self.retriever.close()

    # -- durability ------------------------------------------------------------------------
    def checkpoint(self) -> bool:
        """Save the shards the log changed and a new top manifest, then delete the log;
        False when the log was empty."""
        r = self._need_ready()
        with self._writer:
            if self._offset == 0:
                return False
            with self._rw.read():   # searches go on; writes wait for the writer lock
                r.save()
            wal.prune_logs(self.path, r.generation)
            self._offset, self._log_docs, self._log_since = 0, 0, None
            self.stats["checkpoints"] += 1
        return True

    def _checkpoints(self) -> None:
        lower_thread_priority(self.write_nice)
        while not self._stop.wait(0.5):
            since = self._log_since
            if since is not None and time.monotonic() - since >= self.checkpoint_seconds:
                try:
                    self.checkpoint()
                except Exception:  # retried on the next tick; the log keeps the writes
                    log.exception("checkpoint failed")

    def _after_write(self) -> None:
        if self._log_docs >= self.checkpoint_docs:
            self.checkpoint()

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
                "write_encoder": None if self._encoder is None else self._encoder.kind,
                "pid": os.getpid()}

    def add(self, documents: Sequence[Mapping[str, Any]]) -> int:
        """Add ``{"id"?, "text", "title"?, "metadata"?}`` documents, durably (without ids: the
        next automatic ones); returns how many."""
        docs = check_add_request(self.limits, documents)
        auto = all(d["id"] is None for d in docs)
        if not auto:
            IdMap.check_new([d["id"] for d in docs])   # types, empties, repeats, some None
        r = self._need_ready()
        if not auto:   # refused before the encoding (the commit checks again)
            asked = [d["id"] for d in docs]
            with self._rw.read():
                live = r.live(asked)
            dup = next((i for i in asked if i in live), None)
            if dup is not None:
                raise DuplicateIdError(f"document id {dup!r} is already in the index")
        encoded = self._encoder.encode(_texts(docs))
        rows = [{k: v for k, v in d.items() if v is not None} for d in docs]
        self._commit(Write(wal.add_record(rows, encoded), encoded,
                           ids=[] if auto else [d["id"] for d in docs], auto=auto))
        self._after_write()
        return len(docs)

    def delete(self, ids: Sequence[str]) -> int:
        ids = check_delete_request(self.limits, ids)
        self._need_ready()
        self._commit(Write(wal.delete_record(ids), ids=ids))
        self._after_write()
        return len(ids)

    # -- group commit ----------------------------------------------------------------------
    def _commit_batch(self, batch: list[Write]) -> None:
        """Check, log (one append + fsync) and apply a batch of writes, in order."""
        r = self._need_ready()
        with self._writer:
            next_id = int(r.meta["next_auto_id"])
            claimed: set[str] = set()   # ids added explicitly earlier in the batch
            for x in batch:     # automatic ids, in the queue's order
                if x.auto:
                    x.ids, next_id = r.auto_ids(len(x.record["documents"]), next_id, claimed)
                    for d, i in zip(x.record["documents"], x.ids):
                        d["id"] = i
                    x.record["next_auto_id"] = next_id   # a replay moves the counter too
                elif x.record["op"] == "add":
                    claimed.update(x.ids)
            good = r.check(batch)
            if not good:
                return
            self._offset = append_batch(wal.wal_path(self.path, r.generation), good,
                                        self._offset, self.stats, self.on_log_append)
            self._log_docs += sum(len(x.ids) for x in good)
            if self._log_since is None:
                self._log_since = time.monotonic()
            _apply(r, good, self._rw.write)
            if any(x.auto for x in good):
                r.meta["next_auto_id"] = max(int(r.meta["next_auto_id"]), next_id)


def _apply(r: Any, writes: list[Write], hold: Callable[[], Any]) -> None:
    """Apply checked writes to a sharded retriever in order, a run of adds (or of deletes)
    as one change per shard; searches are held off (``hold``) only while a run is swapped in
    on every shard it touches."""
    for op, run in runs(writes):
        if op == "add":
            documents, ids, metadata, encoded = added(run)
            r._add_checked(documents, ids, metadata, encoded, hold=hold)
        else:
            r._delete_checked([d for x in run for d in x.ids], hold=hold)
