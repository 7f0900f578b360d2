"""Adds to a large loaded (memory-mapped) PLAID index: time and memory of each add, and search
after them.

    flock /tmp/colengine-bench.lock python bench/bench_add_loaded.py \\
        --index /path/to/scaleidx/1000000/index --docs 1000000

The index is one ``bench_scale.py --index-dir`` kept (the synthetic corpus, whose queries are
regenerated here); it is not changed on disk (nothing is saved). Steps: load, one search (the
inverted lists are built then), ``--adds`` one-document adds of ``--tokens`` random unit
tokens each, timed one by one with the process's resident memory (all of it and the
anonymous part: what is not a mapped file); single queries at ``--knobs`` before and after
the adds (the same queries, each searched twice and the second timed); and a check that an
added document is found by its own tokens. With ``--save-copy DIR`` all of it runs on a
copy of the index made of hard links, which is then saved (time, bytes written and linked)
and loaded again. Writes
``bench/results/add_loaded_<date><tag>.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
from _common import (RESULTS, add_kept_index_arguments, env_info,  # noqa: E402
                     kept_index_queries, peak_rss_mb, today)


def _args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_kept_index_arguments(p, queries=40)
    p.add_argument("--adds", type=int, default=10)
    p.add_argument("--tokens", type=int, default=100, help="tokens of each added document")
    p.add_argument("--save-copy", default=None, metavar="DIR",
                   help="work on a copy of the index made of hard links in DIR (created; "
                        "removed at the end), and save it after the adds: the save's time and "
                        "the bytes it wrote, then load it again and search")
    p.add_argument("--tag", default="")
    return p.parse_args()


def _link_copy(src: Path, dst: Path) -> None:
    """``cp -al``: a copy of folder ``src`` whose files are hard links (no data copied). A
    save into it writes a new generation and renames a new manifest into place: the
    original's files are never written."""
    for d in sorted(p for p in src.rglob("*") if p.is_dir()):
        (dst / d.relative_to(src)).mkdir(parents=True, exist_ok=True)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.rglob("*"):
        if f.is_file():
            os.link(f, dst / f.relative_to(src))


def _memory_gb() -> dict[str, float]:
    """Resident memory of this process now (GB): all of it, and the anonymous part."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "RssAnon"):
            out["rss_gb" if key == "VmRSS" else "anon_gb"] = round(int(rest.split()[0]) / 1e6, 3)
    return out


def main() -> None:
    args = _args()
    knobs = json.loads(args.knobs)
    import torch

    from colengine.index.plaid import PlaidIndex

    index = Path(args.index)
    if args.save_copy:
        copy = Path(args.save_copy)
        if copy.exists():
            raise SystemExit(f"{copy} exists; give a new folder")
        _link_copy(index, copy)
        index = copy
    t = time.perf_counter()
    idx = PlaidIndex.load(index)
    load_s = time.perf_counter() - t
    qt = kept_index_queries(args.docs, 1 + args.queries)
    t = time.perf_counter()
    idx.search(qt[0], k=10, **knobs)
    out = {"env": env_info(), "index": args.index, "docs": args.docs, "knobs": knobs,
           "refine": idx.refine_kind, "load_s": round(load_s, 2),
           "first_search_s": round(time.perf_counter() - t, 2), "loaded": _memory_gb(),
           "adds": []}
    out["search_before_adds"] = _searches(idx, qt[1:], knobs)
    rng = np.random.default_rng(5)
    added = []
    for i in range(args.adds):
        x = rng.standard_normal((args.tokens, idx.dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        added.append(x)
        t = time.perf_counter()
        idx.add([x], [f"added-{i}"])
        out["adds"].append({"s": round(time.perf_counter() - t, 3), **_memory_gb()})
        print("add", i, out["adds"][-1], flush=True)
    out["stores"] = {n: type(getattr(idx, n)).__name__
                     for n in ("codes", "residuals", "refine", "refine_scale")}
    out["search_after_adds"] = _searches(idx, qt[1:], knobs)
    j = len(added) // 2
    top = idx.search(torch.from_numpy(added[j][:32]), k=1, **knobs)[0]
    out["added_doc_found_by_its_tokens"] = bool(top and top[0].doc_id == f"added-{j}")
    if args.save_copy:
        out["save"] = _save(idx, index, added, knobs)
        shutil.rmtree(index)
    out["peak_rss_gb"] = round(peak_rss_mb() * 2**20 / 1e9, 3)
    print(json.dumps({k: v for k, v in out.items() if k != "env"}, indent=1))
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"add_loaded_{today()}{args.tag}"
    stem.with_suffix(".json").write_text(json.dumps(out, indent=1))
    _plot(out, stem.with_suffix(".png"))


def _save(idx, index: Path, added: list, knobs: dict) -> dict:
    """Save ``idx`` into ``index`` (a link copy): the time, the bytes of the new generation's
    files that were written (not linked), the manifest's format; then load it again
    (checksums verified) and find an added document by its tokens."""
    import torch

    from colengine.index.plaid import PlaidIndex

    t = time.perf_counter()
    idx.save(index)
    save_s = time.perf_counter() - t
    m = json.loads((index / "manifest.json").read_text())
    gdir = index / f"g{m['generation']:06d}"
    files = [f for f in gdir.rglob("*") if f.is_file()]
    written = sum(f.stat().st_size for f in files if f.stat().st_nlink == 1)
    linked = sum(f.stat().st_size for f in files if f.stat().st_nlink > 1)
    t = time.perf_counter()
    again = PlaidIndex.load(index, verify=True)
    load_s = time.perf_counter() - t
    j = len(added) - 1
    top = again.search(torch.from_numpy(added[j][:32]), k=1, **knobs)[0]
    row = {"save_s": round(save_s, 2), "written_bytes": written, "linked_bytes": linked,
           "format_version": m["format_version"],
           "tails": sorted(k for k, e in m["arrays"].items() if "tail" in e),
           "load_verified_s": round(load_s, 1),
           "added_doc_found_after_load": bool(top and top[0].doc_id == f"added-{j}")}
    print("save", row, flush=True)
    return row


def _searches(idx, queries, knobs: dict) -> dict:
    """Single-query latency p50 / p95 (ms) over ``queries``, each searched twice (the second
    pass timed: the pages the first read are in memory for both measurements)."""
    for x in queries:
        idx.search(x, k=10, **knobs)
    lat = []
    for x in queries:
        t = time.perf_counter()
        idx.search(x, k=10, **knobs)
        lat.append((time.perf_counter() - t) * 1e3)
    a = np.array(lat)
    return {"n": int(a.size), "p50_ms": round(float(np.percentile(a, 50)), 1),
            "p95_ms": round(float(np.percentile(a, 95)), 1)}


def _plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.4))
    n = np.arange(1, len(out["adds"]) + 1)
    a1.bar(n, [1e3 * r["s"] for r in out["adds"]])
    a1.set_xlabel("add (one document)")
    a1.set_ylabel("ms")
    a2.plot(np.r_[0, n], [out["loaded"]["rss_gb"]] + [r["rss_gb"] for r in out["adds"]],
            marker="o", label="resident")
    a2.plot(np.r_[0, n], [out["loaded"]["anon_gb"]] + [r["anon_gb"] for r in out["adds"]],
            marker="o", label="anonymous")
    a2.set_xlabel("documents added")
    a2.set_ylabel("GB")
    a2.set_ylim(bottom=0)
    a2.legend(fontsize=8)
    e = out["env"]
    fig.suptitle(f"adds to a loaded index, {out['docs']:,} docs, refine={out['refine']}; "
                 f"{e.get('cpu')} x{e.get('cpu_count')}, {e.get('date')}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
