"""PLAID search, batched: centroid scores -> candidates -> two centroid-interaction passes ->
residual decompression of the survivors -> exact MaxSim (``colengine.kernels``) -> top-k.

Every stage works on the whole query batch with torch ops on the index's device. Sizes that
depend on the data (how many documents the probed lists hold, ...) are read once per stage and
batch, never once per query, so a GPU is not synchronised inside a per-query loop.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Knobs", "resolve_knobs", "SearchState", "plaid_search"]

_NEG_INF = float("-inf")
# Bound on B x N dense score blocks (query chunk x documents) kept at once.
_DENSE_BUDGET = 1 << 24
# Above this many (query, document, query token) cells stage 2 compacts rows with unique().
_DENSE_M = 1 << 23
# Documents decompressed at once in stage 4 (bounds that float32 block to ~512 x 300 x d).
_STAGE4_DOCS = 512


@dataclass(frozen=True)
class Knobs:
    """Per-call search settings (PLAID's names in brackets).

    n_probe [ncells]: centroids probed per query token to find candidate documents.
    centroid_score_threshold [centroid_score_threshold]: stage 2 keeps only centroids whose
        best score over the query tokens reaches it (``None`` = no pruning).
    n_candidates [ndocs]: documents kept after stage 2 (pruned centroid interaction).
    n_exact [ndocs / 4]: documents kept after stage 3 (full centroid interaction); their
        residuals are decompressed and scored exactly.
    """

    n_probe: int
    centroid_score_threshold: float | None
    n_candidates: int
    n_exact: int


def default_knobs(k: int) -> dict[str, Any]:
    """PLAID's defaults by ``k`` (n_probe raised from 1 to 2 for k <= 10). Not yet tuned: a
    sweep on SciFact with the MiniLM stand-in is in bench/_plaid_sweep.py but did not finish."""
    if k <= 10:
        d = dict(n_probe=2, centroid_score_threshold=0.45, n_candidates=256)
    elif k <= 100:
        d = dict(n_probe=2, centroid_score_threshold=0.45, n_candidates=1024)
    else:
        d = dict(n_probe=4, centroid_score_threshold=0.4, n_candidates=max(k * 4, 4096))
    d["n_exact"] = max(k, d["n_candidates"] // 4)
    return d


_KNOB_NAMES = ("n_probe", "centroid_score_threshold", "n_candidates", "n_exact")


def resolve_knobs(k: int, knobs: dict[str, Any]) -> Knobs:
    """Defaults for ``k`` overridden by ``knobs``; unknown names and bad values raise."""
    unknown = set(knobs) - set(_KNOB_NAMES)
    if unknown:
        raise TypeError(f"unknown search knob(s) {sorted(unknown)}; valid: {list(_KNOB_NAMES)}")
    d = default_knobs(k)
    given = {n: v for n, v in knobs.items() if v is not None or n == "centroid_score_threshold"}
    if "n_candidates" in given and "n_exact" not in given:
        d["n_exact"] = max(k, int(given["n_candidates"]) // 4) if _is_int(given["n_candidates"]) else 0
    d.update(given)
    for name in ("n_probe", "n_candidates", "n_exact"):
        v = d[name]
        if not _is_int(v):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    t = d["centroid_score_threshold"]
    if t is not None:
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise TypeError(f"centroid_score_threshold must be a float or None, got {type(t).__name__}")
        if not math.isfinite(float(t)):
            raise ValueError(f"centroid_score_threshold must be finite, got {t}")
        t = float(t)
    # stage 4 needs at least k documents to return k; stage 3 cannot keep more than stage 2
    n_cand = int(d["n_candidates"])
    n_exact = min(max(int(d["n_exact"]), k), max(n_cand, k))
    return Knobs(int(d["n_probe"]), t, max(n_cand, n_exact), n_exact)


def _is_int(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, int) or type(v).__name__ in ("int64", "int32")


@dataclass
class SearchState:
    """The index as torch tensors on one device (built lazily by the index)."""

    centroids: torch.Tensor        # float32 [K, d]
    ivf_offsets: torch.Tensor      # int64 [K + 1]
    ivf_docs: torch.Tensor         # int64 [P]
    doc_code_offsets: torch.Tensor  # int64 [N + 1]
    doc_codes: torch.Tensor        # int64 [P]
    n_docs: int
    live: torch.Tensor | None = None  # bool [N]: False for tombstoned documents (None: all live)

    @property
    def device(self) -> torch.device:
        return self.centroids.device


def _expand(offsets: torch.Tensor, values: torch.Tensor, rows: torch.Tensor):
    """CSR rows ``rows`` flattened: (which row of ``rows`` each item came from, the items)."""
    starts = offsets[rows]
    lens = offsets[rows + 1] - starts
    total = int(lens.sum())  # one sync per stage: the size of what follows
    rep = torch.repeat_interleave(torch.arange(rows.shape[0], device=rows.device), lens,
                                  output_size=total)
    shift = starts - (torch.cumsum(lens, 0) - lens)
    idx = torch.arange(total, device=rows.device) + shift[rep]
    return rep, values[idx], lens


def _probe(S: torch.Tensor, qvalid: torch.Tensor, n_probe: int):
    """Each valid query token's top ``n_probe`` centroids: (query, token, centroid) int64 [E]."""
    B, Lq, K = S.shape
    p = min(n_probe, K)
    cells = S.topk(p, dim=2).indices                                         # [B, Lq, p]
    keep = qvalid.unsqueeze(2).expand_as(cells)
    bi = torch.nonzero(keep, as_tuple=True)
    return bi[0], bi[1], cells[keep]


def _stage2(S: torch.Tensor, qvalid: torch.Tensor, st: SearchState, n_probe: int,
            threshold: float | None, n_keep: int):
    """Candidate generation and the pruned centroid interaction; top ``n_keep`` per query.

    Candidates are the documents in the inverted lists of every query token's top ``n_probe``
    centroids. Their approximate score is ``sum_i max(0, max_{c in doc, (i, c) kept} S[i, c])``
    where the kept (query token, centroid) entries are the probed ones plus every entry with
    ``S[i, c] >= threshold`` (``threshold=None``: every entry, i.e. no pruning). This is PLAID's
    pruned centroid interaction with the pruning applied per entry instead of per centroid,
    which makes it a scalar scatter-max over the kept entries' inverted lists: its cost is the
    number of (kept entry, document) pairs, a small fraction of the candidates' tokens x Lq.
    Returns (scores [B, n], doc positions [B, n]; -inf / -1 where fewer than n).
    """
    B, Lq, K = S.shape
    N = st.n_docs
    dev = S.device
    # candidates
    pb, pi, pc = _probe(S, qvalid, n_probe)
    cand = torch.zeros(B, N, dtype=torch.bool, device=dev)
    if n_probe >= K:
        cand[:] = True
    else:
        rep, docs, _ = _expand(st.ivf_offsets, st.ivf_docs, pc)
        cand[pb[rep], docs] = True
    if st.live is not None:   # tombstoned documents are never candidates
        cand &= st.live.unsqueeze(0)
    # kept entries
    if threshold is None:
        kept = qvalid.unsqueeze(2).expand(B, Lq, K)
    else:
        kept = (S >= threshold) & qvalid.unsqueeze(2)
        kept[pb, pi, pc] = True
    eb, ei, ec = torch.nonzero(kept, as_tuple=True)
    ev = S[eb, ei, ec]
    starts = st.ivf_offsets[ec]
    lens = st.ivf_offsets[ec + 1] - starts
    total = int(lens.sum())
    # every kept entry's documents: flattened lists (no filtering; non-candidates are masked
    # at the end, which is cheaper than filtering the pairs)
    shift = starts - (torch.cumsum(lens, 0) - lens)
    idx = torch.arange(total, device=dev)
    idx += torch.repeat_interleave(shift, lens, output_size=total)
    docs = st.ivf_docs[idx]
    vals = torch.repeat_interleave(ev, lens, output_size=total)
    if B * N * Lq <= _DENSE_M:
        base = torch.repeat_interleave(eb * (N * Lq) + ei, lens, output_size=total)
        target = docs.mul_(Lq).add_(base)
        M = torch.zeros(B * N * Lq, device=dev)
        M.scatter_reduce_(0, target, vals, "amax", include_self=True)
        dense = M.view(B, N, Lq).sum(dim=2)
    else:
        qb = torch.repeat_interleave(eb, lens, output_size=total)
        key, inv = torch.unique(qb * N + docs, return_inverse=True)
        target = inv.mul_(Lq).add_(torch.repeat_interleave(ei, lens, output_size=total))
        M = torch.zeros(key.shape[0] * Lq, device=dev)
        M.scatter_reduce_(0, target, vals, "amax", include_self=True)
        dense = torch.zeros(B * N, device=dev)
        dense[key] = M.view(-1, Lq).sum(dim=1)
        dense = dense.view(B, N)
    dense.masked_fill_(~cand, _NEG_INF)
    return _topk_rows(dense, n_keep)


def _topk_rows(dense: torch.Tensor, n: int):
    n = min(n, dense.shape[1])
    top = dense.topk(n, dim=1, sorted=True)
    pos = torch.where(top.values > _NEG_INF, top.indices, torch.full_like(top.indices, -1))
    return top.values, pos


def _stage3(ST: torch.Tensor, pos: torch.Tensor, st: SearchState, n_keep: int):
    """Full centroid interaction (no pruning) for ``pos`` [B, n] (-1 = none); top ``n_keep``."""
    B, n = pos.shape
    Lq = ST.shape[2]
    valid = pos >= 0
    flat = torch.nonzero(valid.view(-1), as_tuple=True)[0]
    docs = pos.view(-1)[flat]
    qb = flat // n
    rep, codes, lens = _expand(st.doc_code_offsets, st.doc_codes, docs)
    vals = ST[qb[rep], codes]                                                # [nnz, Lq]
    out = torch.full((B * n,), _NEG_INF, device=ST.device)
    if vals.shape[0]:
        m = torch.full((docs.shape[0], Lq), _NEG_INF, device=ST.device)
        with warnings.catch_warnings():  # "index_reduce() is in beta"
            warnings.simplefilter("ignore", UserWarning)
            m.index_reduce_(0, rep, vals, "amax", include_self=True)
        # a document without tokens keeps -inf rows and so -inf
        out[flat] = m.sum(dim=1)
    out = out.view(B, n)
    n_keep = min(n_keep, n)
    top = out.topk(n_keep, dim=1, sorted=True)
    sel = torch.gather(pos, 1, top.indices)
    sel = torch.where(top.values > _NEG_INF, sel, torch.full_like(sel, -1))
    return top.values, sel


def plaid_search(q: torch.Tensor, qlens: torch.Tensor, k: int, knobs: Knobs, st: SearchState,
                 decompress_docs, score_candidates_packed):
    """Top-``k`` (scores [B, k'], doc positions [B, k']) for a query batch ``q`` [B, Lq, d].

    ``decompress_docs(doc_positions int64 [M]) -> (tokens [T', d], offsets int64 [M + 1])`` gives
    the survivors' decompressed token vectors on ``st.device``.
    """
    dev = st.device
    q = q.to(dev, torch.float32)
    qlens = qlens.to(dev)
    B, Lq, _ = q.shape
    qvalid = torch.arange(Lq, device=dev).unsqueeze(0) < qlens.unsqueeze(1)   # [B, Lq]
    q = q * qvalid.unsqueeze(2)       # padded query tokens score 0 against everything
    S = q @ st.centroids.T                                                      # [B, Lq, K]
    ST = S.transpose(1, 2).contiguous()                                         # [B, K, Lq]
    _, pos2 = _stage2(S, qvalid, st, knobs.n_probe, knobs.centroid_score_threshold,
                      knobs.n_candidates)
    _, pos3 = _stage3(ST, pos2, st, knobs.n_exact)
    # stage 4: decompress the survivors (once per group of queries, so that the decompressed
    # block stays around _STAGE4_DOCS documents), then exact MaxSim through the kernel
    valid = pos3 >= 0
    group = max(1, _STAGE4_DOCS // max(1, pos3.shape[1]))
    parts = []
    for a in range(0, B, group):
        p, v = pos3[a:a + group], valid[a:a + group]
        uniq, inv = torch.unique(p[v], return_inverse=True)
        local = torch.full_like(p, -1)
        local[v] = inv
        tokens, offsets = decompress_docs(uniq)
        parts.append(score_candidates_packed(q[a:a + group], qlens[a:a + group], tokens, offsets, local))
    scores = torch.cat(parts) if len(parts) > 1 else parts[0]
    scores = torch.where(valid, scores, torch.full_like(scores, _NEG_INF))
    kk = min(k, scores.shape[1])
    top = scores.topk(kk, dim=1, sorted=True)
    out_pos = torch.gather(pos3, 1, top.indices)
    return top.values, out_pos
