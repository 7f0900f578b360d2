"""One shard: how it is built (from spooled vectors and the shared centroids) and the actor
that serves it. Plain Python; :mod:`colengine.distributed.sharded` runs these on Ray.

A shard is an ordinary saved :class:`~colengine.Retriever` folder (index, metadata store) whose
PLAID index uses the centroids and residual codec trained once for the whole corpus, so a
score means the same thing in every shard. Shard actors never load the model: queries are
encoded once by the driver and added documents arrive encoded, so a shard holds only its
memory-mapped arrays and metadata.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from colengine.devices import resolve_device
from colengine.embeddings import PackedEmbeddings
from colengine.encoder import Encoder
from colengine.errors import IndexFormatError
from colengine.ids import IdMap, RowIds
from colengine.index.plaid import PlaidIndex
from colengine.index.plaid.codec import ResidualCodec
from colengine.server.service import RWLock
from colengine.types import Hit

__all__ = [
    "RESTARTED",
    "UNPREPARED",
    "RecordedModel",
    "ShardActor",
    "build_plaid_shard",
    "build_shard",
    "process_facts",
]

#: what a shard actor answers instead of running a call meant for an earlier life of it
RESTARTED = "restarted"
#: what a shard actor answers to :meth:`ShardActor.commit_add` when it does not hold the
#: prepared add (a new life, or another change came in between): the caller sends it whole
UNPREPARED = "unprepared"


class RecordedModel(Encoder):
    """The record of the model an index was built with (``Encoder.describe()``), without the
    model itself: enough for a :class:`~colengine.Retriever` that receives encoded vectors
    (dimension checks, saving the record). Encoding raises."""

    def __init__(self, record: Mapping[str, Any]) -> None:   # no model is loaded
        self._record = dict(record)
        self.name = str(record["name"])

    @property
    def dim(self) -> int:
        return int(self._record["dim"])

    @property
    def query_length(self) -> int:
        return int(self._record.get("query_length", 0))

    @property
    def document_length(self) -> int:
        return int(self._record.get("document_length", 0))

    def describe(self) -> dict[str, object]:
        return dict(self._record)

    def _encode(self, *args: Any, **kwargs: Any) -> list[torch.Tensor]:
        raise RuntimeError("a shard holds no model: the driver encodes queries and documents "
                           "(ShardedRetriever) and sends the vectors")


def build_plaid_shard(docs: PackedEmbeddings, ids: Sequence[str], *, centroids: np.ndarray,
                      codec: ResidualCodec, normalized: bool, device: str = "cpu",
                      model: dict | None = None, refine: str | None = None) -> PlaidIndex:
    """A PLAID index of ``docs`` on given centroids (float16 ``[K, d]``) and codec: each token
    assigned to its nearest centroid and its residual compressed, as a one-index build does
    after training (and kept at ``refine`` precision too, when given). Every token is
    assigned through the same faiss index whatever the shard's size, so the same vector gets
    the same code in every shard."""
    dev = resolve_device(device, mps=False)
    t0 = time.perf_counter()
    rows = RowIds(IdMap.check_new(list(ids)))
    if docs.n_tokens == 0:
        raise ValueError("cannot build a PLAID shard: the documents have no tokens")
    from colengine.index.plaid import build as plaid_build
    from colengine.index.plaid.refine import encode as refine_encode

    asg = plaid_build.make_assigner(np.asarray(centroids, dtype=np.float16), dev)
    enc = plaid_build.encode_tokens(docs.tokens, asg, codec)
    ref = refine_encode(docs.tokens, refine) if refine else (None, None)
    info = {"shared_centroids": True,
            "build_seconds": {"centroids": 0.0, "compress": round(time.perf_counter() - t0, 3)}}
    return PlaidIndex._finish_build(
        centroids=np.asarray(centroids, dtype=np.float16), codec=codec, codes=enc.codes,
        residuals=enc.residuals, doc_offsets=np.asarray(docs.offsets, dtype=np.int64), ids=rows,
        normalized=normalized, norm_sum=enc.norm_sum, info=info, model=model, meta={},
        device=dev, path=None, refine=ref)


def build_shard(spool: str, shard: int, out: str, *, model: dict[str, Any], kind: str,
                centroids: np.ndarray | None, codec_arrays: dict[str, np.ndarray] | None,
                nbits: int, normalized: bool, store_texts: bool, device: str,
                refine: str | None = None) -> dict[str, Any]:
    """Build and save shard ``shard`` from its spooled parts into ``out``; returns its
    ``{"generation", "documents", "tokens", "seconds", "disk_bytes"}``. Run as a Ray task."""
    from colengine.distributed.spool import read_shard
    from colengine.index.exhaustive import ExhaustiveIndex
    from colengine.index.plaid.codec import codec_from_arrays
    from colengine.metadata import MetadataStore
    from colengine.retriever import Retriever

    t0 = time.perf_counter()
    ids, docs, packed = read_shard(spool, shard)
    if kind == "plaid":
        index = build_plaid_shard(packed, ids, centroids=centroids,
                                  codec=codec_from_arrays(codec_arrays, nbits),
                                  normalized=normalized, device=device, model=model,
                                  refine=refine)
    else:
        index = ExhaustiveIndex.build(packed, ids)
    store = MetadataStore(store_texts=store_texts)
    store.add(ids, texts=[d["text"] for d in docs], titles=[d.get("title") for d in docs],
              metadata=[d.get("metadata") for d in docs])
    r = Retriever(RecordedModel(model), index, path=out, metadata=store)
    r.save(out)
    return {"generation": int(r.generation), "documents": len(index),
            "tokens": int(packed.n_tokens), "seconds": round(time.perf_counter() - t0, 3),
            "disk_bytes": _folder_bytes(Path(out)),
            # the worker's peak so far (Ray reuses workers: an upper bound for this task)
            "worker_peak_rss_bytes": process_facts().get("peak_rss_bytes")}


def _folder_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


class ShardActor:
    """Serves one shard: loads its saved folder (memory-mapped) and answers searches, adds,
    deletes, gets and saves. Ray restarts it after a crash; it then reloads the folder.

    Every method takes ``boot``, the life of the actor the caller last saw (``None``: any).
    A call meant for an earlier life is not run: it answers ``(RESTARTED, boot)`` so that the
    caller replays its unsaved changes first. Answers are ``(boot, value)``.

    Calls may run on several threads at once (Ray's ``max_concurrency``): searches and gets
    share the shard with each other and with a save, which writes the state in memory to a
    new generation without changing it (so a checkpoint does not stop searches). Saves and
    changes run one at a time. An add is prepared (its tokens compressed, the new lists made:
    :meth:`Retriever.prepare_add`) while searches go on, and holds them off only for the
    swap; a delete holds them off throughout (it is cheap). A driver that changes several
    shards at once uses the two halves, :meth:`prepare_add` on each shard, then
    :meth:`commit_add` on each, so that searches never see the change on one shard and not
    on another (it holds its own searches off only for the second half).
    """

    def __init__(self, name: str, path: str, model: dict[str, Any], device: str = "cpu",
                 verify: bool = True, threads: int | None = None) -> None:
        from colengine.retriever import Retriever

        if threads:
            torch.set_num_threads(int(threads))
        self.name, self.path = name, path
        self.boot = uuid.uuid4().hex
        self.error: str | None = None
        self.retriever: Any = None
        self._rw = RWLock()                 # readers: search, get, save; writers: swaps, deletes
        self._writing = threading.Lock()    # one save or change at a time
        self._prepared: tuple[str, Any] | None = None   # (token, PreparedAdd) not swapped in
        try:
            self.retriever = Retriever.load(path, model=RecordedModel(model), device=device,
                                            verify=verify, replay_log=False)
        except Exception as e:  # noqa: BLE001 - reported to the caller, naming the shard
            self.error = f"{type(e).__name__}: {e}"

    def _live(self, boot: str | None) -> Any:
        if self.error is not None:
            raise IndexFormatError(f"shard {self.name} ({self.path}) cannot be loaded: "
                                   f"{self.error}")
        return self.retriever

    def status(self) -> tuple[str, dict[str, Any]]:
        return self.boot, {"error": self.error, "pid": os.getpid(),
                           "documents": None if self.retriever is None else len(self.retriever),
                           "generation": None if self.retriever is None
                           else self.retriever.generation}

    def search(self, boot: str | None, q: np.ndarray, k: int, flt: Mapping[str, Any] | None,
               return_text: bool, return_metadata: bool,
               knobs: Mapping[str, Any]) -> tuple[str, list[list[Hit]] | str]:
        if boot is not None and boot != self.boot:
            return RESTARTED, self.boot
        r = self._live(boot)
        qt = torch.from_numpy(np.array(q, dtype=np.float32))   # a writable copy
        with self._rw.read():
            return self.boot, r.search_batch(["q"] * qt.shape[0], k, filter=flt,
                                             return_text=return_text,
                                             return_metadata=return_metadata,
                                             query_embeddings=qt, **dict(knobs))

    def known(self, boot: str | None, ids: Sequence[str]) -> tuple[str, list[str] | str]:
        """Which of ``ids`` this shard holds (live)."""
        if boot is not None and boot != self.boot:
            return RESTARTED, self.boot
        r = self._live(boot)
        with self._rw.read():
            return self.boot, [i for i in ids if i in r.index.ids]

    def add(self, boot: str | None, ids: Sequence[str], docs: Sequence[dict[str, Any]],
            tokens: np.ndarray, offsets: np.ndarray) -> tuple[str, int | str]:
        """Add encoded documents (both halves of a two-phase add at once)."""
        if boot is not None and boot != self.boot:
            return RESTARTED, self.boot
        r = self._live(boot)
        with self._writing:
            prepared = r.prepare_add(**_add_args(ids, docs, tokens, offsets))
            with self._rw.write():
                r.commit_add(prepared)
            return self.boot, len(r)

    def prepare_add(self, boot: str | None, ids: Sequence[str], docs: Sequence[dict[str, Any]],
                    tokens: np.ndarray, offsets: np.ndarray) -> tuple[str, str]:
        """First half of an add: everything but the swap, while searches go on; nothing is
        visible until :meth:`commit_add` with the token this answers. A later prepare
        replaces an earlier one that was not committed."""
        if boot is not None and boot != self.boot:
            return RESTARTED, self.boot
        r = self._live(boot)
        with self._writing:
            prepared = r.prepare_add(**_add_args(ids, docs, tokens, offsets))
            token = uuid.uuid4().hex
            self._prepared = (token, prepared)
            return self.boot, token

    def commit_add(self, boot: str | None, token: str) -> tuple[str, int | str]:
        """Second half of an add: swap in the add prepared under ``token`` (searches held off
        only for that). Answers :data:`UNPREPARED` instead when this actor does not hold it
        (another change came in between, or the actor is a new life): send the whole add."""
        if boot is not None and boot != self.boot:
            return RESTARTED, self.boot
        r = self._live(boot)
        with self._writing:
            held, self._prepared = self._prepared, None
            if held is None or held[0] != token or not r.can_commit(held[1]):
                return self.boot, UNPREPARED
            with self._rw.write():
                r.commit_add(held[1])
            return self.boot, len(r)

    def delete(self, boot: str | None, ids: Sequence[str]) -> tuple[str, int | str]:
        if boot is not None and boot != self.boot:
            return RESTARTED, self.boot
        r = self._live(boot)
        with self._writing, self._rw.write():
            self._prepared = None
            r.delete(list(ids))
            return self.boot, len(r)

    def get(self, boot: str | None, ids: Sequence[str]) -> tuple[str, list[dict] | str]:
        if boot is not None and boot != self.boot:
            return RESTARTED, self.boot
        r = self._live(boot)
        with self._rw.read():
            return self.boot, r.get(list(ids))

    def save(self, boot: str | None) -> tuple[str, dict[str, int] | str]:
        if boot is not None and boot != self.boot:
            return RESTARTED, self.boot
        r = self._live(boot)
        with self._writing, self._rw.read():
            self._prepared = None   # a save may move the arrays a prepared add wrote past
            r.save()
            return self.boot, {"generation": int(r.generation), "documents": len(r),
                               "tokens": int(r.index.stats()["tokens"])}

    def stats(self, boot: str | None) -> tuple[str, dict[str, Any]]:
        r = self._live(boot)
        with self._rw.read():
            return self.boot, {**r.index.stats(), **process_facts()}


def _add_args(ids: Sequence[str], docs: Sequence[dict[str, Any]], tokens: np.ndarray,
              offsets: np.ndarray) -> dict[str, Any]:
    """``Retriever.prepare_add``'s arguments for an add as the driver sends it."""
    return {"documents": [{"text": d["text"], **({"title": d["title"]} if d.get("title") else {})}
                          for d in docs],
            "ids": list(ids), "metadata": [d.get("metadata") for d in docs],
            "encoded": PackedEmbeddings(np.asarray(tokens), np.asarray(offsets, dtype=np.int64))}


def process_facts() -> dict[str, Any]:
    """This process's id, torch threads, resident and peak resident memory (bytes; Linux)."""
    out: dict[str, Any] = {"pid": os.getpid(), "torch_threads": torch.get_num_threads()}
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key = "rss_bytes" if line.startswith("VmRSS") else "peak_rss_bytes"
                    out[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out
