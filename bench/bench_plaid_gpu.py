"""PLAID search on a GPU vs the same index on the CPU, with recall of the exhaustive top-10.

Two steps, because the GPU machine has no model, no faiss and no data set:

    # 1. here (CPU): encode SciFact with the MiniLM stand-in, build PLAID (nbits 2), compute the
    #    exhaustive top-100 of every judged query, and write it all to one folder
    python bench/bench_plaid_gpu.py prepare --source DATA --dataset scifact --out bench/.gpu/scifact

    # 2. on the GPU machine: load the index on cuda and on the CPU, search with several knob
    #    settings, report q/s, latency, recall of the exhaustive top-10 and nDCG@10 retention
    python bench/bench_plaid_gpu.py run --data bench/.gpu/scifact [--stage4 fused,decompress]

On the GPU each knob setting runs twice: with stage 4 scored from the codes (the fused kernel, the
engine's path on CUDA) and with it decompressing (the path taken after the fused kernel failed),
so the fused kernel's gain is read from one run. ``bench/run_gpu.sh`` runs this with the other
GPU checks in one call.

Recall of the exhaustive top-10 counts a returned document as a hit when it is in the exhaustive
top-10 or scores within 1e-4 of the exhaustive 10th score (ties). nDCG@10 is computed here with
the standard formula (linear gains, log2 discounts, ideal from the qrels): ``pytrec_eval`` is not
on the GPU machine; the CPU benches use it. Results: bench/results/plaid_gpu_<dataset>_<date>.json
(+ .png).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

K = 10
GT_K = 100


def prepare(args: argparse.Namespace) -> None:
    from _common import data_root, encoded
    from colengine.index.exhaustive import ExhaustiveIndex
    from colengine.index.plaid import PlaidIndex

    data_root(args.source)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc_ids, docs, qids, q, qrels, model = encoded(args.dataset)
    t = time.perf_counter()
    plaid = PlaidIndex.build(docs, doc_ids, nbits=args.nbits, device="cpu")
    build_s = time.perf_counter() - t
    plaid.save(out / "plaid")
    ex = ExhaustiveIndex.build(docs, doc_ids)
    hits = []
    for a in range(0, q.shape[0], 16):
        hits.extend(ex.search(q[a:a + 16], GT_K))
    pos = {d: i for i, d in enumerate(doc_ids)}
    gt_rows = np.array([[pos[h.doc_id] for h in hs] for hs in hits], dtype=np.int64)
    gt_scores = np.array([[h.score for h in hs] for hs in hits], dtype=np.float32)
    np.save(out / "queries.npy", q.numpy().astype(np.float32))
    np.save(out / "gt_rows.npy", gt_rows)
    np.save(out / "gt_scores.npy", gt_scores)
    (out / "info.json").write_text(json.dumps({
        "dataset": args.dataset, "doc_ids": list(doc_ids), "qids": list(qids),
        "qrels": {k: dict(v) for k, v in qrels.items()}, "model": model, "nbits": args.nbits,
        "tokens": int(docs.n_tokens), "cpu_build_s": build_s, "prepared_on": _common.env_info(),
    }))
    print(f"wrote {out} ({sum(f.stat().st_size for f in out.rglob('*') if f.is_file()) / 2**20:.1f} MiB)")


def ndcg10(ranked: list[str], rels: dict[str, int]) -> float:
    dcg = sum(rels.get(d, 0) / np.log2(i + 2) for i, d in enumerate(ranked[:K]))
    ideal = sorted(rels.values(), reverse=True)[:K]
    idcg = sum(g / np.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_exhaustive(rows: np.ndarray, gt_rows: np.ndarray, gt_scores: np.ndarray,
                      tol: float = 1e-4) -> float:
    """Mean over queries of |returned ∩ exhaustive top-10| / 10, where a returned document also
    counts when its exact score (from the exhaustive top-100) is within ``tol`` of the 10th
    (ties). PLAID's own scores are not used: they come from decompressed vectors."""
    out = []
    for r, g, gs in zip(rows, gt_rows, gt_scores):
        exact = dict(zip(g.tolist(), gs.tolist()))
        tenth = gs[K - 1]
        hit = sum(1 for x in r[:K].tolist() if x >= 0 and exact.get(x, -np.inf) >= tenth - tol)
        out.append(min(hit, K) / K)
    return float(np.mean(out))


def run(args: argparse.Namespace) -> None:
    from colengine.index.plaid import PlaidIndex

    data = Path(args.data)
    info = json.loads((data / "info.json").read_text())
    q_all = torch.from_numpy(np.load(data / "queries.npy"))
    gt_rows, gt_scores = np.load(data / "gt_rows.npy"), np.load(data / "gt_scores.npy")
    doc_ids, qids, qrels = info["doc_ids"], info["qids"], info["qrels"]
    exh_ndcg = np.mean([ndcg10([doc_ids[r] for r in g], qrels.get(qid, {}))
                        for qid, g in zip(qids, gt_rows)])
    env = _common.env_info()
    from colengine.index.plaid import search as plaid_search_mod

    # (device, stage 4): on the GPU stage 4 scores from the codes (the fused kernel) unless
    # told to decompress, which the engine does only after the fused kernel failed
    runs = [("cuda", s4) for s4 in args.stage4.split(",")] if torch.cuda.is_available() else []
    runs += [] if args.gpu_only else [("cpu", "decompress")]
    fused_default = plaid_search_mod._fused_stage4
    settings = [
        ("default", {}),
        ("probe2_cand1024_exact256", dict(n_probe=2, n_candidates=1024, n_exact=256)),
        ("probe4_cand4096_exact1024", dict(n_probe=4, n_candidates=4096, n_exact=1024)),
        ("probe8_cand8192_exact4096", dict(n_probe=8, n_candidates=8192, n_exact=4096)),
    ]
    rows = []
    for dev, stage4 in runs:
        if stage4 not in ("fused", "decompress"):
            sys.exit(f"--stage4: {stage4!r} is neither 'fused' nor 'decompress'")
        plaid_search_mod._fused_stage4 = (fused_default if stage4 == "fused"
                                          else (lambda dev, d: False))
        t = time.perf_counter()
        idx = PlaidIndex.load(data / "plaid", device=dev)
        load_s = time.perf_counter() - t
        q = q_all.to(dev) if dev == "cuda" else q_all

        def sync():
            if dev == "cuda":
                torch.cuda.synchronize()

        for name, kn in settings:
            if dev == "cpu" and args.cpu_settings and name not in args.cpu_settings.split(","):
                continue
            idx.search_topk(q[:32], K, **kn)  # warm-up (state upload, Triton compile)
            sync()
            # quality: one pass over all queries in batches of 32
            ps = []
            for a in range(0, q.shape[0], 32):
                _, p = idx.search_topk(q[a:a + 32], K, **kn)
                ps.append(p.numpy())
            pos = np.concatenate(ps)
            rec = recall_exhaustive(pos, gt_rows, gt_scores)
            nd = np.mean([ndcg10([doc_ids[r] for r in p if r >= 0], qrels.get(qid, {}))
                          for qid, p in zip(qids, pos)])
            lat = []
            for i in range(min(args.single, q.shape[0])):
                sync()
                t = time.perf_counter()
                idx.search_topk(q[i:i + 1], K, **kn)
                sync()
                lat.append(time.perf_counter() - t)
            thr = {}
            for bs in (32, q.shape[0]):
                sync()
                t = time.perf_counter()
                for _ in range(args.repeats):
                    for a in range(0, q.shape[0], bs):
                        idx.search_topk(q[a:a + bs], K, **kn)
                sync()
                thr[bs] = args.repeats * q.shape[0] / (time.perf_counter() - t)
            lat_ms = np.asarray(lat) * 1e3
            row = {"device": dev, "stage4": stage4, "setting": name, "knobs": kn,
                   "fused_failed": list(plaid_search_mod._FUSED_FAILED), "load_s": load_s,
                   "recall_exh_top10": rec, "ndcg10": float(nd),
                   "ndcg10_retention": float(nd / exh_ndcg), "qps_batch32": thr[32],
                   f"qps_batch{q.shape[0]}": thr[q.shape[0]],
                   "single_p50_ms": float(np.percentile(lat_ms, 50)),
                   "single_p95_ms": float(np.percentile(lat_ms, 95))}
            rows.append(row)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()},
                  flush=True)
        del idx
    plaid_search_mod._fused_stage4 = fused_default
    payload = {"bench": "plaid_gpu", "dataset": info["dataset"], "nbits": info["nbits"],
               "tokens": info["tokens"], "documents": len(doc_ids), "queries": len(qids),
               "model": info["model"], "exhaustive_ndcg10": float(exh_ndcg), "env": env,
               "threads": torch.get_num_threads(), "rows": rows,
               "notes": "recall of the exhaustive top-10 (ties within 1e-4 count); nDCG@10 by the "
                        "standard formula; q/s over all judged queries, batches of 32 and all at "
                        "once; single = first queries one at a time, synchronised"}
    path = _common.write_json(f"plaid_gpu_{info['dataset']}_{_common.today()}", payload)
    plot(rows, path.with_suffix(".png"), env)
    print(f"wrote {path}")


def plot(rows: list[dict], path: Path, env: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for dev, stage4, marker in (("cuda", "fused", "o"), ("cuda", "decompress", "^"),
                                ("cpu", "decompress", "s")):
        sub = [r for r in rows if r["device"] == dev and r.get("stage4", stage4) == stage4]
        if not sub:
            continue
        ax.plot([r["recall_exh_top10"] for r in sub], [r["qps_batch32"] for r in sub],
                marker=marker, label=f"{dev}, stage 4 {stage4} (batches of 32)")
        for r in sub:
            ax.annotate(r["setting"].split("_")[0] if r["setting"] != "default" else "default",
                        (r["recall_exh_top10"], r["qps_batch32"]), fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("recall of the exhaustive top-10")
    ax.set_ylabel("queries / s")
    ax.set_title(f"PLAID search, {env.get('gpu', '')} vs {env.get('cpu', 'CPU')}"[:90], fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--dataset", default="scifact")
    p.add_argument("--source", default=os.environ.get(_common.DATA_ENV),
                   help=f"folder holding BEIR data sets (default: ${_common.DATA_ENV})")
    p.add_argument("--out", required=True)
    p.add_argument("--nbits", type=int, default=2)
    r = sub.add_parser("run")
    r.add_argument("--data", required=True)
    r.add_argument("--single", type=int, default=100)
    r.add_argument("--repeats", type=int, default=3)
    r.add_argument("--gpu-only", action="store_true")
    r.add_argument("--stage4", default="fused,decompress",
                   help="GPU stage 4 variants to run: fused (scored from codes, the engine's "
                        "default on CUDA), decompress (decoded copy + packed MaxSim kernel)")
    r.add_argument("--cpu-settings", default="",
                   help="comma-separated settings to run on the CPU (default: all)")
    args = ap.parse_args()
    prepare(args) if args.cmd == "prepare" else run(args)


if __name__ == "__main__":
    main()
