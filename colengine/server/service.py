"""The index behind the HTTP server, without HTTP: concurrent reads, one durable writer.

One :class:`IndexService` lives in each server worker process. Several workers (and other
processes) share one index folder:

* **Reads** run concurrently in threads, on a :class:`~colengine.Retriever` whose arrays are
  memory-mapped from the saved generation (the page cache is shared by every worker).
* **Writes** are encoded in a thread of lower CPU priority (:data:`BACKGROUND_NICE`), then
  queued for a *group commit*: one
  thread (the leader) takes every queued request, takes the index's writer lock
  (:func:`colengine.storage.writer_lock`), catches up with what other writers did, checks
  the requests in their order (a bad one fails alone: 409 duplicate id, 404 unknown id),
  appends all the good ones to the write-ahead log (:mod:`colengine.wal`) with one write
  and one fsync, applies them in memory, and only then are they answered: an acknowledged
  write survives ``kill -9``. Requests that arrive while a commit is in progress wait for
  the next one, so under load many writes share one fsync.
* **Applying** a write prepares everything (compression, new inverted lists, search state)
  while searches go on, and holds them off only to swap the result in.
* **Freshness**: before serving, a worker compares ``manifest.json`` and the log with what it
  has (two ``stat`` calls); new log records are applied, so a change made through one worker is
  seen by the others on their next request. An add's record carries the documents' token
  vectors (float16, base64), so the other workers, and a load after a crash, apply it
  without encoding the texts again. A new generation saved by another worker's
  checkpoint records which log bytes it folds in: a worker that applied exactly those (or
  catches up with them from the old log) holds that generation already and adopts it at once,
  then maps the saved files in the background (:meth:`IndexService._remap`) with the writes
  made meanwhile; any other new generation is loaded and swapped in.
* **Checkpoints**: a background thread folds the log into a new saved generation when it holds
  ``checkpoint_docs`` documents or is ``checkpoint_seconds`` old, so a stream of small writes
  costs one log append each, not one rewrite of the index each. That thread runs at the
  lower priority too: on a machine whose cores the searches keep busy, encoding a write or
  saving a generation takes the CPU time the searches leave, instead of stretching their tail.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from colengine import storage, wal
from colengine.errors import DuplicateIdError
from colengine.ids import IdMap, as_id_list
from colengine.metadata import check_metadata
from colengine.server.commit import (
    GroupCommit,
    Write,
    added,
    append_batch,
    check_writes,
    runs,
)
from colengine.server.encoding import (
    WriteEncoder,
    check_write_encoder,
    lower_thread_priority,
    write_encoder_for,
)

__all__ = ["BACKGROUND_NICE", "IndexService", "Limits", "NotReady", "RWLock", "RequestTooLarge",
           "SearchSlots", "check_add_request", "check_delete_request", "check_nice",
           "default_search_slots", "lower_thread_priority"]

log = logging.getLogger("colengine.server")

#: default nice value (Linux, per thread) of the threads that encode written documents and save
#: checkpoints (``IndexService(write_nice=)``, ``colengine serve --write-nice``); searches run
#: at the process's own (normally 0). Under the scheduler's weights a thread at +10 gets about
#: a tenth of the CPU a thread at 0 gets when both want it.
BACKGROUND_NICE = 10


def check_nice(nice: Any) -> int:
    """``nice`` if it is a valid nice value for :func:`lower_thread_priority` (an int, 0 to
    19), else ``ValueError``."""
    if isinstance(nice, bool) or not isinstance(nice, int) or not 0 <= nice <= 19:
        raise ValueError(f"write_nice must be an int from 0 (writes at the searches' priority) "
                         f"to 19, got {nice!r}")
    return nice


@dataclass(frozen=True)
class Limits:
    """Request limits of the server (``colengine serve --max-...``)."""

    #: queries in one ``/search`` request
    max_queries: int = 64
    #: largest ``k`` (and ``candidates``) of a search or rerank
    max_k: int = 1000
    #: characters of one query or document text
    max_text_chars: int = 100_000
    #: documents (or ids) in one add, delete, get or rerank request
    max_documents: int = 1000
    #: bytes of one request body
    max_body_bytes: int = 32 * 1024 * 1024

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class RequestTooLarge(ValueError):
    """A request exceeds one of the :class:`Limits` (HTTP 413)."""


class NotReady(RuntimeError):
    """The index is still loading (HTTP 503)."""


class RWLock:
    """Many readers or one writer; a waiting writer stops new readers from entering."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class SearchSlots:
    """At most ``n`` searches run at once; the others wait their turn in arrival order.

    On a machine with few cores, searches that all run at once share the cores and the
    interpreter lock: each takes longer, and the short Python-heavy work in between (a write's
    encoding, the next request's parsing) waits behind all of them for every step. Held to
    the cores, the searches keep the cores busy as before, in turn (first come, first served:
    a freed slot goes to the oldest waiter, never to a newcomer). Measured in process on 2
    cores, 4 threads searching SciFact and a fifth adding one document every 0.2 s: at most 2
    at once gave 30.8 against 29.3 searches a second, search p99 172 against 222 ms, and adds
    56 against 200 ms at the median. ``n`` 0: no limit.

    >>> slots = SearchSlots(2)
    >>> with slots:
    ...     slots.running
    1
    """

    def __init__(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"search_slots must be an int >= 0 (0: no limit), got {n!r}")
        self.n = n or None
        self._free = self.n or 0
        self._lock = threading.Lock()
        self._waiters: deque[threading.Event] = deque()

    @property
    def running(self) -> int:
        """Searches holding a slot now (0 without a limit: they are not counted)."""
        return (self.n or 0) - self._free

    def __enter__(self) -> "SearchSlots":
        if self.n is None:
            return self
        with self._lock:
            if self._free and not self._waiters:
                self._free -= 1
                return self
            turn = threading.Event()
            self._waiters.append(turn)
        turn.wait()          # the slot was handed over by __exit__
        return self

    def __exit__(self, *exc: object) -> None:
        if self.n is None:
            return
        with self._lock:
            if self._waiters:
                self._waiters.popleft().set()   # the slot goes to the oldest waiter directly
            else:
                self._free += 1


def default_search_slots(workers: int = 1) -> int:
    """Searches one server worker runs at once by default: the cores this process may run on
    (its CPU affinity where the system tells it), shared among ``workers``."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, workers))


def _check_limit(n: int, limit: int, what: str) -> None:
    if n > limit:
        raise RequestTooLarge(f"{n} {what} in one request; the limit is {limit}")


def check_search_limits(lim: Limits, queries: Sequence[str], k: int, pipeline: str,
                        candidates: int) -> None:
    """A search request within ``lim``: queries, their length, ``k`` (and ``candidates``)."""
    _check_limit(len(queries), lim.max_queries, "queries")
    for q in queries:
        _check_limit(len(q), lim.max_text_chars, "characters in a query")
    if k > lim.max_k or (pipeline not in ("late", "dense") and candidates > lim.max_k):
        raise ValueError(f"k (and the two-stage pipelines' candidates) must be at most "
                         f"{lim.max_k}")



def check_add_request(lim: Limits, documents: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The documents of an add request checked against ``lim`` and for their types, as
    ``{"id", "text", "metadata", "title"?}`` dicts (metadata checked; id still unchecked)."""
    if not documents:
        raise ValueError("no documents to add")
    _check_limit(len(documents), lim.max_documents, "documents")
    docs: list[dict[str, Any]] = []
    for i, d in enumerate(documents):
        text, title = d.get("text"), d.get("title")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"documents[{i}]: 'text' must be a non-empty string")
        if title is not None and not isinstance(title, str):
            raise ValueError(f"documents[{i}]: 'title' must be a string")
        _check_limit(len(text) + len(title or ""), lim.max_text_chars,
                     "characters in a document")
        doc = {"id": d.get("id"), "text": text,
               "metadata": check_metadata(d.get("metadata"), f"documents[{i}].metadata")}
        if title:
            doc["title"] = title
        docs.append(doc)
    return docs


def check_delete_request(lim: Limits, ids: Sequence[str]) -> list[str]:
    """The ids of a delete request: a non-empty list of distinct strings within ``lim``."""
    ids = as_id_list(ids)
    if not ids:
        raise ValueError("no ids to delete")
    _check_limit(len(ids), lim.max_documents, "ids")
    if not all(isinstance(i, str) for i in ids):
        raise TypeError("ids must be strings")
    if len(set(ids)) != len(ids):
        raise DuplicateIdError("delete got the same document id twice")
    return ids


class IndexService:
    """A served index: see the module docstring."""

    def __init__(self, path: str | os.PathLike, *, model: Any = None, device: str = "auto",
                 limits: Limits | None = None, checkpoint_docs: int = 1000,
                 checkpoint_seconds: float = 30.0, lock_timeout: float = 30.0,
                 trust_remote_code: bool | None = None,
                 write_nice: int = BACKGROUND_NICE,
                 search_slots: int | None = None, write_encoder: str = "auto") -> None:
        self.path = Path(path)
        self.write_nice = check_nice(write_nice)
        #: where added documents are encoded (:mod:`colengine.server.encoding`): ``"process"``
        #: (a child process with its own copy of the model), ``"thread"``, or ``"auto"``
        #: (the process when the model is given by name and the server encodes on the CPU)
        self.write_encoder = check_write_encoder(write_encoder)
        #: searches (and reranks) run at most this many at once, in arrival order
        #: (:class:`SearchSlots`; default: :func:`default_search_slots`; 0: no limit)
        self.slots = SearchSlots(default_search_slots() if search_slots is None
                                 else search_slots)
        self.trust_remote_code = trust_remote_code
        self.model = model
        self.device = device
        self.limits = limits or Limits()
        self.checkpoint_docs = checkpoint_docs
        self.checkpoint_seconds = checkpoint_seconds
        self.lock_timeout = lock_timeout
        self.retriever: Any = None
        self.error: str | None = None
        self.stats = {"log_appends": 0, "records_logged": 0, "checkpoints": 0, "reloads": 0,
                      "remaps": 0, "records_replayed": 0, "adoptions": 0,
                      "records_decoded": 0}   # other workers' adds applied from their vectors
        #: writes applied since a save this process's retriever holds but does not map yet (a
        #: checkpoint's own, or one adopted from another worker), until it is remapped (else None)
        self._since_save: list[Write] | None = None
        self._remap_due = False    # an adopted generation waits for the background thread
        #: called with the list of encoded lines just before each log append + fsync (a
        #: metrics or test hook; it runs in the committing thread, under the writer lock)
        self.on_log_append: Callable[[list[bytes]], None] | None = None
        self._commit = GroupCommit(self._commit_batch)
        self._rw = RWLock()
        self._write_mutex = threading.Lock()     # one writer thread in this process
        self._refresh_mutex = threading.Lock()
        self._gen = 0
        self._offset = 0           # bytes of the generation's log already applied
        self._log_docs = 0         # documents changed by those records
        self._log_since: float | None = None
        self._sig: tuple[int, int, int] | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._writes: WriteEncoder | None = None   # made by open()

    # -- life cycle ------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.retriever is not None

    def open(self) -> None:
        """Load the index and replay its log (under the writer lock, so no write is half
        way); then start the checkpoint thread."""
        try:
            with self._writing():
                self._reload()
            self._writes = write_encoder_for(
                self.write_encoder, self.retriever, model=self.model, device=self.device,
                trust_remote_code=self.trust_remote_code, nice=self.write_nice,
                encode=self._encode_texts)
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
            log.exception("loading %s failed", self.path)
            self.retriever = None
            return
        self._thread = threading.Thread(target=self._background, name="colengine-checkpoint",
                                        daemon=True)
        self._thread.start()

    def close(self, checkpoint: bool = True) -> None:
        """Stop the checkpoint thread and fold the log into a saved generation."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._writes is not None:
            self._writes.close()
        if checkpoint and self.ready:
            try:
                self.checkpoint(timeout=5.0, remap=False)
            except Exception:
                log.exception("final checkpoint failed; the write-ahead log keeps the changes")

    def _need_ready(self) -> Any:
        r = self.retriever
        if r is None:
            raise NotReady(self.error or "the index is loading")
        return r

    @contextmanager
    def _writing(self, timeout: float | None = None) -> Iterator[None]:
        with self._write_mutex, storage.writer_lock(
                self.path, timeout=self.lock_timeout if timeout is None else timeout):
            yield

    # -- freshness -------------------------------------------------------------------
    def _manifest_sig(self) -> tuple[int, int, int]:
        st = os.stat(self.path / storage.MANIFEST)
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _reload(self) -> None:
        """Load the current generation, replay its log, swap it in."""
        from colengine.retriever import Retriever

        sig = self._manifest_sig()
        old = self.retriever
        model = old.encoder if old is not None else self.model
        r = Retriever.load(self.path, model=model, device=self.device, verify=old is None,
                           trust_remote_code=self.trust_remote_code, replay_log=False)
        records, end = wal.read_records(wal.wal_path(self.path, r.generation))
        for record in records:
            wal.apply_record(r, record)
        if old is not None:   # build the search structures before requests meet them
            _keep_caches(old, r)
            r.search("warm up", 1)
        with self._rw.write():
            self.retriever, self._gen, self._offset, self._sig = r, r.generation, end, sig
            self._log_docs = sum(_record_docs(x) for x in records)
            self._log_since = time.monotonic() if records else None
        self._since_save, self._remap_due = None, False
        self.stats["reloads"] += 1
        self.stats["records_replayed"] += len(records)

    def refresh(self, block: bool = True) -> None:
        """Catch up with other writers: a new generation is loaded, new log records applied.
        With ``block=False`` return at once when another thread is already refreshing."""
        if self.retriever is None or not self._refresh_mutex.acquire(blocking=block):
            return
        try:
            sig = self._manifest_sig()
            if sig != self._sig:
                gen, meta = storage.current_manifest_meta(self.path)
                if gen != self._gen and not self._adopt(gen, meta, sig):
                    self._reload()
                    return
                self._sig = sig
            path = wal.wal_path(self.path, self._gen)
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                return
            if size <= self._offset:
                return
            records, end = wal.read_records(path, self._offset)
            try:
                self._apply([Write(rec, self._encode(rec)) for rec in records])
            except Exception:
                log.exception("applying the write-ahead log failed; reloading the index")
                self._reload()
                return
            for record in records:
                self._note_logged(record)
            self._offset = end
        finally:
            self._refresh_mutex.release()

    def _adopt(self, gen: int, meta: Mapping[str, Any], sig: tuple[int, int, int]) -> bool:
        """Take generation ``gen`` as the one held in memory when it is what this process
        holds: another worker's checkpoint of our generation's log up to the bytes we applied
        (caught up first from that log when it is still there). Called under the refresh
        mutex; False when ``gen`` is anything else (the caller loads it)."""
        folded = meta.get("log_folded")
        if not isinstance(folded, dict) or folded.get("generation") != self._gen:
            return False
        want = folded.get("bytes")
        if not isinstance(want, int) or isinstance(want, bool) or want < self._offset:
            return False
        if want > self._offset:   # records of the old log not applied yet
            try:
                records, end = wal.read_records(wal.wal_path(self.path, self._gen), self._offset)
                if end != want:
                    return False
                self._apply([Write(rec, self._encode(rec)) for rec in records])
            except Exception:  # noqa: BLE001 - pruned, torn or failing: load the generation
                log.debug("catching up with the folded log failed; loading generation %d", gen)
                return False
            self._offset = end
        self._gen, self._offset, self._sig = gen, 0, sig
        self.retriever.generation = gen   # its content: what a save from here must follow
        self._log_docs, self._log_since = 0, None
        self._since_save, self._remap_due = [], True
        self._wake.set()
        self.stats["adoptions"] += 1
        return True

    def _encode(self, record: dict[str, Any]) -> Any:
        """An add record's embeddings: the ones it carries, else its texts encoded."""
        if record["op"] != "add":
            return None
        carried = wal.record_vectors(record, self.retriever.encoder.dim)
        if carried is not None:
            self.stats["records_decoded"] += 1
            return carried
        return self._encode_texts(_texts(record["documents"]))

    def _encode_texts(self, texts: list[str]) -> Any:
        return self.retriever.encode_documents(texts)

    def _note_logged(self, record: dict[str, Any]) -> None:
        self._log_docs += _record_docs(record)
        if self._log_since is None:
            self._log_since = time.monotonic()
        if self._log_docs >= self.checkpoint_docs:
            self._wake.set()

    # -- reads -----------------------------------------------------------------------
    def search(self, queries: Sequence[str], k: int = 10, *, pipeline: str = "late",
               candidates: int = 100, filter: Mapping[str, Any] | None = None,
               return_text: bool = False, return_metadata: bool = False,
               knobs: Mapping[str, Any] | None = None) -> list[list[Any]]:
        check_search_limits(self.limits, queries, k, pipeline, candidates)
        from colengine.retriever import _check_query

        r = self._need_ready()
        queries = [_check_query(q) for q in queries]
        with self.slots:
            # encoded before the read lock: a waiting writer holds off new readers, so the
            # less a search does under the lock the shorter everyone waits
            encoded = (r.encoder.encode_queries(queries)
                       if queries and pipeline in ("late", "bm25+rerank", "fusion",
                                                   "dense+rerank", "hybrid") else None)
            self.refresh(block=False)
            with self._rw.read():
                return self.retriever.search_batch(
                    queries, k, pipeline=pipeline, candidates=candidates, filter=filter,
                    return_text=return_text, return_metadata=return_metadata,
                    query_embeddings=encoded, **dict(knobs or {}))

    def get(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        _check_limit(len(ids), self.limits.max_documents, "ids")
        self._need_ready()
        self.refresh(block=False)
        with self._rw.read():
            return self.retriever.get(list(ids))

    def rerank(self, query: str, *, ids: Sequence[str] | None = None,
               texts: Sequence[str] | None = None, k: int | None = None) -> list[Any]:
        """Exact MaxSim of ``query`` against indexed documents ``ids`` or new ``texts``."""
        if (ids is None) == (texts is None):
            raise ValueError("rerank needs exactly one of 'documents' (texts) or 'ids'")
        lim = self.limits
        _check_limit(len(query), lim.max_text_chars, "characters in the query")
        items = list(ids if ids is not None else texts)  # type: ignore[arg-type]
        _check_limit(len(items), lim.max_documents, "documents")
        if texts is not None:
            for t in items:
                _check_limit(len(t), lim.max_text_chars, "characters in a document")
        if k is not None and k > lim.max_k:
            raise ValueError(f"k must be at most {lim.max_k}")
        self._need_ready()
        self.refresh(block=False)
        with self.slots, self._rw.read():
            if ids is not None:
                return self.retriever.rerank(query, items, k)
            return self.retriever.rerank_texts(query, items, k=k)

    def info(self) -> dict[str, Any]:
        r = self._need_ready()
        self.refresh(block=False)
        with self._rw.read():
            i = r.info()
            return {
                "documents": len(r),
                "index": i["index"]["kind"],
                "model": i["model"],
                "bm25": i["bm25"],
                "store_texts": i["store_texts"],
                "index_stats": i["index"],
                "generation": self._gen,
                "log": {"bytes": self._offset, "documents": self._log_docs},
                "limits": self.limits.as_dict(),
                "stats": dict(self.stats),
                "write_encoder": None if self._writes is None else self._writes.kind,
                "pid": os.getpid(),
            }

    # -- writes ----------------------------------------------------------------------
    def add(self, documents: Sequence[Mapping[str, Any]]) -> int:
        """Add ``{"id", "text", "title"?, "metadata"?}`` documents, durably; returns how many."""
        docs = check_add_request(self.limits, documents)
        ids = IdMap.check_new([d["id"] for d in docs])  # types, empties, repeats in the request
        self._need_ready()
        self.refresh(block=False)
        with self._rw.read():   # refused before the encoding (the commit checks again)
            IdMap.check_new(ids, self.retriever.index.ids)
        # encoded before the commit (in a child process or at the lower priority): the commit
        # only logs and applies; the record carries the vectors, so other workers and a
        # restart do not encode again
        encoded = self._writes.encode(_texts(docs))
        self._commit(Write(wal.add_record(docs, encoded), encoded, ids=ids))
        return len(docs)

    def delete(self, ids: Sequence[str]) -> int:
        """Delete documents by id, durably; every id must exist. Returns how many."""
        ids = check_delete_request(self.limits, ids)
        self._need_ready()
        self._commit(Write(wal.delete_record(ids), ids=ids))
        return len(ids)

    # -- group commit ----------------------------------------------------------------
    def _commit_batch(self, batch: list[Write]) -> None:
        """Check, log (one append + fsync) and apply a batch of writes, in order."""
        with self._writing():
            self.refresh()
            with self._refresh_mutex:  # no other thread of ours reads the log meanwhile
                good = self._check_batch(batch)
                if not good:
                    return
                self._offset = append_batch(wal.wal_path(self.path, self._gen), good,
                                            self._offset, self.stats, self.on_log_append)
                for x in good:
                    self._note_logged(x.record)
                try:
                    self._apply(good)
                except Exception:
                    log.exception("applying acknowledged changes failed; reloading the index")
                    self._reload()   # the log has them: the reload replays them

    def _check_batch(self, batch: list[Write]) -> list[Write]:
        """The writes of ``batch`` that apply, in order (:func:`check_writes`)."""
        r = self._need_ready()
        live_ids = r.index.ids
        return check_writes(batch, lambda i: i in live_ids, {None: len(r)})

    def _apply(self, writes: list[Write], target: Any = None) -> None:
        """Apply logged writes in order. A run of adds becomes one add, prepared (encoded,
        compressed, new lists) while searches go on; searches are held off only while the
        prepared change is swapped in, and while a delete is applied. ``target``: a
        retriever no search sees yet (applied without holding searches off)."""
        if self._since_save is not None and target is None:
            self._since_save.extend(writes)   # a checkpoint's remap applies them too
        r = self.retriever if target is None else target
        hold = self._rw.write if target is None else nullcontext
        for op, run in runs(writes):
            if op == "add":
                documents, ids, metadata, encoded = added(run)
                prepared = r.prepare_add(documents, ids, metadata=metadata, encoded=encoded)
                with hold():
                    r.commit_add(prepared)
            else:
                with hold():
                    r.delete([d for x in run for d in x.record["ids"]])

    # -- checkpoints -----------------------------------------------------------------
    def checkpoint(self, timeout: float | None = None, remap: bool = True) -> bool:
        """Save a new generation holding the log's changes and delete the log; False when
        there was nothing to save. Writers wait only for the save: the retriever in memory
        is what was saved, so writes go on with it on the new generation's log; then
        (``remap``) the saved generation is loaded memory-mapped (pages shared with the
        other workers) without the lock and swapped in (:meth:`_remap`)."""
        self._need_ready()
        with self._writing(timeout):
            self.refresh()
            if self._offset == 0:
                return False
            # the refresh mutex too: a search that saw the new manifest before the state
            # below is updated would load the generation we hold in memory (refresh() in a
            # search does not wait for the mutex, it skips)
            with self._refresh_mutex:
                with self._rw.read():   # searches go on; writers are held off by the lock
                    self.retriever.save(self.path, log_folded=(self._gen, self._offset))
                wal.prune_logs(self.path, storage.current_generation(self.path))
                self.stats["checkpoints"] += 1
                self._gen, self._offset = self.retriever.generation, 0
                self._sig = self._manifest_sig()
                self._log_docs, self._log_since = 0, None
                self._since_save = [] if remap else None
                self._remap_due = False
        if remap:
            try:
                self._remap()
            finally:
                self._since_save = None
        return True

    def _remap(self, lock: bool = True) -> None:
        """Replace the private arrays of the retriever in memory by the saved generation,
        memory-mapped: loaded and warmed up without any lock, then, under the refresh mutex
        (and the writer lock with ``lock``: after this process's own checkpoint), the writes
        applied meanwhile (kept with their embeddings) are applied to it and it is swapped in.
        Given up (nothing lost: the retriever in memory is complete) when a newer generation
        was taken meanwhile."""
        from colengine.retriever import Retriever

        gen, old = self._gen, self.retriever
        try:
            r = Retriever.load(self.path, model=old.encoder, device=self.device, verify=False,
                               trust_remote_code=self.trust_remote_code, replay_log=False)
            if r.generation != gen:
                return
            _keep_caches(old, r)
            r.search("warm up", 1)
        except Exception:  # noqa: BLE001 - the retriever in memory serves on
            log.exception("memory-mapping the saved generation failed")
            return
        # (the refresh mutex alone excludes this process's refreshes and commits: both apply
        # changes only while holding it)
        with (self._writing() if lock else nullcontext()), self._refresh_mutex:
            if self._gen != gen or self.retriever is not old or self._since_save is None:
                return
            try:
                self._apply(self._since_save, target=r)
            except Exception:  # noqa: BLE001
                log.exception("applying the writes since the checkpoint failed; not remapped")
                return
            with self._rw.write():
                self.retriever = r
            self.stats["remaps"] += 1

    def _due(self) -> bool:
        if self._log_since is None:
            return False
        return (self._log_docs >= self.checkpoint_docs
                or time.monotonic() - self._log_since >= self.checkpoint_seconds)

    def _background(self) -> None:
        lower_thread_priority(self.write_nice)
        while not self._stop.is_set():
            self._wake.wait(timeout=min(1.0, self.checkpoint_seconds / 4))
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.refresh(block=False)
                if self._remap_due:
                    self._remap_due = False
                    try:
                        self._remap(lock=False)
                    finally:
                        with self._refresh_mutex:
                            if not self._remap_due:
                                self._since_save = None
                if self._due():
                    self.checkpoint(timeout=0.5)
            except Exception as e:  # noqa: BLE001 - lock busy or a failed save: try again later
                log.debug("checkpoint postponed: %s", e)


def _keep_caches(old: Any, new: Any) -> None:
    """What ``new`` (a retriever of a newer generation of the same index) can keep of
    ``old``'s derived state: the PLAID assigner for adds, when the centroids are the same."""
    take = getattr(new.index, "take_add_assigner", None)
    if take is not None:
        take(old.index)


def _texts(documents: Sequence[Mapping[str, Any]]) -> list[str]:
    """The texts to encode of added documents (title and text)."""
    from colengine.retriever import _document_text

    return [_document_text(d, i) for i, d in enumerate(documents)]


def _record_docs(record: dict[str, Any]) -> int:
    return len(record["documents"]) if record["op"] == "add" else len(record["ids"])
