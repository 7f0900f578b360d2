"""Living-index stress: delete a random 10% of SciFact and add it back, 75 times.

    flock /tmp/colengine-bench.lock python bench/bench_living.py --data DATA --dataset scifact --cycles 75

The MiniLM stand-in embeddings come from bench/_common.py's on-disk cache. A PLAID index
(nbits=2, seed 0) is built once; each cycle tombstones a random 10% of the live documents and
adds the same embeddings back under the same ids (existing centroids and codec, no rebuild),
then runs every judged query with the default k=10 knobs and scores nDCG@10 (pytrec_eval).
The reference is a fresh build of the same corpus (the corpus is the same after every cycle).

Checked every cycle: documents untouched by the cycle keep byte-identical decompressed
vectors; every document found in both the fresh build's and the living index's top 10 has the
same score; the share of queries whose top-10 ids are identical. Tombstones are compacted by
``delete`` itself once they pass 25% of the stored rows, and by every save: every
``--save-every`` cycles the index is saved and loaded back (memory-mapped).
Writes bench/results/living_<dataset>_<date>.json and .png.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_data_argument, cpu_model, data_root, encoded, ndcg10  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _run(idx, q, knobs, batch=64):
    out = []
    for a in range(0, q.shape[0], batch):
        out.extend([[(h.doc_id, h.score) for h in r] for r in idx.search(q[a:a + batch], k=10, **knobs)])
    return out


def _compare(run, ref):
    """(share of queries with identical top-10 ids, max |score diff| over docs in both)."""
    same, worst = 0, 0.0
    for got, want in zip(run, ref):
        same += [d for d, _ in got] == [d for d, _ in want]
        w = dict(want)
        for d, s in got:
            if d in w:
                worst = max(worst, abs(s - w[d]))
    return same / max(1, len(ref)), worst


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="scifact")
    add_data_argument(ap)
    ap.add_argument("--cycles", type=int, default=75)
    ap.add_argument("--fraction", type=float, default=0.10)
    ap.add_argument("--nbits", type=int, default=2)
    ap.add_argument("--save-every", type=int, default=25)
    ap.add_argument("--check-docs", type=int, default=300,
                    help="untouched documents whose decompressed vectors are compared per cycle")
    ap.add_argument("--no-retrain", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    data_root(args.data)

    import torch

    from colengine.index.plaid import PlaidIndex

    doc_ids, docs, qids, q, qrels, model = encoded(args.dataset)
    q = q.contiguous()
    knobs: dict = {}
    info = {
        "dataset": args.dataset, "documents": len(docs), "tokens": docs.n_tokens,
        "queries": len(qids), "date": dt.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "model": model, "nbits": args.nbits, "cycles": args.cycles, "fraction": args.fraction,
        "knobs": "default k=10", "save_every": args.save_every, "seed": args.seed,
        "procedure": "each cycle: delete a random fraction of the live docs (tombstones), add the "
                     "same embeddings back under the same ids; nDCG@10 vs a fresh build",
    }
    print(f"[living] {args.dataset}: {len(docs)} docs, {docs.n_tokens} tokens, {len(qids)} queries",
          flush=True)
    t = time.perf_counter()
    fresh = PlaidIndex.build(docs, doc_ids, nbits=args.nbits, seed=0)
    info["fresh_build_s"] = round(time.perf_counter() - t, 2)
    info["n_centroids"] = fresh.n_centroids
    ref_run = _run(fresh, q, knobs)
    base = ndcg10(ref_run, qids, qrels)
    print(f"[living] fresh build {info['fresh_build_s']} s, nDCG@10 {base:.4f}", flush=True)
    fresh_emb = {}

    b = fresh.to_bundle()   # the living index starts as a copy of the fresh build
    b.arrays = {k: np.array(v) for k, v in b.arrays.items()}
    idx = PlaidIndex.from_bundle(b)
    rng = np.random.default_rng(args.seed)
    pos_of = {d: i for i, d in enumerate(doc_ids)}
    tmp = Path(tempfile.mkdtemp(prefix="living-"))
    rows = []
    n_warn = 0
    try:
        for cycle in range(1, args.cycles + 1):
            live = list(idx.ids)
            n = max(1, int(round(args.fraction * len(live))))
            out = [live[i] for i in np.sort(rng.choice(len(live), n, replace=False))]
            out_set = set(out)
            untouched = [d for d in live if d not in out_set]
            check = [untouched[i] for i in rng.choice(len(untouched), min(args.check_docs, len(untouched)),
                                                      replace=False)]
            before = dict(zip(check, idx.embeddings_of(check)))
            t0 = time.perf_counter()
            idx.delete(out)
            t1 = time.perf_counter()
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                idx.add(docs.select(np.array([pos_of[d] for d in out])), out)
            n_warn += sum(issubclass(x.category, UserWarning) for x in w)
            t2 = time.perf_counter()
            saved = False
            if args.save_every and cycle % args.save_every == 0:
                idx.save(tmp / "idx")                         # compacts the tombstones
                idx = PlaidIndex.load(tmp / "idx")
                saved = True
            t3 = time.perf_counter()
            run = _run(idx, q, knobs)
            t4 = time.perf_counter()
            nd = ndcg10(run, qids, qrels)
            same, worst = _compare(run, ref_run)
            after = idx.embeddings_of(check)
            vec_same = all(np.array_equal(before[d], a) for d, a in zip(check, after))
            # against the fresh build too (a sample; same embeddings -> same codes)
            for d in check[:50]:
                if d not in fresh_emb:
                    fresh_emb[d] = fresh.embeddings_of([d])[0]
            vec_fresh = all(np.array_equal(fresh_emb[d], a) for d, a in zip(check[:50], after[:50]))
            st = idx.stats()
            dr = st["drift"]
            row = {"cycle": cycle, "ndcg@10": nd, "retention": nd / base if base else float("nan"),
                   "same_top10_share": same, "max_abs_score_diff_common_hits": worst,
                   "untouched_vectors_unchanged": bool(vec_same),
                   "vectors_equal_fresh_build": bool(vec_fresh),
                   "deleted_rows_pending": st["deleted_documents"], "stored_rows": idx.n_rows,
                   "added_token_share": round(dr["added_token_share"], 4),
                   "residual_norm_ratio": dr["residual_norm_ratio"],
                   "saved_and_reloaded": saved,
                   "seconds": {"delete": round(t1 - t0, 3), "add": round(t2 - t1, 3),
                               "save_load": round(t3 - t2, 3), "search_all": round(t4 - t3, 3)}}
            rows.append(row)
            if cycle % 5 == 0 or cycle == args.cycles:   # partial results survive a kill
                _write(args, info, {"partial": True, "cycles_done": cycle,
                                    "fresh_ndcg@10": base}, rows, base)
            print(f"[living] cycle {cycle:3d}: nDCG@10 {nd:.4f} ({row['retention']:.4%}) "
                  f"same top-10 {same:.3f} max|ds| {worst:.2e} untouched-ok {vec_same} "
                  f"rows {idx.n_rows} add {t2 - t1:.2f}s search {t4 - t3:.2f}s", flush=True)
        summary = {
            "fresh_ndcg@10": base,
            "final_ndcg@10": rows[-1]["ndcg@10"],
            "final_retention": rows[-1]["retention"],
            "min_retention": min(r["retention"] for r in rows),
            "all_untouched_vectors_unchanged": all(r["untouched_vectors_unchanged"] for r in rows),
            "all_sampled_vectors_equal_fresh_build": all(r["vectors_equal_fresh_build"] for r in rows),
            "max_abs_score_diff_common_hits": max(r["max_abs_score_diff_common_hits"] for r in rows),
            "min_same_top10_share": min(r["same_top10_share"] for r in rows),
            "drift_warnings": n_warn,
            "target": ">= 99.5% of the fresh build's nDCG@10 after the last cycle",
            "target_met": rows[-1]["retention"] >= 0.995,
        }
        if not args.no_retrain:
            t = time.perf_counter()
            idx.retrain()
            rt = time.perf_counter() - t
            run = _run(idx, q, knobs)
            summary["after_retrain"] = {"ndcg@10": ndcg10(run, qids, qrels), "seconds": round(rt, 2),
                                        "drift": idx.drift()["added_token_share"]}
            summary["after_retrain"]["retention"] = summary["after_retrain"]["ndcg@10"] / base
            print(f"[living] retrain {rt:.1f}s: nDCG@10 {summary['after_retrain']['ndcg@10']:.4f}",
                  flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _write(args, info, summary, rows, base)
    print(json.dumps(summary, indent=1))


def _write(args, info, summary, rows, base, plot=True):
    RESULTS.mkdir(exist_ok=True)
    stem = f"living_{args.dataset}_{dt.date.today().isoformat()}"
    (RESULTS / f"{stem}.json").write_text(json.dumps({"info": info, "summary": summary,
                                                        "cycles": rows}, indent=1))
    if plot:
        _plot(rows, base, info, RESULTS / f"{stem}.png")
    print(f"wrote {RESULTS / stem}.json" + ("/.png" if plot else ""), flush=True)


def _plot(rows, base, info, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    c = [r["cycle"] for r in rows]
    ax[0].plot(c, [r["ndcg@10"] for r in rows], marker=".", label="living index")
    ax[0].axhline(base, color="k", ls="--", lw=1, label="fresh build")
    ax[0].axhline(0.995 * base, color="r", ls=":", lw=1, label="99.5% of fresh")
    ax[0].set_xlabel("cycle (delete 10%, add back)")
    ax[0].set_ylabel("nDCG@10")
    ax[0].legend(fontsize=8)
    ax[0].set_title(f"{info['dataset']}: nDCG@10 per cycle")
    ax[1].plot(c, [r["added_token_share"] for r in rows], label="added token share (drift)")
    ax[1].plot(c, [r["same_top10_share"] for r in rows], label="queries with identical top-10")
    ax[1].set_xlabel("cycle")
    ax[1].set_ylim(0, 1.05)
    ax[1].legend(fontsize=8)
    ax[1].set_title("drift and result stability")
    fig.suptitle(f"PLAID living-index stress, nbits={info['nbits']}, {info['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
