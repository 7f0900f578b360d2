"""Sharded serving under writes: searches during checkpoints, and fsyncs shared by writes.

    flock /tmp/colengine-bench.lock python bench/bench_sharded_serve.py --data DATA \\
        [--baseline /path/to/a/worktree/of/another/commit]

SciFact's corpus comes encoded from the shared cache (``_common.encoded``) and is built once
into a sharded PLAID index (``ShardedRetriever.build_encoded``, 2 shards on a local Ray with
every core). Then, for this checkout and, with ``--baseline``, for another commit's engine
(the same index folder copied, the engine imported from that checkout in a subprocess), the
service behind ``colengine serve`` (:class:`colengine.distributed.service.ShardedService`,
in process: no HTTP, so the figures are the service's own) runs ``--searchers`` threads
searching one query at a time and ``--writers`` threads adding one document at a time for
``--duration`` seconds, with a checkpoint every ``--checkpoint-seconds``.

Reported per engine: search q/s and latency percentiles (all searches, and those that
overlapped a checkpoint), write requests/s and latency, log appends (fsyncs) per write,
checkpoints and their mean duration. Writes through ``colengine serve`` also pay HTTP and
encoding in the request thread; both engines pay the same.

Writes bench/results/sharded_serve_<dataset>_<date><tag>.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import (  # noqa: E402
    RESULTS,
    add_data_argument,
    data_root,
    encoded,
    engine_commit,
    env_info,
    run_engine,
    today,
)


def _pct(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs, dtype=np.float64) * 1e3
    if a.size == 0:
        return {"n": 0}
    return {"n": int(a.size), "p50_ms": float(np.percentile(a, 50)),
            "p95_ms": float(np.percentile(a, 95)), "p99_ms": float(np.percentile(a, 99)),
            "max_ms": float(a.max())}


def load(index: str, searchers: int, writers: int, duration: float, every: float,
         seed: int, data: str, dataset: str) -> dict:
    """One engine (whatever ``colengine`` this interpreter imports) under the mixed load."""
    import ray

    from colengine.distributed.service import ShardedService
    from colengine.encoder import Encoder
    from colengine.eval.datasets import load_dataset
    from colengine.models import resolve_model_name

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    ds = load_dataset(Path(data) / dataset)
    texts, queries = ds.documents(), list(ds.queries.values())
    enc = Encoder(str(resolve_model_name("minilm")), device="cpu")
    svc = ShardedService(index, model=enc, device="cpu", checkpoint_docs=10**9,
                         checkpoint_seconds=every)
    svc.open()
    if not svc.ready:
        raise SystemExit(f"the service did not open: {svc.error}")
    windows: list[tuple[float, float]] = []
    checkpoint = svc.checkpoint

    def timed_checkpoint(*a, **kw):
        t = time.perf_counter()
        try:
            return checkpoint(*a, **kw)
        finally:
            windows.append((t, time.perf_counter()))

    svc.checkpoint = timed_checkpoint          # the service's own thread calls it
    for q in queries[:5]:
        svc.search([q], k=10)
    searches: list[tuple[float, float]] = []   # (start, seconds)
    writes: list[float] = []
    errors: list[str] = []
    stop = time.perf_counter() + duration

    def searcher(c: int) -> None:
        rng = np.random.default_rng(seed + c)
        while time.perf_counter() < stop:
            q = queries[int(rng.integers(len(queries)))]
            t = time.perf_counter()
            try:
                svc.search([q], k=10)
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors.append(f"search: {type(e).__name__}: {e}")
                continue
            searches.append((t, time.perf_counter() - t))

    def writer(c: int) -> None:
        rng = np.random.default_rng(seed + 1000 + c)
        j = 0
        while time.perf_counter() < stop:
            text = texts[int(rng.integers(len(texts)))]
            doc = {"id": f"w{c}-{j}", "text": text if isinstance(text, str) else text["text"]}
            t = time.perf_counter()
            try:
                svc.add([doc])
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors.append(f"add: {type(e).__name__}: {e}")
                continue
            writes.append(time.perf_counter() - t)
            j += 1

    threads = ([threading.Thread(target=searcher, args=(c,)) for c in range(searchers)]
               + [threading.Thread(target=writer, args=(c,)) for c in range(writers)])
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    stats = dict(svc.stats)
    svc.close(checkpoint=False)
    ray.shutdown()
    during = [s for t, s in searches if any(a < t + s and t < b for a, b in windows)]
    return {"search_qps": len(searches) / wall, "search": _pct([s for _, s in searches]),
            "search_during_checkpoint": _pct(during),
            "writes_per_s": len(writes) / wall, "write": _pct(writes),
            "writes": len(writes), "log_appends": stats.get("log_appends"),
            "fsyncs_per_write": (stats["log_appends"] / len(writes)) if writes else None,
            "checkpoints": len(windows),
            "checkpoint_mean_s": float(np.mean([b - a for a, b in windows])) if windows else None,
            "checkpoint_s_total": float(sum(b - a for a, b in windows)),
            "errors": len(errors), "error_samples": errors[:5], "wall_s": wall,
            "engine_module": str(Path(__import__("colengine").__file__).parent)}


def _child(root: str | None, args, index: Path) -> dict:
    cmd = [sys.executable, __file__, "--one", str(index), "--searchers", str(args.searchers),
           "--writers", str(args.writers), "--duration", str(args.duration),
           "--checkpoint-seconds", str(args.checkpoint_seconds), "--seed", str(args.seed),
           "--dataset", args.dataset, "--data", str(data_root(args.data))]
    return run_engine(cmd, root, timeout=args.duration * 4 + 600)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_argument(ap)
    ap.add_argument("--dataset", default="scifact")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--searchers", type=int, default=4)
    ap.add_argument("--writers", type=int, default=4)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--checkpoint-seconds", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--baseline", default=None,
                    help="a checkout of another commit, measured the same way first")
    ap.add_argument("--this-first", action="store_true",
                    help="measure this checkout before the baseline (the first engine of a run "
                         "can find the machine faster; run both orders)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(load(args.one, args.searchers, args.writers, args.duration,
                              args.checkpoint_seconds, args.seed, args.data, args.dataset)))
        return
    import ray

    from colengine.distributed import ShardedRetriever
    from colengine.encoder import Encoder
    from colengine.eval.datasets import load_dataset
    from colengine.models import resolve_model_name

    doc_ids, packed, *_ = encoded(args.dataset, data=args.data)
    ds = load_dataset(data_root(args.data) / args.dataset)
    texts = ds.documents()
    work = Path(tempfile.mkdtemp(prefix="sharded-serve-"))
    try:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        enc = Encoder(str(resolve_model_name("minilm")), device="cpu")
        t = time.perf_counter()
        r = ShardedRetriever.build_encoded(packed, list(doc_ids), model=enc, documents=texts,
                                           shards=args.shards, path=work / "built")
        build_s = time.perf_counter() - t
        r.close()
        ray.shutdown()
        engines = {}
        order = ([("baseline", Path(args.baseline))] if args.baseline else []) + [("this", None)]
        for name, root in (order[::-1] if args.this_first else order):
            index = work / name
            shutil.copytree(work / "built", index)
            res = _child(str(root) if root else None, args, index)
            res["commit"] = engine_commit(root)
            engines[name] = res
            print(name, json.dumps({k: v for k, v in res.items() if k != "error_samples"}),
                  flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info = env_info()
    info.update(dataset=args.dataset, documents=len(texts), shards=args.shards,
                order=list(engines),
                searchers=args.searchers, writers=args.writers, duration_s=args.duration,
                checkpoint_seconds=args.checkpoint_seconds, build_s=build_s,
                model="minilm stand-in", index="PLAID nbits 2 (ShardedRetriever.build_encoded)",
                what="ShardedService in process: searches of one query, adds of one document")
    out = {"env": info, "engines": engines}
    path = RESULTS / f"sharded_serve_{args.dataset}_{today()}{args.tag}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    _plot(out, path.with_suffix(".png"))
    print(f"wrote {path}")


def _plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eng = out["engines"]
    names = list(eng)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    x = np.arange(len(names))
    for i, (key, label) in enumerate([("search", "all searches"),
                                      ("search_during_checkpoint", "during a checkpoint")]):
        for j, p in enumerate(("p50_ms", "p99_ms")):
            axes[0].bar(x + (2 * i + j) * 0.2 - 0.3, [eng[n][key].get(p, 0) for n in names],
                        0.2, label=f"{label} {p[:3]}")
    axes[0].set_ylabel("search latency (ms)")
    axes[0].legend(fontsize=7)
    axes[1].bar(x, [eng[n]["search_qps"] for n in names], 0.5)
    axes[1].set_ylabel("searches / s")
    axes[2].bar(x - 0.15, [eng[n]["writes_per_s"] for n in names], 0.3, label="writes / s")
    axes[2].bar(x + 0.15, [eng[n]["fsyncs_per_write"] or 0 for n in names], 0.3,
                label="fsyncs per write")
    axes[2].legend(fontsize=7)
    for ax in axes:
        ax.set_xticks(x, [f"{n} ({eng[n]['commit']})" for n in names])
    e = out["env"]
    fig.suptitle(f"sharded serving, {e['dataset']}, {e['shards']} shards, {e['searchers']} "
                 f"searchers + {e['writers']} writers, checkpoint every "
                 f"{e['checkpoint_seconds']:g} s ({e.get('cpu', '')}, {e.get('date', '')})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
