"""Scale: streaming PLAID builds of the synthetic clustered corpus at 10k, 100k and 1M documents,
with recall of the exhaustive top-10 against a streamed exact reference.

    flock /tmp/colengine-bench.lock python bench/bench_scale.py --sizes 10000,100000,1000000

For each size, in fresh subprocesses (so ``ru_maxrss`` is that size's peak RSS):

1. **Reference** (once per size and query count, then reused): the exact MaxSim top-100 of every
   query, computed by streaming the corpus chunk by chunk through the exact kernel (the float
   vectors are never all in memory), written to
   ``bench/results/synthetic_exact_<docs>docs_<queries>q.json``.
2. **Build**: ``PlaidIndex.build_from_iterator`` (two passes over regenerated float16 chunks,
   nbits 2 unless ``--nbits`` (and ``--refine``) say otherwise, K by PLAID's rule for the
   token count unless ``--max-centroids`` caps it; how K was chosen is the build's own
   record), written straight to a folder (pass 2's arrays are memory-mapped files), then
   loaded back memory-mapped.
3. **Search**: every query in batches of 32 (q/s) and one at a time (p50/p95 latency), at the
   default knobs and at each ``--knobs`` setting; recall of the exhaustive top-10 (ties within
   1e-4 of the 10th exact score count as hits) and success@10 (the query's source document).

Writes bench/results/scale_<date><tag>.json and .png (one curve per quantity over the sizes).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import (RESULTS, WIDE_KNOBS, cpu_model, peak_rss_mb, recall_with_ties,  # noqa: E402
                     rss_mb)
KNOBS = {"defaults": {}, "probe 2, cand 1024, exact 256": {"n_probe": 2, "n_candidates": 1024,
                                                            "n_exact": 256},
         "probe 4, cand 2048, exact 512": {"n_probe": 4, "n_candidates": 2048, "n_exact": 512}}


def reference_path(n_docs: int, n_queries: int, seed: int = 1) -> Path:
    """The reference of ``queries(n_queries, seed=seed)``; seed 1: the evaluation queries,
    others (``bench/tune_scale.py``): tuning queries held apart from them."""
    tail = "" if seed == 1 else f"_seed{seed}"
    return RESULTS / f"synthetic_exact_{n_docs}docs_{n_queries}q{tail}.json"


def reference(n_docs: int, n_queries: int, chunk_docs: int, seed: int = 1) -> dict:
    """Compute and write the streamed exact top-100 of ``n_queries`` queries."""
    import torch

    from synthetic import SyntheticCorpus

    corpus = SyntheticCorpus(n_docs, chunk_docs=chunk_docs)
    q, _ = corpus.queries(n_queries, seed=seed)
    t = time.perf_counter()
    s, i = corpus.exact_top(torch.from_numpy(np.asarray(q, dtype=np.float32)), 100)
    out = {"documents": n_docs, "queries": n_queries, "chunk_docs": chunk_docs,
           "generator": f"bench.synthetic.SyntheticCorpus(n_docs, seed=0), queries(n, seed={seed})",
           "what": "exact MaxSim (float32 queries, float16 tokens) top-100 per query, streamed",
           "seconds": round(time.perf_counter() - t, 1), "date": dt.date.today().isoformat(),
           "ids": [[f"d{int(x)}" for x in row] for row in i], "scores": s.tolist()}
    p = reference_path(n_docs, n_queries, seed)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(out))
    os.replace(tmp, p)
    return out


def _ref_pairs(ref: dict) -> list[list[tuple[str, float]]]:
    """The stored reference as ``_common.recall_with_ties`` takes it."""
    return [list(zip(ids, scores)) for ids, scores in zip(ref["ids"], ref["scores"])]


def one(n_docs: int, chunk_docs: int, max_centroids: int, n_queries: int, sample_tokens: int,
        workdir: Path, nbits: int = 2, refine: str | None = None,
        wide: bool = False, more_knobs: dict | None = None, ceiling: bool = True) -> dict:
    import torch

    from colengine.index.plaid import PlaidIndex
    from colengine.index.plaid.centroids import plaid_rule
    from synthetic import SyntheticCorpus

    ref = json.loads(reference_path(n_docs, n_queries).read_text())
    corpus = SyntheticCorpus(n_docs, chunk_docs=chunk_docs)
    q, targets = corpus.queries(n_queries)
    rss0 = rss_mb()
    k = None if max_centroids <= 0 else min(plaid_rule(n_docs * corpus.mean_len), max_centroids)
    path = workdir / "index"
    reused = (path / "manifest.json").exists()   # --index-dir holding an earlier build
    t = time.perf_counter()
    if reused:
        build_s, peak_build = None, None
        detail = PlaidIndex.load(path, verify=False).meta["build"]
    else:
        idx = PlaidIndex.build_from_iterator(corpus, nbits=nbits, refine=refine, n_centroids=k,
                                             seed=0, path=path, sample_tokens=sample_tokens,
                                             show_progress=False)
        build_s = round(time.perf_counter() - t, 1)
        peak_build = round(peak_rss_mb(), 1)
        detail = idx.meta["build"]
        del idx
    t = time.perf_counter()
    idx = PlaidIndex.load(path)
    load_s = time.perf_counter() - t
    st = idx.stats()
    qt = torch.from_numpy(np.asarray(q, dtype=np.float32))
    row = {"documents": n_docs, "tokens": st["tokens"], "n_centroids": st["n_centroids"],
           "plaid_rule": plaid_rule(st["tokens"]), "k_record": detail.get("n_centroids"),
           "nbits": nbits, "refine": refine, "codec": st.get("codec"),
           "build_s": build_s, "index_reused": reused,
           "build_parts_s": detail.get("build_seconds"), "kmeans_sample": detail.get("kmeans_sample"),
           "load_s": round(load_s, 2), "rss_before_build_mb": round(rss0, 1),
           "peak_rss_build_mb": peak_build,
           "disk_bytes": st["disk_bytes"], "bytes_per_token": round(st["disk_bytes"] / st["tokens"], 3),
           "float16_embeddings_mb": round(st["tokens"] * 128 * 2 / 2**20, 1),
           "queries": int(qt.shape[0]), "knobs": {}}
    hits_of = {}
    for name, knobs in {**KNOBS, **(more_knobs or {}), **(WIDE_KNOBS if wide else {})}.items():
        idx.search(qt[:4], k=10, **knobs)                       # warm-up
        t = time.perf_counter()
        hits = []
        for a in range(0, qt.shape[0], 32):
            hits.extend(idx.search(qt[a:a + 32], k=10, **knobs))
        qps = qt.shape[0] / (time.perf_counter() - t)
        lat = []
        for i in range(qt.shape[0]):
            t = time.perf_counter()
            idx.search(qt[i], k=10, **knobs)
            lat.append((time.perf_counter() - t) * 1000)
        got = [[(h.doc_id, h.score) for h in r] for r in hits]
        hits_of[name] = got
        row["knobs"][name] = {
            "recall_exh_top10": round(recall_with_ties(got, _ref_pairs(ref), 10), 4),
            "success@10": float(np.mean([tg in {d for d, _ in g} for tg, g in zip(targets, got)])),
            "qps_batch32": round(qps, 1), "p50_ms": round(float(np.percentile(lat, 50)), 1),
            "p95_ms": round(float(np.percentile(lat, 95)), 1)}
    row["peak_rss_mb"] = round(peak_rss_mb(), 1)
    row["rss_after_search_mb"] = round(rss_mb(), 1)
    if not ceiling:
        return row
    # after the peak is read: this decompresses every document (a block at a time).
    # Compression's share of the loss: every document decoded and scored exactly; pruning's
    # share: each setting's hits against that decoded top-10 (PLAID's final scores are the
    # same exact MaxSim over decoded vectors, so ties are judged on one scale)
    t = time.perf_counter()
    dec = decoded_top(idx, qt)
    row["decoded_ceiling_recall"] = round(recall_with_ties(dec, _ref_pairs(ref), 10), 4)
    if refine:   # decompress_docs reads the refinement store: the ceiling is that store's
        row["decoded_ceiling_of"] = f"refine={refine}"
    row["decoded_ceiling_s"] = round(time.perf_counter() - t, 1)
    for name, got in hits_of.items():
        row["knobs"][name]["recall_decoded_top10"] = round(recall_with_ties(got, dec, 10), 4)
    return row


def decoded_top(idx, qt, k: int = 100, block: int = 10_000):
    """Every document decompressed and scored exactly, ``block`` documents at a time (never the
    whole corpus decompressed at once: 1M documents would be 51 GB of float32): the top-``k``
    (ids, scores) per query over the decoded vectors, i.e. what the codec allows before pruning."""
    import torch

    from colengine.kernels import score_candidates_packed

    ql = torch.full((qt.shape[0],), qt.shape[1], dtype=torch.int64)
    best_s = torch.full((qt.shape[0], 0), float("-inf"))
    best_i = torch.zeros((qt.shape[0], 0), dtype=torch.int64)
    n = idx.n_rows
    for a in range(0, n, block):
        rows = torch.arange(a, min(n, a + block))
        tok, off = idx.decompress_docs(rows)
        local = torch.arange(rows.shape[0]).unsqueeze(0).expand(qt.shape[0], -1).contiguous()
        s = score_candidates_packed(qt, ql, tok, off, local)
        all_s, all_i = torch.cat([best_s, s], 1), torch.cat([best_i, rows.expand(qt.shape[0], -1)], 1)
        top = all_s.topk(min(k, all_s.shape[1]), dim=1)
        best_s, best_i = top.values, torch.gather(all_i, 1, top.indices)
    # a fresh build: stored row == position in ids
    return [[(idx.ids[int(r)], float(v)) for r, v in zip(ri, rs)]
            for ri, rs in zip(best_i.tolist(), best_s.tolist())]


def _more_knobs(text: str | None) -> dict:
    """``--more-knobs``: ``{name: {knob: value}}`` from JSON (checked before any work)."""
    more = json.loads(text) if text else {}
    if not isinstance(more, dict) or not all(isinstance(v, dict) for v in more.values()):
        raise SystemExit('--more-knobs takes {"name": {"n_probe": 4, ...}, ...}')
    return more


def _child(args, what: str, n: int, workdir: str | None = None) -> tuple[int, str, str]:
    cmd = [sys.executable, __file__, what, str(n), "--chunk-docs", str(args.chunk_docs),
           "--max-centroids", str(args.max_centroids), "--queries", str(args.queries),
           "--sample-tokens", str(args.sample_tokens), "--nbits", str(args.nbits)]
    if args.refine:
        cmd += ["--refine", args.refine]
    if args.wide:
        cmd += ["--wide"]
    if args.more_knobs:
        cmd += ["--more-knobs", args.more_knobs]
    if args.no_ceiling:
        cmd += ["--no-ceiling"]
    if workdir:
        cmd += ["--workdir", workdir]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    return p.returncode, p.stdout, p.stderr


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--chunk-docs", type=int, default=10_000)
    ap.add_argument("--max-centroids", type=int, default=0,
                    help="cap on PLAID's number of centroids (0: none, the rule as the build applies it)")
    ap.add_argument("--sample-tokens", type=int, default=1 << 21)
    ap.add_argument("--nbits", type=int, default=2, choices=(1, 2, 4),
                    help="residual bits per dimension (the issue's setting is 2)")
    ap.add_argument("--refine", choices=["float16", "int8"], default=None,
                    help="also store refinement vectors (PlaidIndex.build's refine=; int8 adds "
                         "132 bytes a token: 12.8 GB at 1M documents)")
    ap.add_argument("--wide", action="store_true",
                    help="also search at fast-plaid's default budget (8 probes, 4,096 documents "
                         "scored exactly)")
    ap.add_argument("--more-knobs", default=None,
                    help='more settings to search, as JSON: {"name": {"n_probe": 4, ...}}')
    ap.add_argument("--no-ceiling", action="store_true",
                    help="skip the decoded ceiling (every document decoded and scored: 14 min "
                         "at 1M documents)")
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--timeout", type=int, default=4 * 3600, help="seconds per subprocess")
    ap.add_argument("--tag", default="", help="suffix of the result files' names")
    ap.add_argument("--tmp", default=None, help="folder for the indexes (default: system temp)")
    ap.add_argument("--index-dir", default=None,
                    help="keep each size's index under DIR/<docs>/index; when one is already "
                         "there (same settings), search it without building (build figures "
                         "null): search-side changes measured without a 40-minute build")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--reference", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    _more_knobs(args.more_knobs)
    if args.reference:
        reference(args.reference, args.queries, args.chunk_docs)
        print("REFERENCE written", flush=True)
        return
    if args.one:
        print("RESULT " + json.dumps(one(args.one, args.chunk_docs, args.max_centroids, args.queries,
                                         args.sample_tokens, Path(args.workdir),
                                         args.nbits, args.refine, args.wide,
                                         _more_knobs(args.more_knobs),
                                         not args.no_ceiling)), flush=True)
        return
    info = {"date": dt.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "mem_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "generator": "bench.synthetic.SyntheticCorpus (dim 128, ~100 tokens/doc, 1024 topics)",
            "nbits": args.nbits, "refine": args.refine,
            "build": f"PlaidIndex.build_from_iterator, nbits {args.nbits}, two passes over "
                     "float16 chunks, written to a folder, loaded back memory-mapped",
            "n_centroids": ("PLAID's rule 2^floor(log2(16 sqrt(T)))" if args.max_centroids <= 0
                            else f"PLAID's rule capped at {args.max_centroids}"),
            "chunk_docs": args.chunk_docs, "sample_tokens": args.sample_tokens,
            "knobs": {**KNOBS, **_more_knobs(args.more_knobs),
                      **(WIDE_KNOBS if args.wide else {})},
            "threads": os.environ.get("OMP_NUM_THREADS", "default"),
            "recall": "of the streamed exact top-10, ties within 1e-4 of the 10th score count",
            "peak_rss": "ru_maxrss of the build+search subprocess (python + torch + faiss included; "
                        "rss_before_build_mb is that baseline)"}
    rows, notes = [], []
    for n in [int(s) for s in args.sizes.split(",")]:
        t = time.perf_counter()
        try:
            if not reference_path(n, args.queries).exists():
                print(f"[scale] {n} docs: exact reference ...", flush=True)
                rc, out, err = _child(args, "--reference", n)
                if rc:
                    notes.append(f"{n} docs: reference failed (rc {rc}): {err[-2000:]}")
                    print(notes[-1], flush=True)
                    break
            ref_s = json.loads(reference_path(n, args.queries).read_text())["seconds"]
            print(f"[scale] {n} docs: build + search ...", flush=True)
            if args.index_dir:
                work = Path(args.index_dir) / str(n)
                work.mkdir(parents=True, exist_ok=True)
                rc, out, err = _child(args, "--one", n, str(work))
            else:
                work = Path(tempfile.mkdtemp(prefix="scale-", dir=args.tmp))
                try:
                    rc, out, err = _child(args, "--one", n, str(work))
                finally:
                    shutil.rmtree(work, ignore_errors=True)
        except subprocess.TimeoutExpired:
            notes.append(f"{n} docs: did not finish within {args.timeout} s")
            print(notes[-1], flush=True)
            break
        res = [line for line in out.splitlines() if line.startswith("RESULT ")]
        if rc or not res:
            notes.append(f"{n} docs: failed (rc {rc}): {err[-2000:]}")
            print(notes[-1], flush=True)
            break
        r = json.loads(res[-1][7:])
        r["reference_s"] = ref_s
        r["wall_s"] = round(time.perf_counter() - t, 1)
        rows.append(r)
        _write(info, rows, notes, partial=True, tag=args.tag)   # survives a later kill
        d = r["knobs"]["defaults"]
        print(f"[scale] {n}: K {r['n_centroids']}, build {r['build_s']} s, peak RSS "
              f"{r['peak_rss_mb']} MB, {r['bytes_per_token']} B/token, {d['qps_batch32']} q/s, "
              f"p50 {d['p50_ms']} ms, recall {d['recall_exh_top10']}", flush=True)
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
    panels = [("build time (s)", lambda r, _: r["build_s"] or float("nan"), True),
              ("peak RSS (MB)", lambda r, _: r["peak_rss_mb"], True),
              ("bytes / token on disk", lambda r, _: r["bytes_per_token"], False),
              ("queries / s (batches of 32)", lambda r, kn: r["knobs"][kn]["qps_batch32"], True),
              ("single query p50 / p95 (ms)", lambda r, kn: r["knobs"][kn]["p50_ms"], True),
              ("recall of exhaustive top-10", lambda r, kn: r["knobs"][kn]["recall_exh_top10"], False)]
    fig, axs = plt.subplots(1, len(panels), figsize=(20, 3.6))
    for ax, (label, get, logy) in zip(axs, panels):
        for j, kn in enumerate(KNOBS):
            ax.plot(x, [get(r, kn) for r in rows], marker="o", label=kn, color=f"C{j}")
            if label.startswith("single"):
                ax.plot(x, [r["knobs"][kn]["p95_ms"] for r in rows], ls=":", marker=".",
                        color=f"C{j}")
            if not any(s in label for s in ("queries", "single", "recall")):
                break                       # not knob-dependent
        for r in rows:
            ax.annotate(f"K={r['n_centroids']}", (r["documents"], get(r, "defaults")), fontsize=7)
        if label.startswith("recall"):
            ax.axhline(0.95, ls="--", c="grey")
            ax.plot(x, [r.get("decoded_ceiling_recall") for r in rows], ls="--", marker="x",
                    c="grey", label="every document decompressed")
            ax.legend(fontsize=7)
        ax.set_xscale("log")
        if logy and any(v is not None and v > 0 for v in (get(r, "defaults") for r in rows)):
            ax.set_yscale("log")   # (a reused index has no build time: nothing to scale)
        ax.set_xlabel("documents (~100 tokens each)")
        ax.set_title(label, fontsize=9)
    fig.suptitle(f"PLAID streaming build + search, synthetic corpus, nbits "
                 f"{info.get('nbits', 2)}, {info['cpu']} x{info['cores']}, {info['date']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
