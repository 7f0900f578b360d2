"""PLAID search, batched: centroid scores -> candidates -> two centroid-interaction passes ->
residual decompression of the survivors (or their refinement vectors, :mod:`.refine`) ->
exact MaxSim (``colengine.kernels``) -> top-k.

Every stage works on the whole query batch with torch ops on the index's device. Sizes that
depend on the data (how many documents the probed lists hold, ...) are read once per stage and
batch, never once per query, so a GPU is not synchronised inside a per-query loop.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypedDict

import numpy as np
import torch

from colengine.appended import is_appended
from colengine.index.base import check_positive_int
from colengine.index.plaid import stages_cpu
from colengine.index.plaid.refine import take as refine_take

__all__ = ["Knobs", "KnobOverrides", "KNOB_NAMES", "check_knob_names", "SearchState",
           "plaid_search", "query_chunk", "filtered_n_probe", "score_stored",
           "reads_refine_in_place", "prefetch_stored", "keep_top", "compiled_stages"]

_NEG_INF = float("-inf")
# On the CPU every intermediate block is kept small (a few MiB) on purpose: blocks above
# glibc's mmap threshold come back from the kernel as fresh pages on every call, and the page
# faults cost more than the arithmetic (a 55 MB decompressed block took 28 ms just to touch).
# On a GPU blocks are _GPU_SCALE times larger, so that each launch has enough work.
_GPU_SCALE = 64
# (query, document, query token) cells of stage 2's dense score block per query chunk. On the
# CPU a chunk is one query from 4,097 documents up (SciFact has 5,183): batching
# buys nothing there (a batch of 32 ran at the q/s of single queries), while every query of a
# chunk adds its [K, Lq] centroid scores (2 MiB at K = 16,384) to the working set.
_CELL_BUDGET = 1 << 18
# Centroid scores (float32 cells of [K, B, Lq]) per query chunk on the CPU's compiled stages:
# 8 MB, four SciFact queries (K = 16,384), one at K >= 65,536. The chunk's queries share
# the centroid GEMM and stage 2's threads.
_SCORE_CELLS = 1 << 21
# (query token, posting) pairs expanded at once by an unpruned stage 2 (threshold None).
_PAIR_BUDGET = 1 << 24
# (kept entry, document) pairs of stage 2's scatter-max expanded at once: the expansion is the
# search's largest temporary (several int64 arrays of this length), so it is done in blocks
# whose maxima accumulate; one block of every pair made a 32-query SciFact batch peak at 130 MB.
_PAIR_BLOCK = 1 << 16
# Above this many cells stage 2 compacts rows with unique() instead (one query, huge corpus).
_DENSE_M = 1 << 23
# Rows of [*, Lq] centroid scores gathered at once by stage 3.
_STAGE3_ROWS = 1 << 14
# Documents decompressed and scored at once by stage 4 (~32 x 300 tokens x d float32).
_STAGE4_DOCS = 32
# Tokens whose centroids are gathered and added at once by a decompression (1 MiB at d = 128).
_DECODE_TOKENS = 2048


def _block(size: int, dev: torch.device) -> int:
    return size if dev.type == "cpu" else size * _GPU_SCALE


def query_chunk(n_docs: int, lq: int, device: torch.device, *, n_postings: int | None = None,
                n_centroids: int | None = None) -> int:
    """Queries per :func:`plaid_search` call so that stage 2's dense block stays small.

    ``n_postings`` (the inverted lists' total length) is given when nothing is pruned
    (``centroid_score_threshold=None``): stage 2 then expands every (query token, posting)
    pair, and a batch of 300 queries asked for 46 GiB on a GPU before this bound.
    ``n_centroids`` is given when the compiled CPU stages run (:mod:`.stages_cpu`): they
    hold nothing over the documents or the postings, so only the centroid scores ``[K, B,
    Lq]`` bound the chunk (:data:`_SCORE_CELLS`)."""
    if n_centroids is not None:
        return max(1, _SCORE_CELLS // max(1, n_centroids * lq))
    step = max(1, _block(_CELL_BUDGET, device) // max(1, n_docs * lq))
    if n_postings is not None:
        step = min(step, max(1, _block(_PAIR_BUDGET, device) // max(1, lq * n_postings)))
    return step


class KnobOverrides(TypedDict, total=False):
    """The search knobs as keyword arguments (every one optional; see :class:`Knobs`).

    ``None`` for an int knob means "the default for k"; ``centroid_score_threshold=None``
    means no pruning (leave it out for the default)."""

    n_probe: int | None
    centroid_score_threshold: float | None
    n_candidates: int | None
    n_exact: int | None
    impute: bool | None


#: the knob names, in :class:`Knobs` field order
KNOB_NAMES: tuple[str, ...] = ("n_probe", "centroid_score_threshold", "n_candidates", "n_exact",
                               "impute")


@dataclass(frozen=True)
class Knobs:
    """Per-call search settings for top-``k`` (PLAID's names in brackets).

    n_probe [ncells]: centroids probed per query token to find candidate documents.
    centroid_score_threshold [centroid_score_threshold]: stage 2 keeps only centroids whose
        best score over the query tokens reaches it (``None`` = no pruning).
    n_candidates [ndocs]: documents kept after stage 2 (pruned centroid interaction).
    n_exact [ndocs / 4]: documents kept after stage 3 (full centroid interaction); their
        residuals are decompressed and scored exactly.
    k: the number of results these knobs are for; stage 4 needs at least ``k`` documents,
        so ``k <= n_exact <= n_candidates`` always holds.
    impute [WARP's missing-similarity imputation]: in stage 2 a query token none of whose
        probed centroids holds a token of the candidate counts the score of its
        ``n_probe + 1``-th best centroid (the most an unprobed centroid can score: the least
        upper bound of what it could have) instead of 0; only the probed lists are read, so
        the threshold does not apply.

    Build them with :meth:`for_k` (PLAID's defaults) and change them with :meth:`replace`:

    >>> Knobs.for_k(10)
    Knobs(n_probe=1, centroid_score_threshold=0.45, n_candidates=256, n_exact=64, k=10, impute=False)
    >>> kn = Knobs.for_k(10).replace(n_candidates=1024)   # n_exact follows: 1024 // 4
    >>> kn.n_candidates, kn.n_exact
    (1024, 256)
    >>> Knobs.for_k(1000).replace(n_candidates=100).n_candidates   # never fewer than k
    1000
    >>> Knobs.for_k(10).replace(nprobe=2)
    Traceback (most recent call last):
    TypeError: unknown search knob(s) ['nprobe']; valid: ['n_probe', ...]
    """

    n_probe: int
    centroid_score_threshold: float | None
    n_candidates: int
    n_exact: int
    k: int = 1
    impute: bool = False

    @classmethod
    def for_k(cls, k: int) -> "Knobs":
        """PLAID's defaults by ``k`` (ncells, centroid_score_threshold, ndocs; ``n_exact`` =
        ndocs / 4), threshold 0.45 instead of 0.5 for ``k <= 10``.

        Checked by a sweep on SciFact with the MiniLM stand-in (bench/_plaid_sweep.py, log in
        bench/results/plaid_sweep_scifact_2026-11-23.txt): for ``k = 10`` every setting of
        n_probe in {1, 2, 4}, n_candidates in {128, 256, 512}, n_exact in {16, 32, 64} kept
        >= 101% of exhaustive nDCG@10; recall of the exhaustive top-10 grows with n_exact
        (0.69 / 0.76 / 0.79) and barely with the others, while speed falls with all three.
        """
        k = check_positive_int("k", k)
        if k <= 10:
            n_probe, threshold, n_cand = 1, 0.45, 256
        elif k <= 100:
            n_probe, threshold, n_cand = 2, 0.45, 1024
        else:
            n_probe, threshold, n_cand = 4, 0.4, max(k * 4, 4096)
        return cls(n_probe, threshold, n_cand, max(k, n_cand // 4), k)

    def replace(self, **overrides: Any) -> "Knobs":
        """These knobs with ``overrides`` (names of :data:`KNOB_NAMES`) applied and checked.

        ``None`` for an int knob keeps it; ``centroid_score_threshold=None`` turns pruning
        off. When ``n_candidates`` changes and ``n_exact`` is not given, ``n_exact`` becomes
        ``n_candidates // 4`` (at least ``k``). Unknown names raise ``TypeError``; a non-int or
        non-positive count, or a threshold that is not a finite float, raise.
        """
        check_knob_names(overrides)
        k = self.k
        n_probe, n_cand, n_exact = self.n_probe, self.n_candidates, self.n_exact
        if overrides.get("n_probe") is not None:
            n_probe = check_positive_int("n_probe", overrides["n_probe"])
        if overrides.get("n_candidates") is not None:
            n_cand = check_positive_int("n_candidates", overrides["n_candidates"])
            n_exact = max(k, n_cand // 4)
        if overrides.get("n_exact") is not None:
            n_exact = check_positive_int("n_exact", overrides["n_exact"])
        threshold = self.centroid_score_threshold
        if "centroid_score_threshold" in overrides:
            threshold = _threshold(overrides["centroid_score_threshold"])
        impute = self.impute
        if overrides.get("impute") is not None:
            impute = overrides["impute"]
            if not isinstance(impute, (bool, np.bool_)):
                raise TypeError(f"impute must be a bool, got {type(impute).__name__}")
            impute = bool(impute)
        # stage 4 needs at least k documents to return k; stage 3 cannot keep more than stage 2
        n_exact = min(max(n_exact, k), max(n_cand, k))
        return Knobs(n_probe, threshold, max(n_cand, n_exact), n_exact, k, impute)


def check_knob_names(names: Iterable[str]) -> None:
    """``TypeError`` naming the valid knobs when ``names`` holds any other."""
    unknown = set(names) - set(KNOB_NAMES)
    if unknown:
        raise TypeError(f"unknown search knob(s) {sorted(unknown)}; valid: {list(KNOB_NAMES)}")


def _threshold(t: Any) -> float | None:
    if t is None:
        return None
    if isinstance(t, bool) or not isinstance(t, (int, float, np.integer, np.floating)):
        raise TypeError(f"centroid_score_threshold must be a float or None, got {type(t).__name__}")
    if not math.isfinite(float(t)):
        raise ValueError(f"centroid_score_threshold must be finite, got {t}")
    return float(t)


def filtered_n_probe(n_probe: int, selectivity: float, n_centroids: int) -> int:
    """``n_probe`` for a filter that keeps ``selectivity`` of the documents: probed lists hold
    about ``selectivity`` allowed documents per document, so probing ``n_probe / selectivity``
    centroids per query token finds about as many allowed candidates as an unfiltered search
    finds candidates (capped at every centroid)."""
    if selectivity >= 1.0:
        return n_probe
    return int(min(n_centroids, math.ceil(n_probe / max(selectivity, 1e-9))))


def state_centroids(centroids: np.ndarray, device: torch.device,
                    float32: Callable[[], np.ndarray] | None = None) -> torch.Tensor:
    """The centroids as a :class:`SearchState` holds them on ``device``: bfloat16 on a CPU that
    multiplies bfloat16 natively (:func:`colengine.devices.native_bf16_matmul`) when every
    centroid is exact in bfloat16, float32 otherwise. Centroids on the int8 grid of index
    layout 4 (``q * 2**e`` with ``|q| <= 127``: 7 significant bits, bfloat16 keeps 8) always
    are, so decompression adds exactly the centroids it would add in float32 and only the
    centroid scores of stages 1-3, which rank candidates for stage 4's exact MaxSim, see the
    query rounded to bfloat16. ``float32`` returns a float32 copy of ``centroids`` to share
    (an index's cached one) instead of converting again.

    >>> c = np.array([[0.5, -0.25], [0.125, 1.0]], dtype=np.float16)
    >>> state_centroids(c, torch.device("meta")).dtype
    torch.float32
    """
    from colengine import devices

    if devices.native_bf16_matmul(device):
        c16 = torch.from_numpy(np.ascontiguousarray(centroids))
        cb = c16.to(torch.bfloat16)
        # (compared in the stored dtype, which holds the bfloat16 values of its own range
        # exactly: a rounded value differs from its original, and no float32 copy is made)
        if torch.equal(cb.to(c16.dtype), c16):
            return cb
    c32 = float32() if float32 is not None else np.asarray(centroids, dtype=np.float32)
    return torch.from_numpy(c32).to(device)


@dataclass(frozen=True)
class SearchState:
    """Everything a search reads, as tensors on one device: the centroids, the inverted lists,
    each document's centroid set, and the compressed tokens with their codec, so that stage 4
    decompresses its survivors itself (:meth:`decompress`) instead of calling back into the
    index. The index builds one per version of its contents and never changes it (an add or a
    delete makes a new one), so concurrent searches may share it. On the CPU the tensors share
    the index's arrays (memory-mapped files included): nothing is copied."""

    centroids: torch.Tensor        # float32 [K, d] (bfloat16: see state_centroids)
    ivf_starts: torch.Tensor       # int64 [K]: where each inverted list starts in ivf_docs
    ivf_lens: torch.Tensor         # int64 [K]: its length
    ivf_docs: torch.Tensor         # int32 (int64 past 2**31 rows): the lists' buffer (ivf.Lists)
    doc_code_offsets: torch.Tensor  # int64 [N + 1]
    doc_codes: torch.Tensor        # int32 (int64 past 2**31 centroids) [P]
    n_docs: int
    tok_offsets: torch.Tensor      # int64 [N + 1]: each stored row's tokens
    codes: torch.Tensor            # [T] each token's centroid (int16/int32 on the CPU)
    residuals: torch.Tensor        # uint8 [T, packed_dim]
    codec: Any                     # the ResidualCodec of ``residuals``
    normalized: bool               # decompressed tokens are renormalised to unit length
    live: torch.Tensor | None = None  # bool [N]: False for tombstoned documents (None: all live)
    refine: torch.Tensor | None = None        # float16/int8 [T, d]: finer copies (:mod:`.refine`)
    refine_scale: torch.Tensor | None = None  # float32 [T]: the int8 copies' scales

    @property
    def device(self) -> torch.device:
        return self.centroids.device

    def decompress(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The token vectors of the stored rows ``positions`` (int64 ``[M]``): (float32
        ``[T', d]``, int64 offsets ``[M + 1]``), on this state's device: the refinement
        vectors when the index keeps them (:mod:`.refine`), else the decoded residuals."""
        dev = self.device
        positions = positions.to(dev)
        starts = self.tok_offsets[positions]
        lens = self.tok_offsets[positions + 1] - starts
        offsets = torch.zeros(positions.shape[0] + 1, dtype=torch.int64, device=dev)
        torch.cumsum(lens, 0, out=offsets[1:])
        total = int(offsets[-1])
        rep = torch.repeat_interleave(torch.arange(positions.shape[0], device=dev), lens,
                                      output_size=total)
        tok = torch.arange(total, device=dev) + (starts - offsets[:-1])[rep]
        if self.refine is not None:
            return refine_take(self.refine, self.refine_scale, tok), offsets
        return self.decode(tok), offsets

    def decode(self, tok: torch.Tensor) -> torch.Tensor:
        """The decoded residuals of stored tokens ``tok`` (int64 ``[n]`` on this state's
        device): float32 ``[n, d]``, centroids added, renormalised when the index is."""
        x = self.codec.decompress(self.residuals.index_select(0, tok))
        codes = self.codes.index_select(0, tok).to(torch.int32)
        # the centroids are added a slice of tokens at a time: their gathered copy is the
        # size of ``x`` when made at once, and the largest temporary of stage 4
        step = _block(_DECODE_TOKENS, self.device)
        for a in range(0, tok.shape[0], step):
            x[a:a + step] += torch.nn.functional.embedding(codes[a:a + step], self.centroids)
        if self.normalized:
            x.mul_(torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min_(1e-12).reciprocal_())
        return x


def _expand(st: SearchState, rows: torch.Tensor):
    """Inverted lists ``rows`` flattened: (which of ``rows`` each posting came from, the
    postings' documents, the lists' lengths)."""
    starts, lens = st.ivf_starts[rows], st.ivf_lens[rows]
    total = int(lens.sum())  # one sync per stage: the size of what follows
    rep, items = _gather(st.ivf_docs, starts, lens, total)
    return rep, items, lens


def _gather(values: torch.Tensor, starts: torch.Tensor, lens: torch.Tensor, total: int):
    """The items of CSR rows given by their ``starts`` and ``lens`` (``total`` items in all):
    (which row each item came from, the items)."""
    rep = torch.repeat_interleave(torch.arange(lens.shape[0], device=lens.device), lens,
                                  output_size=total)
    shift = starts - (torch.cumsum(lens, 0) - lens)
    idx = torch.arange(total, device=lens.device) + shift[rep]
    return rep, values[idx]


def _expand_blocks(st: SearchState, rows: torch.Tensor, budget: int):
    """:func:`_expand` in blocks of consecutive ``rows`` holding about ``budget`` items each
    (a row longer than ``budget`` is a block of its own): yields (the block's slice of
    ``rows``, which row of the block each item came from, the items). One sync when
    everything fits one block, two otherwise."""
    values = st.ivf_docs
    starts, lens = st.ivf_starts[rows], st.ivf_lens[rows]
    ends = torch.cumsum(lens, 0)
    total = int(ends[-1]) if ends.shape[0] else 0
    if total == 0:
        return
    if total <= budget:
        yield (slice(0, rows.shape[0]), *_gather(values, starts, lens, total))
        return
    # block boundaries: the row after the one whose running total passes each multiple of
    # budget; the blocks' item counts come from the running totals at the boundaries
    cuts = torch.searchsorted(ends, torch.arange(budget, total, budget, device=ends.device))
    bounds = torch.unique(torch.cat([cuts + 1, torch.tensor([rows.shape[0]], device=ends.device)]))
    at = torch.cat([ends.new_zeros(1), ends[bounds - 1]]).tolist()   # the second sync
    bounds = [0, *bounds.tolist()]
    for j, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        n = int(at[j + 1] - at[j])
        if n:
            yield (slice(lo, hi), *_gather(values, starts[lo:hi], lens[lo:hi], n))


#: stage 2 ranks a query token's centroids only within the best blocks of this many
#: consecutive centroids (see _top_cells)
_TOP_BLOCK = 64


def _top_cells(S: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``S.topk(p, dim=0)`` of centroid scores ``S`` ``[K, M]`` as (values, indices) ``[p, M]``.

    On the CPU, for many centroids, the ``p`` best of a column lie in the ``p`` blocks of
    :data:`_TOP_BLOCK` consecutive centroids whose maxima are best (any other block's maximum
    is at most the ``p``-th best of those, each of which holds an entry at least as large), so
    only those blocks (and the rows past the last whole block) are ranked: one contiguous
    max over the scores instead of a top-k along their outer axis (1M documents, 131,072
    centroids x 32 query tokens: 5.1 -> 0.3 ms). Same values; among equal scores the cells
    taken may differ from ``torch.topk``'s (whose choice is unspecified too)."""
    K, M = S.shape
    blk = _TOP_BLOCK
    nb = K // blk
    if S.device.type != "cpu" or nb < 8 * p:
        top = S.topk(p, dim=0)
        return top.values, top.indices
    main = nb * blk
    best = S[:main].view(nb, blk, M).amax(dim=1).topk(p, dim=0).indices          # [p, M]
    step = torch.arange(blk, device=S.device).view(1, blk, 1)
    rows = (best.unsqueeze(1) * blk + step).reshape(p * blk, M)
    if main < K:
        rest = torch.arange(main, K, device=S.device).unsqueeze(1).expand(K - main, M)
        rows = torch.cat([rows, rest])
    top = S.gather(0, rows).topk(p, dim=0)
    return top.values, rows.gather(0, top.indices)


def _entries(SK: torch.Tensor, qvalid: torch.Tensor, n_probe: int, threshold: float | None,
             impute: bool):
    """Stage 2's probed and kept (query, token, centroid) entries from the centroid scores
    ``SK`` ``[K, B, Lq]``: (probed (b, i, c), kept (b, i, c, score), with ``impute`` the best
    unprobed score of every query token ``[B, Lq]`` (the ``n_probe + 1``-th; ``None`` without
    impute or when every centroid is probed)).

    Probed: each valid query token's ``n_probe`` best centroids (for ``n_probe = 1`` the
    lowest-numbered of equal best ones). Kept: the probed ones plus every entry scoring at
    least ``threshold`` (every valid entry for ``None``; only the probed ones with ``impute``).
    For ``n_probe = 1`` one comparison finds both: an entry is kept when it reaches
    ``min(threshold, its token's best score)``, and the probed ones are the kept entries at
    their token's best (a max over the outer dimension with its arg is 20x slower than the
    max alone, so the arg-max comes from the entries instead).
    """
    K, B, Lq = SK.shape
    p = min(n_probe, K)
    floor = impute and p < K      # the (p + 1)-th score is wanted too
    if p > 1:
        _, top = _top_cells(SK.view(K, B * Lq), p)                          # [p, B * Lq]
        # (a second top-k rather than one of p + 1: centroid scores from a bfloat16 product
        # tie often, and top-(p + 1) may pick other cells among tied p-th ones)
        nxt = _top_cells(SK.view(K, B * Lq), p + 1)[0][p].view(B, Lq) if floor else None
        cells = top.view(p, B, Lq)
        keep = qvalid.unsqueeze(0).expand_as(cells)
        _, pb, pi = torch.nonzero(keep, as_tuple=True)
        pc = cells[keep]
        if impute:
            kept = torch.zeros_like(SK, dtype=torch.bool)
            kept[pc, pb, pi] = True
        elif threshold is None:
            kept = qvalid.unsqueeze(0).expand(K, B, Lq)
        else:
            kept = SK >= threshold
            if threshold <= 0:   # padded query tokens score 0: only such a threshold keeps them
                kept &= qvalid.unsqueeze(0)
            kept[pc, pb, pi] = True
        ec, eb, ei = torch.nonzero(kept, as_tuple=True)
        return (pb, pi, pc), (eb, ei, ec, SK[ec, eb, ei]), nxt
    if floor:
        top2 = _top_cells(SK.view(K, B * Lq), 2)[0]                         # [2, B * Lq]
        nth, nxt = top2[0].view(B, Lq), top2[1].view(B, Lq)
    else:
        nth, nxt = SK.amax(dim=0), None                                      # [B, Lq]
    if threshold is None and not impute:
        kept = qvalid.unsqueeze(0).expand(K, B, Lq)
    else:
        lim = nth if impute else nth.clamp(max=threshold)
        kept = SK >= lim.masked_fill(~qvalid, float("inf"))
    ec, eb, ei = torch.nonzero(kept, as_tuple=True)
    ev = SK[ec, eb, ei]
    # the probed entry of each token: the first (lowest centroid) of its entries at its best
    col = eb * Lq + ei
    best = ev >= nth.view(-1)[col]
    first = torch.full((B * Lq,), K, dtype=ec.dtype, device=ec.device)
    first.scatter_reduce_(0, col[best], ec[best], "amin", include_self=True)
    probe = best & (ec == first[col])
    if impute or threshold is not None:
        # entries kept only because they tie their token's best score (a zero query token
        # ties every centroid): dropped unless probed or above the threshold
        sel = probe if impute else probe | (ev >= threshold)
        if not bool(sel.all()):
            eb, ei, ec, ev, probe = eb[sel], ei[sel], ec[sel], ev[sel], probe[sel]
    return (eb[probe], ei[probe], ec[probe]), (eb, ei, ec, ev), nxt


def _stage2(SK: torch.Tensor, qvalid: torch.Tensor, st: SearchState, n_probe: int,
            threshold: float | None, n_keep: int, allowed: torch.Tensor | None = None,
            impute: bool = False):
    """Candidate generation and the pruned centroid interaction; top ``n_keep`` per query.

    ``SK`` ``[K, B, Lq]``: every centroid's score with every query token (padded query
    tokens are zero vectors, so they score 0). Candidates are the documents in the inverted
    lists of every query token's top ``n_probe`` centroids. Their approximate score is
    ``sum_i max(0, max_{c in doc, (i, c) kept} S[i, c])``
    where the kept (query token, centroid) entries are the probed ones plus every entry with
    ``S[i, c] >= threshold`` (``threshold=None``: every entry, i.e. no pruning). This is PLAID's
    pruned centroid interaction with the pruning applied per entry instead of per centroid,
    which makes it a scalar scatter-max over the kept entries' inverted lists: its cost is the
    number of (kept entry, document) pairs, a small fraction of the candidates' tokens x Lq.
    With ``impute`` a query token's floor is the score of its ``n_probe + 1``-th best centroid
    instead of 0, and only the probed entries are kept (every other entry scores at most that).
    Returns (scores [B, n], doc positions [B, n]; -inf / -1 where fewer than n).
    """
    K, B, Lq = SK.shape
    N = st.n_docs
    (pb, pi, pc), (eb, ei, ec, ev), nxt = _entries(SK, qvalid, n_probe, threshold, impute)
    # a document none of whose tokens sits in a token's n_probe best cells scores at most that
    # token's best unprobed centroid (the n_probe-th, used until 2026-12-01, is a looser
    # bound, and at n_probe = 1 it is the token's best score: every candidate then tied, and
    # stage 2 kept an arbitrary n_candidates of them)
    floor = None if nxt is None else (nxt * qvalid).clamp_(min=0)              # [B, Lq]
    if B * N * Lq <= _DENSE_M or n_probe >= K:
        return _stage2_dense(st, B, Lq, (pb, pc), (eb, ei, ec, ev), n_probe >= K, n_keep, allowed,
                             floor)
    return _stage2_sparse(st, B, Lq, (pb, pc), (eb, ei, ec, ev), n_keep, allowed, floor)


def _stage2_dense(st: SearchState, B: int, Lq: int, probed, entries, everything: bool,
                  n_keep: int, allowed: torch.Tensor | None, floor: torch.Tensor | None = None):
    """Stage 2 on ``[B, N]`` / ``[B, N, Lq]`` blocks: for batches small enough that they fit
    :data:`_DENSE_M` (and for ``n_probe >= K``, where every document is a candidate)."""
    N = st.n_docs
    pb, pc = probed
    eb, ei, ec, ev = entries
    dev = ev.device
    cand = torch.zeros(B, N, dtype=torch.bool, device=dev)
    if everything:
        cand[:] = True
    else:
        rep, docs, _ = _expand(st, pc)
        cand[pb[rep], docs] = True
    if st.live is not None:   # tombstoned documents are never candidates
        cand &= st.live.unsqueeze(0)
    if allowed is not None:   # a metadata filter: only allowed rows are candidates
        cand &= allowed.unsqueeze(0)
    # every kept entry's documents, unfiltered: non-candidates are masked at the end, which
    # is cheaper than filtering the pairs
    if B * N * Lq <= _DENSE_M:
        if floor is None:
            M = torch.zeros(B * N * Lq, device=dev)
        else:
            M = floor.unsqueeze(1).expand(B, N, Lq).reshape(-1).clone()
        cell = eb * (N * Lq) + ei
        for sl, rep, docs in _expand_blocks(st, ec,
                                            _block(_PAIR_BLOCK, dev)):
            target = cell[sl][rep].add_(docs * Lq)   # docs may be int32: B N Lq <= _DENSE_M
            M.scatter_reduce_(0, target, ev[sl][rep], "amax", include_self=True)
        dense = M.view(B, N, Lq).sum(dim=2)
    else:   # every document probed in a large corpus: compact the (query, document) pairs
        rep, docs, _ = _expand(st, ec)
        vals = ev[rep]
        key, inv = torch.unique(eb[rep] * N + docs, return_inverse=True)
        target = inv.mul_(Lq).add_(ei[rep])
        M = torch.zeros(key.shape[0] * Lq, device=dev) if floor is None else \
            floor[key // N].reshape(-1).clone()
        M.scatter_reduce_(0, target, vals, "amax", include_self=True)
        dense = torch.zeros(B * N, device=dev)
        dense[key] = M.view(-1, Lq).sum(dim=1)
        dense = dense.view(B, N)
    dense.masked_fill_(~cand, _NEG_INF)
    return _topk_rows(dense, n_keep)


def _stage2_sparse(st: SearchState, B: int, Lq: int, probed, entries, n_keep: int,
                   allowed: torch.Tensor | None, floor: torch.Tensor | None = None):
    """Stage 2 on the union of the probed lists only: nothing of size ``[B, N]`` is allocated,
    so the memory a query needs follows the lists it probes, not the corpus size.

    Candidates are the sorted unique ``query * N + doc`` keys of the probed lists (minus
    tombstoned and filtered-out rows); each kept entry's (query, document) pairs are located
    among them by binary search, and the scatter-max runs over ``[candidates, Lq]``."""
    N = st.n_docs
    pb, pc = probed
    eb, ei, ec, ev = entries
    dev = ev.device
    rep, docs, _ = _expand(st, pc)
    key = torch.unique(pb[rep] * N + docs)
    cdoc = key % N
    ok = None
    if st.live is not None:   # tombstoned documents are never candidates
        ok = st.live[cdoc]
    if allowed is not None:   # a metadata filter: only allowed rows are candidates
        ok = allowed[cdoc] if ok is None else ok & allowed[cdoc]
    if ok is not None:
        key, cdoc = key[ok], cdoc[ok]
    n_cand = key.shape[0]
    if n_cand == 0:
        return (torch.full((B, 1), _NEG_INF, device=dev),
                torch.full((B, 1), -1, dtype=torch.int64, device=dev))
    qb = key // N
    M = torch.zeros(n_cand * Lq, device=dev) if floor is None else floor[qb].reshape(-1).clone()
    for sl, rep, docs in _expand_blocks(st, ec, _block(_PAIR_BLOCK, dev)):
        pkey = eb[sl][rep] * N + docs
        slot = torch.searchsorted(key, pkey).clamp_(max=n_cand - 1)
        hit = key[slot] == pkey
        target = slot.mul_(Lq).add_(ei[sl][rep])[hit]
        M.scatter_reduce_(0, target, ev[sl][rep][hit], "amax", include_self=True)
    score = M.view(n_cand, Lq).sum(dim=1)
    # per query: its candidates are one run of the sorted keys; lay them out [B, max run]
    counts = torch.bincount(qb, minlength=B)
    start = torch.cumsum(counts, 0) - counts
    col = torch.arange(n_cand, device=dev) - start[qb]
    width = int(counts.max())
    dense = torch.full((B, width), _NEG_INF, device=dev)
    dense[qb, col] = score
    rows = torch.full((B, width), -1, dtype=torch.int64, device=dev)
    rows[qb, col] = cdoc
    vals, pos = _topk_rows(dense, n_keep)
    return vals, torch.where(pos >= 0, torch.gather(rows, 1, pos.clamp(min=0)), pos)


def _topk_rows(dense: torch.Tensor, n: int):
    n = min(n, dense.shape[1])
    top = dense.topk(n, dim=1, sorted=True)
    pos = torch.where(top.values > _NEG_INF, top.indices, torch.full_like(top.indices, -1))
    return top.values, pos


def _stage3(SK: torch.Tensor, pos: torch.Tensor, st: SearchState, n_keep: int):
    """Full centroid interaction (no pruning) for ``pos`` [B, n] (-1 = none); top ``n_keep``.

    A document's score is ``sum_i max_{c in doc} SK[c, b, i]`` over its distinct centroids
    (``SK`` ``[K, B, Lq]``: a row of ``Lq`` scores per (centroid, query), gathered whole).
    The (query, document) pairs are sorted by their number of centroids and cut into chunks
    of about ``_STAGE3_ROWS`` gathered rows; a chunk of ``m`` pairs whose longest list has
    ``L`` centroids is gathered as one ``[m, L, Lq]`` block in which a shorter list repeats
    its last centroid (a repeated row cannot change a max, and sorted lengths waste little),
    so the max is a plain reduction over the block's middle axis: 2.5x faster than a
    scatter-max over the unpadded rows (SciFact, 1,024 candidates, 2-core EPYC).
    """
    B, n = pos.shape
    Lq = SK.shape[2]
    dev = SK.device
    flat = torch.nonzero((pos >= 0).view(-1), as_tuple=True)[0]
    docs = pos.view(-1)[flat]
    starts = st.doc_code_offsets[docs]
    lens = st.doc_code_offsets[docs + 1] - starts
    out = torch.full((B * n,), _NEG_INF, device=dev)
    # one sync: the chunks are planned on the host from the sorted lengths
    lens_h = lens.cpu().numpy()
    order_h = np.argsort(lens_h, kind="stable")
    s_len = lens_h[order_h]
    order = torch.from_numpy(order_h).to(dev)
    s_start, s_len_t = starts[order], lens[order]
    s_row = (flat // n)[order]        # the query of each sorted pair
    s_out = flat[order]
    rows_of = SK.view(-1, Lq)
    budget = _block(_STAGE3_ROWS, dev)
    n_pairs = s_len.shape[0]
    a = int(np.searchsorted(s_len, 1))   # documents without tokens keep -inf
    while a < n_pairs:
        b = min(n_pairs, a + max(1, budget // int(s_len[a])))
        while b > a + 1 and (b - a) * int(s_len[b - 1]) > budget:
            b = a + max(1, budget // int(s_len[b - 1]))
        L = int(s_len[b - 1])
        j = torch.arange(L, device=dev)
        at = s_start[a:b, None] + torch.minimum(j[None, :], s_len_t[a:b, None] - 1)
        cells = st.doc_codes[at.view(-1)].to(torch.int64).mul_(B)
        cells += s_row[a:b].repeat_interleave(L)
        vals = rows_of.index_select(0, cells).view(b - a, L, Lq)
        out[s_out[a:b]] = vals.amax(dim=1).sum(dim=1)
        a = b
    return keep_top(out.view(B, n), pos, n_keep)


def keep_top(scores: torch.Tensor, pos: torch.Tensor, n_keep: int):
    """The ``n_keep`` best of each row of ``scores`` [B, n] (-inf = none) as (scores, the
    matching ``pos``, -1 where the score is -inf), best first: stage 3's survivors."""
    top = scores.topk(min(n_keep, scores.shape[1]), dim=1, sorted=True)
    sel = torch.gather(pos, 1, top.indices)
    sel = torch.where(top.values > _NEG_INF, sel, torch.full_like(sel, -1))
    return top.values, sel


def compiled_stages(device: torch.device, n_probe: int, n_centroids: int) -> bool:
    """Whether :func:`plaid_search` runs stages 2-3 as the compiled loops of
    :mod:`.stages_cpu`: on the CPU, unless every centroid is probed (every document is then a
    candidate: the torch stages' dense path)."""
    return device.type == "cpu" and n_probe < n_centroids


def _stage4(q: torch.Tensor, qlens: torch.Tensor, pos3: torch.Tensor, st: SearchState,
            score_candidates_packed) -> torch.Tensor:
    """Exact MaxSim of each query with its stage-3 survivors ``pos3`` [B, n] (-1 = none):
    [B, n] (-inf for none).

    On a GPU with Triton the survivors of an index without refinement vectors are scored
    straight from their codes (:mod:`colengine.kernels.codes`: each tile decoded in
    registers, no decompressed copy); everywhere else through :func:`score_stored` (which on
    the CPU scores them from their codes too). All give the same scores within float32
    rounding."""
    dev = st.device
    if st.refine is None and _fused_stage4(dev, q.shape[2]):
        from colengine.kernels.codes import score_candidates_codes

        try:
            return score_candidates_codes(q, qlens, st.codes, st.residuals, st.codec.lut(dev),
                                          st.centroids.float(), st.tok_offsets, pos3,
                                          normalize=st.normalized)
        except _kernel_failures() as e:   # a kernel that does not compile or run here
            if isinstance(e, torch.cuda.OutOfMemoryError):
                raise
            _FUSED_FAILED.append(repr(e))
            warnings.warn(f"the fused stage-4 kernel failed ({e!r}); decompressing instead "
                          f"for the rest of this process", RuntimeWarning, stacklevel=2)
    return score_stored(q, qlens, pos3, st, score_candidates_packed)


def _torch_backend(st: SearchState) -> bool:
    """Whether exact MaxSim on ``st``'s device runs on the torch backend (CPU, MPS)."""
    from colengine.kernels import resolve_backend

    return resolve_backend("auto", st.device, int(st.centroids.shape[1])) == "torch"


def reads_refine_in_place(st: SearchState) -> bool:
    """Whether exact scoring reads ``st``'s refinement vectors where they are stored (the
    torch backend: CPU, MPS) instead of taking float32 copies of them first (Triton)."""
    return st.refine is not None and _torch_backend(st)


def score_stored(q: torch.Tensor, qlens: torch.Tensor, pos: torch.Tensor, st: SearchState,
                 score_candidates_packed) -> torch.Tensor:
    """Exact MaxSim of each query of ``q`` [B, Lq, d] with the stored rows ``pos`` [B, n]
    (-1 = none): [B, n] (-inf for none) on ``st.device``.

    On the CPU the rows of an index without refinement vectors are scored straight from
    their codes (:func:`_score_codes_cpu`). Otherwise, on the torch backend
    (CPU, MPS) the kernel chunks the work itself and reads the rows from where they are: a
    refined index's refinement store (:func:`reads_refine_in_place`; for int8 each token's
    scale multiplies its similarities), otherwise the residuals, which it decodes a chunk at
    a time (:meth:`SearchState.decode`). On Triton the rows are
    decompressed first (:meth:`SearchState.decompress`), at most ``_STAGE4_DOCS`` documents
    at a time (a block of queries x candidate columns; a document shared by queries of the
    block is decompressed once), and scored by ``score_candidates_packed``."""
    if st.refine is None and st.device.type == "cpu":
        return _score_codes_cpu(q, qlens, pos, st)
    if _torch_backend(st):
        prefetch_stored(st, pos)
        # the refinement store as it is, or the residuals decoded (:meth:`SearchState.decode`)
        # straight into the padded block the kernel's GEMM reads: one float32 copy instead of
        # two, and no blocks of _STAGE4_DOCS documents (64 SciFact documents: 4.4 -> 3.3 ms)
        src = st.decode if st.refine is None else st.refine
        if is_appended(src):
            return _score_parts(q, qlens, pos.to(st.device), st, score_candidates_packed)
        return score_candidates_packed(q, qlens, src, st.tok_offsets, pos.to(st.device),
                                       row_scale=st.refine_scale)
    dev = st.device
    B = q.shape[0]
    valid = pos >= 0
    n = pos.shape[1]
    n_docs = _block(_STAGE4_DOCS, dev)
    cols = min(n, n_docs)
    group = max(1, n_docs // max(1, n))
    scores = torch.full(pos.shape, _NEG_INF, device=dev)
    for a in range(0, B, group):
        for c in range(0, n, cols):
            p, v = pos[a:a + group, c:c + cols], valid[a:a + group, c:c + cols]
            uniq, inv = torch.unique(p[v], return_inverse=True)
            if uniq.shape[0] == 0:
                continue
            local = torch.full_like(p, -1)
            local[v] = inv
            tokens, offsets = st.decompress(uniq)
            scores[a:a + group, c:c + cols] = score_candidates_packed(
                q[a:a + group], qlens[a:a + group], tokens, offsets, local)
    return scores


def _score_parts(q: torch.Tensor, qlens: torch.Tensor, pos: torch.Tensor, st: SearchState,
                 score_candidates_packed) -> torch.Tensor:
    """:func:`score_stored` of a refinement store in two parts (a loaded index with documents
    added since, :class:`~colengine.appended.AppendedTensor`): see :func:`_by_part`."""
    vec, scale = st.refine, st.refine_scale
    return _by_part(pos, st.tok_offsets, vec.n_base, lambda part, off, p: score_candidates_packed(
        q, qlens, getattr(vec, part), off, p,
        row_scale=None if scale is None else getattr(scale, part)))


def _by_part(pos: torch.Tensor, off: torch.Tensor, nb: int, score) -> torch.Tensor:
    """Scores of the stored rows ``pos`` [B, n] (-1 = none) of a token store in two parts
    (:class:`~colengine.appended.AppendedTensor`: the mapped ``base`` of ``nb`` tokens, then
    the added ``tail``). A document's tokens are all in one part, so each part scores its own
    documents where it is (no copy of either part): ``score(part, offsets, pos)`` with
    ``part`` ``"base"`` or ``"tail"``, the offsets clamped to that part and the other part's
    documents masked to -1; the scores are merged."""
    in_tail = (pos >= 0) & (off[pos.clamp(min=0)] >= nb)
    none = torch.full_like(pos, -1)
    out = score("base", off.clamp(max=nb), torch.where(in_tail, none, pos))
    if bool(in_tail.any()):
        tail = score("tail", (off - nb).clamp_(min=0), torch.where(in_tail, pos, none))
        out = torch.where(in_tail, tail, out)
    return out


def _score_codes_cpu(q: torch.Tensor, qlens: torch.Tensor, pos: torch.Tensor,
                     st: SearchState) -> torch.Tensor:
    """:func:`score_stored` of an index without refinement vectors on the CPU: the rows
    scored from their codes (:mod:`colengine.kernels.codes_cpu`), read ahead first, each part
    of a loaded index with added documents where it is (:func:`_by_part`)."""
    from colengine.kernels.codes_cpu import score_candidates_codes_cpu

    prefetch_stored(st, pos)
    lut = st.codec.lut(st.device)

    def score(codes, residuals, off, p):
        return score_candidates_codes_cpu(q, qlens, codes, residuals, lut, st.centroids, off, p,
                                          normalize=st.normalized)

    if is_appended(st.residuals):
        return _by_part(pos, st.tok_offsets, st.residuals.n_base, lambda part, off, p: score(
            getattr(st.codes, part), getattr(st.residuals, part), off, p))
    return score(st.codes, st.residuals, st.tok_offsets, pos)


def prefetch_stored(st: SearchState, pos: torch.Tensor) -> int:
    """Ask the operating system to read ahead what scoring the stored rows ``pos`` (-1 =
    none) on the CPU will read: the refinement vectors (and int8 scales) of a refined index,
    else the codes and residuals of their tokens (:func:`colengine.memory.will_need`). At a
    million documents these are files of several GB of which a query reads a few hundred
    scattered documents: without it each page not in the page cache is a fault that waits
    for the disk alone. Returns the bytes advised (0 off the CPU)."""
    if st.device.type != "cpu":
        return 0
    from colengine.memory import will_need

    p = torch.unique(pos[pos >= 0])
    if p.numel() == 0:
        return 0
    starts, stops = st.tok_offsets[p].numpy(), st.tok_offsets[p + 1].numpy()
    stores = (st.refine, st.refine_scale) if st.refine is not None else (st.codes, st.residuals)
    total = 0
    for t in stores:
        if t is None:
            continue
        a, b = starts, stops
        if is_appended(t):   # the appended rows are in memory: the base's rows only
            t, keep = t.base, stops <= t.n_base
            a, b = starts[keep], stops[keep]
        total += will_need(t.data_ptr(), t.stride(0) * t.element_size(), a, b)
    return total


def _fused_stage4(dev: torch.device, d: int) -> bool:
    """Whether stage 4 scores from codes on ``dev``: CUDA with Triton, the dimension one the
    Triton MaxSim kernels take, and no earlier failure of the fused kernel in this process."""
    if dev.type != "cuda" or _FUSED_FAILED:
        return False
    from colengine.kernels import resolve_backend

    return resolve_backend("auto", dev, d) == "triton"


#: why the fused stage-4 kernel was given up in this process (empty while it works)
_FUSED_FAILED: list[str] = []


def _kernel_failures() -> tuple[type[BaseException], ...]:
    """What a Triton kernel that cannot work on this machine raises: Triton's own errors
    (compilation, out of resources, ptxas) and the driver's ``RuntimeError``. Anything else
    (a ``ValueError`` from the launcher's checks: a bug in what the engine passed) is raised,
    not hidden behind the fallback; so is running out of GPU memory."""
    try:
        from triton.errors import TritonError
    except ImportError:   # an older Triton: its errors derive from Exception directly
        return (RuntimeError,)
    return (TritonError, RuntimeError)


def plaid_search(q: torch.Tensor, qlens: torch.Tensor, k: int, knobs: Knobs, st: SearchState,
                 score_candidates_packed, allowed: torch.Tensor | None = None):
    """Top-``k`` (scores [B, k'], doc positions [B, k']) for a query batch ``q`` [B, Lq, d]:
    a pure function of its arguments (the state decompresses stage 4's survivors).

    ``score_candidates_packed`` is the exact MaxSim kernel: the engine's unchecked entry point
    (:func:`colengine.kernels.score_candidates_packed_unchecked`), which also takes the
    ``row_scale=`` of a refined index's int8 store (:func:`score_stored`).
    ``allowed`` (bool [N] on ``st.device``, optional): only these rows are candidates (a
    metadata filter), so every later stage sees allowed rows only.
    """
    dev = st.device
    q = q.to(dev, torch.float32)
    qlens = qlens.to(dev)
    B, Lq, _ = q.shape
    qvalid = torch.arange(Lq, device=dev).unsqueeze(0) < qlens.unsqueeze(1)   # [B, Lq]
    q = q * qvalid.unsqueeze(2)       # padded query tokens score 0 against everything
    # centroid scores laid out [K, B, Lq] by one GEMM: stage 2 reduces over K and stage 3
    # gathers whole (centroid, query) rows of Lq scores, so no transposed copy is needed (the
    # GEMM is also faster in this orientation on the CPU: 4.7 vs 7.2 ms for 6 x 32 x 16,384)
    # (bfloat16 centroids: the product in bfloat16, its float32 copy what the stages read;
    # 3.5x faster than float32 for 6 queries x 16,384 centroids on an AVX-512 BF16 CPU, where
    # the stages' reductions would be slower on bfloat16 itself)
    SK = (st.centroids @ q.reshape(B * Lq, -1).T.to(st.centroids.dtype)).float().view(-1, B, Lq)
    if compiled_stages(dev, knobs.n_probe, SK.shape[0]):
        _, pos2 = stages_cpu.stage2(SK, qlens, st, knobs.n_probe, knobs.centroid_score_threshold,
                                    knobs.n_candidates, allowed, knobs.impute)
        _, pos3 = stages_cpu.stage3(SK, pos2, st, knobs.n_exact)
    else:
        _, pos2 = _stage2(SK, qvalid, st, knobs.n_probe, knobs.centroid_score_threshold,
                          knobs.n_candidates, allowed, knobs.impute)
        _, pos3 = _stage3(SK, pos2, st, knobs.n_exact)
    del SK   # stage 4 reads the survivors' codes only: its blocks reuse these pages
    scores = _stage4(q, qlens, pos3, st, score_candidates_packed)
    valid = pos3 >= 0
    scores = torch.where(valid, scores, torch.full_like(scores, _NEG_INF))
    kk = min(k, scores.shape[1])
    top = scores.topk(kk, dim=1, sorted=True)
    out_pos = torch.gather(pos3, 1, top.indices)
    return top.values, out_pos
