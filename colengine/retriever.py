"""The Retriever: one object that ties the encoder, an index and optional BM25 together.

It holds no maths of its own: encoding is :class:`colengine.encoder.Encoder`, scoring is the
index and :mod:`colengine.kernels`, BM25 is :mod:`colengine.bm25`, fusion is
:mod:`colengine.fusion`. What it owns is the life cycle (build, add, delete, save, load) and
the checks that keep a saved index consistent with its model.
"""

from __future__ import annotations

import dataclasses
import json
import contextlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from colengine.cache import cached_encode_documents
from colengine.devices import resolve_device
from colengine.embeddings import PackedEmbeddings, readonly_tensor
from colengine.encoder import DEFAULT_MODEL, Encoder
from colengine.errors import DuplicateIdError, IndexFormatError
from colengine.ids import IdMap, as_id_list, auto_ids
from colengine.index import INDEX_KINDS
from colengine.index.base import Index, check_k
from colengine.index.plaid.search import check_knob_names
from colengine.kernels import score_candidates_packed
from colengine.longdocs import EncodedPassages, PassageIndex, check_policy
from colengine.metadata import MetadataStore, check_metadata
from colengine.storage import Bundle, load_bundle, prefixed, save_bundle, sub_bundle
from colengine.text import check_texts
from colengine.types import Hit

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from colengine.index.plaid.search import KnobOverrides

__all__ = ["Retriever", "PreparedAdd", "Pipeline", "default_index_kind", "encode_for_index"]

Pipeline = Literal["late", "dense", "dense+rerank", "hybrid", "bm25", "bm25+rerank", "fusion"]
#: Above this many documents ``Retriever.build`` streams (encodes and compresses in chunks).
STREAM_MIN_DOCS = 100_000
#: Filters whose allowed-document masks are kept (until the next add or delete).
_MASK_CACHE = 16
_PIPELINES = ("late", "dense", "dense+rerank", "hybrid", "bm25", "bm25+rerank", "fusion")
_NEEDS_BM25 = ("bm25", "bm25+rerank", "fusion", "hybrid")
_NEEDS_DENSE = ("dense", "dense+rerank", "hybrid")
DocumentLike = str | Mapping[str, str]


def default_index_kind() -> str:
    """The index kind ``Retriever.build`` uses when none is given: ``"plaid"``."""
    return "plaid"


def encoder_for_index(model: Any, recorded: Mapping[str, Any], path: Any, *, device: str,
                      trust_remote_code: bool | None) -> Encoder:
    """The query encoder for an index at ``path`` whose manifest recorded model ``recorded``
    (``name``, ``dim``): ``model`` as given (an :class:`Encoder`, a name or folder) or else the
    recorded name, loaded under the caller's ``trust_remote_code`` (the manifest never makes a
    model trusted); a ``ValueError`` when its dimension differs from the index's."""
    if isinstance(model, Encoder):
        encoder = model
    else:
        encoder = Encoder(model or recorded["name"], device=device,
                          trust_remote_code=trust_remote_code)
    if encoder.dim != recorded["dim"]:
        raise ValueError(
            f"model {encoder.name!r} has dim {encoder.dim} but the index at {path} was built "
            f"with dim {recorded['dim']} ({recorded['name']!r})")
    return encoder


def encode_for_index(encoder: Encoder, texts: Sequence[str],
                     passage_policy: Mapping[str, Any] | None = None
                     ) -> "PackedEmbeddings | EncodedPassages":
    """``texts`` encoded by ``encoder`` as an index stores them: one vector set per text, or
    passages under ``passage_policy`` (:attr:`Retriever.passage_policy`)."""
    show = len(texts) > 256
    if passage_policy is not None:
        from colengine.longdocs import LongDocPolicy, encode_passages

        pol = passage_policy
        policy = LongDocPolicy(pol["mode"], int(pol["overlap"]),
                               int(pol["context"]) if pol["mode"] == "late" else None)
        return encode_passages(encoder, list(texts), policy, show_progress=show)
    return encoder.encode_documents(texts, show_progress=show)


def _document_text(doc: DocumentLike, i: int) -> str:
    """A document is a string, or a BEIR-style mapping with ``text`` and optional ``title``."""
    if isinstance(doc, str):
        return doc
    if isinstance(doc, Mapping):
        if "text" not in doc:
            raise ValueError(f"documents[{i}] is a mapping without a 'text' field")
        if not isinstance(doc["text"], str):
            got = "null" if doc["text"] is None else type(doc["text"]).__name__
            raise TypeError(f"documents[{i}]: 'text' must be a string, got {got}")
        title = str(doc.get("title") or "").strip()
        return f"{title} {doc['text']}".strip() if title else str(doc["text"])
    raise TypeError(f"documents[{i}] must be str or a mapping with 'text', got {type(doc).__name__}")


def _rows(seq: Sequence[Any], a: int, b: int) -> list[Any]:
    """``seq[a:b]`` as a list, for any sequence (one read for a list or a corpus on disk)."""
    from colengine.corpus import JsonlCorpus

    if isinstance(seq, (list, tuple, JsonlCorpus)):
        return list(seq[a:b])
    return [seq[j] for j in range(a, min(b, len(seq)))]


class _Texts(Sequence[str]):
    """The documents' texts (title prepended) made on access, so that a streamed build over
    a corpus on disk (:class:`colengine.corpus.JsonlCorpus`) never holds them all."""

    def __init__(self, documents: Sequence[DocumentLike]) -> None:
        self._docs = documents

    def __len__(self) -> int:
        return len(self._docs)

    def __getitem__(self, i):
        if isinstance(i, slice):
            rows = range(*i.indices(len(self)))
            if rows.step != 1:
                return [self[j] for j in rows]
            return [_document_text(d, j) for j, d in
                    zip(rows, _rows(self._docs, rows.start, rows.stop))]
        return _document_text(self._docs[i], i)

    def __iter__(self):
        for a in range(0, len(self), 1024):
            yield from self[a:a + 1024]


def _document_parts(doc: DocumentLike) -> tuple[str, str | None]:
    """(text, title) as stored in the metadata store (the title separately, when given)."""
    if isinstance(doc, str):
        return doc, None
    title = str(doc.get("title") or "").strip()
    return str(doc["text"]), title or None


def _check_metadata_list(metadata: Sequence[Mapping[str, Any] | None] | None,
                         n: int) -> list[dict[str, Any]] | None:
    """Validate a batch's metadata (one dict or None per document) before any encoding."""
    if metadata is None:
        return None
    if isinstance(metadata, Mapping) or not isinstance(metadata, Sequence):
        raise TypeError("metadata must be a list with one dict (or None) per document")
    if len(metadata) != n:
        raise ValueError(f"got {len(metadata)} metadata entries for {n} documents")
    return [check_metadata(m, f"metadata[{i}]") for i, m in enumerate(metadata)]


def _check_query(query: object) -> str:
    if not isinstance(query, str):
        raise TypeError(f"query must be str, got {type(query).__name__}")
    if not query.strip():
        raise ValueError("query is empty")
    return query


class Retriever:
    """Search a corpus with late interaction (MaxSim over token vectors).

    Build one with :meth:`build` (encodes and indexes) or :meth:`load` (memory-maps a saved
    index and loads its model)::

        r = Retriever.build(["first text", "second text"], model="minilm", index="plaid")
        r.search("a question", k=5)          # -> [Hit(doc_id='1', score=...), ...]
        r.save("my-index"); r = Retriever.load("my-index")

    ``search(..., pipeline=...)`` picks ``"late"`` (the late-interaction index, the default),
    ``"bm25"``, ``"bm25+rerank"`` (BM25 candidates re-scored by exact MaxSim), ``"fusion"``
    (reciprocal-rank fusion of the late index and BM25), ``"dense"`` (the single-vector dense
    index), ``"dense+rerank"`` (dense candidates re-scored by exact MaxSim) or ``"hybrid"``
    (BM25 and dense candidates fused, then exact MaxSim); the BM25 pipelines need
    ``build(..., bm25=True)``, the dense ones ``build(..., dense=...)``.

    Documents' texts (``store_texts=True``, the default) and metadata live in a SQLite store
    (:mod:`colengine.metadata`) saved with the index: ``search(..., filter={"year": {"$gte":
    2020}})`` searches only the documents the filter keeps, ``return_text`` /
    ``return_metadata`` fill :attr:`Hit.text` / :attr:`Hit.metadata`, and :meth:`get` returns
    documents by id.
    """

    def __init__(self, encoder: Encoder, index: Index, *, bm25: Any = None,
                 path: str | os.PathLike | None = None, next_auto_id: int | None = None,
                 metadata: MetadataStore | None = None, dense: Any = None) -> None:
        if encoder.dim != index.dim:
            raise ValueError(f"model dim {encoder.dim} does not match index dim {index.dim}")
        self.encoder = encoder
        self.index = index
        self.bm25 = bm25
        #: the dense first stage (:class:`colengine.dense.DenseStage`), or None
        self.dense = dense
        if metadata is None:   # an index saved before the metadata store: ids only
            metadata = MetadataStore(store_texts=False)
            metadata.add(list(index.ids))
        self.metadata = metadata
        self._mask_cache: dict[tuple[int, str], tuple[np.ndarray, np.ndarray | None]] = {}
        self._version = 0   # bumped by add and delete: cached masks of older versions are stale
        self.path = Path(path) if path is not None else None
        #: the generation on disk this retriever was loaded from or last saved (None: never)
        self.generation: int | None = None
        self._lease: Any = None
        if next_auto_id is not None:   # an index saved before the counter lived in the index
            index.next_auto_id = next_auto_id

    # -- construction ----------------------------------------------------------------
    @classmethod
    def build(
        cls,
        documents: Sequence[DocumentLike],
        ids: Sequence[str] | None = None,
        *,
        model: "str | os.PathLike | Encoder | Any" = DEFAULT_MODEL,
        index: str | None = None,
        path: str | os.PathLike | None = None,
        bm25: bool | str = False,
        device: str | torch.device = "auto",
        batch_size: int = 32,
        show_progress: bool = True,
        cache_dir: str | os.PathLike | None = None,
        stream: bool | None = None,
        chunk_size: int = 10_000,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
        store_texts: bool = True,
        trust_remote_code: bool | None = None,
        long_documents: str = "chunk",
        overlap: int | float | None = None,
        context: int | None = None,
        dense: Any = None,
        dense_options: Mapping[str, Any] | None = None,
        **index_kwargs: Any,
    ) -> "Retriever":
        """Encode ``documents`` and build an index over them.

        documents: strings, or mappings with ``text`` (and ``title``, prepended).
        ids: unique strings; default ``"0" .. "n-1"``.
        model: hub name, local folder, ``"minilm"`` / ``"tiny-pplx"``, a built
            ``pylate.models.ColBERT`` or an :class:`Encoder`.
        index: ``"plaid"`` (default when available) or ``"exhaustive"``.
        path: if given, the index is saved there once built.
        bm25: ``True`` (language guessed from the script: :func:`colengine.bm25.guess_language`,
            English for Latin script) or a language code, to also build a BM25 index of the texts.
        cache_dir: if given, encoded documents are cached there (keyed by model and texts).
        stream: PLAID only. Encode and compress ``chunk_size`` documents at a time
            (:meth:`PlaidIndex.build_from_iterator`), so float vectors never all sit in memory:
            encoded chunks are spooled to disk (``cache_dir``, else ``<path>.building``, else
            a temporary folder) and, with a ``path``, an interrupted build resumes where it
            stopped when called again. Default: on above ``STREAM_MIN_DOCS`` documents.
        metadata: one dict (field -> str/int/float/bool/None) or None per document; queryable
            with ``search(..., filter=...)``.
        store_texts: keep the texts (and titles) in the index, for ``get`` and ``return_text``.
        trust_remote_code: ``True`` lets a model folder or hub model run the Python code it
            ships; default: only the default model family and colengine's own code.
        device: where the model encodes and the PLAID index trains and searches
            (:func:`colengine.devices.resolve_device`: ``"auto"``, ``"cpu"``, ``"cuda"``,
            ``"cuda:N"``, ``"mps"``; PLAID's ``"auto"`` does not pick MPS). A device this
            machine lacks is a ``ValueError`` before any work.
        long_documents: ``"chunk"`` (default: every document is cut into windows of the
            model's document length, ``overlap`` tokens apart, each indexed as a passage;
            search returns documents scored by their best passage, :attr:`Hit.passage`),
            ``"late"`` (late chunking: each document encoded once, up to ``context`` tokens,
            then its token vectors cut into the same windows) or ``"truncate"`` (only the
            first ``document_length`` tokens, counted in a warning). See
            :mod:`colengine.longdocs`.
        overlap: tokens shared by consecutive windows (an int, or a float share of the
            window; default 1/8). context: ``"late"`` only, tokens encoded at once (default
            8,192, capped by the model's position limit).
        dense: also build a dense (single-vector) index for the ``dense``, ``dense+rerank``
            and ``hybrid`` pipelines: ``True`` (``perplexity-ai/pplx-embed-v1-0.6b``, or the
            announced MiniLM stand-in where it cannot be loaded), ``"minilm"``, ``"tiny-pplx"``,
            a sentence-transformers name or folder, or a :class:`colengine.DenseEncoder` (for
            ``dims=`` and ``precision=``).
        dense_options: the dense index's options (:meth:`colengine.DenseIndex.build`:
            ``rescore``, ``ann``, ``hnsw_m``, ``ef_search``).
        index_kwargs: passed to the index's ``build`` (e.g. ``nbits=2`` for PLAID, or
            ``pool_factor=2`` to pool each document's tokens to about half at build:
            :mod:`colengine.pooling`); an unknown or inapplicable option is a ``TypeError``
            naming the valid ones.
        """
        if isinstance(documents, (str, bytes)) or not isinstance(documents, Sequence):
            raise TypeError("documents must be a list of strings or of {'title', 'text'} mappings")
        if not len(documents):
            raise ValueError("cannot build an index from an empty corpus")
        ids = [str(i) for i in range(len(documents))] if ids is None else list(ids)
        if len(ids) != len(documents):
            raise ValueError(f"got {len(ids)} ids for {len(documents)} documents")
        IdMap.check_new(ids)  # fail before the (slow) encoding, not after
        metas = _check_metadata_list(metadata, len(documents))
        policy = check_policy(long_documents, overlap, context)
        kind = index or default_index_kind()
        if kind not in INDEX_KINDS:
            raise ValueError(f"unknown index kind {kind!r}; choose from {sorted(INDEX_KINDS)}")

        if stream is None:
            stream = kind == "plaid" and len(documents) > STREAM_MIN_DOCS
        if stream and kind != "plaid":
            raise ValueError(f"stream=True needs index='plaid', not {kind!r}")
        _check_index_options(kind, stream, index_kwargs)
        # every document checked here, in one pass; a streamed build reads the texts again a
        # chunk at a time (never all in memory), any other build keeps the list made here
        texts: Sequence[str] = _Texts(documents) if stream else list(_Texts(documents))
        empty = [i for i, t in enumerate(texts) if not t.strip()]
        if empty:
            raise ValueError(f"documents[{empty[0]}] is empty (id {ids[empty[0]]!r}; {len(empty)} "
                             "empty in all): leave them out (CLI: --skip-empty)")
        if "pool_factor" in index_kwargs:   # a bad value fails before the (slow) encoding
            from colengine.pooling import check_pool_factor

            check_pool_factor(index_kwargs["pool_factor"])
        resolve_device(device)   # an unknown or absent device fails before the encoding
        dense_encoder = None
        if dense is not None and dense is not False:   # loaded (or refused) before any encoding
            from colengine.dense.stage import as_dense_encoder, check_options

            dense_options = check_options(dense_options)
            dense_encoder = as_dense_encoder(dense, device=device,
                                             trust_remote_code=trust_remote_code)
        elif dense_options:
            raise ValueError("dense_options given without dense=")
        if kind == "plaid":
            index_kwargs = {**index_kwargs, "device": device}

        encoder = model if isinstance(model, Encoder) else Encoder(
            model, device=device, batch_size=batch_size, trust_remote_code=trust_remote_code)
        if policy.mode != "truncate":   # overlap / context against the model, before encoding
            resolved = policy.resolve(encoder)
            built = _build_passages(encoder, texts, ids, policy, resolved, kind, stream=stream,
                                    path=path, cache_dir=cache_dir, chunk_size=chunk_size,
                                    show_progress=show_progress, **index_kwargs)
        elif stream:
            built = _build_streaming(encoder, texts, ids, path=path, cache_dir=cache_dir,
                                     chunk_size=chunk_size, show_progress=show_progress,
                                     **index_kwargs)
        else:
            if cache_dir is not None:
                docs = cached_encode_documents(encoder, texts, cache_dir=cache_dir,
                                               show_progress=show_progress)
            else:
                docs = encoder.encode_documents(texts, show_progress=show_progress)
            built = INDEX_KINDS[kind].build(docs, ids, **index_kwargs)
        bm25_index = None
        if bm25:
            from colengine.bm25 import BM25Index

            from colengine.bm25 import guess_language

            language = guess_language(texts) if bm25 is True else str(bm25)
            bm25_index = BM25Index.build(texts, ids, language=language, show_progress=show_progress)
        stage = None
        if dense_encoder is not None:
            from colengine.dense.stage import DenseStage

            stage = DenseStage.build(dense_encoder, texts, ids, cache_dir=cache_dir,
                                     show_progress=show_progress, **dense_options)
        store = MetadataStore(store_texts=store_texts)
        step = max(chunk_size, 1)
        for a in range(0, len(ids), step):   # (a chunk at a time: the store spills to disk)
            parts = [_document_parts(d) for d in _rows(documents, a, a + step)]
            store.add(ids[a:a + step], texts=[p[0] for p in parts],
                      titles=[p[1] for p in parts],
                      metadata=None if metas is None else metas[a:a + step])
        r = cls(encoder, built, bm25=bm25_index, path=path, metadata=store, dense=stage)
        if path is not None:
            r.save(path)
        return r

    @classmethod
    def load(cls, path: str | os.PathLike, *, model: "str | os.PathLike | Encoder | None" = None,
             device: str | torch.device = "auto", verify: bool = True,
             trust_remote_code: bool | None = None, replay_log: bool = True,
             dense_model: Any = None) -> "Retriever":
        """Load a saved retriever; arrays are memory-mapped.

        ``model`` overrides the model recorded in the index (e.g. after moving its folder);
        its dim must match. A model folder that ships Python code is not run unless
        ``trust_remote_code=True`` (the index's own record never makes it trusted): an index
        handed over by someone else runs nothing of theirs. ``replay_log``: apply the changes
        a server acknowledged since the last save (the write-ahead log of :mod:`colengine.wal`).
        ``device``: as in :meth:`build`, for the model and the PLAID index (an index loaded
        with ``device="cpu"`` searches on the CPU even where CUDA exists).
        ``dense_model``: overrides the dense model recorded in the index, like ``model``.
        """
        resolve_device(device)   # an unknown or absent device fails here, not as a bad index
        b = load_bundle(path, kind="retriever", mmap=True, verify=verify)
        meta = b.meta
        m = meta.get("model")
        if (not isinstance(m, dict) or not isinstance(m.get("name"), str)
                or not isinstance(m.get("dim"), int) or isinstance(m.get("dim"), bool)):
            raise IndexFormatError(f"{path}: manifest field 'meta.model' must hold a model "
                                   "'name' (string) and 'dim' (integer)")
        try:
            kind = meta["index_kind"]
            index_cls = INDEX_KINDS[kind]
        except KeyError as e:
            raise IndexFormatError(f"{path}: unknown or missing index kind {e}") from None
        try:
            where = {"device": device} if kind == "plaid" else {}   # exhaustive: always the CPU
            index = index_cls.from_bundle(Bundle(kind, meta.get("index_meta", {}),
                                                 sub_bundle(b.arrays, "index")), **where)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise IndexFormatError(f"{path}: the {kind} index in it is malformed "
                                   f"({type(e).__name__}: {e})") from None
        if "passages" in meta:   # an index of passages; without the key: one per document
            try:
                index = PassageIndex.from_bundle(index, Bundle("passages", meta["passages"],
                                                               sub_bundle(b.arrays, "passages")))
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise IndexFormatError(f"{path}: the passage map in it is malformed "
                                       f"({type(e).__name__}: {e})") from None
        bm25 = None
        if "bm25_meta" in meta:
            from colengine.bm25 import BM25Index

            bm25 = BM25Index.from_bundle(Bundle("bm25", meta["bm25_meta"], sub_bundle(b.arrays, "bm25")))
            if len(bm25) != len(index) or not all(i in index.ids for i in bm25.ids):
                raise IndexFormatError(f"{path}: the BM25 index and the late index hold "
                                   "different document ids")
        dense = None
        if "dense_meta" in meta:
            from colengine.dense.stage import DenseStage

            try:
                dense = DenseStage.from_bundle(
                    Bundle("dense", meta["dense_meta"], sub_bundle(b.arrays, "dense")),
                    model=dense_model, device=device, trust_remote_code=trust_remote_code)
            except (KeyError, TypeError, AttributeError) as e:
                raise IndexFormatError(f"{path}: the dense index in it is malformed "
                                       f"({type(e).__name__}: {e})") from None
            live = dense.index.ids.live().ids
            if len(dense) != len(index) or not all(i in index.ids for i in live):
                raise IndexFormatError(f"{path}: the dense index and the late index hold "
                                       "different document ids")
        encoder = encoder_for_index(model, meta["model"], path, device=device,
                                    trust_remote_code=trust_remote_code)
        store = None
        if "metadata.sqlite" in b.files:  # (the bundle's lease keeps its generation on disk)
            store = MetadataStore.open(b.files["metadata.sqlite"],
                                       store_texts=bool(meta.get("store_texts", True)))
            if len(store) != len(index):
                raise IndexFormatError(f"{path}: the metadata store holds {len(store)} documents, "
                                       f"the index {len(index)}")
        r = cls(encoder, index, bm25=bm25, path=path, next_auto_id=meta.get("next_auto_id"),
                metadata=store, dense=dense)
        r.generation, r._lease = b.generation, b.lease
        if replay_log:
            r.replay_log()
        return r

    def replay_log(self, offset: int = 0) -> int:
        """Apply the write-ahead log records of the loaded generation from byte ``offset``
        (:mod:`colengine.wal`); returns the offset after the last record applied."""
        from colengine import wal

        if self.path is None or self.generation is None:
            return offset
        records, end = wal.read_records(wal.wal_path(self.path, self.generation), offset)
        for record in records:
            wal.apply_record(self, record)
        return end

    def save(self, path: str | os.PathLike | None = None, *, lock_timeout: float | None = None,
             log_folded: tuple[int, int] | None = None) -> Path:
        """Write the retriever atomically (manifest swap) under the index's writer lock;
        returns the path.

        Saving back to the index this retriever was loaded from (or last saved to) fails with
        :class:`colengine.errors.StaleIndexError` if another writer saved a newer generation
        there in the meantime: reload and apply the change again, nothing is overwritten.

        ``log_folded`` (generation, bytes): the write-ahead log whose first ``bytes`` this
        save folds in (the server's checkpoints), recorded in the manifest: a server process
        that applied exactly those records holds this generation already and adopts it
        without loading it (:mod:`colengine.server.service`).
        """
        target = Path(path) if path is not None else self.path
        if target is None:
            raise ValueError("no path given and the retriever was not built or loaded with one")
        same = (self.path is not None and self.generation is not None
                and os.path.abspath(target) == os.path.abspath(self.path))
        ib = self.index.to_bundle()
        meta: dict[str, Any] = {
            "model": self.encoder.describe(),
            "index_kind": ib.kind,
            "index_meta": ib.meta,
            "n_documents": len(self.index),
            "store_texts": self.metadata.store_texts,
        }
        if log_folded is not None:
            meta["log_folded"] = {"generation": int(log_folded[0]), "bytes": int(log_folded[1])}
        arrays = prefixed(ib.arrays, "index")
        if isinstance(self.index, PassageIndex):   # the passage -> document map, versioned
            pb = self.index.passage_bundle()
            meta["passages"] = pb.meta
            arrays.update(prefixed(pb.arrays, "passages"))
        if self.bm25 is not None:
            bb = self.bm25.to_bundle()
            meta["bm25_meta"] = bb.meta
            arrays.update(prefixed(bb.arrays, "bm25"))
        if self.dense is not None:
            db = self.dense.to_bundle()
            meta["dense_meta"] = db.meta
            arrays.update(prefixed(db.arrays, "dense"))
        # the metadata database is a file of the same generation as the arrays: one manifest
        # swap publishes both, so after a crash they always describe the same documents
        bundle = Bundle("retriever", meta, arrays, files={"metadata.sqlite": self.metadata.write})
        save_bundle(target, bundle, expected_generation=self.generation if same else None,
                    lock_timeout=lock_timeout)
        self.path, self.generation = target, bundle.generation
        return target

    def __repr__(self) -> str:
        kind = self.index.kind
        bm25 = f", bm25={self.bm25.language!r}" if self.bm25 is not None else ""
        where = f", path={str(self.path)!r}" if self.path is not None else ""
        return (f"Retriever({len(self)} documents, index={kind!r}, model={self.encoder.name!r}, "
                f"dim={self.encoder.dim}{bm25}{where})")

    def __len__(self) -> int:
        return len(self.index)

    # -- search ----------------------------------------------------------------------
    def _need_bm25(self, pipeline: str) -> None:
        if self.bm25 is None:
            raise ValueError(f"pipeline {pipeline!r} needs BM25: build with Retriever.build(..., bm25=True) "
                             "(CLI: colengine index ... --bm25)")

    def _need_dense(self, pipeline: str) -> None:
        if self.dense is None:
            raise ValueError(f"pipeline {pipeline!r} needs dense vectors: build with "
                             "Retriever.build(..., dense='minilm' | True | a model) (CLI: colengine "
                             "index ... --dense MODEL); the late-interaction index's own search is "
                             "pipeline 'late'")

    def search(self, query: str, k: int = 10, *, pipeline: Pipeline = "late",
               candidates: int = 100, filter: Mapping[str, Any] | None = None,
               return_text: bool = False, return_metadata: bool = False,
               **knobs: Unpack[KnobOverrides]) -> list[Hit]:
        """Top-``k`` hits for one query, best first.

        ``knobs`` (PLAID's search knobs, :class:`colengine.index.plaid.Knobs`): ``n_probe``,
        ``n_candidates``, ``n_exact`` (ints; left out or ``None``: the default for ``k``) and
        ``centroid_score_threshold`` (a float, or ``None`` for no pruning; left out: the
        default). They go to the index's search in the ``late`` and ``fusion`` pipelines (the
        BM25 and dense pipelines do not use them); an unknown name, or a knob given to an index
        that has none (exhaustive), is a ``TypeError``. ``candidates``: the first-stage depth of
        every pipeline but ``late`` and ``dense``.

        ``filter``: a metadata filter (:mod:`colengine.metadata`); only the documents it keeps
        are searched, in every pipeline. ``return_text`` / ``return_metadata`` fill
        :attr:`Hit.text` / :attr:`Hit.metadata`.
        """
        return self.search_batch([_check_query(query)], k, pipeline=pipeline,
                                 candidates=candidates, filter=filter, return_text=return_text,
                                 return_metadata=return_metadata, **knobs)[0]

    def search_batch(self, queries: Sequence[str], k: int = 10, *, pipeline: Pipeline = "late",
                     candidates: int = 100, filter: Mapping[str, Any] | None = None,
                     return_text: bool = False, return_metadata: bool = False,
                     query_embeddings: torch.Tensor | None = None,
                     **knobs: Unpack[KnobOverrides]) -> list[list[Hit]]:
        """:meth:`search` for many queries at once (one encoder pass, one batched index search);
        the same ``knobs``.

        ``query_embeddings``: the queries already encoded, ``self.encoder.encode_queries(
        queries)`` (a server encodes them before it takes its read lock)."""
        if isinstance(queries, str):
            raise TypeError("search_batch takes a list of queries; use search() for one")
        queries = [_check_query(q) for q in queries]
        check_k(k)
        check_knob_names(knobs)
        if pipeline not in _PIPELINES:
            raise ValueError(f"unknown pipeline {pipeline!r}; choose from {_PIPELINES}")
        if pipeline in _NEEDS_DENSE:
            self._need_dense(pipeline)
        if pipeline in _NEEDS_BM25:
            self._need_bm25(pipeline)
        if pipeline not in ("late", "dense"):
            check_k(candidates)
        masks = None if filter is None else self._filter_masks(filter)
        if not queries:
            return []
        if masks is not None and not masks[0].any():
            return [[] for _ in queries]
        if query_embeddings is not None and (
                not isinstance(query_embeddings, torch.Tensor)
                or query_embeddings.ndim != 3 or query_embeddings.shape[0] != len(queries)):
            raise ValueError("query_embeddings must be the [len(queries), Lq, d] tensor that "
                             "encoder.encode_queries(queries) returns")
        hits = self._search(queries, k, pipeline, candidates, masks, knobs, query_embeddings)
        if return_text or return_metadata:
            hits = self._with_documents(hits, return_text, return_metadata)
        return hits

    def _filter_masks(self, flt: Mapping[str, Any]
                      ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """What a filter keeps, as bool masks over the index's and BM25's id positions and
        the dense index's rows; the last few are cached until the next add or delete."""
        try:
            key = (self._version, json.dumps(flt, sort_keys=True, allow_nan=True))
        except (TypeError, ValueError):
            key = None   # not JSON-able: compile_filter names the problem below
        if key is not None and key in self._mask_cache:
            return self._mask_cache[key]
        allowed = self.metadata.matching_ids(flt)
        masks = (_mask(self.index.ids, allowed),
                 None if self.bm25 is None else _mask(self.bm25.ids, allowed),
                 None if self.dense is None else self.dense.index.rows_of(allowed))
        if key is not None:
            if len(self._mask_cache) >= _MASK_CACHE:
                self._mask_cache.pop(next(iter(self._mask_cache)))
            self._mask_cache[key] = masks
        return masks

    def _search(self, queries: list[str], k: int, pipeline: str, candidates: int,
                masks: tuple[np.ndarray, np.ndarray | None, np.ndarray | None] | None,
                knobs: KnobOverrides, encoded: torch.Tensor | None = None) -> list[list[Hit]]:
        """The pipelines; ``masks``: what a filter keeps (None: every document)."""
        dense_kw = dict(knobs) if masks is None else {**knobs, "allowed": masks[0]}

        def q_emb() -> torch.Tensor:
            return encoded if encoded is not None else self.encoder.encode_queries(queries)

        if pipeline == "late":
            return self.index.search(q_emb(), k, **dense_kw)
        bm25_kw = {} if masks is None else {"allowed": masks[1]}
        if pipeline in _NEEDS_DENSE:
            rows = None if masks is None else masks[2]
            depth = k if pipeline == "dense" else max(candidates, k)
            first = self.dense.index.search(self.dense.encoder.encode_queries(queries), depth,
                                            allowed_rows=rows)
            if pipeline == "dense":
                return first
            if pipeline == "hybrid":
                from colengine.fusion import reciprocal_rank_fusion

                lexical = self.bm25.search(queries, max(candidates, k), **bm25_kw)
                first = [reciprocal_rank_fusion([d, b], k=max(candidates, k))
                         for d, b in zip(first, lexical)]
            q = q_emb()
            return [self._rerank_encoded(q[i:i + 1], [h.doc_id for h in hits], k)
                    for i, hits in enumerate(first)]
        if pipeline == "bm25":
            return self.bm25.search(queries, k, **bm25_kw)
        if pipeline == "bm25+rerank":
            first = self.bm25.search(queries, max(candidates, k), **bm25_kw)
            q = q_emb()
            return [self._rerank_encoded(q[i:i + 1], [h.doc_id for h in hits], k)
                    for i, hits in enumerate(first)]
        from colengine.fusion import reciprocal_rank_fusion

        dense = self.index.search(q_emb(), max(candidates, k), **dense_kw)
        lexical = self.bm25.search(queries, max(candidates, k), **bm25_kw)
        return [reciprocal_rank_fusion([d, b], k=k) for d, b in zip(dense, lexical)]

    def _with_documents(self, hits: list[list[Hit]], text: bool, metadata: bool) -> list[list[Hit]]:
        docs = {d["id"]: d for d in self.metadata.get(
            sorted({h.doc_id for row in hits for h in row}))}
        return [[dataclasses.replace(h, text=docs[h.doc_id].get("text") if text else None,
                                     metadata=docs[h.doc_id]["metadata"] if metadata else None)
                 for h in row] for row in hits]

    def get(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        """Documents by id, in order: ``{"id", "text" (when stored), "title" (when given),
        "metadata"}``. Unknown ids raise :class:`colengine.errors.UnknownIdError`."""
        if isinstance(ids, str):
            raise TypeError("get takes a list of ids, not a single string")
        ids = list(ids)
        self.index.ids.positions(ids)  # raises UnknownIdError naming the first unknown id
        return self.metadata.get(ids)

    # -- reranking -------------------------------------------------------------------
    @staticmethod
    def _score_packed(q: torch.Tensor, docs: PackedEmbeddings) -> torch.Tensor:
        """Exact MaxSim of one query ``[1, Lq, d]`` against every document of ``docs`` -> ``[n]``."""
        cand = torch.arange(len(docs), dtype=torch.int64).unsqueeze(0)
        ql = torch.tensor([q.shape[1]], dtype=torch.int64)
        return score_candidates_packed(q, ql, readonly_tensor(docs.tokens),
                                       readonly_tensor(docs.offsets), cand)[0]

    @staticmethod
    def _top(ids: Sequence[str], scores: torch.Tensor, k: int | None) -> list[Hit]:
        order = torch.argsort(scores, descending=True, stable=True).tolist()
        hits = [Hit(ids[i], float(scores[i])) for i in order]
        return hits if k is None else hits[:k]

    def _rerank_encoded(self, q: torch.Tensor, doc_ids: Sequence[str], k: int | None) -> list[Hit]:
        if not doc_ids:
            return []
        return self._top(doc_ids, self.index.score(q, doc_ids)[0], k)

    def rerank(self, query: str, doc_ids: Sequence[str], k: int | None = None) -> list[Hit]:
        """Re-score indexed documents ``doc_ids`` by exact MaxSim; best first, top ``k``.

        Unknown ids raise :class:`colengine.errors.UnknownIdError`; duplicates a ValueError.
        """
        _check_query(query)
        if k is not None:
            check_k(k)
        doc_ids = as_id_list(doc_ids, "doc_ids")
        if len(set(doc_ids)) != len(doc_ids):
            raise DuplicateIdError("rerank got the same document id twice")
        self.index.ids.positions(doc_ids)  # raises UnknownIdError naming the first unknown id
        return self._rerank_encoded(self.encoder.encode_queries([query]), doc_ids, k)

    def rerank_texts(self, query: str, texts: Sequence[str], ids: Sequence[str] | None = None,
                     k: int | None = None) -> list[Hit]:
        """Re-score texts that are not in the index (encoded on the fly); ids default "0".."n-1"."""
        _check_query(query)
        if k is not None:
            check_k(k)
        texts = check_texts(texts, "texts")
        if not texts:
            return []
        ids = [str(i) for i in range(len(texts))] if ids is None else IdMap.check_new(ids)
        if len(ids) != len(texts):
            raise ValueError(f"got {len(ids)} ids for {len(texts)} texts")
        docs = self.encoder.encode_documents(list(texts), show_progress=False)
        return self._top(ids, self._score_packed(self.encoder.encode_queries([query]), docs), k)

    # -- mutation --------------------------------------------------------------------
    def add(self, documents: Sequence[DocumentLike], ids: Sequence[str] | None = None, *,
            metadata: Sequence[Mapping[str, Any] | None] | None = None,
            encoded: PackedEmbeddings | None = None) -> list[str]:
        """Encode and add documents (with optional metadata, one dict or None each); returns
        their ids. Nothing changes if any id or metadata entry is bad. ``encoded``: the
        documents' embeddings when the caller already computed them with :attr:`encoder`."""
        return self.commit_add(self.prepare_add(documents, ids, metadata=metadata,
                                                encoded=encoded))

    def prepare_add(self, documents: Sequence[DocumentLike], ids: Sequence[str] | None = None,
                    *, metadata: Sequence[Mapping[str, Any] | None] | None = None,
                    encoded: PackedEmbeddings | None = None) -> "PreparedAdd":
        """The checks and the expensive part of :meth:`add` (encoding; for a PLAID index also
        compression and the new inverted lists), without changing what searches see;
        :meth:`commit_add` makes it visible. Nothing may change the retriever in between
        (a server holds its writer lock; readers may go on searching meanwhile)."""
        if isinstance(documents, (str, bytes)) or not isinstance(documents, Sequence):
            raise TypeError("documents must be a list of strings or of {'title', 'text'} "
                            "mappings, not a single string: pass [text]")
        texts = [_document_text(d, i) for i, d in enumerate(documents)]
        if not texts:
            raise ValueError("no documents to add")
        metas = _check_metadata_list(metadata, len(texts))
        auto = ids is None
        counter = None
        if auto:   # the index owns the one persistent counter; it is advanced only on success
            ids, counter = auto_ids(self.index.next_auto_id, len(texts), self.index.ids)
        ids = IdMap.check_new(ids, self.index.ids)
        if len(ids) != len(texts):
            raise ValueError(f"got {len(ids)} ids for {len(texts)} documents")
        docs = encoded if encoded is not None else self.encode_documents(texts)
        dense_part = self.dense.encode(texts) if self.dense is not None else None
        if len(docs) != len(texts):
            raise ValueError(f"got {len(docs)} encoded documents for {len(texts)} documents")
        prepare = getattr(self.index, "prepare_add", None)
        index_part = prepare(docs, ids) if prepare is not None else None
        parts = [_document_parts(d) for d in documents]
        return PreparedAdd(self._version, ids, texts, parts, metas, docs, index_part, counter,
                           dense_part)

    def encode_documents(self, texts: Sequence[str]) -> "PackedEmbeddings | EncodedPassages":
        """``texts`` encoded as this retriever's index stores them (passages for an index
        built with ``long_documents="chunk"`` / ``"late"``): what ``add(..., encoded=)`` takes."""
        return encode_for_index(self.encoder, texts, self.passage_policy)

    @property
    def passage_policy(self) -> dict[str, Any] | None:
        """How long documents are cut into passages (``{"mode", "overlap", "context"?}``), or
        None for an index of one vector set per document."""
        return dict(self.index.policy) if isinstance(self.index, PassageIndex) else None

    def can_commit(self, p: "PreparedAdd") -> bool:
        """Whether :meth:`commit_add` can apply ``p``: nothing changed since it was prepared."""
        return p.version == self._version

    def commit_add(self, p: "PreparedAdd") -> list[str]:
        """Apply what :meth:`prepare_add` computed; returns the new documents' ids."""
        if not self.can_commit(p):
            raise RuntimeError("the retriever changed between prepare_add and commit_add")
        if p.index_part is not None:
            self.index.commit_add(p.index_part)
        else:
            self.index.add(p.docs, p.ids)
        if self.bm25 is not None:
            self.bm25.add(p.texts, p.ids)
        if self.dense is not None:
            self.dense.add(p.dense_part, p.ids)
        self.metadata.add(p.ids, texts=[x[0] for x in p.parts], titles=[x[1] for x in p.parts],
                          metadata=p.metadata)
        self._version += 1
        self._mask_cache.clear()
        if p.counter is not None:
            self.index.next_auto_id = p.counter
        return p.ids

    def delete(self, ids: Sequence[str]) -> None:
        """Remove documents by id; every id must exist (nothing changes otherwise)."""
        ids = as_id_list(ids)
        if len(set(ids)) != len(ids):
            raise DuplicateIdError("delete got the same document id twice")
        self.index.ids.positions(ids)
        self.index.delete(ids)
        if self.bm25 is not None:
            self.bm25.delete(ids)
        if self.dense is not None:
            self.dense.delete(ids)
        self.metadata.delete(ids)
        self._version += 1
        self._mask_cache.clear()

    def info(self) -> dict[str, Any]:
        """Model, index statistics and BM25 presence, JSON-able."""
        return {
            "model": self.encoder.describe(),
            "index": self.index.stats(),
            "bm25": self.bm25 is not None,
            "long_documents": (self.index.policy if isinstance(self.index, PassageIndex)
                               else {"mode": "truncate"}),
            "dense": self.dense.describe() if self.dense is not None else None,
            "store_texts": self.metadata.store_texts,
            "path": str(self.path) if self.path else None,
        }


@dataclasses.dataclass
class PreparedAdd:
    """An add checked and computed by :meth:`Retriever.prepare_add`, not yet applied."""

    version: int
    ids: list[str]
    texts: list[str]
    parts: list[tuple[str, str | None]]          # (text, title) as the metadata store keeps them
    metadata: list[dict[str, Any]] | None
    docs: Any                                    # the documents' embeddings
    index_part: Any                              # the index's own preparation, if it has one
    counter: int | None                          # the automatic-id counter after the add
    dense_part: Any = None                       # the documents' dense vectors, if any


def _mask(ids: IdMap, keep: Sequence[str]) -> np.ndarray:
    """bool mask over ``ids`` positions that is true at the ids in ``keep``."""
    m = np.zeros(len(ids), dtype=bool)
    m[ids.positions(keep)] = True
    m.flags.writeable = False
    return m


def _check_index_options(kind: str, stream: bool, options: Mapping[str, Any]) -> None:
    """``TypeError`` for build options the chosen index (and build mode) does not take."""
    import inspect

    cls = INDEX_KINDS[kind]
    fn = cls.build_from_iterator if stream else cls.build
    own = {"doc_embeddings", "ids", "chunks", "path", "resume_dir", "show_progress", "model"}
    valid = sorted(n for n, p in inspect.signature(fn).parameters.items()
                   if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and n not in own)
    bad = sorted(set(options) - set(valid))
    if bad:
        mode = f"index={kind!r}" + (", stream=True" if stream else "")
        raise TypeError(f"Retriever.build() got option(s) {', '.join(map(repr, bad))} that "
                        f"{mode} does not take; valid: {', '.join(valid) or 'none'}")


def _build_streaming(encoder: Encoder, texts: Sequence[str], ids: Sequence[str], *,
                     path: str | os.PathLike | None, cache_dir: str | os.PathLike | None,
                     chunk_size: int, show_progress: bool, **index_kwargs: Any) -> Index:
    """A PLAID index built chunk by chunk; see ``Retriever.build(stream=True)``."""
    import tempfile
    import warnings

    from colengine.cache import EncodedChunks
    from colengine.index.plaid import PlaidIndex
    from colengine.index.plaid.streaming import default_resume_dir

    work = default_resume_dir(path) if path is not None else None
    with tempfile.TemporaryDirectory(prefix="colengine-spool-") as tmp:
        spool = (Path(cache_dir) / "encoded" if cache_dir is not None
                 else work / "encoded" if work is not None else Path(tmp))
        chunks = EncodedChunks(encoder, texts, ids, chunk_size=chunk_size, spool_dir=spool)
        n_cut = encoder.count_truncated(texts)   # one warning for the corpus, not one per chunk
        if n_cut:
            warnings.warn(f"{n_cut} of {len(texts)} documents are longer than the model's limit "
                          f"of {encoder.document_length} tokens and were truncated", stacklevel=3)
        # the index is saved inside the retriever's bundle, so it is built in memory; the
        # work folder (progress + spooled vectors) is removed once the build is complete
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".* documents are longer than the model")
            built = PlaidIndex.build_from_iterator(chunks, resume_dir=work,
                                                   show_progress=show_progress, **index_kwargs)
    if work is not None and cache_dir is None:
        import shutil

        shutil.rmtree(work / "encoded", ignore_errors=True)   # our spool, in our work folder
        with contextlib.suppress(OSError):
            work.rmdir()                                      # only if nothing else is left
    return built


def _build_passages(encoder: Encoder, texts: Sequence[str], ids: Sequence[str], policy: Any,
                    resolved: Any, kind: str, *, stream: bool, path: str | os.PathLike | None,
                    cache_dir: str | os.PathLike | None, chunk_size: int, show_progress: bool,
                    **index_kwargs: Any) -> Index:
    """A :class:`PassageIndex` (``long_documents="chunk"`` / ``"late"``), streamed or not."""
    import logging

    from colengine.longdocs import PassageChunks, cached_encode_passages, encode_passages

    if not stream:
        enc = (cached_encode_passages(encoder, texts, policy, cache_dir=cache_dir,
                                      show_progress=show_progress) if cache_dir is not None
               else encode_passages(encoder, texts, policy, show_progress=show_progress))
        built = PassageIndex.build(INDEX_KINDS[kind], enc, ids, resolved, **index_kwargs)
    else:
        import tempfile

        from colengine.index.plaid import PlaidIndex
        from colengine.index.plaid.streaming import default_resume_dir

        work = default_resume_dir(path) if path is not None else None
        with tempfile.TemporaryDirectory(prefix="colengine-spool-") as tmp:
            spool = (Path(cache_dir) if cache_dir is not None
                     else work / "encoded" if work is not None else Path(tmp))
            chunks = PassageChunks(encoder, texts, ids, policy, chunk_size=chunk_size,
                                   spool_dir=spool)
            inner = PlaidIndex.build_from_iterator(chunks, resume_dir=work,
                                                   show_progress=show_progress, **index_kwargs)
            doc, win, start, end, report = chunks.table()
        if work is not None and cache_dir is None:
            import shutil

            shutil.rmtree(work / "encoded", ignore_errors=True)
            with contextlib.suppress(OSError):
                work.rmdir()
        built = PassageIndex(inner, ids, doc, win, start, end,
                             {"policy": resolved.describe(), "report": report})
    rep = built.meta["report"]
    logging.getLogger(__name__).info(
        "%d documents indexed as %d passages (%s; %d longer than one window; nothing truncated)",
        rep["documents"], rep["passages"], rep["mode"], rep["long_documents"])
    return built
