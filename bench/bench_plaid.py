"""PLAID index vs exhaustive MaxSim vs fast-plaid, side by side on the same embeddings.

    flock /tmp/colengine-bench.lock python bench/bench_plaid.py --data DATA --dataset scifact

Documents and queries are encoded once with the MiniLM stand-in (all-MiniLM-L6-v2 + fixed
128-dim projection) and cached on disk. Each engine runs in its own spawned process so that its
peak RSS is its own: ``peak_rss_mb`` is the child's ``ru_maxrss`` minus its RSS once the
memory-mapped embeddings are loaded. Quality comes from one
batched run over all judged queries; single-query latency from the first ``--timing-queries``
queries one at a time; batched throughput from all queries in batches of 32.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (add_data_argument, cpu_model, data_root, dir_bytes, encoded,  # noqa: E402
                     ndcg10, peak_rss_mb, recall_of, recall_with_ties, rss_mb, timed_search)

RESULTS = Path(__file__).resolve().parent / "results"


# -- engines (each runs in a child process) ---------------------------------------------------
def _engine_exhaustive(docs, doc_ids, q, cfg):
    from colengine.index.exhaustive import ExhaustiveIndex

    t = time.perf_counter()
    idx = ExhaustiveIndex.build(docs)
    build = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        idx.save(Path(tmp) / "i")
        nbytes = dir_bytes(Path(tmp) / "i")

    def search(qq, k=100):
        return [[(doc_ids[int(h.doc_id)], h.score) for h in r] for r in idx.search(qq, k=k)]

    out, lat, bqps = timed_search(search, q, cfg["timing_queries"])
    return dict(build_s=build, bytes_per_token=nbytes / docs.n_tokens, run100=out, run10=None,
                lat=lat.tolist(), batched_qps=bqps)


def _engine_plaid(docs, doc_ids, q, cfg):
    if cfg.get("root"):   # a baseline engine: colengine from another checkout (a git worktree)
        sys.path.insert(0, cfg["root"])
        for name in [m for m in sys.modules if m == "colengine" or m.startswith("colengine.")]:
            del sys.modules[name]
    from colengine.index.plaid import PlaidIndex

    if cfg.get("root"):
        import colengine

        if not Path(colengine.__file__).resolve().is_relative_to(Path(cfg["root"]).resolve()):
            raise RuntimeError(f"the baseline engine was imported from {colengine.__file__}")
        docs = (np.asarray(docs.tokens), np.asarray(docs.offsets))   # not this checkout's class

    t = time.perf_counter()
    idx = PlaidIndex.build(docs, nbits=cfg["nbits"], **cfg.get("build", {}))
    build = time.perf_counter() - t
    tuned = None
    if cfg.get("tune"):
        t = time.perf_counter()
        res = idx.tune(**cfg["tune"])
        tuned = {"seconds": time.perf_counter() - t, "knobs": res.to_meta()}
    tmp = Path(tempfile.mkdtemp())
    try:
        idx.save(tmp / "i")
        rss = _search_rss(tmp / "i", cfg)
        idx = PlaidIndex.load(tmp / "i")            # search the memory-mapped, reloaded index
        stats = idx.stats()
        knobs = cfg.get("knobs", {})

        def search10(qq):
            return [[(doc_ids[int(h.doc_id)], h.score) for h in r] for r in idx.search(qq, k=10, **knobs)]

        out10, lat, bqps = timed_search(search10, q, cfg["timing_queries"])
        run100 = []
        for a in range(0, q.shape[0], 32):
            run100.extend([[(doc_ids[int(h.doc_id)], h.score) for h in r]
                           for r in idx.search(q[a:a + 32], k=100, **cfg.get("knobs100", {}))])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dict(build_s=build, bytes_per_token=stats["bytes_per_token"], run10=out10, run100=run100,
                bytes_per_original_token=stats.get("bytes_per_original_token"), tuned=tuned,
                lat=lat.tolist(), batched_qps=bqps, search_rss=rss,
                index={k: stats[k] for k in ("n_centroids", "nbits", "ivf_pairs")},
                build_detail=idx.meta.get("build"))


def _search_rss(path: Path, cfg) -> dict:
    """Resident memory a loaded index adds while it searches, measured in fresh processes
    (spawned: this one's build left its own pages behind): RSS after importing everything and
    loading the queries, then after loading the index and searching every query in batches of
    32 (at the end and at the peak), against the index's size on disk.

    Measured twice: ``warm`` first loads and searches a 200-document index built from the same
    corpus and gives the C heap's free memory back, so that the pages of the engine's code
    (torch's and numpy's libraries, touched on first use, the same for any index and shared
    between processes) and the warm-up's heap are not counted; ``cold`` counts them (the
    figure reported before 2026-12-01)."""
    out = {}
    for warm in (True, False):
        ctx = mp.get_context("spawn")
        a, b = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_search_rss_child, args=(b, str(path), {**cfg, "warm": warm}))
        p.start()
        res = a.recv()
        p.join()
        out = {**out, **res} if warm else {**out, **{f"cold_{k}": v for k, v in res.items()
                                                     if k != "disk_mb"}}
    return out


def _trim_heap() -> None:
    """glibc's malloc_trim (free heap memory back to the OS), where there is one. Not
    ``colengine.memory.release_free_memory``: the child may run a baseline checkout (d9a7b20)
    that predates it."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


def _hwm_mb() -> float:
    """Peak resident set size of this process (VmHWM), in MiB."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _search_rss_child(conn, path, cfg):
    try:
        if cfg.get("root"):
            sys.path.insert(0, cfg["root"])
        import torch  # noqa: F401

        from colengine.index.plaid import PlaidIndex

        _, docs, _, q, _, _ = encoded(cfg["dataset"])
        q = q.contiguous()
        import gc

        if cfg.get("warm"):   # see _search_rss
            with tempfile.TemporaryDirectory() as tmp:
                small = PlaidIndex.build([np.asarray(docs[i]) for i in range(min(200, len(docs)))],
                                         nbits=cfg.get("nbits", 2))
                small.save(Path(tmp) / "w")
                del small
                small = PlaidIndex.load(Path(tmp) / "w")
                for a in range(0, 64, 32):
                    small.search(q[a:a + 32], k=10, **cfg.get("knobs", {}))
                for a in range(4):
                    small.search(q[a:a + 1], k=10, **cfg.get("knobs", {}))
                del small
        del docs
        gc.collect()
        _trim_heap()
        rss0 = rss_mb()
        # reset the peak (VmHWM) so that loading the corpus cache above does not count
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        idx = PlaidIndex.load(path)
        for a in range(0, q.shape[0], 32):
            idx.search(q[a:a + 32], k=10, **cfg.get("knobs", {}))
        rss1 = rss_mb()
        conn.send({"disk_mb": dir_bytes(Path(path)) / 2**20, "added_after_search_mb": rss1 - rss0,
                   "added_peak_mb": _hwm_mb() - rss0})
    except BaseException as e:  # noqa: BLE001 - report, do not hang the parent
        conn.send({"error": repr(e)})
    finally:
        conn.close()


def _engine_fastplaid(docs, doc_ids, q, cfg):
    import torch
    from fast_plaid.search import FastPlaid

    tmp = Path(tempfile.mkdtemp())
    try:
        mats = [torch.from_numpy(np.asarray(docs[i], dtype=np.float32)) for i in range(len(docs))]
        t = time.perf_counter()
        fp = FastPlaid(index=str(tmp / "fp"), device="cpu")
        fp.create(documents_embeddings=mats, **cfg.get("create", {}))
        build = time.perf_counter() - t
        nbytes = dir_bytes(tmp / "fp")
        sk = cfg.get("search", {})

        def search(qq, k=10):
            res = fp.search(qq, top_k=k, show_progress=False, **sk)
            return [[(doc_ids[int(i)], float(s)) for i, s in r] for r in res]

        out10, lat, bqps = timed_search(search, q, cfg["timing_queries"])
        run100 = []
        for a in range(0, q.shape[0], 32):
            run100.extend(search(q[a:a + 32], k=100))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dict(build_s=build, bytes_per_token=nbytes / docs.n_tokens, run10=out10, run100=run100,
                lat=lat.tolist(), batched_qps=bqps)


ENGINES = {"exhaustive": _engine_exhaustive, "plaid": _engine_plaid, "fast-plaid": _engine_fastplaid}


def _child(conn, kind, dataset, cfg):
    try:
        doc_ids, docs, _, q, _, _ = encoded(dataset)   # memory-mapped from the on-disk cache
        q = q.contiguous()
        rss0 = rss_mb()
        res = ENGINES[kind](docs, doc_ids, q, cfg)
        res["peak_rss_mb"] = peak_rss_mb() - rss0
        conn.send(("ok", res))
    except BaseException as e:  # noqa: BLE001 - report any failure to the parent
        import traceback

        conn.send(("error", f"{e!r}\n{traceback.format_exc()}"))
    finally:
        conn.close()


def run_engine(kind, dataset, cfg):
    # spawn, not fork: a forked child of a process that already ran torch ops can deadlock in
    # the OpenMP thread pool (seen here: the exhaustive child hung at 0% CPU).
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(b, kind, dataset, cfg))
    p.start()
    status, res = a.recv()
    p.join()
    if status != "ok":
        raise RuntimeError(f"{kind} failed: {res}")
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="scifact")
    add_data_argument(ap)
    ap.add_argument("--timing-queries", type=int, default=100)
    ap.add_argument("--engines", default="exhaustive,plaid1,plaid2,plaid4,fast-plaid,fast-plaid-nbits2")
    ap.add_argument("--knobs", default="{}", help="JSON knobs for our k=10 search")
    ap.add_argument("--tag", default="")
    ap.add_argument("--baseline", default=os.environ.get("COLENGINE_BASELINE"),
                    help="checkout of the engine to compare against (e.g. a git worktree of the "
                         "commit before a change; needs colengine/kernels -> ../kernels): the "
                         "engines base1/base2/base4 run it")
    args = ap.parse_args(argv)
    data_root(args.data)   # checked, and exported for the engines' child processes

    import torch

    doc_ids, docs, qids, q, qrels, model = encoded(args.dataset)
    q = q.contiguous()
    tq = args.timing_queries
    knobs = json.loads(args.knobs)
    configs = {
        "exhaustive": ("exhaustive", {}),
        "plaid1": ("plaid", {"nbits": 1, "knobs": knobs}),
        "plaid2": ("plaid", {"nbits": 2, "knobs": knobs}),
        "plaid4": ("plaid", {"nbits": 4, "knobs": knobs}),
        "plaid2-scalar": ("plaid", {"nbits": 2, "knobs": knobs, "build": {"codec": "scalar"}}),
        "plaid2-exact128": ("plaid", {"nbits": 2, "knobs": {"n_exact": 128, **knobs}}),
        "plaid2-wide": ("plaid", {"nbits": 2, "knobs": {"n_candidates": 1024, "n_exact": 256,
                                                         **knobs}}),
        "plaid2-impute": ("plaid", {"nbits": 2, "knobs": {"impute": True, **knobs}}),
        **{f"plaid2-pool{f}": ("plaid", {"nbits": 2, "knobs": knobs, "build": {"pool_factor": f}})
           for f in (2, 3)},
        # tune() on pseudo-queries from the documents (no test query seen), target 0.95 of the
        # exact top-10 over the index's own decompressed vectors; the tuned knobs are the
        # saved index's defaults
        "plaid2-tuned": ("plaid", {"nbits": 2, "tune": {"target_recall": 0.95}}),
        # refinement vectors (refine=): stage 4 scores float16 / int8 copies of the tokens;
        # "mid" = n_probe 4, 1024 candidates, 256 scored exactly; "wide" = the knobs that
        # reach 0.95 of the exact top-10 on SciFact (n_probe 4, 2048 candidates, 512 scored
        # exactly); "tuned" = tune() on pseudo-queries, as above. base2-i8* run the same
        # settings on the --baseline checkout.
        **{f"{engine}-{short}{suffix}": ("plaid", {"nbits": 2, "build": {"refine": kind}, **extra,
                                                    **root})
           for engine, root in (("plaid2", {}), ("base2", {"root": args.baseline}))
           for short, kind in (("f16", "float16"), ("i8", "int8"))
           for suffix, extra in (("", {"knobs": knobs}),
                                 ("-mid", {"knobs": {"n_probe": 4, "n_candidates": 1024,
                                                     "n_exact": 256, **knobs}}),
                                 ("-wide", {"knobs": {"n_probe": 4, "n_candidates": 2048,
                                                      "n_exact": 512, **knobs}}),
                                 ("-tuned", {"tune": {"target_recall": 0.95}}))},
        **{f"base{b}": ("plaid", {"nbits": b, "root": args.baseline}) for b in (1, 2, 4)},
        "fast-plaid": ("fast-plaid", {}),
        "fast-plaid-nbits2": ("fast-plaid", {"create": {"nbits": 2}}),
    }
    info = {
        "dataset": args.dataset, "documents": len(docs), "tokens": docs.n_tokens,
        "queries": len(qids), "date": dt.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "loadavg_start": os.getloadavg(), "model": model,
        "timing": f"single: first {tq} queries one at a time; batched: all queries, batches of 32",
        "peak_rss": "spawned child per engine: ru_maxrss minus RSS after loading the memory-mapped embeddings",
        "kernel": "colengine.kernels.score_candidates_packed",
    }
    results = {}
    names = args.engines.split(",")
    if any(n.startswith("base") for n in names) and not args.baseline:
        ap.error("the base* engines need --baseline DIR (or COLENGINE_BASELINE)")
    for name in names:
        kind, cfg = configs[name]
        cfg = {**cfg, "timing_queries": tq, "dataset": args.dataset}
        print(f"[{name}] running ...", flush=True)
        t = time.perf_counter()
        results[name] = run_engine(kind, args.dataset, cfg)
        results[name]["config"] = {k: v for k, v in cfg.items() if k not in ("timing_queries", "dataset")}
        print(f"[{name}] done in {time.perf_counter() - t:.0f}s", flush=True)
        info["loadavg_end"] = os.getloadavg()
        # written after every engine, so a long run that is cut short still leaves its results
        _write(results, info, qids, qrels, args)


def _write(results, info, qids, qrels, args):
    if "exhaustive" not in results:
        return
    ref = results["exhaustive"]["run100"]
    table = {}
    for name, r in results.items():
        run10 = r["run10"] if r["run10"] is not None else r["run100"]
        lat = np.asarray(r["lat"])
        row = {
            "ndcg@10": ndcg10(run10, qids, qrels),
            "recall_exh_top10": recall_of(run10, ref, 10),
            "recall_exh_top10_ties": recall_with_ties(run10, ref, 10),
            "recall_exh_top100": recall_of(r["run100"], ref, 100),
            "qps_single": float(1 / lat.mean()),
            "qps_batch32": float(r["batched_qps"]),
            "p50_ms": float(np.percentile(lat, 50) * 1000),
            "p95_ms": float(np.percentile(lat, 95) * 1000),
            "build_s": float(r["build_s"]),
            "peak_rss_mb": float(r["peak_rss_mb"]),
            "bytes_per_token": float(r["bytes_per_token"]),
        }
        for extra in ("index", "build_detail", "config", "search_rss", "bytes_per_original_token",
                      "tuned"):
            if extra in r:
                row[extra] = r[extra]
        table[name] = row
    base = table["exhaustive"]["ndcg@10"]
    for row in table.values():
        row["ndcg_retention"] = row["ndcg@10"] / base if base else float("nan")

    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"plaid_{args.dataset}_{dt.date.today().isoformat()}{args.tag}"
    (RESULTS / f"{stem}.json").write_text(json.dumps({"info": info, "results": table}, indent=1))
    _plot(table, info, RESULTS / f"{stem}.png")
    cols = ["ndcg@10", "ndcg_retention", "recall_exh_top10_ties", "recall_exh_top100", "qps_single",
            "qps_batch32", "p50_ms", "p95_ms", "build_s", "peak_rss_mb", "bytes_per_token"]
    print(f"{'engine':20s}" + "".join(f"{c:>18s}" for c in cols))
    for name, row in table.items():
        print(f"{name:20s}" + "".join(f"{row[c]:18.4f}" for c in cols))
    for name, row in table.items():
        if "search_rss" in row:
            print(f"{name}: memory added by the loaded index while searching {row['search_rss']}")
    print("wrote", RESULTS / f"{stem}.json", flush=True)


def _plot(table, info, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    names = list(table)
    for ax, key, y, label, ylabel in (
            (axes[0], "qps_single", "recall_exh_top10_ties", "queries/s, one at a time",
             "recall of the exhaustive top-10"),
            (axes[1], "qps_batch32", "recall_exh_top10_ties", "queries/s, batches of 32",
             "recall of the exhaustive top-10"),
            (axes[2], "qps_batch32", "ndcg@10", "queries/s, batches of 32", "nDCG@10")):
        for n in names:
            ax.scatter(table[n][key], table[n][y], s=40)
            ax.annotate(n, (table[n][key], table[n][y]), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[3].bar(names, [table[n]["bytes_per_token"] for n in names])
    axes[3].set_ylabel("bytes per token on disk")
    axes[3].tick_params(axis="x", rotation=45)
    fig.suptitle(f"{info['dataset']}: {info['documents']} docs, {info['tokens']} tokens, "
                 f"{info['cpu']} x{info['cores']}, {info['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
