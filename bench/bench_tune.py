"""PLAID recall tuning on a BEIR set: default knobs vs ``tune()`` with the real queries and with
pseudo-queries, measured against exhaustive MaxSim over the ORIGINAL vectors.

    flock /tmp/colengine-bench.lock python bench/bench_tune.py --data DATA --dataset scifact

For every setting: the knobs, recall of the exact top-10 (ties within 1e-4 of the 10th exact
score count) over the original float vectors (``ExhaustiveIndex`` on the same embeddings) and
over the index's own decompressed vectors (what tune() targets), nDCG@10, and q/s over every
query in batches of 32 (best of ``--repeats`` passes after a one-batch warm-up). Variants:

* ``default``: ``Knobs.for_k(10)`` (the index untuned);
* ``tuned-queries``: tune() on all the test queries (in-sample: the same queries are measured);
* ``tuned-queries-half``: tune() on the first half of the queries, measured on all (the second
  half is held out; its own recall is reported too);
* ``tuned-pseudo``: tune() on ``--n-sample`` pseudo-queries made from documents;
* ``decoded-exhaustive``: every document scored on its decompressed vectors: the cap that
  compression puts on recall over the original vectors.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (add_data_argument, data_root, encoded, env_info, ndcg10,  # noqa: E402
                     write_json)

K = 10
TIE = 1e-4


def _recall(pos: np.ndarray, exact: torch.Tensor, kth: torch.Tensor) -> np.ndarray:
    """Per-query tie-aware recall: returned positions ``pos`` [B, k] (-1 none), their exact
    scores ``exact`` [B, k], the k-th exact score ``kth`` [B]."""
    hit = torch.from_numpy(pos >= 0) & (exact >= kth[:, None] - TIE)
    return (hit.sum(1).clamp(max=K).double() / K).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_argument(ap)
    ap.add_argument("--dataset", default="scifact")
    ap.add_argument("--nbits", type=int, default=2)
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--n-sample", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--index-cache", default=None,
                    help="load the PLAID index from here if it exists, else build and save it")
    ap.add_argument("--out", default=None, help="result name (default tune_<dataset>_<date>)")
    args = ap.parse_args()
    data_root(args.data)
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    from colengine.index.exhaustive import ExhaustiveIndex
    from colengine.index.plaid import Knobs, PlaidIndex
    from colengine.index.plaid.tune import _Reference, corpus_knobs, knobs_to_dict
    from colengine.storage import is_index

    env = env_info()
    doc_ids, docs, qids, q, qrels, model = encoded(args.dataset)
    judged = [i for i, qid in enumerate(qids) if qid in qrels]
    q = q[judged]
    qids = [qids[i] for i in judged]
    ql = torch.full((q.shape[0],), q.shape[1], dtype=torch.int64)
    print(f"{args.dataset}: {len(doc_ids)} documents, {q.shape[0]} judged queries", flush=True)

    t0 = time.perf_counter()
    if args.index_cache and is_index(args.index_cache):
        idx = PlaidIndex.load(args.index_cache, device="cpu")
        build_s = None
    else:
        idx = PlaidIndex.build(docs, doc_ids, nbits=args.nbits, device="cpu", seed=0)
        build_s = time.perf_counter() - t0
        if args.index_cache:
            idx.save(args.index_cache)
    assert list(idx.ids) == list(doc_ids) and idx.nbits == args.nbits
    print(f"index: {idx.n_centroids} centroids, build {build_s}", flush=True)

    # exact references: original vectors (the truth) and decompressed vectors (tune's target)
    t0 = time.perf_counter()
    ex = ExhaustiveIndex.build(docs, doc_ids)
    ref_hits = ex.search(q, k=K)
    kth_orig = torch.tensor([r[-1].score for r in ref_hits])
    ndcg_exh = ndcg10([[(h.doc_id, h.score) for h in r] for r in ref_hits], qids, qrels)
    dec_ref = _Reference(idx, None)
    with torch.inference_mode():
        kth_dec = dec_ref.kth(q, ql, K)
    print(f"references {time.perf_counter() - t0:.1f}s; exhaustive nDCG@10 {ndcg_exh:.4f}",
          flush=True)

    def measure(name: str, knobs: dict | None, extra: dict | None = None) -> dict:
        def run():
            out_s, out_p = [], []
            for a in range(0, q.shape[0], 32):
                s, p = idx.search_topk(q[a:a + 32], K, **(knobs or {}))
                out_s.append(s)
                out_p.append(p)
            return torch.cat(out_s), torch.cat(out_p)

        idx.search_topk(q[:32], K, **(knobs or {}))   # warm-up
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            scores, rows = run()
            times.append(time.perf_counter() - t)
        pos = rows.numpy()   # no tombstones: stored rows are live positions
        exact_orig = ex.score_positions(q, np.where(pos >= 0, pos, -1))
        with torch.inference_mode():
            exact_dec = dec_ref.score(q, ql, torch.from_numpy(pos))
        r_orig = _recall(pos, exact_orig, kth_orig)
        r_dec = _recall(pos, exact_dec, kth_dec)
        run_hits = [[(doc_ids[p], float(s)) for s, p in zip(sr, pr) if p >= 0]
                    for sr, pr in zip(scores.tolist(), pos.tolist())]
        kn = idx.default_knobs(K) if knobs is None else corpus_knobs(
            Knobs.for_k(K).replace(**knobs), len(idx))
        row = {"name": name, "knobs": knobs_to_dict(kn),
               "recall_vs_original": float(r_orig.mean()),
               "recall_vs_decompressed": float(r_dec.mean()),
               "ndcg10": ndcg10(run_hits, qids, qrels), "qps_batch32": q.shape[0] / min(times),
               "seconds_per_pass": times, **(extra or {})}
        half = q.shape[0] // 2
        row["recall_vs_original_second_half"] = float(r_orig[half:].mean())
        row["recall_vs_decompressed_second_half"] = float(r_dec[half:].mean())
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
               if k != "seconds_per_pass"}, flush=True)
        return row

    rows = []
    untuned = knobs_to_dict(Knobs.for_k(K))
    rows.append(measure("default", untuned))

    def tuned(name: str, **kw) -> None:
        t = time.perf_counter()
        res = idx.tune(target_recall=args.target, k=K, **kw)
        secs = time.perf_counter() - t
        info = {"tune_seconds": secs, "tune_recall": res.recall, "tune_reached": res.reached,
                "tune_source": res.source, "tune_n_sample": res.n_sample,
                "tune_reference": res.reference, "tune_measurements": len(res.trail),
                "tune_trail": res.trail}
        print(f"{name}: tuned in {secs:.1f}s -> {res.knobs} recall {res.recall:.4f} "
              f"({len(res.trail)} measurements)", flush=True)
        rows.append(measure(name, None, info))   # the stored defaults
        idx.clear_tuning()

    tuned("tuned-queries", sample_queries=q, n_sample=q.shape[0])
    tuned("tuned-queries-half", sample_queries=q[:q.shape[0] // 2], n_sample=q.shape[0] // 2)
    tuned("tuned-pseudo", n_sample=args.n_sample)
    everything = {"n_probe": idx.n_centroids, "centroid_score_threshold": None,
                  "n_candidates": len(idx), "n_exact": len(idx)}
    # decoded exhaustive: every document scored exactly on its decompressed vectors
    t = time.perf_counter()
    with torch.inference_mode():
        s, p = idx._score_rows_topk(q, ql, K, idx._rows.live_rows(),
                                    __import__("colengine.kernels", fromlist=["x"])
                                    .score_candidates_packed_unchecked)
    dt = time.perf_counter() - t
    pos = p.numpy()
    r_orig = _recall(pos, ex.score_positions(q, pos), kth_orig)
    hits = [[(doc_ids[j], float(v)) for v, j in zip(sr, pr)]
            for sr, pr in zip(s.tolist(), pos.tolist())]
    rows.append({"name": "decoded-exhaustive", "knobs": {k: (None if v is None else int(v))
                                                        for k, v in everything.items()},
                 "recall_vs_original": float(r_orig.mean()), "recall_vs_decompressed": 1.0,
                 "ndcg10": ndcg10(hits, qids, qrels), "qps_batch32": q.shape[0] / dt,
                 "note": "every document decompressed and scored (one batch of all queries)"})
    print(rows[-1], flush=True)

    payload = {"benchmark": "plaid recall tuning", "dataset": args.dataset,
               "documents": len(doc_ids), "queries": int(q.shape[0]), "k": K,
               "nbits": args.nbits, "target_recall": args.target, "tie_tolerance": TIE,
               "n_centroids": idx.n_centroids, "build_seconds": build_s, "model": model,
               "exhaustive_ndcg10": ndcg_exh, "env": env, "rows": rows}
    name = args.out or f"tune_{args.dataset}_{time.strftime('%Y-%m-%d')}"
    path = write_json(name, payload)
    _plot(payload, path.with_suffix(".png"))
    print(f"wrote {path}", flush=True)


def _plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for row in payload["rows"]:
        for key, marker in (("recall_vs_original", "o"), ("recall_vs_decompressed", "s")):
            ax.scatter(row["qps_batch32"], row[key], marker=marker,
                       color="C0" if key == "recall_vs_original" else "C1")
            ax.annotate(row["name"], (row["qps_batch32"], row[key]), fontsize=7,
                        xytext=(4, 2), textcoords="offset points")
    ax.axhline(payload["target_recall"], color="grey", lw=0.8, ls="--")
    ax.scatter([], [], marker="o", color="C0", label="recall vs exhaustive (original vectors)")
    ax.scatter([], [], marker="s", color="C1", label="recall vs exhaustive (decompressed)")
    ax.set_xscale("log")
    ax.set_xlabel("queries/s, batches of 32")
    ax.set_ylabel(f"recall of the exact top-{payload['k']}")
    env = payload["env"]
    ax.set_title(f"PLAID tune(): {payload['dataset']}, nbits {payload['nbits']}, "
                 f"target {payload['target_recall']}\n{env['cpu']} x{env['cpu_count']}, "
                 f"{env['date'][:10]}", fontsize=9)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
