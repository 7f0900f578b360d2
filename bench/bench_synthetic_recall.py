"""Recall of the exhaustive top-10 on the synthetic clustered corpus, exhaustive streamed.

    flock /tmp/colengine-bench.lock python bench/bench_synthetic_recall.py --docs 20000,100000

For each size the corpus (``bench/synthetic.py``) is built into a PLAID index with
``build_from_iterator`` (nbits 2, both codecs optional), and the exact MaxSim top-10 of every
query is computed by streaming the corpus chunk by chunk through the exact kernel (the float
vectors are never all in memory). PLAID is then searched with the knob settings given, and the
table reports recall of the exhaustive top-10 (ties within 1e-4 of the 10th exact score count
as hits), q/s in batches of 32, and bytes per token. JSON + PNG in bench/results/.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (RESULTS, WIDE_KNOBS as WIDE, cpu_model, dir_bytes,  # noqa: E402
                     recall_with_ties, timed_search, today)
from synthetic import SyntheticCorpus  # noqa: E402

KNOBS = {"defaults": {}, "n_exact 128": {"n_exact": 128},
         "probe 2, cand 1024, exact 256": {"n_probe": 2, "n_candidates": 1024, "n_exact": 256},
         "probe 4, cand 2048, exact 512": {"n_probe": 4, "n_candidates": 2048, "n_exact": 512}}
#: fast-plaid settings: its defaults, and a wider one
FAST_PLAID = {"fast-plaid defaults": {}, "fast-plaid probe 32, full 8192":
              {"n_ivf_probe": 32, "n_full_scores": 8192}}


def run(n_docs: int, n_queries: int, codecs: list[str], max_centroids: int,
        refine: str | None = None, *, wide: bool = False, tune: bool = False,
        fast_plaid: bool = False) -> list[dict]:
    from colengine.index.plaid import PlaidIndex
    from colengine.index.plaid.centroids import default_n_centroids

    corpus = SyntheticCorpus(n_docs)
    qn, _ = corpus.queries(n_queries)
    q = torch.from_numpy(np.asarray(qn, dtype=np.float32))
    t = time.perf_counter()
    ex_s, ex_i = corpus.exact_top(q, 100)
    ex_time = time.perf_counter() - t
    ref = [[(f"d{int(i)}", float(s)) for s, i in zip(ex_s[b], ex_i[b])] for b in range(q.shape[0])]
    rows = []
    for codec in codecs:
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            idx = PlaidIndex.build_from_iterator(
                corpus, nbits=2, codec=codec, path=Path(tmp) / "i", show_progress=False,
                refine=refine,
                n_centroids=min(max_centroids, default_n_centroids(n_docs * corpus.mean_len)))
            build = time.perf_counter() - t
            idx = PlaidIndex.load(Path(tmp) / "i")
            st = idx.stats()
            base = {"documents": n_docs, "tokens": st["tokens"], "codec": codec,
                    "refine": refine, "n_centroids": st["n_centroids"],
                    "bytes_per_token": st["bytes_per_token"], "build_s": build,
                    "exhaustive_streamed_s": ex_time}

            def ours(knobs, idx=idx):
                return lambda qq: [[(h.doc_id, h.score) for h in r]
                                   for r in idx.search(qq, k=10, **knobs)]

            for name, knobs in {**KNOBS, **(WIDE if wide else {})}.items():
                rows.append(_row(base, name, ours(knobs), q, ref))
            if tune:   # last: tune() makes its pick (on pseudo-queries) the index's defaults
                t = time.perf_counter()
                res = idx.tune(target_recall=0.95, k=10)
                extra = {"tuned": res.to_meta(), "tune_s": time.perf_counter() - t}
                rows.append(_row({**base, **extra}, "tuned (pseudo-queries)", ours({}), q, ref))
    if fast_plaid:
        rows += run_fast_plaid(corpus, q, ref, n_docs, ex_time)
    return rows


def _row(base: dict, name: str, search, q: torch.Tensor, ref) -> dict:
    """``base`` with the recall and batched q/s of ``search`` (queries -> [(id, score)] lists)
    under the setting ``name``; printed as it is made."""
    got, _, qps = timed_search(search, q, 0)
    row = {**base, "knobs": name, "recall_exh_top10": recall_with_ties(got, ref, 10),
           "qps_batch32": qps}
    print(json.dumps(row), flush=True)
    return row


def run_fast_plaid(corpus: SyntheticCorpus, q: torch.Tensor, ref, n_docs: int,
                   ex_time: float) -> list[dict]:
    """fast-plaid (nbits 2) on the same documents, queries and reference."""
    import shutil

    from fast_plaid.search import FastPlaid

    mats, tokens = [], 0
    for _, part in corpus:
        tok = np.asarray(part.tokens, dtype=np.float32)
        off = np.asarray(part.offsets)
        mats += [torch.from_numpy(tok[a:b].copy()) for a, b in itertools.pairwise(off)]
        tokens += tok.shape[0]
    tmp = tempfile.mkdtemp()
    rows = []
    try:
        t = time.perf_counter()
        fp = FastPlaid(index=str(Path(tmp) / "fp"), device="cpu")
        fp.create(documents_embeddings=mats, nbits=2)
        build = time.perf_counter() - t
        del mats
        base = {"documents": n_docs, "tokens": tokens, "codec": "fast-plaid", "refine": None,
                "n_centroids": None, "bytes_per_token": dir_bytes(Path(tmp)) / tokens,
                "build_s": build, "exhaustive_streamed_s": ex_time}
        for name, sk in FAST_PLAID.items():
            def search(qq, sk=sk):
                return [[(f"d{int(i)}", float(s)) for i, s in r]
                        for r in fp.search(qq, top_k=10, show_progress=False, **sk)]

            rows.append(_row(base, name, search, q, ref))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", default="20000,100000")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--codecs", default="product,scalar")
    ap.add_argument("--max-centroids", type=int, default=1 << 15,
                    help="cap on PLAID's default number of centroids (build time on 2 cores)")
    ap.add_argument("--refine", choices=["float16", "int8"], default=None,
                    help="build with refinement vectors (PlaidIndex.build's refine=)")
    ap.add_argument("--wide", action="store_true",
                    help=f"also search with {next(iter(WIDE))} (fast-plaid's default budget)")
    ap.add_argument("--tune", action="store_true",
                    help="also idx.tune(target_recall=0.95) on pseudo-queries, then search")
    ap.add_argument("--fast-plaid", action="store_true",
                    help="also build and search fast-plaid (nbits 2) on the same corpus")
    ap.add_argument("--tag", default="", help="suffix of the result files (joined with _)")
    args = ap.parse_args(argv)
    info = {"date": today(), "cpu": cpu_model(), "threads": torch.get_num_threads(),
            "queries": args.queries, "knobs": {**KNOBS, **(WIDE if args.wide else {})},
            "fast_plaid": FAST_PLAID if args.fast_plaid else None, "refine": args.refine,
            "reference": "exact MaxSim top-100, streamed chunk by chunk; ties within 1e-4 of "
                         "the 10th exact score count as hits"}
    rows = []
    for n in [int(x) for x in args.docs.split(",")]:
        rows += run(n, args.queries, args.codecs.split(","), args.max_centroids, args.refine,
                    wide=args.wide, tune=args.tune, fast_plaid=args.fast_plaid)
        stem = RESULTS / f"synthetic_recall_{today()}{'_' + args.tag if args.tag else ''}"
        stem.with_suffix(".json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
        _plot(rows, info, stem.with_suffix(".png"))


def _plot(rows, info, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in sorted({(r["documents"], r["codec"]) for r in rows}):
        pts = [r for r in rows if (r["documents"], r["codec"]) == key]
        ax.plot([r["qps_batch32"] for r in pts], [r["recall_exh_top10"] for r in pts], "o-",
                label=f"{key[0]:,} docs, {key[1]}" + (f", refine {info['refine']}"
                                                      if info.get("refine") else ""))
    ax.axhline(0.95, ls="--", c="grey")
    ax.set_xlabel("queries/s (batches of 32)")
    ax.set_ylabel("recall of the exhaustive top-10")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title(f"synthetic corpus, nbits 2: {info['cpu']}, {info['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
