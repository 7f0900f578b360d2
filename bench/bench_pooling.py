"""Token pooling at build: quality, size and speed of PLAID indexes with pool_factor 1, 2, 3.

    flock /tmp/colengine-bench.lock python bench/bench_pooling.py --data DATA

For each data set (default SciFact and NFCorpus, MiniLM stand-in, cached encodings from
``_common.encoded``) it builds PLAID indexes (``--nbits``, default 2) with each pool factor,
saves and reloads them (searching the memory-mapped copy, as a served index is), and
measures at k = 10 with the default knobs:

* nDCG@10 (pytrec_eval, the test qrels) and its retention against exhaustive MaxSim over the
  unpooled vectors (and against the unpooled PLAID index);
* recall of the unpooled exhaustive top-10 (plain, and counting as hits the documents whose
  exact score ties the 10th within 1e-4);
* bytes per original token: every file of the saved index (``stats()["disk_bytes"]``) over
  the tokens before pooling, with the bytes of each array, to see what dominates;
* batched q/s: all judged queries in batches of 32, best of ``--repeats`` passes after a
  warm-up pass.

Exhaustive MaxSim over the pooled vectors (float16, uncompressed) is also run, which splits
the quality lost to pooling from the quality lost to PLAID's compression and pruning.
Writes bench/results/pooling_<date>.json and .png.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (RESULTS, add_data_argument, data_root, encoded, env_info, ndcg10,  # noqa: E402
                     recall_of, today, write_json)

TARGET = {"pool_factor": 2, "max_bytes_per_original_token": 20.0, "min_ndcg_retention": 0.99}
TIE_TOL = 1e-4


def _batched(search, q, repeats: int):
    """(results of one pass over ``q`` in batches of 32, best batched q/s of ``repeats``)."""
    def one_pass():
        out = []
        for a in range(0, q.shape[0], 32):
            out.extend(search(q[a:a + 32]))
        return out

    search(q[:32])   # warm-up (lists, caches, thread pools)
    best, out = 0.0, None
    for _ in range(repeats):
        t = time.perf_counter()
        out = one_pass()
        best = max(best, q.shape[0] / (time.perf_counter() - t))
    return out, best


def _tie_recall(run_pos, ex, q, ref_pos, ref_scores) -> float:
    """Recall of the exhaustive top-10 where a returned document whose exact (unpooled)
    MaxSim ties the 10th exact score within ``TIE_TOL`` also counts as a hit."""
    vals = []
    for a in range(0, q.shape[0], 32):
        pos = [r[:10] + [-1] * (10 - len(r[:10])) for r in run_pos[a:a + 32]]
        s = ex.score_positions(q[a:a + 32], np.asarray(pos, dtype=np.int64))
        for b, row in enumerate(pos):
            i = a + b
            want = set(ref_pos[i][:10])
            tenth = ref_scores[i][min(9, len(ref_scores[i]) - 1)]
            hits = sum(1 for j, p in enumerate(row) if p >= 0 and (
                p in want or float(s[b, j]) >= tenth - TIE_TOL))
            vals.append(min(hits, len(want)) / max(1, len(want)))
    return float(np.mean(vals))


def _array_bytes(path: Path) -> dict[str, int]:
    man = json.loads((path / "manifest.json").read_text())
    out = {name: (path / e["file"]).stat().st_size for name, e in man["arrays"].items()}
    out["manifest.json"] = (path / "manifest.json").stat().st_size
    return out


def run_dataset(name: str, args) -> dict:
    from colengine.index.exhaustive import ExhaustiveIndex
    from colengine.index.plaid import PlaidIndex
    from colengine.pooling import pool_packed

    doc_ids, docs, qids, q, qrels, model = encoded(name)
    q = q.contiguous()
    T0 = docs.n_tokens
    print(f"[{name}] {len(docs)} documents, {T0} tokens, {len(qids)} queries", flush=True)

    def as_run(hits_batch):
        return [[(doc_ids[int(h.doc_id)], h.score) for h in r] for r in hits_batch]

    rows: dict[str, dict] = {}
    # exhaustive MaxSim over the unpooled vectors: the reference
    ex = ExhaustiveIndex.build(docs)
    ref_hits, ex_qps = _batched(lambda qq: ex.search(qq, k=10), q, 1)
    ref = as_run(ref_hits)
    ref_pos = [[int(h.doc_id) for h in r] for r in ref_hits]
    ref_scores = [[h.score for h in r] for r in ref_hits]
    base = ndcg10(ref, qids, qrels)
    rows["exhaustive"] = {"pool_factor": 1, "ndcg@10": base, "qps_batch32": ex_qps,
                          "tokens": T0, "bytes_per_original_token": 2.0 * docs.dim}
    print(f"[{name}] exhaustive nDCG@10 {base:.4f}  {ex_qps:.1f} q/s", flush=True)

    for f in args.pool_factors:
        # PLAID, built through the public path (pooling inside build), saved and reloaded
        t = time.perf_counter()
        idx = PlaidIndex.build(docs, nbits=args.nbits, pool_factor=f, device="cpu")
        build_s = time.perf_counter() - t
        tmp = Path(tempfile.mkdtemp(prefix="bench-pool-"))
        try:
            idx.save(tmp / "i")
            files = _array_bytes(tmp / "i")
            idx = PlaidIndex.load(tmp / "i", device="cpu")
            st = idx.stats()
            hits, qps = _batched(lambda qq, i=idx: i.search(qq, k=10), q, args.repeats)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        run = as_run(hits)
        pos = [[int(h.doc_id) for h in r] for r in hits]
        nd = ndcg10(run, qids, qrels)
        top = sorted(files.items(), key=lambda kv: -kv[1])
        row = {
            "pool_factor": f, "nbits": args.nbits, "ndcg@10": nd,
            "ndcg_retention_vs_exhaustive": nd / base if base else float("nan"),
            "recall_exh_top10": recall_of(run, ref, 10),
            "recall_exh_top10_ties": _tie_recall(pos, ex, q, ref_pos, ref_scores),
            "qps_batch32": qps, "build_s": build_s,
            "pooling_s": idx.meta["build"]["build_seconds"].get("pool"),
            "tokens": st["tokens"], "original_tokens": st["original_tokens"],
            "tokens_kept": st["tokens"] / st["original_tokens"],
            "n_centroids": st["n_centroids"], "disk_bytes": st["disk_bytes"],
            "bytes_per_token": st["bytes_per_token"],
            "bytes_per_original_token": st["bytes_per_original_token"],
            "bytes_per_original_token_by_file": {k: v / st["original_tokens"] for k, v in top},
            "build_detail": idx.meta.get("build"),
        }
        rows[f"plaid_pool{f}"] = row
        print(f"[{name}] plaid pool {f}: nDCG@10 {nd:.4f} ({row['ndcg_retention_vs_exhaustive']:.2%}"
              f" of exhaustive), recall {row['recall_exh_top10']:.3f}, "
              f"{row['bytes_per_original_token']:.2f} B/orig tok ({row['bytes_per_token']:.2f} "
              f"B/tok, {row['tokens_kept']:.3f} kept, K={st['n_centroids']}), {qps:.1f} q/s, "
              f"build {build_s:.0f}s", flush=True)
        del idx

        if f > 1 and not args.no_exhaustive_pooled:
            t = time.perf_counter()
            pooled = pool_packed(docs, f)
            pool_s = time.perf_counter() - t
            exp = ExhaustiveIndex(pooled, ex.ids)
            hits, qps = _batched(lambda qq, e=exp: e.search(qq, k=10), q, 1)
            run = as_run(hits)
            nd = ndcg10(run, qids, qrels)
            rows[f"exhaustive_pool{f}"] = {
                "pool_factor": f, "ndcg@10": nd,
                "ndcg_retention_vs_exhaustive": nd / base if base else float("nan"),
                "recall_exh_top10": recall_of(run, ref, 10), "qps_batch32": qps,
                "pooling_s": pool_s, "tokens": pooled.n_tokens,
                "tokens_kept": pooled.n_tokens / T0,
                "bytes_per_original_token": 2.0 * docs.dim * pooled.n_tokens / T0}
            print(f"[{name}] exhaustive pool {f}: nDCG@10 {nd:.4f}, pooling {pool_s:.0f}s",
                  flush=True)
            del exp, pooled

    p1 = rows.get("plaid_pool1", {}).get("ndcg@10")
    for k, r in rows.items():
        if k.startswith("plaid") and p1:
            r["ndcg_retention_vs_plaid_pool1"] = r["ndcg@10"] / p1
    return {"documents": len(docs), "tokens": T0, "queries": len(qids), "model": model,
            "rows": rows}


def _verdict(results: dict) -> dict:
    out = {}
    f = TARGET["pool_factor"]
    for name, res in results.items():
        r = res["rows"].get(f"plaid_pool{f}")
        if r is None:
            continue
        b = r["bytes_per_original_token"]
        ret = r["ndcg_retention_vs_exhaustive"]
        out[name] = {"bytes_per_original_token": b, "ndcg_retention_vs_exhaustive": ret,
                     "bytes_ok": b <= TARGET["max_bytes_per_original_token"],
                     "retention_ok": ret >= TARGET["min_ndcg_retention"],
                     "met": b <= TARGET["max_bytes_per_original_token"]
                     and ret >= TARGET["min_ndcg_retention"]}
    return out


def _plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for name, res in payload["results"].items():
        pr = [(r["bytes_per_original_token"], r["ndcg_retention_vs_exhaustive"], r["pool_factor"],
               r["qps_batch32"]) for k, r in res["rows"].items() if k.startswith("plaid")]
        pr.sort()
        axes[0].plot([p[0] for p in pr], [p[1] for p in pr], "o-", label=name)
        for b, ret, f, _ in pr:
            axes[0].annotate(f"pool {f}", (b, ret), fontsize=8, textcoords="offset points",
                             xytext=(4, 4))
        fs = sorted(pr, key=lambda p: p[2])
        axes[1].plot([p[2] for p in fs], [p[3] for p in fs], "o-", label=name)
    axes[0].axvline(TARGET["max_bytes_per_original_token"], color="grey", ls="--", lw=1)
    axes[0].axhline(TARGET["min_ndcg_retention"], color="grey", ls="--", lw=1)
    axes[0].set_xlabel("bytes per original token (every file of the index)")
    axes[0].set_ylabel("nDCG@10 / exhaustive unpooled nDCG@10")
    axes[0].grid(alpha=0.3)
    axes[0].legend()
    axes[1].set_xlabel("pool factor")
    axes[1].set_ylabel("queries/s, batches of 32")
    axes[1].set_xticks(sorted({r["pool_factor"] for res in payload["results"].values()
                               for r in res["rows"].values()}))
    axes[1].grid(alpha=0.3)
    axes[1].legend()
    env = payload["env"]
    fig.suptitle(f"PLAID nbits {payload['nbits']} with token pooling: {env['cpu']} "
                 f"x{env['cpu_count']}, {env['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_argument(ap)
    ap.add_argument("--datasets", default="scifact,nfcorpus")
    ap.add_argument("--pool-factors", default="1,2,3",
                    type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--nbits", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timed passes (best is kept)")
    ap.add_argument("--no-exhaustive-pooled", action="store_true",
                    help="skip exhaustive MaxSim over the pooled vectors")
    ap.add_argument("--name", default=None, help="result file stem (default pooling_<date>)")
    args = ap.parse_args(argv)
    data_root(args.data)
    payload = {"env": env_info(), "nbits": args.nbits, "k": 10, "knobs": "defaults for k=10",
               "target": TARGET, "timing": "all judged test queries in batches of 32, best of "
               f"{args.repeats} passes after a warm-up batch; index saved and reloaded "
               "(memory-mapped) before searching", "results": {}}
    stem = args.name or f"pooling_{today()}"
    for name in args.datasets.split(","):
        payload["results"][name] = run_dataset(name, args)
        payload["verdict"] = _verdict(payload["results"])
        path = write_json(stem, payload)        # after each data set: a cut run keeps its part
        _plot(payload, RESULTS / f"{stem}.png")
    print(json.dumps(payload["verdict"], indent=1))
    print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
