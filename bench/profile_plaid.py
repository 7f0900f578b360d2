"""Where a PLAID search spends its time, stage by stage, on the CPU or a GPU.

Uses the folder written by ``bench/bench_plaid_gpu.py prepare`` (an index and its queries):

    python bench/profile_plaid.py --data bench/.gpu/scifact --device cpu
    python bench/profile_plaid.py --data bench/.gpu/scifact --device cuda

Each stage function of :mod:`colengine.index.plaid.search` (and, on the CPU, the compiled
stages 2-3 of :mod:`colengine.index.plaid.stages_cpu`) is wrapped with a timer (the device
is synchronised before and after it, so GPU time lands in the stage that queued it; this adds a
few synchronisations per search, so the total is a little above an unprofiled search's):
centroid scores and the final top-k are what ``plaid_search`` spends outside stages 2-4, and
"index" is what ``search_topk`` spends outside ``plaid_search`` (query checks, chunking). Two
workloads at default knobs, k = 10: every query in batches of 32, and the first ``--single``
queries one at a time. Then ``torch.profiler`` lists the operators with the most self time for
single queries (CPU time, and CUDA time on a GPU).
Results: bench/results/profile_plaid_<device>_<date>.json.
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
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

K = 10
STAGES = ("_stage2", "_stage3", "_stage4")


def profile(args: argparse.Namespace) -> dict:
    from colengine.index.plaid import PlaidIndex
    from colengine.index.plaid import index as plaid_index
    from colengine.index.plaid import search as S
    from colengine.index.plaid import stages_cpu as C

    dev = torch.device(args.device)
    data = Path(args.data)
    q = torch.from_numpy(np.load(data / "queries.npy"))
    idx = PlaidIndex.load(data / "plaid", device=args.device)
    if dev.type == "cuda":
        q = q.to(dev)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    spent: collections.Counter = collections.Counter()

    def timed(fn, label):
        def run(*a, **kw):
            sync()
            t = time.perf_counter()
            out = fn(*a, **kw)
            sync()
            spent[label] += time.perf_counter() - t
            return out
        return run

    # the torch stages, and on the CPU the compiled stages 2-3 that plaid_search calls there
    targets = [(S, name) for name in STAGES] + [(C, "stage2"), (C, "stage3")]
    originals = {(mod, name): getattr(mod, name) for mod, name in targets}
    search_fn = plaid_index.plaid_search
    for (mod, name), fn in originals.items():
        setattr(mod, name, timed(fn, name.lstrip("_")))
    plaid_index.plaid_search = timed(search_fn, "plaid_search")
    rows = {}
    try:
        for label, bs, n in (("batch32", 32, q.shape[0]), ("single", 1, args.single)):
            for a in range(0, min(n, 64), bs):   # warm-up: allocations, Triton compilation
                idx.search_topk(q[a:a + bs], K)
            spent.clear()
            sync()
            t = time.perf_counter()
            for a in range(0, n, bs):
                idx.search_topk(q[a:a + bs], K)
            sync()
            total = time.perf_counter() - t
            inner = spent["plaid_search"] - sum(spent[s.lstrip("_")] for s in STAGES)
            parts = {s.lstrip("_"): spent[s.lstrip("_")] for s in STAGES}
            parts["centroid scores + final top-k"] = inner
            parts["index (outside plaid_search)"] = total - spent["plaid_search"]
            rows[label] = {"queries": n, "q_per_s": n / total, "ms_per_query": 1e3 * total / n,
                           "fraction": {k: v / total for k, v in parts.items()}}
            print(label, {k: (round(v, 3) if isinstance(v, float) else v)
                          for k, v in rows[label].items() if k != "fraction"},
                  {k: round(v, 3) for k, v in rows[label]["fraction"].items()}, flush=True)
    finally:
        for (mod, name), fn in originals.items():
            setattr(mod, name, fn)
        plaid_index.plaid_search = search_fn

    acts = [torch.profiler.ProfilerActivity.CPU]
    if dev.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        for i in range(args.single):
            idx.search_topk(q[i:i + 1], K)
        sync()
    key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    ops = []
    for e in sorted(prof.key_averages(), key=lambda e: -getattr(e, key, 0.0))[:args.top]:
        ops.append({"op": e.key, "count": e.count,
                    "self_cpu_us_per_query": e.self_cpu_time_total / args.single,
                    "self_device_us_per_query": getattr(e, "self_device_time_total", 0.0) / args.single})
    print(f"top operators by {key} (single queries, per query):")
    for o in ops:
        print(f"  {o['op'][:48]:48s} n={o['count']:6d} cpu {o['self_cpu_us_per_query']:8.1f} us"
              f"  device {o['self_device_us_per_query']:8.1f} us")
    return {"bench": "profile_plaid", "device": args.device, "env": _common.env_info(),
            "threads": torch.get_num_threads(), "index": str(data), "k": K, "knobs": "defaults",
            "workloads": rows, "top_ops_single": ops,
            "notes": "stage fractions of wall time with a device sync around each stage"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="folder from bench_plaid_gpu.py prepare")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--single", type=int, default=100, help="queries searched one at a time")
    ap.add_argument("--top", type=int, default=15, help="operators listed")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device here: use --device cpu")
    payload = profile(args)
    path = _common.write_json(f"profile_plaid_{args.device.split(':')[0]}_{_common.today()}",
                              payload)
    print("wrote", path)


if __name__ == "__main__":
    main()
