"""The PLAID index: centroids + compressed residuals + inverted lists, searched in four stages."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from colengine.appended import AppendedRows, parts, take_rows
from colengine.devices import resolve_device
from colengine.embeddings import (DocEmbeddingsLike, PackedEmbeddings, as_packed,
                                  readonly_tensor)
from colengine.errors import DuplicateIdError, IndexFormatError
from colengine.ids import AutoIdCounter, IdMap, RowIds, as_id_list, auto_ids
from colengine.index.base import (as_query_batch, build_inputs, check_allowed,
                                  check_positive_int, expected_generation, hits_from_topk)
from colengine.index.plaid import build as plaid_build
from colengine.index.plaid.centroids import centroid_arrays, centroids_from_arrays, sample_rows
from colengine.index.plaid.codec import ResidualCodec, codec_from_arrays
from colengine.index.plaid.drift import (DRIFT_NORM_RATIO, DRIFT_TOKEN_SHARE, drift_report,
                                         fresh_drift, record_added)
from colengine.index.plaid.ivf import Lists, build_lists, drop_docs, extend_lists
from colengine.index.plaid.refine import check_refine, kind_of
from colengine.index.plaid.refine import encode as refine_encode
from colengine.index.plaid.search import (KnobOverrides, Knobs, SearchState, compiled_stages,
                                          filtered_n_probe, plaid_search, query_chunk,
                                          reads_refine_in_place, score_stored, state_centroids)
from colengine.memory import release_free_memory
from colengine.pooling import check_pool_factor, pool_packed
from colengine.storage import MANIFEST, Bundle, entry_bytes, load_bundle, save_bundle
from colengine.types import Hit

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from colengine.index.plaid.tune import TuneResult

__all__ = ["PlaidIndex", "PreparedAdd", "PLAID_FORMAT", "DRIFT_TOKEN_SHARE", "DRIFT_NORM_RATIO"]

#: version of the array layout below (independent of the storage format version).
#: 5 adds the optional refinement vectors (``refine`` [+ ``refine_scale``], :mod:`.refine`);
#: an index without them is still written as 4, so older readers keep reading it. 4 stores
#: centroids on their int8 grid (``centroid_q`` + ``centroid_exponents``, see
#: :func:`~colengine.index.plaid.centroids.centroid_arrays`; float16 ``centroids`` otherwise);
#: 3 added the product codec (``pq_codebooks``; indexes with ``bucket_*`` arrays keep the
#: scalar codec); 2 added the ``deleted`` tombstone mask (row ids may then repeat: a
#: tombstoned row keeps its id, which may be live again further on); 1 to 4 are still read.
PLAID_FORMAT = 5
_READABLE_FORMATS = (1, 2, 3, 4, 5)
_SAMPLE_PER_CENTROID = 16  # k-means training points per centroid (PLAID uses every token)
_STREAM_SAMPLE = 1 << 21   # token vectors build_from_iterator keeps for training (float16, 512 MiB
#: at d 128): K x _SAMPLE_PER_CENTROID for PLAID's K up to 100M tokens (K 131,072)
#: documents decompressed and scored at once by an exact (filtered) scoring on the CPU: ~128 x
#: 220 tokens x d float32 stays a few MiB; 1024 made 50+ MiB blocks whose fresh pages cost
#: more than the arithmetic (SciFact, 10% allowed: 118 -> 42 ms a query, 2-core EPYC)
_EXACT_BLOCK_ROWS = 128
#: documents scored at once where their refinement vectors are stored (see _score_blocks)
_IN_PLACE_BLOCK_ROWS = 1024
# batches of at least this many queries give their temporaries back to the OS when done (CPU)
_TRIM_BATCH = 8
#: the token stores that a first add to a loaded (memory-mapped) index extends in two parts
#: instead of copying them into memory (see PlaidIndex._grow)
_TWO_PART = frozenset({"codes", "residuals", "refine", "refine_scale"})


@dataclasses.dataclass
class PreparedAdd:
    """An add computed by :meth:`PlaidIndex.prepare_add`, not yet visible to searches."""

    version: int                        # the index's change counter it was computed against
    ids: list[str]
    codes: np.ndarray | None            # the whole new arrays (views of growable buffers)
    residuals: np.ndarray | None
    doc_offsets: np.ndarray | None
    lists: Lists | None                 # the new inverted lists (None: not built yet)
    state: SearchState | None           # the new search state (None: built on demand)
    n_tokens: int
    norm_sum: float
    counter: int | None                 # the automatic-id counter after it (None: ids given)
    original_lengths: np.ndarray | None = None   # pooled index: token counts before pooling
    refine: np.ndarray | None = None             # the refinement vectors, when kept
    refine_scale: np.ndarray | None = None


class PlaidIndex:
    """Late-interaction index in the PLAID layout (Santhanam et al., 2022).

    Every token is stored as the id of its nearest centroid (int16 when there are at most
    32,768 centroids) plus its residual to that centroid, quantised per dimension into
    ``2**nbits`` buckets and bit-packed (``dim * nbits / 8`` bytes). Search narrows the corpus
    with centroid scores and scores the few survivors exactly (see :mod:`.search`).

    Build with :meth:`build` (or :meth:`build_from_iterator`, which streams chunks and never
    holds every float embedding), load with :meth:`load`; ``search`` takes ``[B, Lq, d]`` or
    ``[Lq, d]`` query embeddings and knobs (``n_probe``, ``centroid_score_threshold``,
    ``n_candidates``, ``n_exact``) that default by ``k`` as PLAID's do.

    The index lives: :meth:`add` appends documents (existing centroids and codec, inverted
    lists extended in place), :meth:`delete` tombstones them (they are never returned; their
    ids may be added again), :meth:`compact` (also run by :meth:`save`) drops the tombstoned
    rows. External ids are stable through all of it. :meth:`drift` says how far the additions
    have moved from what the centroids were trained on; :meth:`retrain` re-trains.

    Token pooling (``build(..., pool_factor=2)``, :mod:`colengine.pooling`) stores about half
    the vectors of each document; the index remembers its factor (``meta["pool_factor"]``)
    and pools added documents the same way, and keeps each row's original token count
    (``original_lengths``) for :meth:`stats`.

    Refinement (``build(..., refine="float16" | "int8")``, :mod:`.refine`) keeps a finer copy
    of every stored token, which the exact stage scores instead of the decoded residuals:
    the exhaustive index's scores (float16) or within ~1e-3 of them (int8) for 256 or 132
    more bytes a token on disk (memory-mapped; a search reads only its survivors' rows).

    >>> rng = np.random.default_rng(0)
    >>> docs = [rng.standard_normal((n, 16)).astype(np.float32) for n in (30, 50, 20)]
    >>> idx = PlaidIndex.build(docs, ["a", "b", "c"], nbits=4)
    >>> [h.doc_id for h in idx.search(docs[1], k=1)[0]]
    ['b']
    """

    kind = "plaid"
    #: share of stored rows that may be tombstones before :meth:`delete` compacts by itself
    auto_compact_share: float = 0.25
    #: a filtered search whose allowed documents hold at most this many tokens scores them
    #: all exactly (decompressed, exact MaxSim) instead of probing centroids; ~25 ms a query
    #: on a 2-core CPU, about what an unfiltered probe costs (bench/bench_filter.py)
    exact_filter_tokens: int = 131_072
    #: bytes of decompressed tokens that exact scoring keeps between searches on the CPU (per
    #: block of documents, least recently used first out; 0: none). A filter's allowed
    #: documents are the same search after search, so decompressing them again was most of
    #: a filtered search's time; the blocks stay valid through add and delete (stored rows
    #: never change) and are dropped by compact and retrain.
    exact_cache_bytes: int = 128 << 20

    def __init__(self, *, centroids: np.ndarray, codec: ResidualCodec, codes: np.ndarray,
                 residuals: np.ndarray, doc_offsets: np.ndarray, ids: IdMap | RowIds,
                 normalized: bool, meta: dict[str, Any] | None = None,
                 device: str | torch.device = "auto",
                 original_lengths: np.ndarray | None = None,
                 refine: np.ndarray | None = None,
                 refine_scale: np.ndarray | None = None) -> None:
        self.centroids = centroids          # float16 [K, d] (what is stored and searched)
        self.codec = codec
        self.codes = codes                  # int16/int32 [T]  (T: stored tokens, tombstones included)
        self.residuals = residuals          # uint8 [T, packed_dim]
        self.doc_offsets = doc_offsets      # int64 [R + 1]   (R: stored rows, tombstones included)
        self.refine = refine                # float16/int8 [T, d] finer copies (None: not kept)
        self.refine_scale = refine_scale    # float32 [T]: the int8 copies' scales
        self._rows = ids if isinstance(ids, RowIds) else RowIds(list(ids))
        self.normalized = bool(normalized)
        self.meta = dict(meta or {})
        # int64 [R]: tokens each stored row had before pooling (None: not pooled, the same)
        self.original_lengths = None if original_lengths is None else \
            np.asarray(original_lengths, dtype=np.int64)
        # "auto" never picks Apple MPS: the search is not tested there (ask for "mps")
        self.device = resolve_device(device, mps=False)
        self._check()
        if "drift" not in self.meta:   # an index from before drift tracking: all counts as trained
            self.meta["drift"] = fresh_drift(self.n_rows, self.n_tokens, None)
        self.meta.setdefault("next_auto_id", self.n_rows)   # the persistent id counter
        self._lists: Lists | None = None
        self._state: SearchState | None = None
        self._saved_at: Path | None = None
        self._bufs: dict[str, np.ndarray] = {}     # growable token arrays (see _grow)
        self._c32: tuple[np.ndarray, np.ndarray] | None = None
        #: (the centroids array, tokens adds assigned exactly, the kept assigner or None):
        #: see :meth:`_add_assigner`
        self._add_asg: tuple[np.ndarray, int, plaid_build.Assigner | None] | None = None
        #: (the centroids array, their search-state tensor): kept across the states that
        #: adds and deletes make (centroids change only by retrain, which sets a new array)
        self._state_c: tuple[np.ndarray, torch.Tensor] | None = None
        self._version = 0   # bumped by every change (a stale prepare_add is refused)
        self._exact_cache: OrderedDict[bytes, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._exact_cache_nbytes = 0
        self._exact_lock = threading.Lock()
        #: exact scoring's block cache: blocks found / decompressed
        self.exact_cache_stats = {"hits": 0, "misses": 0}

    # -- facts -----------------------------------------------------------------------
    @property
    def ids(self) -> IdMap:
        """The live ids, in row order (position i = the i-th live document, as in
        :meth:`decompressed`)."""
        return self._rows.live()

    @property
    def deleted(self) -> np.ndarray:
        """bool ``[n_rows]``: the tombstone mask (read-only view)."""
        v = self._rows.deleted.view()
        v.flags.writeable = False
        return v

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    @property
    def nbits(self) -> int:
        return self.codec.nbits

    @property
    def refine_kind(self) -> str | None:
        """``"float16"`` or ``"int8"`` when refinement vectors are kept (:mod:`.refine`),
        else ``None``."""
        return kind_of(self.refine)

    @property
    def n_centroids(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def n_tokens(self) -> int:
        """Stored tokens (tombstoned documents' included until :meth:`compact`)."""
        return int(self.doc_offsets[-1])

    @property
    def n_rows(self) -> int:
        """Stored documents, tombstoned ones included."""
        return int(self.doc_offsets.shape[0] - 1)

    @property
    def pool_factor(self) -> int:
        """The build's token pool factor (1: not pooled); added documents are pooled alike."""
        return int(self.meta.get("pool_factor", 1))

    @property
    def original_tokens(self) -> int:
        """Stored documents' tokens before pooling (tombstoned ones included, as
        :attr:`n_tokens`)."""
        return self.n_tokens if self.original_lengths is None else int(self.original_lengths.sum())

    def __len__(self) -> int:
        """Live documents."""
        return self._rows.n_live

    def _check(self) -> None:
        """Shape consistency of every array; raises IndexFormatError."""
        def bad(msg: str) -> IndexFormatError:
            return IndexFormatError(f"plaid index arrays are inconsistent: {msg}")

        c, off, codes, res = self.centroids, self.doc_offsets, self.codes, self.residuals
        if c.ndim != 2 or c.shape[0] < 1 or c.shape[1] < 1:
            raise bad(f"centroids have shape {c.shape}")
        if not np.isfinite(np.asarray(c, dtype=np.float32)).all():
            raise bad("a centroid holds NaN or Inf")
        if self.codec.dim != c.shape[1]:
            raise bad(f"codec dim {self.codec.dim} != centroid dim {c.shape[1]}")
        if off.ndim != 1 or off.shape[0] < 2 or off[0] != 0 or np.any(np.diff(off) < 0):
            raise bad("document offsets must start at 0 and never decrease")
        t = int(off[-1])
        if codes.ndim != 1 or codes.shape[0] != t:
            raise bad(f"{codes.shape[0] if codes.ndim == 1 else codes.shape} codes for {t} tokens")
        if res.ndim != 2 or res.shape != (t, self.codec.packed_dim) or res.dtype != np.uint8:
            raise bad(f"residuals {res.shape} {res.dtype}, expected ({t}, {self.codec.packed_dim}) uint8")
        rf, rs = self.refine, self.refine_scale
        if rf is not None:
            try:
                kind = kind_of(rf)
            except ValueError as e:
                raise bad(str(e)) from None
            if rf.shape != (t, c.shape[1]):
                raise bad(f"refinement vectors {rf.shape}, expected ({t}, {c.shape[1]})")
            if (kind == "int8") != (rs is not None):
                raise bad(f"{kind} refinement vectors with{'' if rs is not None else 'out'} scales")
            if rs is not None and (rs.shape != (t,) or rs.dtype != np.float32):
                raise bad(f"refinement scales {rs.shape} {rs.dtype}, expected ({t},) float32")
        elif rs is not None:
            raise bad("refinement scales without refinement vectors")
        if any(p.size and (int(p.min()) < 0 or int(p.max()) >= c.shape[0]) for p in parts(codes)):
            raise bad("a token's centroid code is out of range")
        if len(self._rows) != off.shape[0] - 1:
            raise bad(f"{len(self._rows)} ids for {off.shape[0] - 1} documents")
        try:
            pf = check_pool_factor(self.meta.get("pool_factor", 1))
        except ValueError as e:
            raise bad(str(e)) from None
        ol = self.original_lengths
        if (pf > 1) != (ol is not None):
            raise bad(f"pool_factor {pf} with{'' if ol is not None else 'out'} original_lengths")
        if ol is not None and (ol.shape != (off.shape[0] - 1,) or bool((ol < np.diff(off)).any())):
            raise bad(f"original_lengths of shape {ol.shape} for {off.shape[0] - 1} documents, "
                      "or shorter than a stored document")

    # -- construction ----------------------------------------------------------------
    @classmethod
    def build(cls, doc_embeddings: DocEmbeddingsLike, ids: Sequence[str] | None = None, *,
              nbits: int = 2, n_centroids: int | None = None, path: str | os.PathLike | None = None,
              device: str | torch.device = "auto", seed: int = 0, kmeans_niter: int = 4,
              sample_per_centroid: int = _SAMPLE_PER_CENTROID, model: dict | None = None,
              codec: str = "product", pool_factor: int = 1, refine: str | None = None,
              **meta: Any) -> "PlaidIndex":
        """Train centroids and the residual codec on ``doc_embeddings`` and compress them.

        doc_embeddings: a sequence of ``[L_i, d]`` float arrays/tensors, a
        :class:`PackedEmbeddings`, or ``(tokens [T, d], offsets [N + 1])``.
        ``n_centroids`` defaults to PLAID's ``2**floor(log2(16 * sqrt(T)))`` and is always capped
        so that k-means has >= 39 points per centroid. ``model`` (JSON-able) is recorded in the
        manifest. ``codec`` is ``"product"`` (product quantisation of the residuals, the default)
        or ``"scalar"`` (PLAID's per-dimension buckets); both take ``dim * nbits / 8`` bytes a
        token (:mod:`.codec`). ``pool_factor`` (1..8, default 1: off) pools each document's
        tokens first (:func:`colengine.pooling.pool_packed`: about ``1 / pool_factor`` of them
        are kept, the first one always). ``refine`` (``None``, ``"float16"`` or ``"int8"``)
        also keeps every stored token at that precision for the exact stage
        (:mod:`.refine`). Saved to ``path`` when given.
        """
        plaid_build.check_build_args(nbits, n_centroids, codec)
        pool_factor = check_pool_factor(pool_factor)
        refine = check_refine(refine)
        t0 = time.perf_counter()
        docs, ids = build_inputs(doc_embeddings, ids)
        idmap = RowIds(IdMap.check_new(ids))
        original_lengths, pool_s = None, 0.0
        if pool_factor > 1:
            original_lengths = docs.lengths
            tp = time.perf_counter()
            docs = pool_packed(docs, pool_factor)
            pool_s = time.perf_counter() - tp
            meta = {**meta, "pool_factor": pool_factor}
        T = docs.n_tokens
        if T == 0:
            raise ValueError("cannot build a PLAID index: the documents have no tokens")
        k_rule = plaid_build.centroid_rule(T, n_centroids, warn=True)
        k = k_rule["used"]
        dev = resolve_device(device, mps=False)

        # 1. centroids (spherical k-means on a sample) and the codec (from its residuals)
        rows = sample_rows(T, max(k * int(sample_per_centroid), 4096), seed)
        tr = plaid_build.train(docs.tokens[rows], k, nbits, seed, kmeans_niter, dev, codec)
        t1 = time.perf_counter()

        # 2. assign + compress every token, in chunks
        enc = plaid_build.encode_tokens(docs.tokens, tr.assigner, tr.codec)
        ref = refine_encode(docs.tokens, refine) if refine else (None, None)
        t2 = time.perf_counter()
        info = {"seed": seed, "kmeans_niter": kmeans_niter, "kmeans_sample": int(rows.size),
                "n_centroids": k_rule,
                "build_seconds": {"centroids": round(t1 - t0 - pool_s, 3),
                                  "compress": round(t2 - t1, 3)}}
        if pool_factor > 1:
            info["build_seconds"]["pool"] = round(pool_s, 3)
        return cls._finish_build(centroids=tr.centroids, codec=tr.codec, codes=enc.codes,
                                 residuals=enc.residuals,
                                 doc_offsets=np.asarray(docs.offsets, dtype=np.int64), ids=idmap,
                                 normalized=tr.normalized, norm_sum=enc.norm_sum, info=info,
                                 model=model,
                                 meta=meta, device=dev, path=path,
                                 original_lengths=original_lengths, refine=ref)

    @classmethod
    def build_from_iterator(cls, chunks: Iterable[tuple[Sequence[str], DocEmbeddingsLike]]
                            | Callable[[], Iterable[tuple[Sequence[str], DocEmbeddingsLike]]], *,
                            nbits: int = 2, n_centroids: int | None = None,
                            sample_tokens: int = _STREAM_SAMPLE, seed: int = 0,
                            path: str | os.PathLike | None = None,
                            resume_dir: str | os.PathLike | None = None,
                            device: str | torch.device = "auto", kmeans_niter: int = 4,
                            sample_per_centroid: int = _SAMPLE_PER_CENTROID,
                            model: dict | None = None, show_progress: bool = True,
                            codec: str = "product", pool_factor: int = 1,
                            refine: str | None = None, **meta: Any) -> "PlaidIndex":
        """Build from ``(ids, doc_embeddings)`` chunks without holding every float embedding;
        resumable; ``pool_factor`` and ``refine`` as in :meth:`build` (each chunk is pooled
        and refined as it is read).
        See :func:`colengine.index.plaid.streaming.build_from_iterator`."""
        from colengine.index.plaid.streaming import build_from_iterator

        return build_from_iterator(
            cls, chunks, nbits=nbits, n_centroids=n_centroids, sample_tokens=sample_tokens,
            seed=seed, path=path, resume_dir=resume_dir, device=device,
            kmeans_niter=kmeans_niter, sample_per_centroid=sample_per_centroid, model=model,
            show_progress=show_progress, codec=codec, pool_factor=pool_factor, refine=refine,
            **meta)

    @classmethod
    def _finish_build(cls, *, centroids: np.ndarray, codec: ResidualCodec, codes: np.ndarray,
                      residuals: np.ndarray, doc_offsets: np.ndarray, ids: "RowIds",
                      normalized: bool, norm_sum: float, info: dict[str, Any],
                      model: dict | None, meta: dict[str, Any], device: torch.device,
                      path: str | os.PathLike | None,
                      original_lengths: np.ndarray | None = None,
                      refine: tuple[np.ndarray | None, np.ndarray | None] = (None, None)
                      ) -> "PlaidIndex":
        """The common tail of every build: the index object, its lists (timed), the save."""
        t = time.perf_counter()
        T = int(doc_offsets[-1])
        idx = cls(centroids=centroids, codec=codec, codes=codes, residuals=residuals,
                  doc_offsets=doc_offsets, ids=ids, normalized=normalized,
                  meta={**meta, **({"model": model} if model else {}), "build": info,
                        "drift": fresh_drift(len(ids), T, norm_sum / T)},
                  device=device, original_lengths=original_lengths, refine=refine[0],
                  refine_scale=refine[1])
        idx._get_lists()
        idx.meta["build"]["build_seconds"]["lists"] = round(time.perf_counter() - t, 3)
        if path is not None:
            idx.save(path)
        return idx

    # -- derived structures ------------------------------------------------------------
    def _get_lists(self) -> Lists:
        if self._lists is None:
            self._lists = build_lists(np.asarray(self.codes), self.doc_offsets, self.n_centroids,
                                      deleted=self._rows.deleted)
            release_free_memory()   # the build's temporaries: tens of MB per million tokens
        return self._lists

    def _invalidate(self, lists: bool = True) -> None:
        if lists:   # rows renumbered or re-encoded: decompressed blocks are stale
            self._lists = None
            self._bufs = {}
            with self._exact_lock:
                self._exact_cache = OrderedDict()   # a new one: late inserts go to the old
                self._exact_cache_nbytes = 0
        self._state = None
        self._saved_at = None
        self._version += 1

    def _search_state(self) -> SearchState:
        if self._state is None:
            dead = self._rows.deleted
            # bfloat16 where the CPU multiplies it natively, else the cached float32 centroids
            # themselves (nothing writes into a search state)
            c = self._state_c
            if c is None or c[0] is not self.centroids:
                c = (self.centroids,
                     state_centroids(self.centroids, self.device, self._centroids32))
                self._state_c = c
            cent = c[1]
            live = torch.from_numpy(~dead).to(self.device) if dead.any() else None
            self._state = self._state_of(self._get_lists(), cent, self.n_rows, live,
                                         self.codes, self.residuals, self.doc_offsets,
                                         refine=(self.refine, self.refine_scale))
        return self._state

    def _state_of(self, L: Lists, centroids: torch.Tensor, n_rows: int,
                  live: torch.Tensor | None, codes: np.ndarray, residuals: np.ndarray,
                  doc_offsets: np.ndarray, prev: SearchState | None = None,
                  refine: tuple[np.ndarray | None, np.ndarray | None] = (None, None)
                  ) -> SearchState:
        """The search state of lists ``L`` and the token arrays. On the CPU every tensor
        shares its array's memory (lists and token arrays are only written past the ends an
        earlier state reads: :mod:`.ivf`, :meth:`_grow`). On a GPU, ``prev`` (the state of
        this index before rows were appended) lends its uploaded token tensors, so only the
        new tail is copied."""
        dev = self.device

        def t(a: np.ndarray, dtype=np.int64) -> torch.Tensor:
            a = np.ascontiguousarray(a, dtype=dtype)
            return torch.from_numpy(a if a.flags.writeable else a.copy()).to(dev)

        def tokens(a: np.ndarray, old: torch.Tensor | None, dtype=None) -> torch.Tensor:
            if dev.type == "cpu":   # shared as they are (a memory map is only read): no copy
                return a.tensor() if isinstance(a, AppendedRows) else readonly_tensor(a)
            start = 0 if old is None else old.shape[0]
            tail = torch.from_numpy(np.array(a[start:])).to(dev, dtype)
            return tail if old is None else torch.cat([old, tail])

        def opt(a: np.ndarray | None, old: torch.Tensor | None) -> torch.Tensor | None:
            return None if a is None else tokens(a, old)

        return SearchState(
            centroids=centroids, ivf_starts=t(L.ivf_starts), ivf_lens=t(L.ivf_lens),
            ivf_docs=t(L.ivf_docs, L.ivf_docs.dtype), doc_code_offsets=t(L.doc_code_offsets),
            doc_codes=t(L.doc_codes, L.doc_codes.dtype), n_docs=n_rows,
            tok_offsets=tokens(doc_offsets, None if prev is None else prev.tok_offsets, torch.int64),
            codes=tokens(codes, None if prev is None else prev.codes, torch.int64),
            residuals=tokens(residuals, None if prev is None else prev.residuals),
            codec=self.codec, normalized=self.normalized, live=live,
            refine=opt(refine[0], None if prev is None else prev.refine),
            refine_scale=opt(refine[1], None if prev is None else prev.refine_scale))

    def decompress_docs(self, positions: torch.Tensor):
        """Decompressed tokens of the stored rows ``positions`` (int64 [M]): (float32 tokens
        [T', d], int64 offsets [M + 1]) on the index device (:meth:`SearchState.decompress`)."""
        return self._search_state().decompress(positions)

    # -- search ----------------------------------------------------------------------
    def search(self, query_embeddings: torch.Tensor | np.ndarray, k: int = 10, *,
               query_lengths: torch.Tensor | None = None, allowed: np.ndarray | None = None,
               **knobs: Unpack[KnobOverrides]) -> list[list[Hit]]:
        """Top-``k`` documents per query; ``B`` lists of :class:`Hit`, best first.

        Knobs (:class:`~colengine.index.plaid.search.Knobs`; left out or ``None`` = the
        index's default for ``k``, :meth:`default_knobs`: the tuned ones after
        :meth:`tune`): ``n_probe`` centroids per query token for candidates;
        ``centroid_score_threshold`` for stage-2 pruning (pass ``None`` to disable pruning);
        ``n_candidates`` kept after stage 2; ``n_exact`` kept after stage 3 and scored exactly
        on decompressed vectors. Tombstoned documents are never returned.

        ``allowed`` (a metadata filter): bool ``[len(self)]`` over :attr:`ids` positions; only
        those documents are candidates. When they hold at most :attr:`exact_filter_tokens`
        tokens they are all scored exactly; otherwise ``n_probe`` grows to ``n_probe /
        selectivity`` (:func:`~colengine.index.plaid.search.filtered_n_probe`) so that the
        probed lists still hold enough allowed documents.
        """
        scores, pos = self.search_topk(query_embeddings, k, query_lengths=query_lengths,
                                       allowed=allowed, **knobs)
        return hits_from_topk(scores, pos, self._rows)  # type: ignore[arg-type]

    # -- knobs and tuning ------------------------------------------------------------
    def default_knobs(self, k: int = 10) -> Knobs:
        """The knobs a search for top-``k`` uses when none are given: the ones :meth:`tune`
        stored for this ``k`` if any, else PLAID's defaults (:meth:`Knobs.for_k`); either way
        scaled to the corpus (:func:`~colengine.index.plaid.tune.corpus_knobs`: n_candidates
        and n_exact never above the live documents, which changes no result)."""
        from colengine.index.plaid.tune import corpus_knobs, knobs_from_dict

        k = check_positive_int("k", k)
        rec = self.meta.get("tuned", {}).get(str(k))
        kn = knobs_from_dict(k, rec["knobs"]) if rec else Knobs.for_k(k)
        return corpus_knobs(kn, len(self))

    def tune(self, sample_queries: torch.Tensor | np.ndarray | None = None, *,
             target_recall: float = 0.95, k: int = 10, n_sample: int = 256,
             query_lengths: torch.Tensor | None = None,
             reference: DocEmbeddingsLike | None = None, seed: int = 0,
             grid: Sequence[Knobs] | None = None, store: bool = True,
             reference_hits: Sequence[Sequence[tuple[str, float]]] | None = None
             ) -> "TuneResult":
        """Pick the cheapest search knobs whose recall of the exact top-``k`` reaches
        ``target_recall`` on a sample, and make them this index's defaults for ``k``.

        ``sample_queries`` (``[B, Lq, d]``, optional ``query_lengths``): up to ``n_sample``
        of them are used (a seeded random subset). Without them, ``n_sample`` pseudo-queries
        are made from random documents' decompressed tokens (up to 4 each, plus a little
        noise). The exact top-``k`` is MaxSim over the index's own decompressed vectors, or
        over ``reference`` (the original float vectors, in the order of :attr:`ids`; then
        compression caps the reachable recall), or given: ``reference_hits``, each sample
        query's exact top list of ``(id, score)`` pairs, best first (computed once elsewhere,
        e.g. by streaming a corpus too large to score here; it must reach past the scores
        tied with the ``k``-th). Ties within 1e-4 of the ``k``-th exact score count as hits.
        Settings of a small grid (or ``grid``) are tried in increasing modelled cost; when
        even the most permissive misses the target it is kept as the best reached
        (``reached=False``; nothing raises). See :mod:`colengine.index.plaid.tune`.

        With ``store`` (default) the knobs become :meth:`default_knobs` for ``k`` and are
        recorded in :attr:`meta` (saved in the manifest by :meth:`save`; reported by
        :meth:`stats`); knobs passed to :meth:`search` still win, other ``k`` keep PLAID's
        defaults. Bad arguments (target outside (0, 1], ``k`` or ``n_sample`` < 1, ...)
        raise before any work.
        """
        from colengine.index.plaid.tune import tune_knobs

        res = tune_knobs(self, sample_queries, target_recall=target_recall, k=k,
                         n_sample=n_sample, query_lengths=query_lengths, reference=reference,
                         seed=seed, grid=grid, reference_hits=reference_hits)
        if store:
            self.meta.setdefault("tuned", {})[str(res.k)] = res.to_meta()
        return res

    def clear_tuning(self, k: int | None = None) -> None:
        """Forget the tuned knobs for ``k`` (every ``k`` when ``None``)."""
        tuned = self.meta.get("tuned", {})
        if k is None:
            tuned.clear()
        else:
            tuned.pop(str(check_positive_int("k", k)), None)

    def search_topk(self, query_embeddings: torch.Tensor | np.ndarray, k: int = 10, *,
                    query_lengths: torch.Tensor | None = None, allowed: np.ndarray | None = None,
                    **knobs: Unpack[KnobOverrides]) -> tuple[torch.Tensor, torch.Tensor]:
        """Like :meth:`search` but returns (scores [B, k'], stored rows [B, k'], -1 = none)
        as CPU tensors."""
        kn = self.default_knobs(k).replace(**knobs)
        q, ql = as_query_batch(query_embeddings, self.dim, query_lengths)
        # the engine builds the kernel's inputs itself: the unchecked entry point (no per-call
        # value checks, which on a GPU are a device sync per stage-4 block)
        from colengine.kernels import score_candidates_packed_unchecked as score_candidates_packed

        allowed_t = None
        live = self._rows.live_rows()
        if allowed is None and k >= live.shape[0]:
            # every live document is wanted: score them all exactly (probing could miss one)
            return self._score_rows_topk(q, ql, int(k), live, score_candidates_packed)
        if allowed is not None:
            rows = live[check_allowed(allowed, len(self))]
            lens = np.diff(np.asarray(self.doc_offsets))
            if k >= rows.shape[0] or int(lens[rows].sum()) <= self.exact_filter_tokens:
                return self._score_rows_topk(q, ql, int(k), rows, score_candidates_packed)
            allowed_t = torch.zeros(self.n_rows, dtype=torch.bool)
            allowed_t[torch.from_numpy(rows)] = True
            allowed_t = allowed_t.to(self.device)
            sel = rows.shape[0] / max(1, len(self))
            kn = kn.replace(n_probe=filtered_n_probe(kn.n_probe, sel, self.n_centroids))
        st = self._search_state()
        compiled = compiled_stages(self.device, kn.n_probe, self.n_centroids)
        step = query_chunk(self.n_rows, q.shape[1], self.device,
                           n_postings=(int(st.ivf_lens.sum())
                                       if kn.centroid_score_threshold is None else None),
                           n_centroids=self.n_centroids if compiled else None)
        outs_s, outs_p = [], []
        with torch.inference_mode():
            for a in range(0, q.shape[0], step):
                s, p = plaid_search(q[a:a + step], ql[a:a + step], int(k), kn, st,
                                    score_candidates_packed, allowed_t)
                outs_s.append(s.cpu())
                outs_p.append(p.cpu())
        if q.shape[0] >= _TRIM_BATCH and self.device.type == "cpu":
            # a batch's temporaries (tens of MB) would otherwise stay resident for good;
            # a single query's are small and reused, and trimming them would cost page faults
            release_free_memory()
        return torch.cat(outs_s), torch.cat(outs_p)

    def score(self, query_embeddings: torch.Tensor | np.ndarray, ids: Sequence[str],
              query_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Exact MaxSim (on the decompressed or refinement vectors) of each query against the
        live documents ``ids``: float32 ``[B, len(ids)]`` on the CPU, in the order of ``ids``
        (reranking). Unknown or deleted ids raise :class:`UnknownIdError`."""
        from colengine.kernels import score_candidates_packed_unchecked

        ids = as_id_list(ids, "ids")
        q, ql = as_query_batch(query_embeddings, self.dim, query_lengths)
        rows = self._rows.rows(ids)
        out = torch.empty((q.shape[0], rows.shape[0]), dtype=torch.float32)
        with torch.inference_mode():
            for a, _, s in self._score_blocks(q, ql, rows, score_candidates_packed_unchecked,
                                              cached=False):
                out[:, a:a + s.shape[1]] = s
        return out

    def _score_rows_topk(self, q: torch.Tensor, ql: torch.Tensor, k: int, rows: np.ndarray,
                         score_candidates_packed) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact MaxSim of every query against the stored ``rows`` (decompressed in blocks);
        top ``k`` as (scores [B, k'], rows [B, k']) CPU tensors."""
        B = q.shape[0]
        best_s = torch.full((B, 0), float("-inf"))
        best_i = torch.zeros((B, 0), dtype=torch.int64)
        with torch.inference_mode():
            for _, r, s in self._score_blocks(q, ql, rows, score_candidates_packed, cached=True):
                all_s = torch.cat([best_s, s], dim=1)
                all_i = torch.cat([best_i, r.cpu().unsqueeze(0).expand(B, -1)], dim=1)
                top = torch.topk(all_s, k=min(k, all_s.shape[1]), dim=1, sorted=True)
                best_s, best_i = top.values, torch.gather(all_i, 1, top.indices)
        best_i = torch.where(best_s > float("-inf"), best_i, torch.full_like(best_i, -1))
        return best_s, best_i

    def _score_blocks(self, q: torch.Tensor, ql: torch.Tensor, rows: np.ndarray, score_fn, *,
                      cached: bool):
        """Exact MaxSim of every query against the stored ``rows``: yields (start in ``rows``,
        the block's rows on the device, scores ``[B, block]`` on the CPU). With ``cached`` and
        no refinement vectors read in place (:func:`.search.reads_refine_in_place`), the rows
        are decompressed :data:`_EXACT_BLOCK_ROWS` documents at a time on the CPU through the
        block cache; otherwise each block goes to :func:`.search.score_stored`
        (:data:`_IN_PLACE_BLOCK_ROWS` documents at a time for refinement vectors read in
        place: no copy is made, so blocks only amortise the caller's per-block top-k)."""
        st = self._search_state()
        in_place = reads_refine_in_place(st)
        step = (_IN_PLACE_BLOCK_ROWS if in_place else _EXACT_BLOCK_ROWS) \
            if self.device.type == "cpu" else 1 << 16
        qd, qld = q.to(self.device), ql.to(self.device)
        for a in range(0, rows.shape[0], step):
            r = torch.from_numpy(rows[a:a + step]).to(self.device)
            if cached and not in_place:
                tokens, offsets = self._decompressed_block(rows[a:a + step], r)
                local = torch.arange(r.shape[0], device=self.device).unsqueeze(0)
                s = score_fn(qd, qld, tokens, offsets, local.expand(q.shape[0], -1).contiguous())
            else:
                s = score_stored(qd, qld, r.unsqueeze(0).expand(q.shape[0], -1).contiguous(),
                                 st, score_fn)
            yield a, r, s.cpu()

    def _decompressed_block(self, rows: np.ndarray, r: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`decompress_docs` of ``rows``, through the block cache on the CPU (see
        :attr:`exact_cache_bytes`). Safe with concurrent searches."""
        budget = self.exact_cache_bytes if self.device.type == "cpu" else 0
        if budget <= 0:
            return self.decompress_docs(r)
        key = np.ascontiguousarray(rows, dtype=np.int64).tobytes()
        with self._exact_lock:
            hit = self._exact_cache.get(key)
            if hit is not None:
                self._exact_cache.move_to_end(key)
                self.exact_cache_stats["hits"] += 1
                return hit
            self.exact_cache_stats["misses"] += 1
            cache = self._exact_cache
        tokens, offsets = self.decompress_docs(r)
        size = tokens.numel() * tokens.element_size()
        if size <= budget:
            with self._exact_lock:
                if cache is self._exact_cache and key not in cache:  # not dropped meanwhile
                    cache[key] = (tokens, offsets)
                    self._exact_cache_nbytes += size
                    while self._exact_cache_nbytes > budget:
                        old, _ = cache.popitem(last=False)[1]
                        self._exact_cache_nbytes -= old.numel() * old.element_size()
        return tokens, offsets

    # -- mutation --------------------------------------------------------------------
    def add(self, doc_embeddings: DocEmbeddingsLike, ids: Sequence[str] | None = None) -> list[str]:
        """Append documents, assigned to the existing centroids and compressed with the
        existing codec (no retraining); returns their ids. The ids must be new among the live
        documents (a deleted id may come back); nothing changes if any is bad
        (:class:`DuplicateIdError`). Warns (``UserWarning``, once until :meth:`retrain`) when
        :meth:`drift` becomes high. A pooled index pools the new documents alike.

        The cost is that of the new documents, not of the index: tokens go to the spare
        capacity of growable arrays, the inverted lists take the new (document, centroid)
        pairs without a re-sort, and the search state is carried over (see
        :meth:`prepare_add`, which does all of it without changing what searches see)."""
        return self.commit_add(self.prepare_add(doc_embeddings, ids))

    def prepare_add(self, doc_embeddings: DocEmbeddingsLike,
                    ids: Sequence[str] | None = None) -> "PreparedAdd":
        """The expensive part of :meth:`add`, done without changing what searches see: ids
        checked, tokens assigned and compressed into the spare capacity past the arrays'
        ends, the new inverted lists and search state built. :meth:`commit_add` then swaps
        them in (a few attribute stores): a server holds its readers off only for that.
        Nothing may change the index between the two calls (a stale preparation raises)."""
        new = as_packed(doc_embeddings, dim=self.dim)
        auto = ids is None
        counter = None
        if auto:
            ids, counter = auto_ids(self.next_auto_id, len(new), self._rows)
        ids = IdMap.check_new(ids, self._rows)  # type: ignore[arg-type]
        if len(ids) != len(new):
            raise ValueError(f"got {len(ids)} ids for {len(new)} documents")
        if not ids:
            return PreparedAdd(self._version, [], None, None, None, None, None, 0, 0.0, counter)
        new_original = new.lengths
        new = pool_packed(new, self.pool_factor)
        enc = plaid_build.encode_tokens(new.tokens, self._add_assigner(new.n_tokens), self.codec)
        codes, residuals, norm_sum = enc.codes.astype(self.codes.dtype), enc.residuals, enc.norm_sum
        new_off = np.asarray(new.offsets, dtype=np.int64)
        all_codes = self._grow("codes", codes)
        all_res = self._grow("residuals", residuals)
        all_off = self._grow("doc_offsets", self.doc_offsets[-1] + new_off[1:])
        all_ref: tuple[np.ndarray | None, np.ndarray | None] = (None, None)
        if self.refine is not None:
            vec, scale = refine_encode(new.tokens, self.refine_kind)
            all_ref = (self._grow("refine", vec),
                       None if scale is None else self._grow("refine_scale", scale))
        all_orig = None if self.original_lengths is None else np.concatenate(
            [self.original_lengths, new_original])
        lists = state = None
        if self._lists is not None:
            lists = extend_lists(self._lists, codes, new_off, self.n_centroids)
            if self._state is not None:
                st = self._state
                live = None if st.live is None else torch.cat(
                    [st.live, torch.ones(len(ids), dtype=torch.bool, device=st.device)])
                state = self._state_of(lists, st.centroids, all_off.shape[0] - 1, live,
                                       all_codes, all_res, all_off, prev=st, refine=all_ref)
        return PreparedAdd(self._version, ids, all_codes, all_res, all_off, lists, state,
                           new.n_tokens, norm_sum, counter, all_orig, *all_ref)

    def commit_add(self, p: "PreparedAdd") -> list[str]:
        """Swap in what :meth:`prepare_add` built; returns the new documents' ids."""
        if p.version != self._version:
            raise RuntimeError("the index changed between prepare_add and commit_add")
        if not p.ids:
            return []
        self._rows.extend(p.ids)
        self.codes, self.residuals, self.doc_offsets = p.codes, p.residuals, p.doc_offsets
        if self.refine is not None:
            self.refine, self.refine_scale = p.refine, p.refine_scale
        if p.original_lengths is not None:
            self.original_lengths = p.original_lengths
        if p.counter is not None:
            self.next_auto_id = p.counter
        d = self.meta["drift"]
        record_added(d, p.n_tokens, p.norm_sum)
        self._invalidate(lists=False)
        self._lists, self._state = p.lists, p.state
        dr = self.drift()
        if dr["high"] and not d.get("warned"):
            d["warned"] = True
            ratio = dr["residual_norm_ratio"]
            warnings.warn(
                f"PLAID index drift is high: {dr['added_token_share']:.0%} of the live tokens were "
                "added after the centroids were trained (residual norm ratio "
                f"{'n/a' if ratio is None else f'{ratio:.3f}'}); search quality may degrade: "
                "call retrain()", UserWarning, stacklevel=3)
        return p.ids

    def _grow(self, name: str, tail: np.ndarray) -> np.ndarray | AppendedRows:
        """``getattr(self, name)`` followed by ``tail``, written into the spare capacity of a
        buffer this index owns (amortised: the buffer grows by a quarter when full). The
        current array is not touched (readers may hold it): only rows past its end are
        written, so the result is a new, longer view of the same buffer. A read-only token
        store (a loaded index's memory-mapped codes, residuals, refinement vectors and
        scales: :data:`_TWO_PART`) is not copied: the result is that store followed by the
        new rows in a buffer of their own (:class:`~colengine.appended.AppendedRows`), so the
        first add to a large loaded index costs what the new rows cost."""
        cur = getattr(self, name)
        if isinstance(cur, AppendedRows):
            return cur.append(tail)
        if name in _TWO_PART and isinstance(cur, np.ndarray) and not cur.flags.writeable:
            # a read-only store (memory-mapped from the saved files) stays where it is; kept
            # as the map itself, so that a save links its file instead of writing it again
            return AppendedRows.of(cur, tail)
        cur = np.asarray(cur)
        n, m = cur.shape[0], tail.shape[0]
        buf = self._bufs.get(name)
        if (buf is None or cur.base is not buf or cur.ctypes.data != buf.ctypes.data
                or buf.shape[0] < n + m or buf.dtype != cur.dtype):
            cap = max(n + m, n + n // 4 + 1024)
            buf = np.empty((cap, *cur.shape[1:]), dtype=cur.dtype)
            buf[:n] = cur
            self._bufs[name] = buf
        buf[n:n + m] = tail
        return buf[:n + m]

    def _add_assigner(self, n_tokens: int) -> plaid_build.Assigner:
        """The assigner for an add of ``n_tokens`` tokens. A centroid index (what a build
        assigns with: faiss, or two-level groups past 65,536 centroids) costs a build of its
        own, so a few small adds take the exact arg-max over every centroid; once the tokens
        added since the load (or the last retrain) reach
        :data:`~colengine.index.plaid.build.EXACT_ASSIGN_TOKENS` the index is built and kept
        until the centroids change (the exact arg-max of one 256-token document: 26 ms over
        SciFact's 16,384 centroids, ~8x that over 131,072 at 1M documents)."""
        c = self._add_asg
        if c is None or c[0] is not self.centroids:
            c = (self.centroids, 0, None)
        cent, exact, asg = c
        if asg is None:
            exact += n_tokens
            if exact >= plaid_build.EXACT_ASSIGN_TOKENS or self.device.type != "cpu":
                asg = plaid_build.make_assigner(self._centroids32(), self.device)
            self._add_asg = (cent, exact, asg)
        if asg is not None:
            return asg
        return plaid_build.make_assigner(self._centroids32(), self.device, n_tokens)

    def take_add_assigner(self, other: Any) -> bool:
        """Keep ``other``'s assigner for adds (:meth:`_add_assigner`) when it holds the same
        centroids: a server that maps a newly saved generation of its own index would build
        it again otherwise. ``other``: a PLAID index (or an index of passages over one)."""
        other = getattr(other, "inner", other)
        c = getattr(other, "_add_asg", None)
        if c is None or c[2] is None or c[0] is not other.centroids:
            return False
        mine, theirs = np.asarray(self.centroids), np.asarray(other.centroids)
        if mine.shape != theirs.shape or not np.array_equal(mine, theirs):
            return False
        self._add_asg = (self.centroids, c[1], c[2])
        return True

    def _centroids32(self) -> np.ndarray:
        """The float32 centroids (cached: centroids change only by :meth:`retrain`)."""
        c = self._c32
        if c is None or c[0] is not self.centroids:
            c = (self.centroids, np.asarray(self.centroids).astype(np.float32))
            self._c32 = c
        return c[1]

    #: the persistent counter of automatic ids (saved with the index; never reused)
    next_auto_id = AutoIdCounter(lambda index: index.n_rows)

    def delete(self, ids: Sequence[str]) -> None:
        """Tombstone documents by id: they are never returned again and their ids may be
        added again. Every id must be live and given once (:class:`UnknownIdError`,
        :class:`DuplicateIdError`; nothing changes otherwise). The stored rows are dropped by
        :meth:`compact`, which :meth:`save` runs, and which runs here as soon as tombstones
        are more than ``auto_compact_share`` (default 25%) of the stored rows: candidate
        generation scans every stored row, so tombstones would otherwise slow search down."""
        ids = as_id_list(ids)
        if len(set(ids)) != len(ids):
            raise DuplicateIdError("delete got the same document id twice")
        rows = self._rows.rows(ids)
        if rows.size and rows.size >= len(self):
            raise ValueError("deleting every document would leave an empty index")
        if not rows.size:
            return
        self._rows.tombstone(rows)
        if self._rows.n_deleted > self.auto_compact_share * self.n_rows:
            self.compact()
            return
        if self._lists is not None:
            dead = np.zeros(self.n_rows, dtype=bool)
            dead[rows] = True
            self._lists = drop_docs(self._lists, dead)
        self._invalidate(lists=False)

    def compact(self) -> int:
        """Drop the tombstoned rows (their tokens, codes, residuals); returns how many.
        Live documents keep their ids, vectors and scores; internal rows are renumbered."""
        dead = self._rows.deleted
        n = int(dead.sum())
        if n == 0:
            return 0
        keep = ~dead
        lens = np.diff(self.doc_offsets)
        tok_keep = np.repeat(keep, lens)
        self.codes = take_rows(self.codes, tok_keep)
        self.residuals = take_rows(self.residuals, tok_keep)
        self.refine, self.refine_scale = self._refine_of(tok_keep)
        new_off = np.zeros(int(keep.sum()) + 1, dtype=np.int64)
        np.cumsum(lens[keep], out=new_off[1:])
        self.doc_offsets = new_off
        if self.original_lengths is not None:
            self.original_lengths = self.original_lengths[keep]
        d = self.meta["drift"]
        d["trained_rows"] = int(keep[:int(d["trained_rows"])].sum())
        self._rows = self._rows.compacted()
        self.meta["compacted_rows"] = int(self.meta.get("compacted_rows", 0)) + n
        self._invalidate()
        return n

    def _refine_of(self, tok_keep: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The refinement (vectors, scales) of the stored tokens where ``tok_keep`` is True
        (``(None, None)`` when none are kept)."""
        def take(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else take_rows(a, tok_keep)

        return take(self.refine), take(self.refine_scale)

    # -- drift -----------------------------------------------------------------------
    def drift(self) -> dict[str, Any]:
        """How far the index has moved from what its centroids and codec were trained on:
        :func:`~colengine.index.plaid.drift.drift_report` of its record (``high``: time to
        :meth:`retrain`). After a retrain the trained norm is measured on the decompressed
        tokens it was trained on, which sit closer to the centroids than fresh embeddings do.
        """
        return drift_report(self.meta["drift"], np.diff(self.doc_offsets), self._rows.deleted)

    def retrain(self, *, n_centroids: int | None = None, seed: int | None = None,
                kmeans_niter: int | None = None) -> None:
        """Re-train centroids and codec on the live documents' current (decompressed) tokens
        and re-compress them; tombstones are dropped and drift starts over. ``n_centroids``
        defaults to PLAID's rule for the current number of tokens; ``seed`` and
        ``kmeans_niter`` to the build's. Holds the live tokens as float16 while it runs.
        A pooled index stays pooled (its stored tokens are not pooled again). An index with
        refinement vectors trains on them (the finer copy) and keeps them as they are."""
        b = self.meta.get("build", {})
        seed = int(b.get("seed", 0)) if seed is None else seed
        kmeans_niter = int(b.get("kmeans_niter", 4)) if kmeans_niter is None else kmeans_niter
        docs = self.decompressed(dtype=np.float16)
        live_ids = list(self.ids)
        live_original = None if self.original_lengths is None else \
            self.original_lengths[self._rows.live_rows()]
        # the live rows' copies, in the new index's row order
        ref = self._refine_of(np.repeat(~self._rows.deleted, np.diff(self.doc_offsets)))
        new = PlaidIndex.build(docs, live_ids, nbits=self.nbits, n_centroids=n_centroids,
                               device=self.device, seed=seed, kmeans_niter=kmeans_niter)
        del docs
        self.centroids, self.codec = new.centroids, new.codec
        self.codes, self.residuals, self.doc_offsets = new.codes, new.residuals, new.doc_offsets
        self._rows = new._rows
        self.original_lengths = live_original
        self.refine, self.refine_scale = ref
        self.meta["build"] = new.meta["build"]
        self.meta["drift"] = new.meta["drift"]
        self.meta["retrained"] = int(self.meta.get("retrained", 0)) + 1
        self._invalidate()
        self._lists = new._lists

    def embeddings_of(self, ids: Sequence[str]) -> list[np.ndarray]:
        """Decompressed float16 token matrices of ``ids`` (what stage 4 scores: the
        refinement vectors when kept)."""
        pos = self._rows.rows(list(ids))
        with torch.inference_mode():
            toks, off = self.decompress_docs(torch.from_numpy(pos))
        toks = toks.to("cpu", torch.float16).numpy()
        off = off.cpu().numpy()
        return [toks[off[i]:off[i + 1]] for i in range(pos.size)]

    def decompressed(self, dtype=np.float32) -> PackedEmbeddings:
        """Every live document decompressed, in the order of :attr:`ids` (e.g. to compare with
        exhaustive search). Decompressed in blocks of documents."""
        rows = self._rows.live_rows()
        lens = np.diff(self.doc_offsets)[rows]
        off = np.zeros(rows.size + 1, dtype=np.int64)
        np.cumsum(lens, out=off[1:])
        out = np.empty((int(off[-1]), self.dim), dtype=dtype)
        step = 4096
        with torch.inference_mode():
            for a in range(0, rows.size, step):
                toks, _ = self.decompress_docs(torch.from_numpy(rows[a:a + step]))
                out[off[a]:off[min(rows.size, a + step)]] = toks.cpu().numpy()
        return PackedEmbeddings(out, off)

    # -- persistence -----------------------------------------------------------------
    def to_bundle(self) -> Bundle:
        """The index as stored, tombstones included (``deleted`` mask); :meth:`save` compacts
        first by default."""
        arrays = {
            **centroid_arrays(self.centroids),
            "codes": self.codes,
            "residuals": self.residuals,
            "doc_offsets": self.doc_offsets,
            **self.codec.to_arrays(),
            **self._rows.to_arrays(),
            **({} if self.original_lengths is None else {"original_lengths": self.original_lengths}),
            **({} if self.refine is None else {"refine": self.refine}),
            **({} if self.refine_scale is None else {"refine_scale": self.refine_scale}),
        }
        meta = {
            **self.meta,
            # without refinement vectors the layout is format 4's: older readers still read it
            "plaid_format": PLAID_FORMAT if self.refine is not None else 4,
            "refine": self.refine_kind,
            "dim": self.dim,
            "nbits": self.nbits,
            "n_centroids": self.n_centroids,
            "n_documents": len(self),
            "n_rows": self.n_rows,
            "n_tokens": self.n_tokens,
            "normalized": self.normalized,
            "codes_dtype": np.dtype(self.codes.dtype).name,
        }
        return Bundle(kind=self.kind, meta=meta, arrays=arrays)

    @classmethod
    def from_bundle(cls, bundle: Bundle, *, device: str | torch.device = "auto") -> "PlaidIndex":
        a, m = bundle.arrays, bundle.meta
        if m.get("plaid_format") not in _READABLE_FORMATS:
            raise IndexFormatError(
                f"plaid index layout version {m.get('plaid_format')!r} is not supported "
                f"(this colengine reads {list(_READABLE_FORMATS)})")
        try:
            nbits = int(m["nbits"])
            codec = codec_from_arrays(a, nbits)
            ids = RowIds.from_arrays(a)
            idx = cls(centroids=centroids_from_arrays(a), codec=codec, codes=a["codes"],
                      residuals=a["residuals"], doc_offsets=np.asarray(a["doc_offsets"]),
                      ids=ids, normalized=bool(m["normalized"]),
                      meta={k: v for k, v in m.items() if k not in _DERIVED_META}, device=device,
                      original_lengths=(np.asarray(a["original_lengths"])
                                        if "original_lengths" in a else None),
                      refine=a.get("refine"), refine_scale=a.get("refine_scale"))
            if m.get("refine") != idx.refine_kind:
                raise IndexFormatError(f"plaid index manifest says refine={m.get('refine')!r}, "
                                       f"arrays say {idx.refine_kind!r}")
            for k_str in idx.meta.get("tuned", {}):   # tuned knobs must read back as knobs
                idx.default_knobs(int(k_str))
        except IndexFormatError:
            raise
        except (KeyError, ValueError, TypeError, UnicodeDecodeError) as e:
            raise IndexFormatError(f"plaid index is inconsistent: {e!r}") from e
        for key, val in (("dim", idx.dim), ("n_centroids", idx.n_centroids),
                         ("n_documents", len(idx)), ("n_tokens", idx.n_tokens),
                         ("n_rows", idx.n_rows)):
            if key == "n_rows" and key not in m:
                continue
            if m.get(key) != val:
                raise IndexFormatError(f"plaid index manifest says {key}={m.get(key)!r}, arrays say {val}")
        return idx

    def save(self, path: str | os.PathLike, *, compact: bool = True) -> None:
        """Write atomically (``save_bundle``: new generation + manifest swap). Tombstoned
        rows are compacted away first unless ``compact=False`` (then the mask is stored)."""
        if compact:
            self.compact()
        bundle = self.to_bundle()
        save_bundle(path, bundle, expected_generation=expected_generation(self, path))
        self._saved_at = Path(path)
        self._saved = (os.path.abspath(path), bundle.generation)

    @classmethod
    def load(cls, path: str | os.PathLike, *, mmap: bool = True, verify: bool = True,
             device: str | torch.device = "auto") -> "PlaidIndex":
        b = load_bundle(path, kind=cls.kind, mmap=mmap, verify=verify)
        try:
            idx = cls.from_bundle(b, device=device)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise IndexFormatError(f"{path}: malformed plaid index ({type(e).__name__}: {e})") from None
        idx._saved_at = Path(path)
        idx._saved = (os.path.abspath(path), b.generation)
        return idx

    def disk_bytes(self) -> int:
        """Bytes of every file of the index on disk (manifest included); estimated from the
        arrays (``.npy`` headers of 128 bytes, manifest of a saved copy) if not saved."""
        if self._saved_at is not None and (self._saved_at / MANIFEST).is_file():
            root = self._saved_at
            man = json.loads((root / MANIFEST).read_text())
            return (root / MANIFEST).stat().st_size + sum(
                entry_bytes(e) for e in man["arrays"].values())
        b = self.to_bundle()
        return sum((v.nbytes if isinstance(v, AppendedRows) else np.asarray(v).nbytes) + 128
                   for v in b.arrays.values()) + 2048

    def stats(self) -> dict[str, Any]:
        nbytes = self.disk_bytes()
        L = self._get_lists()
        live_tokens = int(np.diff(self.doc_offsets)[~self._rows.deleted].sum())
        return {
            "kind": self.kind,
            "documents": len(self),
            "deleted_documents": self._rows.n_deleted,
            "tokens": live_tokens,
            "stored_tokens": self.n_tokens,
            "dim": self.dim,
            "nbits": self.nbits,
            "codec": self.codec.kind,
            "refine": self.refine_kind,
            "n_centroids": self.n_centroids,
            "disk_bytes": nbytes,
            "bytes_per_token": nbytes / max(1, self.n_tokens),
            "pool_factor": self.pool_factor,
            "original_tokens": self.original_tokens,
            "bytes_per_original_token": nbytes / max(1, self.original_tokens),
            "ivf_pairs": L.n_pairs,
            "normalized": self.normalized,
            "device": str(self.device),
            "drift": self.drift(),
            # one record per tuned k: knobs, recall reached, target, sample size, ...
            "tuned": [dict(rec) for _, rec in sorted(self.meta.get("tuned", {}).items(),
                                                     key=lambda kv: int(kv[0]))],
        }


_DERIVED_META = ("plaid_format", "dim", "nbits", "n_centroids", "n_documents", "n_rows", "n_tokens",
                 "normalized", "codes_dtype", "refine")
