"""ShardedRetriever: one index split into shards, each served by a Ray actor.

Layout under ``path``::

    path/manifest.json     the top manifest (kind "sharded"): shards, their generations,
                           the model; swapped atomically like a single index's
    path/g000002/          its arrays: the centroids and residual codec all shards share
    path/shard-0000/       an ordinary saved Retriever folder per shard (its own generations)

Build: documents are routed to shards by :func:`~colengine.distributed.routing.shard_of`;
Ray Data encodes them (``map_batches``, one model per actor, a GPU each when the cluster has
GPUs) and spools each batch's vectors into the owning shard's folder
(:mod:`~colengine.distributed.spool`); centroids and the codec are trained once on a uniform
sample of every token; then one Ray task per shard compresses its documents with them and
saves the shard; the top manifest is written last.

Search: queries are encoded once by the driver, every shard actor searches its shard
(memory-mapped) for the top ``k``, and the driver merges them (highest score first, ties by
id). Faults: Ray restarts a dead actor (``max_restarts``), which reloads its shard from disk;
the driver notices the new life, replays the changes not saved yet, and retries the call until
``timeout`` seconds have passed; then :class:`ShardUnavailableError` names the shard, unless
the search asked for ``allow_partial=True`` (its hits then say which shards are missing).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

try:
    import ray
    import ray.data
    import ray.exceptions
except ImportError as e:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError("colengine.distributed needs Ray: pip install 'colengine[ray]'") from e

import numpy as np

from colengine.distributed.routing import (
    ROUTING,
    SHARDED_FORMAT,
    SHARDED_KIND,
    ShardUnavailableError,
    check_top_meta,
    is_sharded,
    route,
    shard_name,
    shard_of,
)
from colengine.distributed.shard import RESTARTED, UNPREPARED, ShardActor, build_shard
from colengine.distributed.spool import sample_tokens, write_part
from colengine.embeddings import PackedEmbeddings
from colengine.encoder import DEFAULT_MODEL, Encoder
from colengine.errors import DuplicateIdError, IndexFormatError
from colengine.ids import IdMap, as_id_list, auto_ids, default_ids
from colengine.index.base import check_k, check_positive_int
from colengine.server.commit import Write, check_writes
from colengine.storage import Bundle, is_index, load_bundle, prefixed, save_bundle, sub_bundle
from colengine.types import Hit
from colengine.wal import delete_record

__all__ = ["ShardUnavailableError", "ShardedHits", "ShardedRetriever", "connect", "merge_topk"]

_ACTOR = ray.remote(ShardActor)
#: a shard that cannot answer now (dead, restarting, too slow); ActorUnavailableError is
#: missing from older Ray releases
_ACTOR_ERRORS = tuple(getattr(ray.exceptions, n) for n in
                      ("RayActorError", "ActorUnavailableError", "GetTimeoutError")
                      if hasattr(ray.exceptions, n))
#: calls a shard actor runs at once (threads): searches go on during a save (ShardActor)
_ACTOR_CONCURRENCY = 4
_ENCODE_BATCH = 256          # documents per Ray Data batch
_SAMPLE_PER_CENTROID = 16    # as PlaidIndex.build
_BUILDING = ".building"


class ShardedHits(list):
    """One query's hits (a list of :class:`~colengine.Hit`, best first); ``missing`` names
    the shards that did not answer (only with ``allow_partial=True``), ``partial`` says if
    any did not."""

    def __init__(self, hits: Sequence[Hit] = (), missing: Sequence[str] = ()) -> None:
        super().__init__(hits)
        self.missing = tuple(missing)

    @property
    def partial(self) -> bool:
        return bool(self.missing)

    def __repr__(self) -> str:
        flag = f", partial: missing {list(self.missing)}" if self.missing else ""
        return f"ShardedHits({list.__repr__(self)}{flag})"


def merge_topk(lists: Sequence[Sequence[Hit]], k: int) -> list[Hit]:
    """The ``k`` best of several shards' hits: highest score first, equal scores by id (so the
    order never depends on which shard answered first)."""
    return sorted((h for hits in lists for h in hits), key=lambda h: (-h.score, h.doc_id))[:k]


def connect(address: str | None = None, **init_kwargs: Any) -> None:
    """Connect to Ray: an already initialised Ray is used as it is; ``None`` starts a local
    Ray; ``"auto"`` or ``"host:port"`` / ``"ray://..."`` joins that cluster."""
    if ray.is_initialized():
        return
    if address is None and not os.environ.get("RAY_ADDRESS"):   # Ray's own variable wins
        ray.init(include_dashboard=False, **init_kwargs)
    else:
        ray.init(address=address, **init_kwargs)


# -- encoding with Ray Data -------------------------------------------------------------------
class _EncodeParts:
    """A Ray Data ``map_batches`` actor: one model per actor; each batch is encoded and its
    documents spooled into the folders of the shards that own them."""

    def __init__(self, model: Any, spool: str, n_shards: int, device: str, batch_size: int,
                 trust_remote_code: bool | None) -> None:
        self.encoder = model if isinstance(model, Encoder) else Encoder(
            model, device=device, batch_size=batch_size, trust_remote_code=trust_remote_code)
        self.spool, self.n_shards = spool, n_shards

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from colengine.retriever import _document_parts, _document_text

        ids = [str(x) for x in batch["id"]]
        n = len(ids)
        titles = list(batch["title"]) if "title" in batch else [None] * n
        metas = [_metadata_of(x) for x in batch["metadata"]] if "metadata" in batch else [None] * n
        docs = [{"text": str(t), **({"title": str(ti)} if ti else {})}
                for t, ti in zip(batch["text"], titles)]
        texts = [_document_text(d, i) for i, d in enumerate(docs)]
        for i, t in enumerate(texts):
            if not t.strip():
                raise ValueError(f"document {ids[i]!r} is empty")
        packed = self.encoder.encode_documents(texts, show_progress=False)
        out: dict[str, list] = {"shard": [], "key": [], "docs": [], "tokens": []}
        for s, pos in route(ids, self.n_shards).items():
            sub = _take(packed, pos)
            recs = []
            for p in pos:
                text, title = _document_parts(docs[p])
                recs.append({"text": text, "title": title, "metadata": metas[p]})
            part = write_part(self.spool, s, [ids[p] for p in pos], recs, sub.tokens, sub.offsets)
            for key, column in out.items():
                column.append(part[key])
        return {key: np.asarray(v) for key, v in out.items()}


def _metadata_of(x: Any) -> dict[str, Any] | None:
    if x is None or (isinstance(x, str) and not x):
        return None
    if isinstance(x, str):
        x = json.loads(x)
    if not isinstance(x, Mapping):
        raise TypeError(f"a document's metadata must be a dict or a JSON object, got {x!r:.80}")
    from colengine.metadata import check_metadata

    return check_metadata(x)


def _take(packed: PackedEmbeddings, pos: Sequence[int]) -> PackedEmbeddings:
    """The documents at ``pos`` of ``packed``, packed again."""
    off = np.asarray(packed.offsets)
    lens = np.asarray([off[p + 1] - off[p] for p in pos], dtype=np.int64)
    new_off = np.zeros(len(pos) + 1, dtype=np.int64)
    np.cumsum(lens, out=new_off[1:])
    toks = np.asarray(packed.tokens)
    tok = np.concatenate([toks[off[p]:off[p + 1]] for p in pos]) if pos else toks[:0]
    return PackedEmbeddings(np.ascontiguousarray(tok), new_off)


def _encode_with_ray_data(ds: ray.data.Dataset, model: Any, spool: Path, n_shards: int, *,
                          device: str, batch_size: int, encoders: int | None,
                          trust_remote_code: bool | None) -> list[dict[str, Any]]:
    """Run the encoding; returns the spooled parts (``write_part`` records), deduplicated."""
    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    use_gpu = gpus > 0 and device != "cpu"
    size = encoders or (gpus if use_gpu else max(1, int(res.get("CPU", 1)) // 2))
    enc_device = ("cuda" if device in ("auto", "cuda") else device) if use_gpu else "cpu"
    out = ds.map_batches(
        _EncodeParts, batch_size=_ENCODE_BATCH, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=size),
        fn_constructor_kwargs={"model": model, "spool": str(spool), "n_shards": n_shards,
                               "device": enc_device, "batch_size": batch_size,
                               "trust_remote_code": trust_remote_code},
        num_gpus=1 if use_gpu else 0, num_cpus=0 if use_gpu else 1)
    parts = {}
    for row in out.take_all():
        rec = {"shard": int(row["shard"]), "key": str(row["key"]), "docs": int(row["docs"]),
               "tokens": int(row["tokens"])}
        parts[(rec["shard"], rec["key"])] = rec   # a batch Ray ran twice wrote the same part
    return [parts[key] for key in sorted(parts)]


def _model_spec(model: Any, encoder: Encoder) -> Any:
    """What the encoding actors load: the name or folder when there is one, else the object."""
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model)
    return encoder.name if Path(encoder.name).exists() else encoder


def _prepare_root(path: str | os.PathLike, overwrite: bool) -> Path:
    """The index folder, checked before any work: absent, empty, or (with ``overwrite``) a
    sharded index, which is removed."""
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root} is a file, not a folder")
    if root.is_dir() and any(root.iterdir()):
        if not (is_sharded(root) or is_index(root)):
            raise ValueError(f"{root} is a non-empty folder that is not a colengine index; "
                             "choose an empty or new folder")
        if not overwrite and not _unfinished(root):
            raise ValueError(f"{root} already holds an index; pass overwrite=True to replace it")
        if not is_sharded(root):
            raise ValueError(f"{root} holds a single (not sharded) index; remove it first")
        shutil.rmtree(root)
    return root


def _unfinished(root: Path) -> bool:
    """True when ``root`` holds a sharded build that never finished (replaced freely)."""
    try:
        meta = json.loads((root / "manifest.json").read_text(encoding="utf-8")).get("meta", {})
    except (OSError, ValueError, AttributeError):
        return False
    return is_sharded(root) and isinstance(meta, dict) and meta.get("state") == "building"


class ShardedRetriever:
    """A late-interaction index split into shards served by Ray actors.

    ::

        from colengine.distributed import ShardedRetriever
        r = ShardedRetriever.build(texts, ids=ids, model="minilm", shards=4, path="idx",
                                   ray_address=None)          # None: a local Ray
        r.search("a question", k=10, filter={"year": {"$gte": 2020}})
        r.add(["new text"], ids=["n1"]); r.delete(["n1"]); r.save()
        r = ShardedRetriever.load("idx", ray_address="auto")

    ``timeout``: seconds a call waits for a shard (retrying a restarted one) before
    :class:`ShardUnavailableError`. Changes (``add``, ``delete``) live in the shard actors
    and in the driver's journal of unsaved changes, replayed into an actor Ray restarted;
    :meth:`save` makes them durable and publishes a new top manifest.
    """

    def __init__(self, root: Path, meta: dict[str, Any], arrays: Mapping[str, np.ndarray],
                 encoder: Encoder, generation: int, lease: Any, *, timeout: float = 30.0) -> None:
        self.path = root
        self.meta = meta
        self._arrays = dict(arrays)
        self._lease = lease
        self.encoder = encoder
        self.generation = generation
        self.timeout = float(timeout)
        self.names = [s["name"] for s in meta["shards"]]
        self._docs = [int(s["documents"]) for s in meta["shards"]]
        self.actors: list[Any] = []
        self._boot: list[str | None] = [None] * len(self.names)
        #: per shard: the changes applied since the last save, replayed into a restarted actor
        self._pending: list[list[tuple[str, tuple]]] = [[] for _ in self.names]
        #: per shard: how many times its actor was found restarted
        self.restarts = [0] * len(self.names)
        #: one replay per restart, whichever thread sees it; a save holds it throughout, so a
        #: shard restarted after its save (it reloads the saved generation) is never replayed
        #: the changes that generation already holds
        self._sync = threading.RLock()
        #: byte offset after the write-ahead log's last record applied (:meth:`replay_log`)
        self.log_end = 0

    # -- facts -----------------------------------------------------------------------------
    @property
    def n_shards(self) -> int:
        return len(self.names)

    @property
    def kind(self) -> str:
        """The shards' index kind: ``"plaid"`` or ``"exhaustive"``."""
        return str(self.meta["index_kind"])

    @property
    def centroids(self) -> np.ndarray | None:
        """The float16 centroids ``[K, d]`` every PLAID shard shares (``None``: exhaustive)."""
        return self._arrays.get("centroids")

    @property
    def codec(self) -> Any:
        """The residual codec every PLAID shard shares (``None``: exhaustive)."""
        if self.centroids is None:
            return None
        from colengine.index.plaid.codec import codec_from_arrays

        return codec_from_arrays(sub_bundle(self._arrays, "codec"), int(self.meta["nbits"]))

    @property
    def normalized(self) -> bool:
        return bool(self.meta.get("normalized", True))

    def __len__(self) -> int:
        return sum(self._docs)

    def __repr__(self) -> str:
        return (f"ShardedRetriever({len(self)} documents in {self.n_shards} shards, "
                f"index={self.kind!r}, model={self.encoder.name!r}, path={str(self.path)!r})")

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def build(cls, texts_or_dataset: Any, ids: Sequence[str] | None = None, *,
              model: str | os.PathLike | Encoder = DEFAULT_MODEL, shards: int = 2,
              path: str | os.PathLike, ray_address: str | None = None, index: str = "plaid",
              metadata: Sequence[Mapping[str, Any] | None] | None = None,
              store_texts: bool = True, nbits: int = 2, n_centroids: int | None = None,
              codec: str = "product", refine: str | None = None, seed: int = 0,
              kmeans_niter: int = 4, device: str = "auto", batch_size: int = 32,
              encoders: int | None = None,
              overwrite: bool = False, trust_remote_code: bool | None = None,
              **load_options: Any) -> ShardedRetriever:
        """Encode (Ray Data), train shared centroids, build ``shards`` shards (one Ray task
        each) under ``path`` and start their actors.

        texts_or_dataset: strings or ``{"title", "text"}`` mappings (with ``ids`` and
            ``metadata`` as in :meth:`Retriever.build`; ids default to ``"0".."n-1"``), or a
            ``ray.data.Dataset`` with columns ``id``, ``text`` and optionally ``title`` and
            ``metadata`` (dicts or JSON strings).
        path: a folder every Ray node can read and write (a shared file system); absent or
            empty, or a sharded index with ``overwrite=True``.
        encoders: Ray Data encoding actors (default: one per GPU, else half the CPUs).
        refine: PLAID only: every shard keeps its tokens at this precision too
            (:meth:`PlaidIndex.build`'s ``refine``).
        load_options: ``timeout``, ``max_restarts``, ``actor_cpus``, ``search_threads`` as
            in :meth:`load`.
        Bad input is refused before anything is encoded.
        """
        n = check_positive_int("shards", shards)
        _check_kind(index, nbits, n_centroids, codec, refine)
        root = _prepare_root(path, overwrite)
        rows = None
        if not isinstance(texts_or_dataset, ray.data.Dataset):
            rows = _rows_of(texts_or_dataset, ids, metadata, n)
        elif ids is not None or metadata is not None:
            raise TypeError("a Ray Dataset carries its own 'id' and 'metadata' columns; "
                            "pass ids=None and metadata=None")
        else:
            cols = set(texts_or_dataset.columns())
            if not {"id", "text"} <= cols:
                raise ValueError(f"the Dataset needs 'id' and 'text' columns, has {sorted(cols)}")
        encoder = model if isinstance(model, Encoder) else Encoder(
            model, device=device, batch_size=batch_size, trust_remote_code=trust_remote_code)
        connect(ray_address)
        ds = texts_or_dataset if rows is None else ray.data.from_items(rows)
        t0 = time.perf_counter()
        spool = _start(root, encoder)
        parts = _encode_with_ray_data(ds, _model_spec(model, encoder), spool, n, device=device,
                                      batch_size=batch_size, encoders=encoders,
                                      trust_remote_code=trust_remote_code)
        encode_s = time.perf_counter() - t0
        return cls._from_spool(root, spool, parts, encoder, n, kind=index, nbits=nbits,
                               n_centroids=n_centroids, codec=codec, refine=refine, seed=seed,
                               kmeans_niter=kmeans_niter, store_texts=store_texts,
                               device=device, timings={"encode": round(encode_s, 3)},
                               **load_options)

    @classmethod
    def build_encoded(cls, docs: PackedEmbeddings, ids: Sequence[str], *,
                      model: Encoder, shards: int = 2, path: str | os.PathLike,
                      ray_address: str | None = None, index: str = "plaid",
                      documents: Sequence[Any] | None = None,
                      metadata: Sequence[Mapping[str, Any] | None] | None = None,
                      store_texts: bool = True, nbits: int = 2, n_centroids: int | None = None,
                      codec: str = "product", refine: str | None = None, seed: int = 0,
                      kmeans_niter: int = 4, device: str = "auto", overwrite: bool = False,
                      **load_options: Any) -> ShardedRetriever:
        """:meth:`build` from vectors already encoded with ``model`` (``docs``: packed
        float16/32 token vectors, one document per id; ``documents``: their texts or
        ``{"title", "text"}`` mappings, stored when given). Skips Ray Data; the centroid
        training and the per-shard build tasks are the same."""
        from colengine.retriever import _document_parts

        n = check_positive_int("shards", shards)
        _check_kind(index, nbits, n_centroids, codec, refine)
        if not isinstance(docs, PackedEmbeddings):
            raise TypeError("docs must be PackedEmbeddings (Encoder.encode_documents)")
        ids = IdMap.check_new(list(ids))
        if len(ids) != len(docs) or (documents is not None and len(documents) != len(ids)):
            raise ValueError(f"got {len(ids)} ids for {len(docs)} encoded documents")
        if docs.dim != model.dim:
            raise ValueError(f"vectors have dim {docs.dim}, the model {model.dim}")
        metas = _metadata_list(metadata, len(ids))
        _check_every_shard(ids, n)
        root = _prepare_root(path, overwrite)
        connect(ray_address)
        spool = _start(root, model)
        t0 = time.perf_counter()
        parts = []
        for s, pos in route(ids, n).items():
            for a in range(0, len(pos), 4096):
                chunk = pos[a:a + 4096]
                sub = _take(docs, chunk)
                recs = []
                for p in chunk:
                    text, title = (_document_parts(documents[p]) if documents is not None
                                   else ("", None))
                    recs.append({"text": text if documents is not None else None,
                                 "title": title, "metadata": metas[p] if metas else None})
                parts.append(write_part(spool, s, [ids[p] for p in chunk], recs, sub.tokens,
                                        sub.offsets))
        return cls._from_spool(root, spool, parts, model, n, kind=index, nbits=nbits,
                               n_centroids=n_centroids, codec=codec, refine=refine, seed=seed,
                               kmeans_niter=kmeans_niter,
                               store_texts=store_texts and documents is not None,
                               device=device, timings={"spool": round(time.perf_counter() - t0, 3)},
                               **load_options)

    @classmethod
    def _from_spool(cls, root: Path, spool: Path, parts: list[dict[str, Any]], encoder: Encoder,
                    n: int, *, kind: str, nbits: int, n_centroids: int | None, codec: str,
                    refine: str | None, seed: int, kmeans_niter: int, store_texts: bool, device: str,
                    timings: dict[str, float], build_cpus: float = 1,
                    **load_options: Any) -> ShardedRetriever:
        """Train the shared centroids on a sample of the spooled tokens, build every shard in
        its own Ray task, write the top manifest, open the shards."""
        from colengine.devices import resolve_device
        from colengine.index.plaid import build as plaid_build
        from colengine.index.plaid.centroids import sample_rows

        per_shard = [0] * n
        for p in parts:
            per_shard[p["shard"]] += p["docs"]
        empty = [shard_name(i) for i, c in enumerate(per_shard) if c == 0]
        if empty:
            raise ValueError(f"{', '.join(empty)} got no documents: use fewer shards")
        total = sum(p["tokens"] for p in parts)
        t0 = time.perf_counter()
        arrays: dict[str, np.ndarray] = {}
        cent = codec_arrays = None
        normalized = True
        if kind == "plaid":
            k = plaid_build.n_centroids_for(total, n_centroids)
            rows = sample_rows(total, max(k * _SAMPLE_PER_CENTROID, 4096), seed)
            sample = sample_tokens(spool, parts, rows)
            trained = plaid_build.train(sample, k, nbits, seed, kmeans_niter,
                                        resolve_device(device, mps=False), codec)
            cent, codec_obj, normalized = trained.centroids, trained.codec, trained.normalized
            del sample, trained
            codec_arrays = codec_obj.to_arrays()
            arrays = {"centroids": cent, **prefixed(codec_arrays, "codec")}
        timings["train"] = round(time.perf_counter() - t0, 3)
        t1 = time.perf_counter()
        task = ray.remote(build_shard).options(num_cpus=build_cpus)
        model = encoder.describe()
        cref = None if cent is None else ray.put(cent)
        refs = [task.remote(str(spool), i, str(root / shard_name(i)), model=model, kind=kind,
                            centroids=cref, codec_arrays=codec_arrays, nbits=nbits,
                            normalized=normalized, store_texts=store_texts, refine=refine,
                            device="cpu" if device == "auto" else device) for i in range(n)]
        built = ray.get(refs)
        timings["shards"] = round(time.perf_counter() - t1, 3)
        timings["shard_seconds"] = [b["seconds"] for b in built]
        meta = {
            "sharded_format": SHARDED_FORMAT, "state": "ready", "routing": ROUTING,
            "index_kind": kind, "model": model, "nbits": nbits, "normalized": normalized,
            "n_centroids": None if cent is None else int(cent.shape[0]),
            "next_auto_id": sum(per_shard), "store_texts": store_texts,
            "shards": [{"name": shard_name(i), "generation": b["generation"],
                        "documents": b["documents"], "tokens": b["tokens"]}
                       for i, b in enumerate(built)],
            "build": {"seconds": timings, "tokens": total,
                      "shard_disk_bytes": [b["disk_bytes"] for b in built],
                      "worker_peak_rss_bytes": [b["worker_peak_rss_bytes"] for b in built]},
        }
        save_bundle(root, Bundle(SHARDED_KIND, meta, arrays))
        shutil.rmtree(root / _BUILDING, ignore_errors=True)
        return cls.load(root, model=encoder, verify=False, **load_options)

    @classmethod
    def load(cls, path: str | os.PathLike, *, ray_address: str | None = None,
             model: str | os.PathLike | Encoder | None = None, device: str = "auto",
             verify: bool = True, timeout: float = 30.0, max_restarts: int = 4,
             actor_cpus: float = 0.1, search_threads: int | None = None,
             trust_remote_code: bool | None = None, replay_log: bool = True
             ) -> ShardedRetriever:
        """Open a sharded index: check the top manifest and every shard folder (a missing,
        corrupted or out-of-step shard is an :class:`IndexFormatError` naming it), load the
        model for queries here, start one actor per shard (``max_restarts``, ``actor_cpus``
        CPUs reserved each, ``search_threads`` torch threads each) and wait until each has
        mapped its shard (``verify``: checksums, read once by the actor). ``replay_log``:
        apply the write-ahead log of this generation (:meth:`replay_log`)."""
        root = Path(path)
        b = load_bundle(root, kind=SHARDED_KIND, mmap=True, verify=verify)
        meta = check_top_meta(root, b.meta)
        for s in meta["shards"]:
            _check_shard_folder(root, s)
        from colengine.retriever import encoder_for_index

        encoder = encoder_for_index(model, meta["model"], root, device=device,
                                    trust_remote_code=trust_remote_code)
        connect(ray_address)
        r = cls(root, meta, b.arrays, encoder, int(b.generation), b.lease, timeout=timeout)
        r._start_actors(verify=verify, max_restarts=max_restarts, actor_cpus=actor_cpus,
                        threads=search_threads, device="cpu" if device == "auto" else device)
        if replay_log:
            r.replay_log()
        return r

    def replay_log(self) -> int:
        """Apply the write-ahead log of this generation (``wal-<generation>.jsonl`` in the top
        folder, written by ``colengine serve``: :class:`colengine.distributed.service.ShardedService`)
        as unsaved changes; returns the byte offset after its last complete record (also
        :attr:`log_end`). Adds carry their vectors, so nothing is encoded again."""
        from colengine import wal

        records, end = wal.read_records(wal.wal_path(self.path, self.generation))
        for rec in records:
            if rec["op"] == "add":
                docs = rec["documents"]
                self.add(wal.added_documents(rec), [d["id"] for d in docs],
                         metadata=[d.get("metadata") for d in docs],
                         encoded=wal.record_vectors(rec, self.encoder.dim))
                self.meta["next_auto_id"] = max(int(self.meta["next_auto_id"]),
                                                int(rec.get("next_auto_id", 0)))
            else:
                self.delete(rec["ids"])
        self.log_end = end
        return end

    def _start_actors(self, *, verify: bool, max_restarts: int, actor_cpus: float,
                      threads: int | None, device: str) -> None:
        opts = {"max_restarts": max_restarts, "max_task_retries": 0, "num_cpus": actor_cpus,
                "scheduling_strategy": "SPREAD", "max_concurrency": _ACTOR_CONCURRENCY}
        self.actors = [_ACTOR.options(**opts).remote(name, str(self.path / name),
                                                     self.meta["model"], device, verify, threads)
                       for name in self.names]
        refs = [a.status.remote() for a in self.actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=max(self.timeout, 60.0))
        try:
            for i, ref in enumerate(refs):
                if ref not in ready:
                    raise ShardUnavailableError(
                        f"{self.path}: shard {self.names[i]} did not start within "
                        f"{max(self.timeout, 60.0):g} s", [self.names[i]])
                boot, st = ray.get(ref)
                if st["error"]:
                    raise IndexFormatError(f"{self.path}: shard {self.names[i]} cannot be "
                                           f"loaded: {st['error']}")
                self._boot[i] = boot
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop the shard actors (unsaved changes are lost)."""
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []

    # -- calling shards --------------------------------------------------------------------
    def _submit(self, i: int, method: str, args: tuple) -> Any:
        return getattr(self.actors[i], method).remote(self._boot[i], *args)

    def _resync(self, i: int, boot: str, deadline: float) -> None:
        """Shard ``i``'s actor was restarted (new life ``boot``) and reloaded its saved
        folder: replay the changes made since the last save, then call it with ``boot``."""
        with self._sync:
            if self._boot[i] != boot:
                self._replay(i, boot, deadline)

    def _replay(self, i: int, boot: str, deadline: float) -> None:
        replayed = False
        while not replayed:
            replayed = True
            for method, args in self._pending[i]:
                left = max(0.1, deadline - time.monotonic())
                got, value = ray.get(getattr(self.actors[i], method).remote(boot, *args),
                                     timeout=left)
                if got == RESTARTED:   # restarted again meanwhile: start over
                    boot, replayed = value, False
                    break
        self._boot[i] = boot
        self.restarts[i] += 1

    def _call(self, method: str, args: Mapping[int, tuple], *,
              allow_partial: bool = False) -> tuple[dict[int, Any], list[int]]:
        """Call ``method`` on the shards in ``args`` in parallel; returns ({shard: value},
        shards that did not answer). A shard whose actor died is retried (Ray restarts it)
        until ``timeout``; then :class:`ShardUnavailableError` unless ``allow_partial``.
        Errors raised by the shard's code (bad filter, unknown id, ...) propagate."""
        deadline = time.monotonic() + self.timeout
        refs = {i: self._submit(i, method, a) for i, a in args.items()}
        results: dict[int, Any] = {}
        errors: dict[int, BaseException] = {}
        tries = dict.fromkeys(args, 0)
        while refs:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            done, _ = ray.wait(list(refs.values()), num_returns=1, timeout=left)
            if not done:
                break
            i = next(j for j, ref in refs.items() if ref == done[0])
            del refs[i]
            try:
                boot, value = ray.get(done[0])
                if boot == RESTARTED:
                    self._resync(i, value, deadline)
                    refs[i] = self._submit(i, method, args[i])
                    continue
            except _ACTOR_ERRORS as e:
                errors[i] = e
                tries[i] += 1
                time.sleep(max(0.0, min(0.05 * 2 ** min(tries[i], 5),
                                        deadline - time.monotonic())))
                if time.monotonic() < deadline:
                    refs[i] = self._submit(i, method, args[i])
                continue
            results[i] = value
        missing = sorted(set(args) - set(results))
        if missing and not allow_partial:
            why = "; ".join(f"{self.names[i]}: " + (f"{type(errors[i]).__name__}: "
                                                     f"{str(errors[i]).splitlines()[0][:200]}"
                                                     if i in errors else "no answer")
                            for i in missing)
            names = [self.names[i] for i in missing]
            raise ShardUnavailableError(
                f"{self.path}: shard{'s' if len(names) > 1 else ''} {', '.join(names)} did not "
                f"answer {method!r} within {self.timeout:g} s ({sum(tries.values())} retries; "
                f"{why})", names)
        return results, missing

    # -- search ----------------------------------------------------------------------------
    def search(self, query: str, k: int = 10, *, filter: Mapping[str, Any] | None = None,
               allow_partial: bool = False, return_text: bool = False,
               return_metadata: bool = False, **knobs: Any) -> ShardedHits:
        """Top-``k`` hits of one query over every shard (see :meth:`search_batch`)."""
        from colengine.retriever import _check_query

        return self.search_batch([_check_query(query)], k, filter=filter,
                                 allow_partial=allow_partial, return_text=return_text,
                                 return_metadata=return_metadata, **knobs)[0]

    def search_batch(self, queries: Sequence[str], k: int = 10, *,
                     filter: Mapping[str, Any] | None = None, allow_partial: bool = False,
                     return_text: bool = False, return_metadata: bool = False,
                     query_embeddings: Any = None, **knobs: Any) -> list[ShardedHits]:
        """Top-``k`` hits per query: the queries are encoded once here, each shard returns
        its top ``k`` (with ``filter`` applied inside its search and PLAID ``knobs`` as in
        :meth:`Retriever.search`), and the lists are merged (score, then id). A shard that
        does not answer within ``timeout`` raises :class:`ShardUnavailableError`, unless
        ``allow_partial``: then the hits of the other shards come back with ``.missing``
        naming it and ``.partial`` true."""
        from colengine.index.plaid.search import check_knob_names
        from colengine.metadata import compile_filter
        from colengine.retriever import _check_query

        if isinstance(queries, str):
            raise TypeError("search_batch takes a list of queries; use search() for one")
        queries = [_check_query(q) for q in queries]
        check_k(k)
        check_knob_names(knobs)
        if knobs and self.kind != "plaid":
            raise TypeError(f"search knobs {sorted(knobs)} apply to PLAID shards, not "
                            f"{self.kind!r} ones")
        if filter is not None:
            compile_filter(filter)   # a bad filter fails here, named, before any shard works
        if not queries:
            return []
        q = query_embeddings if query_embeddings is not None else \
            self.encoder.encode_queries(queries)
        qref = ray.put(np.ascontiguousarray(q.numpy() if hasattr(q, "numpy") else q,
                                            dtype=np.float32))
        results, missing = self._call(
            "search", {i: (qref, k, filter, return_text, return_metadata, dict(knobs))
                       for i in range(self.n_shards)}, allow_partial=allow_partial)
        gone = [self.names[i] for i in missing]
        return [ShardedHits(merge_topk([results[i][b] for i in sorted(results)], k), gone)
                for b in range(len(queries))]

    # -- documents -------------------------------------------------------------------------
    def _owners(self, ids: Sequence[str]) -> dict[int, list[str]]:
        return {s: [ids[p] for p in pos] for s, pos in route(ids, self.n_shards).items()}

    def get(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        """Documents by id from their shards, in order (as :meth:`Retriever.get`)."""
        if isinstance(ids, str):
            raise TypeError("get takes a list of ids, not a single string")
        ids = as_id_list(ids)
        owners = self._owners(ids)
        res, _ = self._call("get", {s: (sub,) for s, sub in owners.items()})
        by_id = {d["id"]: d for docs in res.values() for d in docs}
        return [by_id[i] for i in ids]

    def add(self, documents: Sequence[Any], ids: Sequence[str] | None = None, *,
            metadata: Sequence[Mapping[str, Any] | None] | None = None,
            encoded: PackedEmbeddings | None = None) -> list[str]:
        """Encode documents here and add each to the shard that owns its id; returns the ids
        (default: the next automatic ones). Every id is checked against its shard first, so
        a duplicate changes nothing. Visible to searches at once; durable after :meth:`save`."""
        texts = _texts_of(documents)
        if not texts:
            raise ValueError("no documents to add")
        metas = _metadata_list(metadata, len(texts))
        auto = ids is None
        if auto:
            ids, counter = self.auto_ids(len(texts))
        else:
            ids = IdMap.check_new(list(ids))
        if len(ids) != len(texts):
            raise ValueError(f"got {len(ids)} ids for {len(texts)} documents")
        found = set() if auto else self.live(ids)   # auto_ids asked the shards already
        if found:
            dup = next(i for i in ids if i in found)
            raise DuplicateIdError(f"document id {dup!r} is already in the index (shard "
                                   f"{self.names[shard_of(dup, self.n_shards)]})")
        docs = encoded if encoded is not None else self.encoder.encode_documents(
            texts, show_progress=len(texts) > 256)
        if len(docs) != len(texts):
            raise ValueError(f"got {len(docs)} encoded documents for {len(texts)} documents")
        self._add_checked(documents, ids, metas, docs)
        if auto:
            self.meta["next_auto_id"] = counter
        return list(ids)

    def live(self, ids: Sequence[str]) -> set[str]:
        """Which of ``ids`` are in the index, asking each owning shard once."""
        known, _ = self._call("known", {s: (sub,) for s, sub in self._owners(ids).items()})
        return {i for found in known.values() for i in found}

    def auto_ids(self, n: int, counter: int | None = None,
                 claimed: Collection[str] = ()) -> tuple[list[str], int]:
        """``n`` automatic ids from ``counter`` on (default: the index's persistent counter),
        skipping ids the shards hold (given explicitly) and ``claimed`` ones; returns them
        and the counter's next value (:func:`colengine.ids.auto_ids`)."""
        c = int(self.meta["next_auto_id"]) if counter is None else int(counter)
        taken = set(claimed)
        while True:
            ids, after = auto_ids(c, n, taken)
            held = self.live(ids)
            if not held:
                return ids, after
            taken |= held

    def _add_checked(self, documents: Sequence[Any], ids: Sequence[str],
                     metas: Sequence[Mapping[str, Any] | None] | None,
                     docs: PackedEmbeddings, *,
                     hold: Callable[[], AbstractContextManager] = nullcontext) -> None:
        """Add documents whose ids were checked (new, not live) to their shards (``hold``: as
        in :meth:`_apply`)."""
        from colengine.retriever import _document_parts

        payloads = {}
        for s, pos in route(ids, self.n_shards).items():
            sub = _take(docs, pos)
            recs = []
            for p in pos:
                text, title = _document_parts(documents[p])
                recs.append({"text": text, "title": title,
                             "metadata": metas[p] if metas else None})
            payloads[s] = ([ids[p] for p in pos], recs, sub.tokens, sub.offsets)
        self._apply("add", payloads, hold)

    def delete(self, ids: Sequence[str]) -> None:
        """Delete documents by id from the shards that own them; every id must exist (nothing
        changes otherwise). Visible at once; durable after :meth:`save`."""
        ids = as_id_list(ids)
        if len(set(ids)) != len(ids):
            raise DuplicateIdError("delete got the same document id twice")
        w = Write(delete_record(ids), ids=ids)
        self.check([w])
        if w.error is not None:
            raise w.error
        self._delete_checked(ids)

    def check(self, writes: list[Write]) -> list[Write]:
        """The writes (adds and deletes with their ids) that apply, in order, each on top of
        the ones before it, asking each owning shard once which ids are live; the others get
        their error (duplicate id, unknown id, a shard left empty): :func:`check_writes`."""
        live = self.live([i for w in writes for i in w.ids])
        return check_writes(
            writes, live.__contains__, dict(enumerate(self._docs)),
            group=lambda i: shard_of(i, self.n_shards),
            emptied=lambda s: f"deleting every document of shard {self.names[s]} would leave "
                              "it empty")

    def _delete_checked(self, ids: Sequence[str], *,
                        hold: Callable[[], AbstractContextManager] = nullcontext) -> None:
        """Delete documents whose ids were checked (live, no shard left empty)."""
        self._apply("delete", {s: (sub,) for s, sub in self._owners(ids).items()}, hold)

    def _apply(self, method: str, payloads: dict[int, tuple],
               hold: Callable[[], AbstractContextManager] = nullcontext) -> None:
        """Run a checked change on its shards and journal it until the next save.

        An add has two halves: every shard prepares its part (compression, new lists) while
        searches go on, then every shard swaps its part in, inside ``hold()`` (a service
        holds its searches off there, so that no search sees the change on one shard and not
        on another, without waiting for the preparation). A shard that does not prepare
        in time fails the add before any shard shows it; one that lost its prepared part
        (restarted meanwhile) is sent the whole add. A delete runs inside ``hold()``."""
        if method == "add":
            done, missing = self._add_in_two_halves(payloads, hold)
        else:
            with hold():
                done, missing = self._call(method, payloads, allow_partial=True)
        for s, n_docs in done.items():
            self._pending[s].append((method, payloads[s]))
            self._docs[s] = int(n_docs)
        if missing:
            names = [self.names[s] for s in missing]
            raise ShardUnavailableError(
                f"{self.path}: {method} reached shards {sorted(self.names[s] for s in done)} "
                f"but not {', '.join(names)} within {self.timeout:g} s; the change is partial "
                "until those shards are back and it is applied to them again", names)

    def _add_in_two_halves(self, payloads: dict[int, tuple],
                           hold: Callable[[], AbstractContextManager]
                           ) -> tuple[dict[int, Any], list[int]]:
        """:meth:`_apply` for an add: ({shard: its document count}, shards missing)."""
        tokens, missing = self._call("prepare_add", payloads, allow_partial=True)
        if missing:
            names = [self.names[s] for s in missing]
            raise ShardUnavailableError(
                f"{self.path}: shard{'s' if len(names) > 1 else ''} {', '.join(names)} did not "
                f"prepare the add within {self.timeout:g} s; no shard applied it", names)
        with hold():
            done, missing = self._call("commit_add", {s: (t,) for s, t in tokens.items()},
                                       allow_partial=True)
            whole = {s: payloads[s] for s, n in done.items() if n == UNPREPARED}
            if whole:
                again, lost = self._call("add", whole, allow_partial=True)
                done = {**{s: n for s, n in done.items() if s not in whole}, **again}
                missing = sorted([*missing, *lost])
        return done, missing

    # -- persistence -----------------------------------------------------------------------
    def save(self) -> Path:
        """Save the shards that changed (each a new generation), then swap the top manifest
        to list them: one atomic step publishes the new snapshot of every shard."""
        with self._sync:
            dirty = [i for i in range(self.n_shards) if self._pending[i]]
            res, _ = self._call("save", {i: () for i in dirty})
            meta = json.loads(json.dumps(self.meta))
            for i, st in res.items():
                meta["shards"][i].update(st)
            bundle = Bundle(SHARDED_KIND, meta, dict(self._arrays))
            save_bundle(self.path, bundle, expected_generation=self.generation)
            self.meta, self.generation = meta, int(bundle.generation)
            for i in dirty:
                self._pending[i] = []
        return self.path

    def info(self) -> dict[str, Any]:
        """Totals and each shard's index statistics, JSON-able."""
        res, _ = self._call("stats", {i: () for i in range(self.n_shards)})
        shards = [{"name": self.names[i], "generation": self.meta["shards"][i]["generation"],
                   "unsaved_changes": len(self._pending[i]), "restarts": self.restarts[i],
                   **res[i]} for i in range(self.n_shards)]
        return {"documents": len(self), "shards": shards, "index": self.kind,
                "model": self.meta["model"], "generation": self.generation,
                "path": str(self.path), "build": self.meta.get("build")}


# -- checks at the door -----------------------------------------------------------------------
def _check_kind(index: str, nbits: int, n_centroids: int | None, codec: str,
                refine: str | None = None) -> None:
    if index not in ("plaid", "exhaustive"):
        raise ValueError(f"unknown index kind {index!r}; choose from ['exhaustive', 'plaid']")
    if index == "plaid":
        from colengine.index.plaid import build as plaid_build
        from colengine.index.plaid.refine import check_refine

        plaid_build.check_build_args(nbits, n_centroids, codec)
        check_refine(refine)
    elif refine is not None:
        raise ValueError("refine= is a PLAID option; an exhaustive index keeps its vectors "
                         "at full precision already")


def _metadata_list(metadata: Any, n: int) -> list[dict[str, Any]] | None:
    from colengine.retriever import _check_metadata_list

    return _check_metadata_list(metadata, n)


def _texts_of(documents: Any) -> list[str]:
    """The texts of a list of strings or ``{"title", "text"}`` mappings (title first)."""
    from colengine.retriever import _document_text

    if isinstance(documents, (str, bytes)) or not isinstance(documents, Sequence):
        raise TypeError("documents must be a list of strings or of {'title', 'text'} mappings "
                        "(build also takes a ray.data.Dataset), not a single string")
    return [_document_text(d, i) for i, d in enumerate(documents)]


def _check_every_shard(ids: Sequence[str], n: int) -> None:
    owners = route(ids, n)
    empty = [shard_name(i) for i in range(n) if i not in owners]
    if empty:
        raise ValueError(f"{len(ids)} documents leave {', '.join(empty)} empty: use fewer shards")


def _rows_of(documents: Any, ids: Sequence[str] | None, metadata: Any,
             n: int) -> list[dict[str, Any]]:
    """A list corpus as Ray Data rows, with every check a single build makes (ids unique,
    no empty text, metadata valid) done before anything is encoded."""
    from colengine.retriever import _document_parts

    texts = _texts_of(documents)
    if not texts:
        raise ValueError("cannot build an index from an empty corpus")
    ids = default_ids(0, len(texts)) if ids is None else list(ids)
    if len(ids) != len(texts):
        raise ValueError(f"got {len(ids)} ids for {len(texts)} documents")
    ids = IdMap.check_new(ids)
    empty = [i for i, t in enumerate(texts) if not t.strip()]
    if empty:
        raise ValueError(f"documents[{empty[0]}] is empty (id {ids[empty[0]]!r}; {len(empty)} "
                         "empty in all): leave them out")
    metas = _metadata_list(metadata, len(texts))
    _check_every_shard(ids, n)
    rows = []
    for i, d in enumerate(documents):
        text, title = _document_parts(d)
        rows.append({"id": ids[i], "text": text, "title": title or "",
                     "metadata": json.dumps(metas[i]) if metas and metas[i] else ""})
    return rows


def _start(root: Path, encoder: Encoder) -> Path:
    """Publish a 'building' top manifest (so the folder is an index that refuses to load
    until the build ends) and return an empty spool folder."""
    save_bundle(root, Bundle(SHARDED_KIND, {"sharded_format": SHARDED_FORMAT,
                                            "state": "building", "model": encoder.describe()}))
    spool = root / _BUILDING / "spool"
    shutil.rmtree(spool, ignore_errors=True)
    spool.mkdir(parents=True)
    return spool


def _check_shard_folder(root: Path, entry: Mapping[str, Any]) -> None:
    """A shard folder named by the top manifest exists, is a readable index (headers and
    sizes; checksums are the actor's) at the generation the manifest lists."""
    name = entry["name"]
    d = root / name
    if d.is_symlink() or not d.is_dir():
        raise IndexFormatError(f"{root}: shard {name}: folder {d} is missing")
    try:
        b = load_bundle(d, kind="retriever", mmap=True, verify=False)
    except IndexFormatError as e:
        raise IndexFormatError(f"{root}: shard {name} is corrupted or not an index: {e}") from None
    if b.generation != entry["generation"]:
        raise IndexFormatError(
            f"{root}: shard {name} is at generation {b.generation} but the top manifest "
            f"lists generation {entry['generation']} (a save was interrupted, or the folder "
            "was replaced); shards must form one snapshot")
