"""What an add or a delete costs the inverted lists of a large index, this checkout against
another commit's ``colengine/index/plaid/ivf.py``, side by side in one process.

    flock /tmp/colengine-bench.lock python bench/bench_ivf_updates.py \\
        --docs 1000000 --centroids 131072 --baseline 2ee6fb7

Both engines get the same lists (``--docs`` documents of ``--tokens`` tokens, each token's
centroid drawn uniformly from ``--centroids``, as a 1M-document synthetic index has), then
the same stream of one-document adds and one-document deletes, alternating engine by
engine so that the machine's drift falls on both alike; each change is timed alone (the
lists only: a real add also assigns and compresses its tokens). At the end both engines'
lists must hold the same postings. Writes ``bench/results/ivf_updates_<date><tag>.json``
and ``.png``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
from _common import RESULTS, env_info, peak_rss_mb, today  # noqa: E402


def _args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--docs", type=int, default=1_000_000)
    p.add_argument("--tokens", type=int, default=100, help="tokens per document")
    p.add_argument("--centroids", type=int, default=131_072)
    p.add_argument("--adds", type=int, default=200)
    p.add_argument("--deletes", type=int, default=50)
    p.add_argument("--baseline", required=True, help="the commit whose ivf.py is compared")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="")
    return p.parse_args()


def _module_at(commit: str, tmp: Path):
    src = subprocess.run(["git", "show", f"{commit}:colengine/index/plaid/ivf.py"],
                         cwd=HERE.parent, capture_output=True, text=True, check=True).stdout
    path = tmp / "ivf_baseline.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("ivf_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _csr(L):
    if hasattr(L, "ivf_csr"):
        return L.ivf_csr()
    return L.ivf_offsets, L.ivf_docs


def _nbytes(L) -> int:
    docs = L.ivf_docs.nbytes if not hasattr(L, "room") or L.room is None else L.room.arr.nbytes
    return int(docs + L.doc_code_offsets.nbytes + L.doc_codes.nbytes)


def _pct(ts: list[float]) -> dict:
    a = np.asarray(ts) * 1e3
    return {"n": int(a.size), "p50_ms": float(np.median(a)), "p90_ms": float(np.percentile(a, 90)),
            "max_ms": float(a.max()), "first_ms": float(a[0]), "mean_ms": float(a.mean())}


def main() -> None:
    args = _args()
    from colengine.index.plaid import ivf as new

    rng = np.random.default_rng(args.seed)
    n, t, k = args.docs, args.tokens, args.centroids
    codes = rng.integers(0, k, n * t).astype(np.int32)
    off = np.arange(n + 1, dtype=np.int64) * t
    with tempfile.TemporaryDirectory() as tmp:
        old = _module_at(args.baseline, Path(tmp))
        engines = {"baseline": old, "this checkout": new}
        lists, build_s = {}, {}
        for name, mod in engines.items():
            s = time.perf_counter()
            lists[name] = mod.build_lists(codes, off, k)
            build_s[name] = time.perf_counter() - s
        del codes
        print(f"lists of {n} documents built: {lists['this checkout'].n_pairs} postings; "
              + ", ".join(f"{e} {s:.1f} s" for e, s in build_s.items()), flush=True)
        adds = {e: [] for e in engines}
        deletes = {e: [] for e in engines}
        n_rows = n
        dead = np.zeros(n + args.adds, dtype=bool)
        for i in range(args.adds + args.deletes):
            if i < args.adds:
                new_codes = rng.integers(0, k, t).astype(np.int32)
                new_off = np.array([0, t], dtype=np.int64)
                for e, mod in engines.items():
                    s = time.perf_counter()
                    lists[e] = mod.extend_lists(lists[e], new_codes, new_off, k)
                    adds[e].append(time.perf_counter() - s)
                n_rows += 1
            else:
                d = int(rng.integers(0, n_rows))
                while dead[d]:
                    d = int(rng.integers(0, n_rows))
                dead[d] = True
                mask = np.zeros(n_rows, dtype=bool)   # as the index passes it: the rows
                mask[d] = True                         # this delete tombstones
                for e, mod in engines.items():
                    s = time.perf_counter()
                    lists[e] = mod.drop_docs(lists[e], mask)
                    deletes[e].append(time.perf_counter() - s)
        a, b = (_csr(lists[e]) for e in engines)
        same = all(np.array_equal(x, y) for x, y in zip(a, b)) and all(
            np.array_equal(getattr(lists["baseline"], f), getattr(lists["this checkout"], f))
            for f in ("doc_code_offsets", "doc_codes"))
    out = {
        "env": env_info(), "docs": n, "tokens_per_doc": t, "centroids": k,
        "postings": int(lists["this checkout"].n_pairs), "baseline_commit": args.baseline,
        "build_s": build_s, "same_postings": bool(same),
        "add": {e: _pct(v) for e, v in adds.items()},
        "delete": {e: _pct(v) for e, v in deletes.items()},
        "lists_bytes": {e: _nbytes(L) for e, L in lists.items()},
        "peak_rss_mb": peak_rss_mb(),
        "adds_ms": {e: [x * 1e3 for x in v] for e, v in adds.items()},
        "deletes_ms": {e: [x * 1e3 for x in v] for e, v in deletes.items()},
    }
    if not same:
        raise SystemExit("the two engines' lists differ")
    name = f"ivf_updates_{today()}{args.tag}"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=1))
    _plot(out, RESULTS / f"{name}.png")
    for op in ("add", "delete"):
        for e, r in out[op].items():
            print(f"{op:6s} {e:14s} p50 {r['p50_ms']:8.2f} ms  p90 {r['p90_ms']:8.2f}  "
                  f"first {r['first_ms']:8.2f}  max {r['max_ms']:8.2f}")
    print("lists MB: " + ", ".join(f"{e} {b / 2**20:.0f}" for e, b in out["lists_bytes"].items()))


def _plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, op in zip(axes, ("adds_ms", "deletes_ms")):
        for e, v in out[op].items():
            ax.plot(np.arange(1, len(v) + 1), v, ".", ms=3, label=e)
        ax.set_yscale("log")
        ax.set_xlabel(f"{op[:-4]} number")
        ax.set_ylabel("ms for the inverted lists")
        ax.legend()
    fig.suptitle(f"{out['docs']:,} docs, {out['postings']:,} postings, K {out['centroids']:,}: "
                 f"{out['env']['cpu']}, {out['env']['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
