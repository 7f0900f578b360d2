"""Streaming PLAID builds: two passes over ``(ids, doc_embeddings)`` chunks, bounded memory,
resumable after an interruption (:class:`~colengine.index.plaid.checkpoint.BuildCheckpoint`).

Pass 1 reads every chunk once, keeping ids, document lengths and a uniform sample of token
vectors (bottom-k random keys, so the sample does not depend on how the stream is chunked),
then trains centroids and the codec on the sample exactly as :meth:`PlaidIndex.build` does on
all tokens. Pass 2 reads the chunks again and compresses them one at a time into arrays of the
final size. Memory: the sample (float16, ``sample_tokens x d x 2`` bytes), one chunk and the
compressed index; with a work folder the compressed arrays are memory-mapped files instead.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from colengine.embeddings import DocEmbeddingsLike, as_packed
from colengine.ids import IdMap, pack_strings, unpack_strings
from colengine.index.plaid import build as plaid_build
from colengine.index.plaid.centroids import sample_rows
from colengine.index.plaid.checkpoint import BuildCheckpoint
from colengine.index.plaid.codec import codec_from_arrays
from colengine.index.plaid.refine import check_refine
from colengine.index.plaid.refine import empty as refine_empty
from colengine.index.plaid.refine import encode as refine_encode
from colengine.memory import release_mapped
from colengine.pooling import check_pool_factor, pool_packed

if TYPE_CHECKING:
    from colengine.index.plaid.index import PlaidIndex

__all__ = ["build_from_iterator", "default_resume_dir"]

Chunks = Iterable[tuple[Sequence[str], DocEmbeddingsLike]]


def default_resume_dir(path: str | os.PathLike) -> Path:
    """``<path>.building``: where a streaming build into ``path`` keeps its work folder."""
    p = Path(path)
    return p.with_name(p.name + ".building")


def _chunk_factory(chunks: Chunks | Callable[[], Chunks]) -> tuple[Callable[[], Iterable], int | None]:
    if callable(chunks):
        make = chunks
    else:
        if iter(chunks) is chunks:
            raise TypeError("build_from_iterator reads the chunks twice: pass a re-iterable "
                            "(a list, an object whose __iter__ starts over) or a callable "
                            "returning a fresh iterator, not a one-shot iterator")
        make = lambda: iter(chunks)  # noqa: E731
    try:
        n_chunks: int | None = len(chunks)  # type: ignore[arg-type]
    except TypeError:
        n_chunks = getattr(chunks, "n_chunks", None)
    return make, n_chunks


#: seconds between two saves of pass 1's progress (the sample: up to 512 MiB a save)
SAMPLE_SAVE_EVERY_S = 120.0


def _sample_pass(make, n_chunks, cap: int, seed: int, show_progress: bool, pool_factor: int = 1,
                 ckpt: BuildCheckpoint | None = None):
    """Pass 1: (ids, lengths int64 [N], token sample float16 [<= cap, d] in stream order, T,
    original lengths int64 [N]). With ``pool_factor`` > 1 every chunk is pooled first: lengths,
    sample and ``T`` are the pooled ones, the original lengths those before pooling.

    Each token gets a uniform random key from one stream (``default_rng([seed, 7])``, one
    draw a token, in stream order) and the ``cap`` smallest keys are the sample, so the sample
    does not depend on how the stream is chunked. With ``ckpt`` the reading so far is saved
    every :data:`SAMPLE_SAVE_EVERY_S` seconds; a later run with the same chunks skips the
    chunks it covers (checking their ids) and advances the key stream past their tokens,
    which gives the sample an uninterrupted pass would have given. Chunks cut differently
    from the saved ones restart the pass."""
    from tqdm.auto import tqdm

    rng = np.random.default_rng([seed, 7])
    res_x: np.ndarray | None = None
    res_key = np.empty(0, dtype=np.float64)
    res_pos = np.empty(0, dtype=np.int64)     # global token position of each sampled token
    all_ids: list[str] = []
    lens_parts: list[np.ndarray] = []
    orig_parts: list[np.ndarray] = []
    T = 0
    dim = None
    chunk_starts: list[int] = []              # first document of each chunk read
    saved = None if ckpt is None else ckpt.load_sampling()
    if saved is not None:
        a, m = saved.arrays, saved.meta
        res_x, res_key, res_pos = np.asarray(a["x"]), np.asarray(a["key"]), np.asarray(a["pos"])
        all_ids = unpack_strings(a["id_data"], a["id_offsets"])
        lens_parts, orig_parts = [np.asarray(a["lengths"])], [np.asarray(a["original_lengths"])]
        chunk_starts = np.asarray(a["chunk_starts"]).tolist()
        T, dim = int(m["tokens"]), int(m["dim"])
        rng.bit_generator.advance(T)   # one key (one 64-bit draw) per token already read
    skip_chunks, bounds = len(chunk_starts), chunk_starts + [len(all_ids)]
    last_save = time.monotonic()
    bar = tqdm(make(), total=n_chunks, desc="plaid build 1/2: sample", unit="chunk",
               disable=not show_progress)
    for i, (ids_c, emb) in enumerate(bar):
        if i < skip_chunks:   # read before the interruption: only check it is the same chunk
            if list(ids_c) != all_ids[bounds[i]:bounds[i + 1]]:
                bar.close()
                ckpt.drop_sampling()
                warnings.warn("the chunks differ from those of the interrupted build's pass 1 "
                              "(cut differently?): pass 1 starts over", stacklevel=3)
                return _sample_pass(make, n_chunks, cap, seed, show_progress, pool_factor, ckpt)
            continue
        packed = as_packed(emb, dim=dim)
        ids_c = list(ids_c)
        if len(ids_c) != len(packed):
            raise ValueError(f"a chunk has {len(ids_c)} ids for {len(packed)} documents")
        dim = packed.dim
        chunk_starts.append(len(all_ids))
        all_ids.extend(ids_c)
        orig_parts.append(packed.lengths)
        packed = pool_packed(packed, pool_factor)
        lens_parts.append(np.diff(np.asarray(packed.offsets, dtype=np.int64)))
        n = packed.n_tokens
        keys = rng.random(n)
        x = np.asarray(packed.tokens, dtype=np.float16)
        if res_x is None:
            res_x = np.empty((0, dim), dtype=np.float16)
        if res_key.size + n <= cap:
            res_x = np.concatenate([res_x, x])
            res_key = np.concatenate([res_key, keys])
            res_pos = np.concatenate([res_pos, T + np.arange(n, dtype=np.int64)])
        else:
            # keep the cap smallest keys among reservoir + chunk (only chunk rows that can
            # make it are copied)
            thresh = np.partition(np.concatenate([res_key, keys]), cap - 1)[cap - 1]
            take = np.flatnonzero(keys <= thresh)
            kk = np.concatenate([res_key, keys[take]])
            sel = np.argpartition(kk, cap - 1)[:cap] if kk.size > cap else np.arange(kk.size)
            res_x = np.concatenate([res_x, x[take]])[sel]
            res_key = kk[sel]
            res_pos = np.concatenate([res_pos, T + take])[sel]
        T += n
        if ckpt is not None and time.monotonic() - last_save >= SAMPLE_SAVE_EVERY_S:
            lens_parts, orig_parts = [np.concatenate(lens_parts)], [np.concatenate(orig_parts)]
            id_data, id_offsets = pack_strings(all_ids)
            ckpt.save_sampling(
                {"x": res_x, "key": res_key, "pos": res_pos, "id_data": id_data,
                 "id_offsets": id_offsets, "lengths": lens_parts[0],
                 "original_lengths": orig_parts[0],
                 "chunk_starts": np.asarray(chunk_starts, dtype=np.int64)},
                {"tokens": T, "dim": dim})
            last_save = time.monotonic()
    bar.close()
    if not all_ids:
        raise ValueError("cannot build an index from an empty corpus")
    if T == 0:
        raise ValueError("cannot build a PLAID index: the documents have no tokens")
    IdMap.check_new(all_ids)
    lens = np.concatenate(lens_parts)
    return all_ids, lens, res_x[np.argsort(res_pos, kind="stable")], T, np.concatenate(orig_parts)


def build_from_iterator(cls: "type[PlaidIndex]", chunks: Chunks | Callable[[], Chunks], *,
                        nbits: int, n_centroids: int | None, sample_tokens: int, seed: int,
                        path: str | os.PathLike | None, resume_dir: str | os.PathLike | None,
                        device, kmeans_niter: int, sample_per_centroid: int,
                        model: dict | None, show_progress: bool, codec: str = "product",
                        pool_factor: int = 1, refine: str | None = None,
                        **meta: Any) -> "PlaidIndex":
    """Build a :class:`PlaidIndex` from ``(ids, doc_embeddings)`` chunks, two passes.

    ``chunks`` must be re-iterable (a list, or an object whose ``__iter__`` starts over, such
    as ``bench.synthetic.SyntheticCorpus``) or a callable returning a fresh iterator, and must
    yield the same documents both times. With ``sample_tokens`` >= the number of tokens the
    result equals ``PlaidIndex.build(all documents, all ids, ...)`` with the same arguments.

    Resuming: with a work folder (``resume_dir``, or ``<path>.building`` when ``path`` is
    given) the trained centroids and codec are kept after pass 1 and pass 2 records its
    progress every few seconds. Running the same call again after a crash or Ctrl-C skips
    pass 1 and every chunk whose tokens were all recorded as written (those chunks are still
    read, to check that ids and lengths did not change; chunk sizes may differ between runs).
    The folder is removed once the index is saved. Pass 1 saves what it has read every
    :data:`SAMPLE_SAVE_EVERY_S` seconds (the token sample, ids, lengths): an interruption
    while reading resumes from the last save, skipping the chunks it covers (read again only
    to check their ids), with the same sample an uninterrupted pass takes; an interruption
    during k-means redoes only k-means.

    ``pool_factor`` > 1 pools every chunk as it is read (both passes: the pooling is
    deterministic), so the result equals ``PlaidIndex.build(..., pool_factor=...)`` under the
    same condition as above. ``refine`` keeps each token at that precision too, written chunk
    by chunk beside the codes (memory-mapped in the work folder, resumed alike).
    """
    from tqdm.auto import tqdm

    from colengine.devices import resolve_device
    from colengine.ids import RowIds

    codec_kind = codec
    plaid_build.check_build_args(nbits, n_centroids, codec_kind)
    pool_factor = check_pool_factor(pool_factor)
    refine = check_refine(refine)
    if isinstance(sample_tokens, bool) or not isinstance(sample_tokens, (int, np.integer)) \
            or sample_tokens < 1:
        raise ValueError(f"sample_tokens must be a positive int, got {sample_tokens!r}")
    make, n_chunks = _chunk_factory(chunks)
    if resume_dir is None and path is not None:
        resume_dir = default_resume_dir(path)
    ckpt = None
    if resume_dir is not None:
        ckpt = BuildCheckpoint(resume_dir, {
            "nbits": nbits, "n_centroids": n_centroids, "sample_tokens": int(sample_tokens),
            "seed": seed, "kmeans_niter": kmeans_niter, "codec": codec_kind,
            "sample_per_centroid": int(sample_per_centroid),
            # only when pooling: work folders of unpooled builds keep their old fingerprint
            **({"pool_factor": pool_factor} if pool_factor > 1 else {}),
            **({"refine": refine} if refine else {})})
    t0 = time.perf_counter()
    dev = resolve_device(device, mps=False)
    cap = int(sample_tokens)

    # pass 1 (or its saved result)
    if ckpt is not None and ckpt.has_trained:
        tb = ckpt.load_trained()
        a, m = tb.arrays, tb.meta
        all_ids = unpack_strings(a["id_data"], a["id_offsets"])
        lens = np.asarray(a["lengths"], dtype=np.int64)
        original = np.asarray(a["original_lengths"], dtype=np.int64) if pool_factor > 1 else lens
        cent16 = np.asarray(a["centroids"])
        codec = codec_from_arrays(a, nbits)
        normalized, T, dim = bool(m["normalized"]), int(m["tokens"]), int(m["dim"])
        asg = plaid_build.make_assigner(cent16, dev)
        n_sample, resumed = int(m["kmeans_sample"]), True
        k_rule = plaid_build.centroid_rule(T, n_centroids)   # warned by the interrupted run
    else:
        all_ids, lens, res_x, T, original = _sample_pass(make, n_chunks, cap, seed,
                                                         show_progress, pool_factor, ckpt)
        dim = res_x.shape[1]
        k_rule = plaid_build.centroid_rule(T, n_centroids, warn=True)
        k = k_rule["used"]
        rows = sample_rows(res_x.shape[0], max(k * int(sample_per_centroid), 4096), seed)
        tr = plaid_build.train(res_x[rows], k, nbits, seed, kmeans_niter, dev, codec_kind)
        cent16, codec, normalized, asg = tr.centroids, tr.codec, tr.normalized, tr.assigner
        del res_x
        n_sample, resumed = int(rows.size), False
        if ckpt is not None:
            id_data, id_offsets = pack_strings(all_ids)
            ckpt.save_trained({"centroids": cent16, "lengths": lens, "id_data": id_data,
                               "id_offsets": id_offsets, **codec.to_arrays(),
                               **({"original_lengths": original} if pool_factor > 1 else {})},
                              {"normalized": normalized, "tokens": T, "dim": dim,
                               "kmeans_sample": n_sample})
    idmap = RowIds(all_ids)
    offsets = np.zeros(lens.size + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    t1 = time.perf_counter()

    # pass 2: compress chunk by chunk (skipping what a previous run already wrote)
    code_dtype = plaid_build.code_dtype(cent16.shape[0])
    if ckpt is not None:
        codes, residuals, ref = ckpt.outputs(T, code_dtype, codec.packed_dim, refine, dim)
        skip_chunks, _, skip_tokens, norm_sum = ckpt.done
    else:
        codes = np.empty(T, dtype=code_dtype)
        residuals = np.empty((T, codec.packed_dim), dtype=np.uint8)
        ref = refine_empty(refine, T, dim) if refine else (None, None)
        skip_chunks, skip_tokens, norm_sum = 0, 0, 0.0
    a = d0 = 0
    bar = tqdm(total=T, initial=skip_tokens, desc="plaid build 2/2: compress", unit="tok",
               unit_scale=True, disable=not show_progress)
    i = -1
    for i, (ids_c, emb) in enumerate(make()):
        packed = pool_packed(as_packed(emb, dim=dim), pool_factor)
        n_d = len(packed)
        if list(ids_c) != all_ids[d0:d0 + n_d] or not np.array_equal(
                np.diff(np.asarray(packed.offsets)), lens[d0:d0 + n_d]):
            raise ValueError("the chunks changed between the two passes of build_from_iterator"
                             + (" (or since the interrupted build in "
                                f"{ckpt.root})" if resumed else ""))
        b = a + packed.n_tokens
        if b > skip_tokens:   # not entirely written by an interrupted run
            # only the tokens past what was written (and counted in norm_sum) before: with
            # another chunk size the resume point can fall inside this chunk
            s0 = max(a, skip_tokens)
            enc = plaid_build.encode_tokens(packed.tokens[s0 - a:], asg, codec)
            codes[s0:b], residuals[s0:b] = enc.codes, enc.residuals
            if refine:
                refine_encode(packed.tokens[s0 - a:], refine,
                              out=(ref[0][s0:b], None if ref[1] is None else ref[1][s0:b]))
            norm_sum += enc.norm_sum
            bar.update(b - s0)
            if ckpt is not None:
                ckpt.progress(i + 1, d0 + n_d, b, norm_sum)
                for out in (codes, residuals, *ref):   # written: the file holds them now
                    if out is not None:
                        release_mapped(out, s0, b)
        a, d0 = b, d0 + n_d
    bar.close()
    if a != T or d0 != len(all_ids):
        raise ValueError("the chunks changed between the two passes of build_from_iterator")
    t2 = time.perf_counter()
    if pool_factor > 1:
        meta = {**meta, "pool_factor": pool_factor}
    info = {"seed": seed, "kmeans_niter": kmeans_niter, "kmeans_sample": n_sample,
            "n_centroids": k_rule,
            "streamed": {"sample_tokens": int(min(T, cap)), "chunks": i + 1,
                         "resumed_after_chunk": skip_chunks if resumed else None},
            "build_seconds": {"sample_and_centroids": round(t1 - t0, 3),
                              "compress": round(t2 - t1, 3)}}
    if ckpt is not None:
        ckpt.progress(i + 1, d0, a, norm_sum, force=True)
        if path is None:   # the index outlives the work folder: bring the arrays into memory
            codes, residuals = np.array(codes), np.array(residuals)
            ref = tuple(None if r is None else np.array(r) for r in ref)
    idx = cls._finish_build(centroids=cent16, codec=codec, codes=codes, residuals=residuals,
                            doc_offsets=offsets, ids=idmap, normalized=normalized,
                            norm_sum=norm_sum, info=info, model=model, meta=meta, device=dev,
                            path=path, original_lengths=original if pool_factor > 1 else None,
                            refine=ref)
    if ckpt is not None:
        if path is not None:   # serve from the saved index, not from the work folder's files
            idx = cls.load(path, device=dev)
        ckpt.remove()
    return idx
