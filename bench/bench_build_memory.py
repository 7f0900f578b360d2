"""Resident memory of a streamed, refined PLAID build: file-backed and anonymous peaks.

    flock /tmp/colengine-bench.lock python bench/bench_build_memory.py --docs 50000 \\
        [--baseline /path/to/a/worktree/of/another/commit]

Builds the synthetic clustered corpus (``bench/synthetic.py``) with
``PlaidIndex.build_from_iterator(..., refine="int8", path=...)`` in a fresh subprocess per
engine (this checkout, and with ``--baseline`` another commit's engine imported from that
checkout), while a thread samples ``/proc/self/status`` every 0.1 s: the peaks of ``RssFile``
(pages of mapped files: the build's memory-mapped outputs, the saved index, libraries) and
``RssAnon`` (the process's own memory), and ``ru_maxrss`` after the build. ``--centroids``
keeps K small so that the run measures the arrays written, not k-means. Both engines search
the same queries afterwards: their hits must be equal. Linux only (reads ``/proc``).

Writes bench/results/build_memory_<date><tag>.json and .png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import RESULTS, engine_commit, env_info, run_engine, today, write_json  # noqa: E402

FIELDS = ("VmRSS", "RssFile", "RssAnon")


def _status_mb() -> dict[str, int]:
    out = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key = line.split(":")[0]
            if key in FIELDS:
                out[key] = int(line.split()[1]) // 1024
    return out


def one(n_docs: int, n_centroids: int, refine: str) -> dict:
    """Build in this process (the engine on ``sys.path``) and report its memory."""
    import torch
    from synthetic import SyntheticCorpus

    import colengine
    from colengine.index.plaid import PlaidIndex

    corpus = SyntheticCorpus(n_docs, chunk_docs=10_000)
    work = Path(tempfile.mkdtemp(prefix="build-memory-"))
    peaks = dict.fromkeys(FIELDS, 0)
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.1):
            for k, v in _status_mb().items():
                peaks[k] = max(peaks[k], v)

    before = _status_mb()
    threading.Thread(target=sample, daemon=True).start()
    t = time.perf_counter()
    try:
        idx = PlaidIndex.build_from_iterator(corpus, nbits=2, refine=refine, seed=0,
                                             n_centroids=n_centroids, sample_tokens=1 << 21,
                                             path=work / "index", show_progress=False)
        build_s = time.perf_counter() - t
        stop.set()
        q, _ = corpus.queries(20)
        hits = idx.search(torch.from_numpy(np.asarray(q, dtype=np.float32)), k=10)
        ids = [[h.doc_id for h in row] for row in hits]
        st = idx.stats()
        disk = sum(p.stat().st_size for p in (work / "index").rglob("*") if p.is_file())
    finally:
        stop.set()
        shutil.rmtree(work, ignore_errors=True)
    return {"engine_module": str(Path(colengine.__file__).parent), "documents": n_docs,
            "tokens": st["tokens"], "n_centroids": st["n_centroids"], "refine": refine,
            "build_s": round(build_s, 1), "disk_mb": round(disk / 2**20, 1),
            "before_mb": before, "peak_mb": peaks,
            "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
            "hits_md5": hashlib.md5(json.dumps(ids).encode()).hexdigest()}


def _child(root: str | None, args) -> dict:
    cmd = [sys.executable, __file__, "--one", "--docs", str(args.docs),
           "--centroids", str(args.centroids), "--refine", args.refine]
    return run_engine(cmd, root, timeout=4 * 3600)


def _plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res["engines"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = np.arange(len(names))
    for j, (key, label) in enumerate((("RssFile", "file-backed"), ("RssAnon", "anonymous"))):
        vals = [res["engines"][n]["peak_mb"][key] for n in names]
        ax.bar(x + (j - 0.5) * 0.38, vals, 0.38, label=label)
    ax.set_xticks(x, [f"{n} ({res['engines'][n]['commit']})" for n in names])
    ax.set_ylabel("peak resident MB during the build")
    e = res["env"]
    ax.set_title(f"{res['documents']:,} docs, refine {res['refine']}: {e['cpu']}, "
                 f"{e['date'][:10]}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=50_000)
    ap.add_argument("--centroids", type=int, default=4096)
    ap.add_argument("--refine", choices=["int8", "float16"], default="int8")
    ap.add_argument("--baseline", default=None,
                    help="a checkout (git worktree) of another commit to measure first")
    ap.add_argument("--tag", default="")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not Path("/proc/self/status").exists():
        raise SystemExit("bench_build_memory reads /proc/self/status (Linux)")
    if args.one:
        print(json.dumps(one(args.docs, args.centroids, args.refine)), flush=True)
        return
    res = {"env": env_info(), "documents": args.docs, "centroids": args.centroids,
           "refine": args.refine, "engines": {}}
    order = ([("baseline", Path(args.baseline))] if args.baseline else []) + [("this", None)]
    for name, root in order:
        print(f"[build_memory] {name} ...", flush=True)
        row = _child(str(root) if root else None, args)
        row["commit"] = engine_commit(root)
        res["engines"][name] = row
        print(name, json.dumps(row), flush=True)
    md5 = {r["hits_md5"] for r in res["engines"].values()}
    res["same_hits"] = len(md5) == 1
    name = f"build_memory_{today()}{args.tag}"
    path = write_json(name, res)
    _plot(res, RESULTS / f"{name}.png")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
