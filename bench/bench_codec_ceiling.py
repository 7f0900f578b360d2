"""How faithful can a residual codec be at PLAID's budget? The decoded ceiling of each codec.

The decoded ceiling is the recall of the exhaustive top-10 when *every* document is scored by
exact MaxSim on its decoded vectors (``normalise(centroid + decoded residual)``): no pruning,
so what is left is what the codec loses. Every variant codes the same residuals (the SciFact
tokens minus their centroids from one PLAID build, nbits-2 budget = 32 bytes a token unless
the row says otherwise), fitted on the same 2**18-residual sample:

* ``pq``       the engine's product codec: 32 sub-spaces of 4 dimensions, 256 codewords each
* ``opq``      the same after faiss's OPQ rotation (trained to minimise the PQ error)
* ``pca``      the same after a PCA rotation whose components are dealt to the 32 groups so
               that each group gets a similar share of the variance
* ``rq``       faiss's residual quantiser: 32 codebooks of 256 full-dimension codewords (beam 1)
* ``mix``      a third of the tokens (largest residuals) at nbits 4, the rest at nbits 1
               (the same 32 bytes on average)
* ``pq1``, ``pq4``  the product codec at nbits 1 (16 bytes) and nbits 4 (64 bytes), for scale

A rotation is applied to the residuals before coding and undone after decoding, which is the
same as rotating queries and documents alike (MaxSim is unchanged by a rotation).
Recall counts ties within 1e-4 of the 10th exact score as hits.

    python bench/bench_codec_ceiling.py --dataset scifact [--variants pq,opq,pca,rq,mix,pq1,pq4]

Results: bench/results/codec_ceiling_<dataset>_<date>.json (+ .png).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
from _common import add_data_argument, data_root, encoded, recall_with_ties  # noqa: E402

K = 10
BYTES = {"pq": 32, "opq": 32, "pca": 32, "rq": 32, "mix": 32, "pq1": 16, "pq4": 64}


def _pq(r: np.ndarray, sample: np.ndarray, nbits: int = 2) -> np.ndarray:
    from colengine.index.plaid.codec import ProductCodec

    codec = ProductCodec.fit(sample, nbits=nbits)
    return codec.decompress(codec.compress(torch.from_numpy(np.ascontiguousarray(r)))).numpy()


def _rotated(r: np.ndarray, sample: np.ndarray, a: np.ndarray) -> np.ndarray:
    """PQ in the basis ``y = a x`` (``a`` orthogonal), decoded back to the original one."""
    return _pq(r @ a.T, sample @ a.T) @ a


def decode(variant: str, r: np.ndarray, sample: np.ndarray, seed: int = 0) -> np.ndarray:
    """The residuals ``r`` after coding and decoding with ``variant``."""
    import faiss

    d = r.shape[1]
    if variant == "pq":
        return _pq(r, sample)
    if variant == "pq1":
        return _pq(r, sample, 1)
    if variant == "pq4":
        return _pq(r, sample, 4)
    if variant == "opq":
        opq = faiss.OPQMatrix(d, d // 4)
        opq.niter = 25
        opq.train(np.ascontiguousarray(sample))
        return _rotated(r, sample, faiss.vector_to_array(opq.A).reshape(d, d))
    if variant == "pca":
        w, v = np.linalg.eigh(np.cov(sample.T))
        v = v[:, np.argsort(-w)]
        groups: list[list[int]] = [[] for _ in range(d // 4)]
        for i in range(d):   # snake order: the strongest components spread over the groups
            row, col = divmod(i, d // 4)
            groups[col if row % 2 == 0 else d // 4 - 1 - col].append(i)
        return _rotated(r, sample, v[:, np.concatenate(groups)].T.astype(np.float32))
    if variant == "rq":
        rq = faiss.ResidualQuantizer(d, d // 4, 8)
        rq.max_beam_size = 1
        rq.train(np.ascontiguousarray(sample[:65536]))
        return rq.decode(rq.compute_codes(np.ascontiguousarray(r)))
    if variant == "mix":
        norms, snorm = np.linalg.norm(r, axis=1), np.linalg.norm(sample, axis=1)
        cut = np.quantile(norms, 2 / 3)
        hi, s_hi = norms >= cut, snorm >= cut
        out = np.empty_like(r)
        out[hi] = _pq(r[hi], sample[s_hi], 4)
        out[~hi] = _pq(r[~hi], sample[~s_hi], 1)
        return out
    raise SystemExit(f"unknown variant {variant!r}: use {', '.join(BYTES)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="scifact")
    add_data_argument(ap)
    ap.add_argument("--variants", default="pq,opq,pca,rq,mix,pq1,pq4")
    args = ap.parse_args()
    variants = args.variants.split(",")
    for v in variants:
        if v not in BYTES:
            sys.exit(f"unknown variant {v!r}: use {', '.join(BYTES)}")
    data_root(args.data)

    from colengine.index.exhaustive import ExhaustiveIndex
    from colengine.index.plaid import PlaidIndex
    from colengine.kernels import score_candidates_packed

    doc_ids, docs, qids, q, qrels, model = encoded(args.dataset)
    q = q.float().contiguous()
    x = torch.from_numpy(np.asarray(docs.tokens)).float()
    off = torch.from_numpy(np.asarray(docs.offsets)).long()
    n = off.shape[0] - 1
    idx = PlaidIndex.build(docs, doc_ids, nbits=2, device="cpu", seed=0)
    st = idx._search_state()
    cent, codes = st.centroids.float(), st.codes.long()
    r = (x - cent[codes]).numpy()
    sample = r[np.random.default_rng(0).choice(r.shape[0], min(r.shape[0], 1 << 18),
                                               replace=False)]
    ex = ExhaustiveIndex.build(docs, doc_ids)
    ref = []
    for a in range(0, q.shape[0], 16):
        ref.extend([[(h.doc_id, h.score) for h in hs] for hs in ex.search(q[a:a + 16], 100)])
    qlens = torch.full((q.shape[0],), q.shape[1])

    def ceiling(rhat: np.ndarray) -> float:
        xh = torch.from_numpy(rhat) + cent[codes]
        xh /= xh.norm(dim=1, keepdim=True).clamp_min(1e-12)
        run = []
        for a in range(0, q.shape[0], 16):
            b = min(16, q.shape[0] - a)
            s = score_candidates_packed(q[a:a + b], qlens[a:a + b], xh, off,
                                        torch.arange(n).expand(b, n))
            run.extend([[(doc_ids[i], 0.0) for i in row] for row in s.topk(K, dim=1).indices.tolist()])
        return recall_with_ties(run, ref, K)

    rows = []
    for v in variants:
        t = time.perf_counter()
        rh = decode(v, r, sample)
        row = {"variant": v, "residual_bytes_per_token": BYTES[v],
               "mean_error": float(np.linalg.norm(rh - r, axis=1).mean()),
               "ceiling_recall_at_10": ceiling(rh), "seconds": time.perf_counter() - t}
        rows.append(row)
        print({k: (round(val, 4) if isinstance(val, float) else val) for k, val in row.items()},
              flush=True)
    payload = {"bench": "codec_ceiling", "dataset": args.dataset, "documents": n,
               "tokens": int(r.shape[0]), "centroids": int(cent.shape[0]), "model": model,
               "mean_residual_norm": float(np.linalg.norm(r, axis=1).mean()),
               "env": _common.env_info(), "rows": rows}
    path = _common.write_json(f"codec_ceiling_{args.dataset}_{_common.today()}", payload)
    plot(rows, path.with_suffix(".png"), args.dataset)
    print("wrote", path)


def plot(rows: list[dict], path, dataset: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    seen: dict[int, int] = {}
    for r in rows:
        x = r["residual_bytes_per_token"]
        n = seen[x] = seen.get(x, -1) + 1   # labels of equal budgets alternate sides
        ax.scatter(x, r["ceiling_recall_at_10"])
        ax.annotate(f"{r['variant']} (err {r['mean_error']:.3f})", (x, r["ceiling_recall_at_10"]),
                    fontsize=8, xytext=(6 if n % 2 == 0 else -6, -3), textcoords="offset points",
                    ha="left" if n % 2 == 0 else "right")
    ax.axhline(0.95, ls="--", c="grey", lw=0.8)
    ax.set_xlabel("residual bytes per token")
    ax.set_ylabel("decoded ceiling: recall of exhaustive top-10")
    ax.set_title(f"Residual codecs on {dataset}: what each keeps (no pruning)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
