"""Scale: streaming PLAID builds of synthetic clustered corpora at growing sizes.

    flock /tmp/colengine-bench.lock python bench/bench_scale.py --sizes 10000,100000

Each size runs in its own subprocess (so ``ru_maxrss`` is that size's peak RSS): the
``bench.synthetic.SyntheticCorpus`` (about 100 tokens per document, dim 128, float16 chunks of
``--chunk-docs`` documents, regenerated deterministically on each pass) is indexed with
``PlaidIndex.build_from_iterator`` (two passes, never all float embeddings in memory), saved,
loaded back memory-mapped, and queried with ``--queries`` synthetic queries (each drawn from one
document's tokens: success@10 = that document in the top 10) in batches of 32 with the default
k=10 knobs. Reports build time (and its parts), peak RSS, bytes per token on disk, q/s.
Writes bench/results/scale_<date>.json and .png.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
RESULTS = HERE / "results"


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def one(n_docs: int, chunk_docs: int, max_centroids: int, n_queries: int, sample_tokens: int) -> dict:
    import torch

    from colengine.index.plaid import PlaidIndex
    from colengine.index.plaid.centroids import default_n_centroids
    from synthetic import SyntheticCorpus

    corpus = SyntheticCorpus(n_docs, chunk_docs=chunk_docs)
    q, targets = corpus.queries(n_queries)
    rss0 = _rss_mb()
    # tokens are only known after pass 1; the PLAID default is capped by --max-centroids
    est_tokens = n_docs * corpus.mean_len
    k = min(default_n_centroids(est_tokens), max_centroids)
    t = time.perf_counter()
    idx = PlaidIndex.build_from_iterator(corpus, nbits=2, n_centroids=k, seed=0,
                                         sample_tokens=sample_tokens, show_progress=False)
    build_s = time.perf_counter() - t
    rss_build = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tmp = Path(tempfile.mkdtemp(prefix="scale-"))
    try:
        t = time.perf_counter()
        idx.save(tmp / "i")
        save_s = time.perf_counter() - t
        n_tokens = idx.n_tokens
        detail = idx.meta["build"]
        del idx
        t = time.perf_counter()
        idx = PlaidIndex.load(tmp / "i")
        st = idx.stats()
        load_s = time.perf_counter() - t
        qt = torch.from_numpy(q)
        idx.search(qt[:4], k=10)                               # warm-up
        t = time.perf_counter()
        hits = []
        for a in range(0, qt.shape[0], 32):
            hits.extend(idx.search(qt[a:a + 32], k=10))
        search_s = time.perf_counter() - t
        t = time.perf_counter()
        for i in range(min(20, qt.shape[0])):
            idx.search(qt[i], k=10)
        single_ms = (time.perf_counter() - t) / min(20, qt.shape[0]) * 1000
        success = float(np.mean([tgt in {h.doc_id for h in r} for tgt, r in zip(targets, hits)]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "documents": n_docs, "tokens": n_tokens, "n_centroids": st["n_centroids"],
        "default_n_centroids": default_n_centroids(n_tokens), "nbits": 2,
        "build_s": round(build_s, 2), "build_detail": detail,
        "save_s": round(save_s, 2), "load_s": round(load_s, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_during_build_mb": round(rss_build, 1), "rss_before_build_mb": round(rss0, 1),
        "float16_embeddings_mb": round(n_tokens * 128 * 2 / 2**20, 1),
        "disk_bytes": st["disk_bytes"], "bytes_per_token": round(st["disk_bytes"] / n_tokens, 3),
        "ivf_pairs": st["ivf_pairs"],
        "qps_batched": round(qt.shape[0] / search_s, 2), "latency_single_ms": round(single_ms, 1),
        "queries": int(qt.shape[0]), "success@10": success,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--chunk-docs", type=int, default=10_000)
    ap.add_argument("--max-centroids", type=int, default=4096)
    ap.add_argument("--sample-tokens", type=int, default=1 << 20)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per size")
    ap.add_argument("--tag", default="", help="suffix of the result files' names")
    ap.add_argument("--combine", default=None,
                    help="comma-separated result JSONs of earlier runs: write one table + plot "
                         "of all their sizes (to scale_<date><tag>.json/.png) and exit")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.combine:
        runs = [json.loads(Path(f).read_text()) for f in args.combine.split(",")]
        rows = sorted((r for run in runs for r in run["sizes"]), key=lambda r: r["documents"])
        info = {**runs[0]["info"], "combined_from": args.combine.split(","),
                "runs_info": [run["info"] for run in runs]}
        _write(info, rows, [n for run in runs for n in run["info"].get("notes", [])],
               partial=False, tag=args.tag)
        return
    if args.one:
        print("RESULT " + json.dumps(one(args.one, args.chunk_docs, args.max_centroids,
                                         args.queries, args.sample_tokens)), flush=True)
        return
    from _common import cpu_model

    info = {"date": dt.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "mem_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "generator": "bench.synthetic.SyntheticCorpus (dim 128, ~100 tokens/doc, 1024 topics)",
            "build": "PlaidIndex.build_from_iterator, nbits=2, two passes, float16 chunks",
            "n_centroids": f"PLAID default for n_docs*100 tokens, capped at {args.max_centroids} "
                           "(assignment cost is tokens x centroids x dim on 2 cores)",
            "max_centroids": args.max_centroids, "chunk_docs": args.chunk_docs,
            "sample_tokens": args.sample_tokens,
            "peak_rss": "ru_maxrss of a fresh subprocess per size (python + torch + faiss baseline "
                        "included; rss_before_build_mb is that baseline)"}
    if 1_000_000 not in [int(s) for s in args.sizes.split(",")]:
        info["1M"] = ("not run in this session (no time left on the shared 2-core machine); see "
                      "projection_1M (from the growth between the last two sizes). A 1M-doc "
                      "(~100M-token) build streams: RAM = sample (256 MiB at 1M tokens) + one "
                      "chunk + the compressed index (~34 B/token, ~3.2 GiB) + lists; the cost is "
                      "assignment, tokens x centroids x dim flops")
    rows, notes = [], []
    for n in [int(s) for s in args.sizes.split(",")]:
        print(f"[scale] {n} docs ...", flush=True)
        t = time.perf_counter()
        try:
            p = subprocess.run([sys.executable, __file__, "--one", str(n), "--chunk-docs",
                                str(args.chunk_docs), "--max-centroids", str(args.max_centroids),
                                "--queries", str(args.queries), "--sample-tokens",
                                str(args.sample_tokens)], capture_output=True, text=True,
                               timeout=args.timeout)
        except subprocess.TimeoutExpired:
            notes.append(f"{n} docs: did not finish within {args.timeout} s")
            print(notes[-1], flush=True)
            break
        res = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
        if p.returncode or not res:
            notes.append(f"{n} docs: failed (rc {p.returncode}): {p.stderr[-2000:]}")
            print(notes[-1], flush=True)
            break
        r = json.loads(res[-1][7:])
        r["wall_s"] = round(time.perf_counter() - t, 1)
        rows.append(r)
        _write(info, rows, notes, partial=True, tag=args.tag)   # survives a later kill
        print(f"[scale] {n}: build {r['build_s']} s, peak RSS {r['peak_rss_mb']} MB, "
              f"{r['bytes_per_token']} B/token, {r['qps_batched']} q/s, success@10 {r['success@10']}",
              flush=True)
    if len(rows) >= 2:
        a, b = rows[-2], rows[-1]
        f = b["tokens"] / a["tokens"]
        growth = {key: round(math.log(b[key] / a[key]) / math.log(f), 3)
                  for key in ("build_s", "peak_rss_mb", "bytes_per_token", "qps_batched") if a[key] and b[key]}
        info["growth_exponents_last_two_sizes"] = growth
        n1m = 1_000_000
        proj = {"documents": n1m, "tokens_est": n1m * 100,
                "build_s_est": round(b["build_s"] * (n1m / b["documents"]) ** growth.get("build_s", 1.0)),
                "compressed_index_gb_est": round(n1m * 100 * b["bytes_per_token"] / 2**30, 2),
                "float16_embeddings_gb_if_held": round(n1m * 100 * 128 * 2 / 2**30, 1)}
        info["projection_1M"] = proj
    _write(info, rows, notes, partial=False, tag=args.tag)
    print(json.dumps({"info": info, "sizes": rows}, indent=1))


def _write(info, rows, notes, partial, tag=""):
    info = {**info, "notes": notes, "complete": not partial}
    RESULTS.mkdir(exist_ok=True)
    stem = f"scale_{dt.date.today().isoformat()}{tag}"
    (RESULTS / f"{stem}.json").write_text(json.dumps({"info": info, "sizes": rows}, indent=1))
    if rows:
        _plot(rows, info, RESULTS / f"{stem}.png")


def _plot(rows, info, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["documents"] for r in rows]
    fig, axs = plt.subplots(1, 4, figsize=(15, 3.4))
    for ax, key, label in zip(axs, ("build_s", "peak_rss_mb", "bytes_per_token", "qps_batched"),
                              ("build time (s)", "peak RSS (MB)", "bytes / token on disk",
                               "queries / s (batched)")):
        ax.plot(x, [r[key] for r in rows], marker="o")
        for r in rows:
            ax.annotate(f"K={r['n_centroids']}", (r["documents"], r[key]), fontsize=7)
        ax.set_xscale("log")
        if key in ("build_s", "peak_rss_mb"):
            ax.set_yscale("log")
        ax.set_xlabel("documents (~100 tokens each)")
        ax.set_title(label, fontsize=9)
    fig.suptitle(f"PLAID streaming build + query, synthetic corpus, {info['cpu']} x{info['cores']}, "
                 f"{info['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
