"""Scoring from codes (WARP-style candidate generation) against PLAID's centroid interaction,
measured by recall of the exhaustive top-10 on real BEIR sets.

WARP (SIGIR 2025) replaces PLAID's stages 2-3 by one pass: every query token probes its
``n_probe`` best centroids, every token stored under them is scored from its packed residual
bytes (``S[i, c] + sum_m table_i[m, byte_m]``, :meth:`ResidualCodec.query_tables`), a
document's score for query token ``i`` is its best such token, and a document with no token
in ``i``'s probed cells gets an imputed score (the ``n_probe``-th centroid score, WARP_SELECT)
instead of 0. Here the top ``n_exact`` of that score go on to the engine's exact stage 4
(decompress + MaxSim) as PLAID's stage-3 survivors do, so the two candidate generators are
compared at equal stage-4 work. ``n_exact = 10`` is WARP's own ranking (no rescoring).

The WARP path is a per-query torch loop written for measurement (its q/s are not a speed
claim); PLAID's are the engine's. Recall is what this script is for; q/s show the order of
cost. Results: ``bench/results/codes_scoring_<date>.json`` and ``.png``.

    python bench/bench_codes_scoring.py --data DATA --datasets scifact,nfcorpus --queries 100
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (RESULTS, add_data_argument, data_root, encoded, env_info,  # noqa: E402
                     recall_with_ties, today, write_json)


class CodesScorer:
    """WARP-style candidate scoring over a built PLAID index (tokens regrouped by centroid)."""

    def __init__(self, idx) -> None:
        from colengine.index.plaid.ivf import doc_of_token

        codes = torch.from_numpy(np.asarray(idx.codes).astype(np.int64))
        k = idx.n_centroids
        order = torch.argsort(codes, stable=True)
        self.offsets = torch.zeros(k + 1, dtype=torch.int64)
        self.offsets[1:] = torch.cumsum(torch.bincount(codes, minlength=k), 0)
        resid = torch.from_numpy(np.asarray(idx.residuals))
        self.C = idx._search_state().centroids.float()
        # 1 / |centroid + residual|: the engine scores renormalised decompressed vectors
        inv = torch.empty(codes.shape[0])
        for a in range(0, codes.shape[0], 1 << 16):
            x = idx.codec.decompress(resid[a:a + (1 << 16)]) + self.C[codes[a:a + (1 << 16)]]
            inv[a:a + (1 << 16)] = 1.0 / torch.linalg.vector_norm(x, dim=1)
        self.normalized = idx.normalized
        self.packed = resid[order]
        self.inv = inv[order]
        self.doc = torch.from_numpy(doc_of_token(np.asarray(idx.doc_offsets)))[order]
        self.token = torch.arange(codes.shape[0])
        self.codec = idx.codec
        self.idx = idx

    def candidates(self, q: torch.Tensor, n_probe: int, n: int, impute: bool) -> torch.Tensor:
        """Top ``n`` stored rows for one query ``q`` [Lq', d] (valid tokens only)."""
        from colengine.index.plaid.codec import score_codes
        from colengine.index.plaid.search import _expand

        lq = q.shape[0]
        S = q @ self.C.T
        top = S.topk(n_probe, dim=1)
        cells = top.indices.reshape(-1)
        tok_of_pair = torch.arange(lq).repeat_interleave(n_probe)
        rep, toks, _ = _expand(self.offsets, self.token, cells)
        i = tok_of_pair[rep]
        s = score_codes(self.codec.query_tables(q), i, self.packed[toks]) + S[i, cells[rep]]
        if self.normalized:
            s = s * self.inv[toks]
        docs, inv = torch.unique(self.doc[toks], return_inverse=True)
        floor = top.values[:, -1].clamp(min=0) if impute else torch.zeros(lq)
        M = floor.unsqueeze(0).expand(docs.shape[0], lq).reshape(-1).clone()
        M.scatter_reduce_(0, inv * lq + i, s, "amax", include_self=True)
        score = M.view(docs.shape[0], lq).sum(dim=1)
        return docs[score.topk(min(n, docs.shape[0])).indices]

    def search(self, q: torch.Tensor, ql: int, n_probe: int, n_exact: int, impute: bool, k=10):
        from colengine.kernels import score_candidates_packed

        cand = self.candidates(q[:ql], n_probe, n_exact, impute)
        if n_exact <= k:
            return cand, None
        toks, off = self.idx.decompress_docs(cand)
        exact = score_candidates_packed(q.unsqueeze(0), torch.tensor([ql]), toks, off,
                                        torch.arange(cand.shape[0]).unsqueeze(0))[0]
        top = exact.topk(min(k, cand.shape[0]))
        return cand[top.indices], top.values


def run_dataset(name: str, n_queries: int, grid) -> dict:
    from colengine.index.exhaustive import ExhaustiveIndex
    from colengine.index.plaid import PlaidIndex

    doc_ids, docs, _, q, _, _ = encoded(name)
    q = q[:n_queries].contiguous()
    ql = (q.abs().sum(dim=2) > 0).sum(dim=1)
    ref = [[(h.doc_id, h.score) for h in r]
           for r in ExhaustiveIndex.build(docs, doc_ids).search(q, k=100)]
    idx = PlaidIndex.build(docs, doc_ids, nbits=2)
    dec = ExhaustiveIndex.build(idx.decompressed(), doc_ids)
    rows: list[dict] = []

    def rec(run) -> float:
        return recall_with_ties(run, ref, 10)

    rows.append({"engine": "decompressed, every document", "recall": rec(
        [[(h.doc_id, h.score) for h in r] for r in dec.search(q, k=10)]), "qps": None})
    for kn in ({}, {"n_candidates": 1024}, {"n_probe": 4, "n_candidates": 1024}):
        idx.search(q[:4], k=10, **kn)
        t = time.perf_counter()
        res = idx.search(q, k=10, **kn)
        dt = time.perf_counter() - t
        rows.append({"engine": "plaid", "knobs": kn, "recall": rec(
            [[(h.doc_id, h.score) for h in r] for r in res]), "qps": len(q) / dt})
        print(name, rows[-1], flush=True)
    ws = CodesScorer(idx)
    for n_probe, impute, n_exact in grid:
        t = time.perf_counter()
        run = []
        for b in range(q.shape[0]):
            cand, _ = ws.search(q[b], int(ql[b]), n_probe, n_exact, impute)
            run.append([(doc_ids[int(c)], 0.0) for c in cand])
        dt = time.perf_counter() - t
        rows.append({"engine": "codes", "knobs": {"n_probe": n_probe, "impute": impute,
                                                  "n_exact": n_exact},
                     "recall": rec(run), "qps": len(q) / dt})
        print(name, rows[-1], flush=True)
    return {"documents": len(doc_ids), "tokens": docs.n_tokens, "queries": int(q.shape[0]),
            "n_centroids": idx.n_centroids, "rows": rows}


def _plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = payload["datasets"]
    fig, axes = plt.subplots(1, len(sets), figsize=(6.5 * len(sets), 4.8), squeeze=False)
    for ax, (name, d) in zip(axes[0], sets.items()):
        ceiling = next(r["recall"] for r in d["rows"] if r["qps"] is None)
        ax.axhline(ceiling, color="grey", ls="--", label="decompressed, every document")
        for n_exact in sorted({r["knobs"]["n_exact"] for r in d["rows"] if r["engine"] == "codes"}):
            pts = sorted((r["knobs"]["n_probe"], r["recall"]) for r in d["rows"]
                         if r["engine"] == "codes" and r["knobs"]["n_exact"] == n_exact
                         and r["knobs"]["impute"])
            label = ("codes (imputed), no rescoring" if n_exact <= 10
                     else f"codes (imputed), top {n_exact} rescored exactly")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
        for r in d["rows"]:
            if r["engine"] == "plaid":
                ax.axhline(r["recall"], ls=":", lw=1,
                           label=f"plaid {r['knobs'] or 'default'}", color="C9")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("n_probe (codes scoring)")
        ax.set_ylabel("recall of exhaustive top-10 (ties)")
        ax.set_title(f"{name}: {d['documents']} docs, {d['queries']} queries")
        ax.legend(fontsize=7)
    fig.suptitle(f"Scoring from codes vs centroid interaction, nbits 2, {payload['env']['cpu']}, "
                 f"{payload['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_argument(ap)
    ap.add_argument("--datasets", default="scifact,nfcorpus")
    ap.add_argument("--queries", type=int, default=100)
    args = ap.parse_args()
    data_root(args.data)
    torch.set_grad_enabled(False)
    grid = [(p, imp, e) for p in (4, 8, 16, 32) for imp in (True, False) for e in (10, 64)
            if imp or e == 64]
    payload = {"date": today(), "env": env_info(), "datasets": {}}
    for name in args.datasets.split(","):
        payload["datasets"][name] = run_dataset(name, args.queries, grid)
    stem = f"codes_scoring_{today()}"
    print(write_json(stem, payload))
    _plot(payload, RESULTS / f"{stem}.png")


if __name__ == "__main__":
    main()
