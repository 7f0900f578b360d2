"""BM25 build memory and time: colengine's vectorised score matrix vs bm25s's own builder.

    python bench/bench_bm25_build.py --docs 100000,300000

Each (size, builder) runs in a fresh subprocess so ``ru_maxrss`` is its own peak. The corpus is
synthetic English-like text (words drawn from a Zipf law over a 200k-word vocabulary, ~100
words a document), generated chunk by chunk. Both builders get the same packed term ids from
``BM25Index._encode_texts``; ``numpy`` is :func:`colengine.bm25.score_matrix` (what
``BM25Index`` uses), ``bm25s`` is ``bm25s.BM25.build_index_from_ids`` on a Python list of ids
per document (what it used before). Reports the peak RSS above the process's baseline, the
tokenising and scoring seconds, and checks that both matrices hold the same number of entries.
Writes bench/results/bm25_build_<date>.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import RESULTS, cpu_model, peak_rss_mb, rss_mb, today  # noqa: E402


def texts(n_docs: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = np.array([f"w{i}x" for i in range(200_000)])
    out = []
    for a in range(0, n_docs, 10_000):
        m = min(n_docs, a + 10_000) - a
        lens = rng.poisson(100, m)
        ids = (rng.zipf(1.2, lens.sum()) - 1) % words.size
        parts = np.split(words[ids], np.cumsum(lens)[:-1])
        out.extend(" ".join(p) for p in parts)
    return out


def one(n_docs: int, builder: str) -> dict:
    from colengine.bm25 import Analyzer, BM25Index, score_matrix

    corpus = texts(n_docs)
    base = rss_mb()
    t = time.perf_counter()
    vocab: list[str] = []
    terms, offsets = BM25Index._encode_texts(corpus, Analyzer("en"), vocab, {}, False)
    tok_s = time.perf_counter() - t
    t = time.perf_counter()
    params = {"k1": 0.9, "b": 0.4, "method": "lucene", "delta": 0.5}
    if builder == "numpy":
        m = score_matrix(terms, offsets, len(vocab), params)
    else:
        import bm25s

        per_doc = [a.tolist() for a in np.split(terms, offsets[1:-1])]
        m = bm25s.BM25(k1=0.9, b=0.4, method="lucene").build_index_from_ids(
            unique_token_ids=list(range(len(vocab))), corpus_token_ids=per_doc, show_progress=False)
    score_s = time.perf_counter() - t
    peak = peak_rss_mb()
    return {"documents": n_docs, "builder": builder, "terms": int(terms.size), "vocab": len(vocab),
            "entries": int(np.asarray(m["data"]).size), "tokenise_s": round(tok_s, 1),
            "score_s": round(score_s, 1), "baseline_rss_mb": round(base, 1),
            "peak_above_baseline_mb": round(peak - base, 1),
            "texts_mb": round(sum(len(x) for x in corpus) / 2**20, 1)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", default="100000,300000")
    ap.add_argument("--builders", default="numpy,bm25s")
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(one(int(args.one[0]), args.one[1])), flush=True)
        return
    rows = []
    for n in [int(x) for x in args.docs.split(",")]:
        for b in args.builders.split(","):
            p = subprocess.run([sys.executable, __file__, "--one", str(n), b], capture_output=True,
                               text=True)
            res = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if p.returncode or not res:
                raise SystemExit(f"{n} docs, {b}: failed\n{p.stderr[-3000:]}")
            rows.append(json.loads(res[-1][7:]))
            print(json.dumps(rows[-1]), flush=True)
    info = {"date": today(), "cpu": cpu_model(), "cores": os.cpu_count(),
            "corpus": "synthetic Zipf(1.2) words over 200k, Poisson(100) words a document",
            "peak": "ru_maxrss minus RSS after generating the texts (the texts themselves are "
                    "not counted; the analyzer's term ids are)"}
    stem = RESULTS / f"bm25_build_{today()}"
    stem.with_suffix(".json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axs = plt.subplots(1, 2, figsize=(9, 3.5))
    for b in args.builders.split(","):
        pts = [r for r in rows if r["builder"] == b]
        axs[0].plot([r["documents"] for r in pts], [r["peak_above_baseline_mb"] for r in pts], "o-", label=b)
        axs[1].plot([r["documents"] for r in pts], [r["score_s"] for r in pts], "o-", label=b)
    axs[0].set_title("peak RSS above baseline (MB)", fontsize=9)
    axs[1].set_title("score matrix build (s)", fontsize=9)
    for ax in axs:
        ax.set_xlabel("documents (~100 words)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"BM25 build, {info['cpu']} x{info['cores']}, {info['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main()
