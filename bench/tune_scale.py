"""Recall tuning of a kept synthetic-corpus index (``bench_scale.py --index-dir``) against a
streamed exact reference of tuning queries held apart from the evaluation queries.

    flock /tmp/colengine-bench.lock python bench/tune_scale.py \\
        --index /path/to/scaleidx/1000000/index --docs 1000000 --store

Tuning queries: ``SyntheticCorpus.queries(n, seed=--seed)`` (default 2; the evaluation
queries of ``bench_scale.py`` are seed 1). Their exact top-100 is computed once by streaming
the corpus chunks (``bench_scale.reference``) and written under ``bench/results/``; then
``PlaidIndex.tune(queries, reference_hits=...)`` picks the cheapest knobs of its grid whose
recall of the exact top-10 reaches ``--target``. With ``--store`` the knobs are saved as the
index's defaults (a new generation in the same folder: the big files are linked, not
rewritten); ``bench_scale.py --index-dir`` then measures them on the evaluation queries as
its "defaults" row. Writes ``bench/results/tune_scale_<date><tag>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
from _common import RESULTS, env_info, peak_rss_mb, today  # noqa: E402
from bench_scale import _ref_pairs, reference, reference_path  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--index", required=True, help="a kept bench_scale index folder")
    p.add_argument("--docs", type=int, required=True, help="documents of its corpus")
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--seed", type=int, default=2, help="tuning queries' seed (not 1)")
    p.add_argument("--chunk-docs", type=int, default=10_000)
    p.add_argument("--target", type=float, default=0.95)
    p.add_argument("--store", action="store_true", help="save the knobs as the defaults")
    p.add_argument("--tag", default="")
    args = p.parse_args()
    if args.seed == 1:
        raise SystemExit("--seed 1 is the evaluation queries' seed: tune on others")
    import torch
    from synthetic import SyntheticCorpus

    from colengine.index.plaid import PlaidIndex

    ref_file = reference_path(args.docs, args.queries, args.seed)
    if not ref_file.exists():
        print(f"exact reference of {args.queries} tuning queries ...", flush=True)
        reference(args.docs, args.queries, args.chunk_docs, args.seed)
    ref = json.loads(ref_file.read_text())
    hits = _ref_pairs(ref)
    q, _ = SyntheticCorpus(args.docs, chunk_docs=args.chunk_docs).queries(args.queries,
                                                                           seed=args.seed)
    t = time.perf_counter()
    idx = PlaidIndex.load(args.index, verify=False)
    load_s = time.perf_counter() - t
    idx.search(torch.from_numpy(np.asarray(q[:2], dtype=np.float32)), k=10)   # lists built
    t = time.perf_counter()
    res = idx.tune(torch.from_numpy(np.asarray(q, dtype=np.float32)), target_recall=args.target,
                   k=10, n_sample=args.queries, reference_hits=hits, store=args.store)
    tune_s = time.perf_counter() - t
    print(f"tuned in {tune_s:.0f} s: {res.knobs} recall {res.recall:.3f} "
          f"(reached {res.reached}; {len(res.trail)} settings measured)", flush=True)
    save_s = None
    if args.store:
        t = time.perf_counter()
        idx.save(args.index)
        save_s = time.perf_counter() - t
        print(f"stored as the index's defaults for k=10 (save {save_s:.1f} s)", flush=True)
    out = {"env": {**env_info(), "index": str(args.index), "documents": args.docs,
                   "tuning_queries": args.queries, "tuning_seed": args.seed,
                   "reference": str(ref_file.name), "reference_seconds": ref["seconds"]},
           "target": args.target, "knobs": res.to_meta()["knobs"], "recall": res.recall,
           "reached": res.reached, "cost": res.cost, "trail": res.trail,
           "load_s": round(load_s, 1), "tune_s": round(tune_s, 1), "save_s": save_s,
           "stored": args.store, "peak_rss_mb": round(peak_rss_mb(), 1)}
    path = RESULTS / f"tune_scale_{today()}{args.tag}.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
