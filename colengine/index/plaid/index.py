"""The PLAID index: centroids + compressed residuals + inverted lists, searched in four stages."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from colengine.embeddings import DocEmbeddingsLike, PackedEmbeddings, as_packed
from colengine.errors import IndexFormatError
from colengine.ids import IdMap, default_ids
from colengine.index.base import as_query_batch, check_k, hits_from_topk
from colengine.index.plaid.centroids import (
    assign, cap_n_centroids, default_n_centroids, flat_ip_index, sample_rows, train_centroids)
from colengine.index.plaid.codec import VALID_NBITS, ResidualCodec
from colengine.index.plaid.ivf import Lists, build_lists
from colengine.index.plaid.search import SearchState, _DENSE_BUDGET, plaid_search, resolve_knobs
from colengine.storage import MANIFEST, Bundle, load_bundle, save_bundle
from colengine.types import Hit

__all__ = ["PlaidIndex", "PLAID_FORMAT"]

#: version of the array layout below (independent of the storage format version)
PLAID_FORMAT = 1
_CHUNK = 1 << 16          # tokens per compression chunk at build/add time
_SAMPLE_PER_CENTROID = 16  # k-means training points per centroid (PLAID uses every token)
_CODEC_SAMPLE = 1 << 16    # residuals the bucket quantiles are estimated from


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    return torch.device(device)


class PlaidIndex:
    """Late-interaction index in the PLAID layout (Santhanam et al., 2022).

    Every token is stored as the id of its nearest centroid (int16 when there are at most
    32,768 centroids) plus its residual to that centroid, quantised per dimension into
    ``2**nbits`` buckets and bit-packed (``dim * nbits / 8`` bytes). Search narrows the corpus
    with centroid scores and scores the few survivors exactly (see :mod:`.search`).

    Build with :meth:`build`, load with :meth:`load`; ``search`` takes ``[B, Lq, d]`` or
    ``[Lq, d]`` query embeddings and knobs (``n_probe``, ``centroid_score_threshold``,
    ``n_candidates``, ``n_exact``) that default by ``k`` as PLAID's do.

    >>> rng = np.random.default_rng(0)
    >>> docs = [rng.standard_normal((n, 16)).astype(np.float32) for n in (30, 50, 20)]
    >>> idx = PlaidIndex.build(docs, ["a", "b", "c"], nbits=4)
    >>> [h.doc_id for h in idx.search(docs[1], k=1)[0]]
    ['b']
    """

    kind = "plaid"

    def __init__(self, *, centroids: np.ndarray, codec: ResidualCodec, codes: np.ndarray,
                 residuals: np.ndarray, doc_offsets: np.ndarray, ids: IdMap, normalized: bool,
                 meta: dict[str, Any] | None = None, device: str | torch.device = "auto") -> None:
        self.centroids = centroids          # float16 [K, d] (what is stored and searched)
        self.codec = codec
        self.codes = codes                  # int16/int32 [T]
        self.residuals = residuals          # uint8 [T, packed_dim]
        self.doc_offsets = doc_offsets      # int64 [N + 1]
        self.ids = ids
        self.normalized = bool(normalized)
        self.meta = dict(meta or {})
        self.device = resolve_device(device)
        self._check()
        self._lists: Lists | None = None
        self._state: SearchState | None = None
        self._dev_cache: dict[str, torch.Tensor] = {}
        self._saved_at: Path | None = None

    # -- facts -----------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    @property
    def nbits(self) -> int:
        return self.codec.nbits

    @property
    def n_centroids(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def n_tokens(self) -> int:
        return int(self.doc_offsets[-1])

    def __len__(self) -> int:
        return int(self.doc_offsets.shape[0] - 1)

    def _check(self) -> None:
        """Shape consistency of every array; raises IndexFormatError."""
        def bad(msg: str) -> IndexFormatError:
            return IndexFormatError(f"plaid index arrays are inconsistent: {msg}")

        c, off, codes, res = self.centroids, self.doc_offsets, self.codes, self.residuals
        if c.ndim != 2 or c.shape[0] < 1 or c.shape[1] < 1:
            raise bad(f"centroids have shape {c.shape}")
        if self.codec.dim != c.shape[1]:
            raise bad(f"codec dim {self.codec.dim} != centroid dim {c.shape[1]}")
        if off.ndim != 1 or off.shape[0] < 2 or off[0] != 0 or np.any(np.diff(off) < 0):
            raise bad("document offsets must start at 0 and never decrease")
        t = int(off[-1])
        if codes.ndim != 1 or codes.shape[0] != t:
            raise bad(f"{codes.shape[0] if codes.ndim == 1 else codes.shape} codes for {t} tokens")
        if res.ndim != 2 or res.shape != (t, self.codec.packed_dim) or res.dtype != np.uint8:
            raise bad(f"residuals {res.shape} {res.dtype}, expected ({t}, {self.codec.packed_dim}) uint8")
        if t and (int(codes.min()) < 0 or int(codes.max()) >= c.shape[0]):
            raise bad("a token's centroid code is out of range")
        if len(self.ids) != off.shape[0] - 1:
            raise bad(f"{len(self.ids)} ids for {off.shape[0] - 1} documents")

    # -- construction ----------------------------------------------------------------
    @classmethod
    def build(cls, doc_embeddings: DocEmbeddingsLike, ids: Sequence[str] | None = None, *,
              nbits: int = 2, n_centroids: int | None = None, path: str | os.PathLike | None = None,
              device: str | torch.device = "auto", seed: int = 0, kmeans_niter: int = 4,
              sample_per_centroid: int = _SAMPLE_PER_CENTROID, model: dict | None = None,
              **meta: Any) -> "PlaidIndex":
        """Train centroids and the residual codec on ``doc_embeddings`` and compress them.

        doc_embeddings: a sequence of ``[L_i, d]`` float arrays/tensors, a
        :class:`PackedEmbeddings`, or ``(tokens [T, d], offsets [N + 1])``.
        ``n_centroids`` defaults to PLAID's ``2**floor(log2(16 * sqrt(T)))`` and is always capped
        so that k-means has >= 39 points per centroid. ``model`` (JSON-able) is recorded in the
        manifest. Saved to ``path`` when given.
        """
        if nbits not in VALID_NBITS:
            raise ValueError(f"nbits must be one of {VALID_NBITS}, got {nbits!r}")
        t0 = time.perf_counter()
        docs = as_packed(doc_embeddings)
        if len(docs) == 0:
            raise ValueError("cannot build an index from an empty corpus")
        ids = default_ids(0, len(docs)) if ids is None else list(ids)
        if len(ids) != len(docs):
            raise ValueError(f"got {len(ids)} ids for {len(docs)} documents")
        idmap = IdMap(ids)
        T, d = docs.n_tokens, docs.dim
        if T == 0:
            raise ValueError("cannot build a PLAID index: the documents have no tokens")
        if n_centroids is None:
            k = default_n_centroids(T)
        else:
            if isinstance(n_centroids, bool) or not isinstance(n_centroids, (int, np.integer)) \
                    or n_centroids < 1:
                raise ValueError(f"n_centroids must be a positive int, got {n_centroids!r}")
            k = cap_n_centroids(int(n_centroids), T)
        dev = resolve_device(device)

        # 1. centroids: spherical k-means on a sample
        rows = sample_rows(T, max(k * int(sample_per_centroid), 4096), seed)
        sample = np.asarray(docs.tokens[rows], dtype=np.float32)
        norms = np.linalg.norm(sample, axis=1)
        normalized = bool(np.all(np.abs(norms - 1.0) < 1e-2))
        cent = train_centroids(sample, k, niter=kmeans_niter, seed=seed)
        cent16 = cent.astype(np.float16)
        k = cent16.shape[0]
        C = torch.from_numpy(cent16.astype(np.float32)).to(dev)
        t1 = time.perf_counter()

        # 2. codec from (a subsample of) the sample's residuals
        flat = flat_ip_index(cent16.astype(np.float32)) if dev.type == "cpu" else None
        sub = sample[sample_rows(sample.shape[0], _CODEC_SAMPLE, seed + 1)]
        s = torch.from_numpy(sub).to(dev)
        s_res = s - C[assign(s, C, flat)]
        codec = ResidualCodec.fit(s_res.cpu().numpy(), nbits, seed=seed)
        del s, s_res, sample, sub

        # 3. assign + compress every token, in chunks
        codes, residuals = cls._encode_tokens(docs.tokens, C, codec, flat)
        t2 = time.perf_counter()
        info = {"seed": seed, "kmeans_niter": kmeans_niter, "kmeans_sample": int(rows.size),
                "build_seconds": {"centroids": round(t1 - t0, 3), "compress": round(t2 - t1, 3)}}
        idx = cls(centroids=cent16, codec=codec, codes=codes, residuals=residuals,
                  doc_offsets=np.asarray(docs.offsets, dtype=np.int64), ids=idmap,
                  normalized=normalized, meta={**meta, **({"model": model} if model else {}),
                                               "build": info},
                  device=dev)
        idx._get_lists()
        idx.meta["build"]["build_seconds"]["lists"] = round(time.perf_counter() - t2, 3)
        if path is not None:
            idx.save(path)
        return idx

    @staticmethod
    def _code_dtype(k: int):
        return np.int16 if k <= 32768 else np.int32

    @classmethod
    def _encode_tokens(cls, tokens: np.ndarray, C: torch.Tensor, codec: ResidualCodec, flat=None):
        T = tokens.shape[0]
        codes = np.empty(T, dtype=cls._code_dtype(C.shape[0]))
        residuals = np.empty((T, codec.packed_dim), dtype=np.uint8)
        for a in range(0, T, _CHUNK):
            b = min(T, a + _CHUNK)
            x = torch.from_numpy(np.asarray(tokens[a:b], dtype=np.float32)).to(C.device)
            c = assign(x, C, flat)
            residuals[a:b] = codec.compress(x - C[c]).cpu().numpy()
            codes[a:b] = c.cpu().numpy()
        return codes, residuals

    # -- derived structures ------------------------------------------------------------
    def _get_lists(self) -> Lists:
        if self._lists is None:
            self._lists = build_lists(np.asarray(self.codes), self.doc_offsets, self.n_centroids)
        return self._lists

    def _invalidate(self) -> None:
        self._lists = None
        self._state = None
        self._dev_cache = {}
        self._saved_at = None

    def _search_state(self) -> SearchState:
        if self._state is None:
            L = self._get_lists()
            dev = self.device

            def t(a, dtype=torch.int64):
                return torch.from_numpy(np.array(a)).to(dev, dtype)  # small: copied

            self._state = SearchState(
                centroids=t(self.centroids, torch.float32),
                ivf_offsets=t(L.ivf_offsets), ivf_docs=t(L.ivf_docs),
                doc_code_offsets=t(L.doc_code_offsets), doc_codes=t(L.doc_codes),
                n_docs=len(self))
        return self._state

    def _dev(self, name: str) -> torch.Tensor:
        """Token-level arrays on the search device (on the CPU they share the numpy memory)."""
        if name not in self._dev_cache:
            arr = {"codes": self.codes, "residuals": self.residuals, "offsets": self.doc_offsets}[name]
            arr = np.asarray(arr)
            if not arr.flags.writeable:  # memory-mapped read-only: torch wants a writable buffer
                arr = np.array(arr) if self.device.type != "cpu" else arr
            with _quiet_nonwritable():
                tt = torch.from_numpy(arr)
            if name == "codes":
                tt = tt.to(torch.int64) if self.device.type != "cpu" else tt
            self._dev_cache[name] = tt.to(self.device)
        return self._dev_cache[name]

    def decompress_docs(self, positions: torch.Tensor):
        """Decompressed tokens of documents at ``positions`` (int64 [M], on the index device):
        (float32 tokens [T', d], int64 offsets [M + 1])."""
        dev = self.device
        positions = positions.to(dev)
        off = self._dev("offsets")
        starts = off[positions]
        lens = off[positions + 1] - starts
        new_off = torch.zeros(positions.shape[0] + 1, dtype=torch.int64, device=dev)
        torch.cumsum(lens, 0, out=new_off[1:])
        total = int(new_off[-1])
        rep = torch.repeat_interleave(torch.arange(positions.shape[0], device=dev), lens,
                                      output_size=total)
        tok = torch.arange(total, device=dev) + (starts - new_off[:-1])[rep]
        return self._decompress_tokens(tok), new_off

    def _decompress_tokens(self, tok: torch.Tensor) -> torch.Tensor:
        st = self._search_state()
        codes = self._dev("codes")[tok].to(torch.int64)
        res = self._dev("residuals")[tok]
        x = self.codec.decompress(res)
        x += st.centroids[codes]
        if self.normalized:
            x = torch.nn.functional.normalize(x, dim=1)
        return x

    # -- search ----------------------------------------------------------------------
    def search(self, query_embeddings: torch.Tensor | np.ndarray, k: int = 10, *,
               query_lengths: torch.Tensor | None = None, n_probe: int | None = None,
               centroid_score_threshold: float | None | str = "default",
               n_candidates: int | None = None, n_exact: int | None = None) -> list[list[Hit]]:
        """Top-``k`` documents per query; ``B`` lists of :class:`Hit`, best first.

        Knobs (``None`` = default for ``k``): ``n_probe`` centroids per query token for
        candidates; ``centroid_score_threshold`` for stage-2 pruning (pass ``None`` to disable
        pruning); ``n_candidates`` kept after stage 2; ``n_exact`` kept after stage 3 and scored
        exactly on decompressed vectors.
        """
        scores, pos = self.search_topk(query_embeddings, k, query_lengths=query_lengths,
                                       n_probe=n_probe, centroid_score_threshold=centroid_score_threshold,
                                       n_candidates=n_candidates, n_exact=n_exact)
        return hits_from_topk(scores, pos, self.ids)

    def search_topk(self, query_embeddings, k: int = 10, *, query_lengths=None, n_probe=None,
                    centroid_score_threshold: float | None | str = "default", n_candidates=None,
                    n_exact=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Like :meth:`search` but returns (scores [B, k'], internal positions [B, k'], -1 = none)
        as CPU tensors."""
        check_k(k)
        knobs = {"n_probe": n_probe, "n_candidates": n_candidates, "n_exact": n_exact}
        if not (isinstance(centroid_score_threshold, str) and centroid_score_threshold == "default"):
            knobs["centroid_score_threshold"] = centroid_score_threshold
        kn = resolve_knobs(int(k), knobs)
        q, ql = as_query_batch(query_embeddings, self.dim, query_lengths)
        from colengine.kernels import score_candidates_packed

        st = self._search_state()
        step = max(1, _DENSE_BUDGET // max(1, len(self)))
        outs_s, outs_p = [], []
        with torch.inference_mode():
            for a in range(0, q.shape[0], step):
                s, p = plaid_search(q[a:a + step], ql[a:a + step], int(k), kn, st,
                                    self.decompress_docs, score_candidates_packed)
                outs_s.append(s.cpu())
                outs_p.append(p.cpu())
        return torch.cat(outs_s), torch.cat(outs_p)

    # -- mutation --------------------------------------------------------------------
    def add(self, doc_embeddings: DocEmbeddingsLike, ids: Sequence[str] | None = None) -> list[str]:
        """Append documents, assigned to the existing centroids and compressed with the
        existing codec (no retraining); returns their ids."""
        new = as_packed(doc_embeddings, dim=self.dim)
        ids = default_ids(len(self.ids), len(new)) if ids is None else list(ids)
        if len(ids) != len(new):
            raise ValueError(f"got {len(ids)} ids for {len(new)} documents")
        IdMap.check_new(ids, self.ids)
        C = torch.from_numpy(self.centroids.astype(np.float32)).to(self.device)
        flat = flat_ip_index(self.centroids.astype(np.float32)) if self.device.type == "cpu" else None
        codes, residuals = self._encode_tokens(new.tokens, C, self.codec, flat)
        self.codes = np.concatenate([np.asarray(self.codes), codes.astype(self.codes.dtype)])
        self.residuals = np.concatenate([np.asarray(self.residuals), residuals])
        self.doc_offsets = np.concatenate([self.doc_offsets, self.doc_offsets[-1] + new.offsets[1:]])
        self.ids.extend(ids)
        self.meta["tokens_added"] = int(self.meta.get("tokens_added", 0)) + new.n_tokens
        self._invalidate()
        return ids

    def delete(self, ids: Sequence[str]) -> None:
        """Remove documents by id (all must exist; nothing changes otherwise). The arrays are
        compacted now; centroids and codec are kept."""
        pos = self.ids.positions(list(ids))
        keep = np.ones(len(self), dtype=bool)
        keep[pos] = False
        if not keep.any():
            raise ValueError("deleting every document would leave an empty index")
        lens = np.diff(self.doc_offsets)
        tok_keep = np.repeat(keep, lens)
        self.codes = np.asarray(self.codes)[tok_keep]
        self.residuals = np.asarray(self.residuals)[tok_keep]
        new_off = np.zeros(int(keep.sum()) + 1, dtype=np.int64)
        np.cumsum(lens[keep], out=new_off[1:])
        self.doc_offsets = new_off
        self.ids = self.ids.keep(keep)
        self._invalidate()

    def embeddings_of(self, ids: Sequence[str]) -> list[np.ndarray]:
        """Decompressed float16 token matrices of ``ids`` (what stage 4 scores)."""
        pos = self.ids.positions(list(ids))
        with torch.inference_mode():
            toks, off = self.decompress_docs(torch.from_numpy(pos))
        toks = toks.to("cpu", torch.float16).numpy()
        off = off.cpu().numpy()
        return [toks[off[i]:off[i + 1]] for i in range(pos.size)]

    def decompressed(self) -> PackedEmbeddings:
        """Every document decompressed (float32), e.g. to compare with exhaustive search."""
        with torch.inference_mode():
            toks, off = self.decompress_docs(torch.arange(len(self)))
        return PackedEmbeddings(toks.cpu().numpy(), off.cpu().numpy())

    # -- persistence -----------------------------------------------------------------
    def to_bundle(self) -> Bundle:
        arrays = {
            "centroids": self.centroids,
            "codes": self.codes,
            "residuals": self.residuals,
            "doc_offsets": self.doc_offsets,
            **self.codec.to_arrays(),
            **self.ids.to_arrays(),
        }
        meta = {
            **self.meta,
            "plaid_format": PLAID_FORMAT,
            "dim": self.dim,
            "nbits": self.nbits,
            "n_centroids": self.n_centroids,
            "n_documents": len(self),
            "n_tokens": self.n_tokens,
            "normalized": self.normalized,
            "codes_dtype": np.dtype(self.codes.dtype).name,
        }
        return Bundle(kind=self.kind, meta=meta, arrays=arrays)

    @classmethod
    def from_bundle(cls, bundle: Bundle, *, device: str | torch.device = "auto") -> "PlaidIndex":
        a, m = bundle.arrays, bundle.meta
        if m.get("plaid_format") != PLAID_FORMAT:
            raise IndexFormatError(
                f"plaid index layout version {m.get('plaid_format')!r} is not supported "
                f"(this colengine reads {PLAID_FORMAT})")
        try:
            nbits = int(m["nbits"])
            codec = ResidualCodec.from_arrays(a, nbits)
            ids = IdMap.from_arrays(a)
            idx = cls(centroids=a["centroids"], codec=codec, codes=a["codes"],
                      residuals=a["residuals"], doc_offsets=np.asarray(a["doc_offsets"]),
                      ids=ids, normalized=bool(m["normalized"]),
                      meta={k: v for k, v in m.items() if k not in _DERIVED_META}, device=device)
        except IndexFormatError:
            raise
        except (KeyError, ValueError, TypeError, UnicodeDecodeError) as e:
            raise IndexFormatError(f"plaid index is inconsistent: {e!r}") from e
        for key, val in (("dim", idx.dim), ("n_centroids", idx.n_centroids),
                         ("n_documents", len(idx)), ("n_tokens", idx.n_tokens)):
            if m.get(key) != val:
                raise IndexFormatError(f"plaid index manifest says {key}={m.get(key)!r}, arrays say {val}")
        if a["centroids"].dtype != np.float16:
            raise IndexFormatError(f"centroids must be float16, got {a['centroids'].dtype}")
        return idx

    def save(self, path: str | os.PathLike) -> None:
        save_bundle(path, self.to_bundle())
        self._saved_at = Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike, *, mmap: bool = True, verify: bool = True,
             device: str | torch.device = "auto") -> "PlaidIndex":
        idx = cls.from_bundle(load_bundle(path, kind=cls.kind, mmap=mmap, verify=verify), device=device)
        idx._saved_at = Path(path)
        return idx

    def disk_bytes(self) -> int:
        """Bytes of every file of the index on disk (manifest included); estimated from the
        arrays (``.npy`` headers of 128 bytes, manifest of a saved copy) if not saved."""
        if self._saved_at is not None and (self._saved_at / MANIFEST).is_file():
            root = self._saved_at
            man = json.loads((root / MANIFEST).read_text())
            return (root / MANIFEST).stat().st_size + sum(
                (root / e["file"]).stat().st_size for e in man["arrays"].values())
        b = self.to_bundle()
        return sum(np.asarray(v).nbytes + 128 for v in b.arrays.values()) + 2048

    def stats(self) -> dict[str, Any]:
        nbytes = self.disk_bytes()
        L = self._get_lists()
        return {
            "kind": self.kind,
            "documents": len(self),
            "tokens": self.n_tokens,
            "dim": self.dim,
            "nbits": self.nbits,
            "n_centroids": self.n_centroids,
            "disk_bytes": nbytes,
            "bytes_per_token": nbytes / max(1, self.n_tokens),
            "ivf_pairs": L.n_pairs,
            "normalized": self.normalized,
            "device": str(self.device),
        }


_DERIVED_META = ("plaid_format", "dim", "nbits", "n_centroids", "n_documents", "n_tokens",
                 "normalized", "codes_dtype")


class _quiet_nonwritable:
    """torch warns when wrapping a read-only (memory-mapped) array; we never write to it."""

    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

    def __exit__(self, *exc):
        return self._w.__exit__(*exc)
