"""Knob sweep for PLAID defaults: nDCG@10 retention vs exhaustive and q/s (batched and single).

    flock /tmp/colengine-bench.lock python bench/_plaid_sweep.py scifact \
        '{"n_probe": [1, 2], "n_exact": [32, 64]}' --data DATA
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_data_argument, data_root, encoded, ndcg10, recall_of  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset")
    ap.add_argument("grid", nargs="?", default="{}", help="JSON: knob name -> list of values")
    add_data_argument(ap)
    args = ap.parse_args()
    data_root(args.data)
    name = args.dataset
    grid = json.loads(args.grid)
    from colengine.index.exhaustive import ExhaustiveIndex
    from colengine.index.plaid import PlaidIndex

    doc_ids, docs, qids, q, qrels, _ = encoded(name)
    cache = Path.home() / ".cache" / "colengine" / f"plaid-sweep-{name}"
    if (cache / "manifest.json").is_file():
        idx = PlaidIndex.load(cache)
    else:
        t = time.time()
        idx = PlaidIndex.build(docs, nbits=2)
        print("build", time.time() - t, idx.meta["build"], flush=True)
        idx.save(cache)
    print(idx.stats(), flush=True)
    ref_path = cache.with_name(cache.name + "-exh.json")
    if ref_path.is_file():
        ref = json.loads(ref_path.read_text())
    else:
        ex = ExhaustiveIndex.build(docs)
        ref = []
        for a in range(0, q.shape[0], 32):
            ref.extend([[(doc_ids[int(h.doc_id)], h.score) for h in r] for r in ex.search(q[a:a + 32], k=100)])
        ref_path.write_text(json.dumps(ref))
    base = ndcg10(ref, qids, qrels)
    ex = ExhaustiveIndex.build(docs)
    ex.search(q[:2], k=10)
    t = time.perf_counter()
    for a in range(0, 64, 32):
        ex.search(q[a:a + 32], k=10)
    ebq = 64 / (time.perf_counter() - t)
    t = time.perf_counter()
    for i in range(10):
        ex.search(q[i:i + 1], k=10)
    esq = 10 / (time.perf_counter() - t)
    del ex
    print(f"exhaustive ndcg {base:.4f} batch {ebq:.1f} q/s single {esq:.1f} q/s", flush=True)
    keys = list(grid)
    for vals in itertools.product(*[grid[k] for k in keys]):
        kn = dict(zip(keys, vals))
        idx.search(q[:2], k=10, **kn)
        t = time.perf_counter()
        run = []
        for a in range(0, q.shape[0], 32):
            run.extend([[(doc_ids[int(h.doc_id)], h.score) for h in r] for r in idx.search(q[a:a + 32], k=10, **kn)])
        bq = q.shape[0] / (time.perf_counter() - t)
        t = time.perf_counter()
        for i in range(20):
            idx.search(q[i:i + 1], k=10, **kn)
        sq = 20 / (time.perf_counter() - t)
        nd = ndcg10(run, qids, qrels)
        print(f"{kn} ndcg {nd:.4f} ret {nd / base:.4f} r10 {recall_of(run, ref, 10):.3f} "
              f"batch {bq:.1f} q/s single {sq:.1f} q/s", flush=True)


if __name__ == "__main__":
    main()
