"""Stage 4's read-ahead (``search.prefetch_stored``) on and off, on a large kept PLAID index.

    flock /tmp/colengine-bench.lock python bench/bench_prefetch.py \\
        --index /path/to/scaleidx/1000000/index --docs 1000000

The index is one ``bench_scale.py --index-dir`` kept (the synthetic corpus, whose queries are
regenerated here). Single queries at one knob setting, read-ahead on for every other query
(the two halves see the same machine and page cache), in two conditions:

- **as found**: the pages as earlier work left them;
- **cold**: before each query, this process's pages of the store stage 4 reads (refinement
  copies and scales, else codes and residuals) are released and the files' pages dropped
  from the page cache (``posix_fadvise(DONTNEED)``): a query whose rows are not in memory,
  as on a machine whose memory cannot hold the store.

Latency p50/p95 and mean time per stage (2, 3, 4) for each half. Writes
``bench/results/prefetch_<date><tag>.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
from _common import (RESULTS, add_kept_index_arguments, env_info,  # noqa: E402
                     kept_index_queries, today)


def _args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_kept_index_arguments(p, queries=100, queries_help="per condition (half each way)")
    p.add_argument("--tag", default="")
    return p.parse_args()


def main() -> None:
    args = _args()
    knobs = json.loads(args.knobs)

    from colengine.index.plaid import PlaidIndex
    from colengine.index.plaid import search as S
    from colengine.memory import release_mapped

    idx = PlaidIndex.load(args.index)
    qt = kept_index_queries(args.docs, 1 + 2 * args.queries)
    names = ("refine", "refine_scale") if idx.refine is not None else ("codes", "residuals")
    gen = max(p for p in os.listdir(args.index) if p.startswith("g"))
    files = [os.path.join(args.index, gen, f"{n}.npy") for n in names]

    def drop() -> None:
        for n in names:
            release_mapped(getattr(idx, n))
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    spent: dict[str, float] = collections.defaultdict(float)
    for name in ("_stage2", "_stage3", "_stage4"):
        f = getattr(S, name)

        def timed(*a, _f=f, _n=name, **k):
            t = time.perf_counter()
            try:
                return _f(*a, **k)
            finally:
                spent[_n] += time.perf_counter() - t
        setattr(S, name, timed)
    real = S.prefetch_stored
    idx.search(qt[0], k=10, **knobs)            # lists and search state built
    out = {"env": env_info(), "index": args.index, "docs": args.docs, "knobs": knobs,
           "refine": idx.refine_kind, "store_files": [os.path.basename(f) for f in files],
           "conditions": {}}
    for c, (cond, cold) in enumerate((("as found", False), ("cold", True))):
        lat: dict[bool, list[float]] = {True: [], False: []}
        stages: dict[bool, dict[str, float]] = {True: collections.defaultdict(float),
                                                False: collections.defaultdict(float)}
        for i in range(args.queries):
            on = i % 2 == 0
            S.prefetch_stored = real if on else (lambda st, pos: 0)
            if cold:
                drop()
            spent.clear()
            t = time.perf_counter()
            idx.search(qt[1 + c * args.queries + i], k=10, **knobs)
            lat[on].append((time.perf_counter() - t) * 1e3)
            for k, v in spent.items():
                stages[on][k] += v * 1e3
        S.prefetch_stored = real
        out["conditions"][cond] = {}
        for on in (True, False):
            a = np.array(lat[on])
            row = {"n": int(a.size), "p50_ms": round(float(np.percentile(a, 50)), 1),
                   "p95_ms": round(float(np.percentile(a, 95)), 1),
                   "stage_mean_ms": {k[1:]: round(v / a.size, 1) for k, v in stages[on].items()}}
            out["conditions"][cond]["read ahead" if on else "no read-ahead"] = row
            print(cond, "read ahead" if on else "no read-ahead", json.dumps(row), flush=True)
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"prefetch_{today()}{args.tag}"
    stem.with_suffix(".json").write_text(json.dumps(out, indent=1))
    _plot(out, stem.with_suffix(".png"))


def _plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    labels, p50, p95 = [], [], []
    for cond, rows in out["conditions"].items():
        for name, r in rows.items():
            labels.append(f"{cond}\n{name}")
            p50.append(r["p50_ms"])
            p95.append(r["p95_ms"])
    x = np.arange(len(labels))
    ax.bar(x - 0.2, p50, 0.4, label="p50")
    ax.bar(x + 0.2, p95, 0.4, label="p95")
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("single query (ms)")
    ax.legend(fontsize=8)
    e = out["env"]
    ax.set_title(f"stage-4 read-ahead, {out['docs']:,} docs, refine={out['refine']}, "
                 f"{out['knobs']}\n{e.get('cpu')} x{e.get('cpu_count')}, {e.get('date')}",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
