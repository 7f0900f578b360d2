"""Where a server encodes the documents written to it: a thread of its own process, or a
child process with its own copy of the model.

An add's documents are encoded before its commit. In a thread of the server process the
encoding shares the interpreter lock with the searches: a model's forward pass is hundreds of
short operations, and between two of them a thread waits for the lock. Measured on 2 cores
(SciFact, MiniLM stand-in, 4 HTTP clients, 10% writes, 2026-12-07): every query encoding
slower than 100 ms (the median is 28 ms) overlapped a document being encoded in the write
thread, and searches' p95 / p99 were 297 / 380 ms against a 142 ms median. With the documents
encoded in a child process (:class:`ProcessEncoder`) the searches' p95 / p99 were 215 / 268 ms
at a 143 ms median, at the same throughput.

:func:`write_encoder_for` picks one (``colengine serve --write-encoder``). The child costs a
second copy of the model in memory (and its start, in the background, a few seconds); it
loads the model by name with the server's own ``trust_remote_code``, nothing else, and is
started again if it dies.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["WRITE_ENCODERS", "EncoderSpec", "FallbackEncoder", "ProcessEncoder", "ThreadEncoder",
           "WorkerUnavailable", "WriteEncoder", "check_write_encoder", "lower_thread_priority",
           "write_encoder_for"]

log = logging.getLogger("colengine.server")

#: the values of ``IndexService(write_encoder=)`` and ``colengine serve --write-encoder``
WRITE_ENCODERS = ("auto", "process", "thread")


def check_write_encoder(kind: Any) -> str:
    """``kind`` if it is one of :data:`WRITE_ENCODERS`, else ``ValueError``."""
    if kind not in WRITE_ENCODERS:
        raise ValueError(f"write_encoder must be one of {WRITE_ENCODERS}, got {kind!r}")
    return kind


def lower_thread_priority(nice: int) -> bool:
    """Give the calling thread (not the process) nice value ``nice``, or keep its own when
    that is already lower in priority; threads it starts afterwards (torch's OpenMP workers
    for the calling thread's operations) inherit it. Linux only (elsewhere a thread's priority
    cannot be set apart from its process's): False there, or when the system refuses."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, max(int(nice), os.getpriority(os.PRIO_PROCESS, tid)))
    except OSError:
        return False
    return True


@dataclass(frozen=True)
class EncoderSpec:
    """What a child process needs to encode documents as the served index stores them."""

    #: the model's name or folder (:attr:`colengine.Encoder.name`)
    model: str
    #: the dimension the index was built with (checked in the child)
    dim: int
    trust_remote_code: bool | None
    #: :attr:`colengine.Retriever.passage_policy`
    passage_policy: dict[str, Any] | None
    batch_size: int = 32


class ThreadEncoder:
    """Documents encoded by ``encode`` in one thread of this process, one request at a time,
    at :func:`lower_thread_priority` ``nice``."""

    kind = "thread"

    def __init__(self, encode: Callable[[list[str]], Any], nice: int) -> None:
        self._encode = encode
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="colengine-encode-writes",
                                        initializer=lower_thread_priority, initargs=(nice,))

    def encode(self, texts: Sequence[str]) -> Any:
        return self._pool.submit(self._encode, list(texts)).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class WorkerUnavailable(RuntimeError):
    """The write-encoding process cannot serve: its model failed to load, or it died twice."""


# -- the child process --------------------------------------------------------------------
class ProcessEncoder:
    """Documents encoded in a child process (``python -m colengine.server.encode_worker``)
    holding its own copy of the model, on the CPU with one torch thread at the server's own
    priority, one request at a time. Requests and answers are JSON lines over its standard
    input and output: the texts in, their vectors out as an add record of the write-ahead
    log carries them (:func:`colengine.wal.pack_vectors`, read back with the same checks);
    nothing is pickled, and the server's main module is not imported again (as
    :mod:`multiprocessing` would). The child starts at construction and loads the model
    while the server goes on; the first request waits for it (:meth:`ready`). A child that
    dies is started again once per request before the error is passed on; it exits by itself
    when the server is gone (its input closes)."""

    kind = "process"

    def __init__(self, spec: EncoderSpec) -> None:
        self.spec = spec
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._ready = False
        self.starts = 0
        with self._lock:
            self._start()

    def _start(self) -> None:
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "colengine.server.encode_worker", json.dumps(asdict(self.spec))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self._ready = False
        self.starts += 1

    @property
    def pid(self) -> int | None:
        """The child's process id."""
        return None if self._proc is None else self._proc.pid

    def _answer(self) -> dict[str, Any]:
        line = self._proc.stdout.readline()
        if not line:
            raise ChildProcessError(f"the write-encoding process exited "
                                    f"(code {self._proc.wait()})")
        return json.loads(line)

    def _ensure_ready(self) -> None:
        if not self._ready:
            msg = self._answer()      # {"ready": true} once the model is loaded
            if "error" in msg:
                raise WorkerUnavailable(f"the write-encoding process: {msg['error']}")
            self._ready = True

    def ready(self) -> None:
        """Wait until the child has loaded the model (raises what loading raised)."""
        with self._lock:
            self._ensure_ready()

    def _ask(self, texts: list[str]) -> Any:
        from colengine.wal import unpack_vectors

        self._ensure_ready()
        self._proc.stdin.write(json.dumps({"texts": texts}).encode() + b"\n")
        self._proc.stdin.flush()
        msg = self._answer()
        if "error" in msg:   # this request failed; the process serves on
            raise RuntimeError(f"the write-encoding process: {msg['error']}")
        return unpack_vectors(msg["vectors"], n_documents=len(texts), dim=self.spec.dim)

    def encode(self, texts: Sequence[str]) -> Any:
        """The texts' vectors (``PackedEmbeddings``, or ``EncodedPassages`` for an index of
        passages). :class:`WorkerUnavailable` when the child cannot load the model or dies
        twice; ``RuntimeError`` when it could not encode these texts."""
        texts = list(texts)
        with self._lock:
            if self._proc is None:
                raise WorkerUnavailable("the write encoder is closed")
            try:
                return self._ask(texts)
            except (ChildProcessError, BrokenPipeError):
                log.warning("the write-encoding process died; starting it again")
            self._stop()
            self._start()
            try:
                return self._ask(texts)
            except (ChildProcessError, BrokenPipeError) as e:
                raise WorkerUnavailable(f"the write-encoding process died twice: {e}") from e

    def _stop(self) -> None:
        proc = self._proc
        if proc is None:
            return
        try:
            proc.stdin.close()          # the child's loop ends at the end of its input
        except OSError:
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()

    def close(self) -> None:
        with self._lock:
            self._stop()
            self._proc = None


class FallbackEncoder:
    """A :class:`ProcessEncoder` picked by ``"auto"``, until it cannot serve
    (:class:`WorkerUnavailable`: its model failed to load, or it died twice); then the
    encoder ``then()`` makes (a :class:`ThreadEncoder`) for good. A request that failed to
    encode (a bad text) does not switch."""

    def __init__(self, first: ProcessEncoder, then: Callable[[], ThreadEncoder]) -> None:
        self.current: ProcessEncoder | ThreadEncoder = first
        self._then = then
        self._lock = threading.Lock()

    @property
    def kind(self) -> str:
        return self.current.kind

    def encode(self, texts: Sequence[str]) -> Any:
        cur = self.current
        try:
            return cur.encode(texts)
        except WorkerUnavailable:
            log.exception("the write-encoding process failed; encoding writes in a thread")
            with self._lock:
                if self.current is cur:
                    self.current = self._then()
                    cur.close()
        return self.current.encode(texts)

    def close(self) -> None:
        self.current.close()


WriteEncoder = ThreadEncoder | ProcessEncoder | FallbackEncoder


def write_encoder_for(kind: str, retriever: Any, *, model: Any, device: str,
                      trust_remote_code: bool | None, nice: int,
                      encode: Callable[[list[str]], Any]) -> WriteEncoder:
    """The write encoder ``kind`` asks for. ``"auto"``: a :class:`ProcessEncoder` when the
    model can be loaded again by name (not passed in as an object) and the server encodes on
    the CPU, with a :class:`ThreadEncoder` to fall back on (:class:`FallbackEncoder`), else
    a :class:`ThreadEncoder` running ``encode`` at nice ``nice``. The process runs at the
    searches' priority: at nice 10 it got so little of two busy cores that an add took 376
    ms at the median (299 ms at nice 0, searches' p99 208 against 268 ms). ``retriever``: a
    :class:`~colengine.Retriever` or a sharded one (no passages)."""
    from colengine.devices import resolve_device
    from colengine.encoder import Encoder

    check_write_encoder(kind)
    enc = retriever.encoder
    by_name = not isinstance(model, Encoder) and not enc.name.startswith("pylate-colbert (")
    auto = kind == "auto"
    if auto:
        kind = "process" if by_name and resolve_device(device).type == "cpu" else "thread"
    if kind == "thread":
        return ThreadEncoder(encode, nice)
    if not by_name:
        raise ValueError("write_encoder='process' needs a model given by name or folder, "
                         "not an Encoder object")
    spec = EncoderSpec(enc.name, enc.dim, trust_remote_code,
                       getattr(retriever, "passage_policy", None), enc.batch_size)
    child = ProcessEncoder(spec)
    return FallbackEncoder(child, lambda: ThreadEncoder(encode, nice)) if auto else child
