"""CPU MaxSim benchmark: colengine's torch fallback vs naive einsum vs maxsim-cpu vs mm peak.

One run, Lq = 32, d = 128: {1k, 10k} candidates of {300, ragged U[50, 300]} tokens, documents
stored as fp32 and fp16, single queries and batches of 32 queries (the batch shares the candidate
set, as in exhaustive search / the rerank of one candidate pool).

MaxSim costs 2 * Lq * d FLOPs per (query, document token); GFLOP/s below use real tokens only.

* ``torch`` = ``colengine.kernels.score_candidates_packed(..., backend="torch")`` on the packed
  store, candidates = a random subset of a store twice as large (so rows must be gathered).
* ``einsum`` = the naive implementation on a pre-padded fp32 copy (padding built outside the
  timing): ``einsum('qd,ntd->nqt')``, mask -inf, max, sum; in 1k-document chunks so the
  similarity tensor fits in memory, one query at a time.
* ``maxsim_cpu`` = PyPI ``maxsim-cpu`` (Rust + libxsmm), fp32 only (its API takes fp32 numpy;
  inputs prepared outside the timing), one call per query: ``maxsim_scores`` on a dense
  ``[n, 300, d]`` array for fixed lengths, ``maxsim_scores_variable`` on a list for ragged.
* ``mm peak`` = ``torch.mm`` 2048 x 2048 fp32, measured in the same run.

Run it under the shared lock:  flock /tmp/colengine-bench.lock python bench/bench_maxsim_cpu.py
Writes bench/results/maxsim_cpu_<date>.json and .png.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

from colengine.kernels import score_candidates_packed  # noqa: E402

LQ, D = 32, 128


def mm_peak(repeats: int) -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    c = torch.empty(2048, 2048)
    t = _common.time_fn(lambda: torch.mm(a, b, out=c), repeats=max(repeats, 5), warmup=2)
    return 2 * 2048**3 / t["min_s"] / 1e9


def make_store(n_cand: int, ragged: bool, rng: np.random.Generator):
    n_docs = 2 * n_cand
    lens = rng.integers(50, 301, n_docs) if ragged else np.full(n_docs, 300)
    offs = np.zeros(n_docs + 1, dtype=np.int64)
    offs[1:] = np.cumsum(lens)
    tokens = torch.from_numpy(rng.standard_normal((int(offs[-1]), D), dtype=np.float32) / 10)
    cand = np.sort(rng.choice(n_docs, n_cand, replace=False)).astype(np.int64)
    return tokens, torch.from_numpy(offs), torch.from_numpy(cand), lens


def naive_einsum(queries: torch.Tensor, padded: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = []
    for b in range(queries.shape[0]):
        row = []
        for s in range(0, padded.shape[0], 1000):
            sim = torch.einsum("qd,ntd->nqt", queries[b], padded[s : s + 1000])
            sim = sim.masked_fill(~mask[s : s + 1000, None, :], float("-inf"))
            row.append(sim.amax(dim=2).sum(dim=1))
        out.append(torch.cat(row))
    return torch.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1k candidates only (smoke)")
    ap.add_argument("--no-einsum", action="store_true")
    args = ap.parse_args()
    import maxsim_cpu

    rng = np.random.default_rng(0)
    env = _common.env_info()
    peak = mm_peak(args.repeats)
    print(f"mm peak (2048^2 fp32): {peak:.1f} GFLOP/s   load {env['loadavg_start']}", flush=True)
    rows = []
    sizes = [1000] if args.quick else [1000, 10000]
    for n_cand in sizes:
        for ragged in (False, True):
            tokens32, offs, cand, lens = make_store(n_cand, ragged, rng)
            tokens16 = tokens32.half()
            clens = lens[cand.numpy()]
            n_tok = int(clens.sum())
            o = offs.numpy()
            docs_np = [tokens32[o[i] : o[i + 1]].numpy() for i in cand.numpy()]
            dense = np.stack(docs_np) if not ragged else None
            padded = torch.zeros(n_cand, int(clens.max()), D)
            for j, x in enumerate(docs_np):
                padded[j, : len(x)] = torch.from_numpy(x)
            mask = torch.arange(padded.shape[1])[None, :] < torch.from_numpy(clens)[:, None]
            layout = "ragged50-300" if ragged else "fixed300"
            for bsz in (1, 32):
                q = torch.from_numpy(rng.standard_normal((bsz, LQ, D), dtype=np.float32) / 10)
                ql = torch.full((bsz,), LQ, dtype=torch.int64)
                c = cand[None].expand(bsz, -1).contiguous()
                flops = 2 * LQ * D * n_tok * bsz
                reps = args.repeats if flops < 2e11 else max(1, args.repeats - 1)
                base = {"n_cand": n_cand, "layout": layout, "batch": bsz, "tokens": n_tok,
                        "gflop": flops / 1e9}
                ref = None
                for name, tok in (("fp32", tokens32), ("fp16", tokens16)):
                    t = _common.time_fn(
                        lambda tok=tok: score_candidates_packed(q, ql, tok, offs, c, backend="torch"),
                        repeats=reps,
                    )
                    got = score_candidates_packed(q, ql, tok, offs, c, backend="torch")
                    if ref is None:
                        ref = got
                    rows.append({**base, "method": "torch_fallback", "storage": name, **t,
                                 "gflops": flops / t["min_s"] / 1e9,
                                 "max_abs_err_vs_fp32": float((got - ref).abs().max())})
                    print(rows[-1], flush=True)
                if not args.no_einsum:
                    t = _common.time_fn(lambda: naive_einsum(q, padded, mask), repeats=reps)
                    rows.append({**base, "method": "einsum", "storage": "fp32", **t,
                                 "gflops": flops / t["min_s"] / 1e9})
                    print(rows[-1], flush=True)
                qn = [q[b].numpy() for b in range(bsz)]
                if ragged:
                    fn = lambda: [maxsim_cpu.maxsim_scores_variable(x, docs_np) for x in qn]  # noqa: E731
                else:
                    fn = lambda: [maxsim_cpu.maxsim_scores(x, dense) for x in qn]  # noqa: E731
                ms = np.stack(fn())
                t = _common.time_fn(fn, repeats=reps)
                rows.append({**base, "method": "maxsim_cpu", "storage": "fp32", **t,
                             "gflops": flops / t["min_s"] / 1e9,
                             "max_abs_err_vs_torch": float(np.abs(ms - ref.numpy()).max())})
                print(rows[-1], flush=True)
            del padded, dense, docs_np

    summary = summarize(rows, peak)
    payload = {"bench": "maxsim_cpu", "env": env, "mm_peak_gflops": peak, "lq": LQ, "d": D,
               "rows": rows, "summary": summary}
    path = _common.write_json(f"maxsim_cpu_{_common.today()}", payload)
    plot(rows, peak, path.with_suffix(".png"))
    print_table(summary, peak)
    print(f"wrote {path} and {path.with_suffix('.png')}")


def summarize(rows: list[dict], peak: float) -> list[dict]:
    """One line per (n_cand, layout, batch): torch fallback GFLOP/s and the ratios."""
    out = []
    keys = sorted({(r["n_cand"], r["layout"], r["batch"]) for r in rows})
    for k in keys:
        get = {(r["method"], r["storage"]): r["gflops"] for r in rows
               if (r["n_cand"], r["layout"], r["batch"]) == k}
        t32, t16 = get.get(("torch_fallback", "fp32")), get.get(("torch_fallback", "fp16"))
        ein, ms = get.get(("einsum", "fp32")), get.get(("maxsim_cpu", "fp32"))
        line = {"n_cand": k[0], "layout": k[1], "batch": k[2], "torch_fp32": t32,
                "torch_fp16": t16, "einsum": ein, "maxsim_cpu": ms,
                "fp32_vs_einsum": t32 / ein if ein else None,
                "fp32_vs_maxsim_cpu": t32 / ms if ms else None,
                "fp16_vs_maxsim_cpu": t16 / ms if ms else None,
                "fp32_pct_mm_peak": 100 * t32 / peak, "fp16_pct_mm_peak": 100 * t16 / peak,
                "fp16_vs_fp32": t16 / t32}
        out.append(line)
    return out


def print_table(summary: list[dict], peak: float) -> None:
    def f(x, p=1):
        return "-" if x is None else f"{x:.{p}f}"

    print(f"\nmm peak {peak:.1f} GFLOP/s; GFLOP/s (best of runs)")
    hdr = ("n", "layout", "B", "torch32", "torch16", "einsum", "mscpu", "32/ein", "32/mscpu",
           "16/mscpu", "%peak32", "%peak16", "16/32")
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for s in summary:
        vals = (str(s["n_cand"]), s["layout"], str(s["batch"]), f(s["torch_fp32"]),
                f(s["torch_fp16"]), f(s["einsum"]), f(s["maxsim_cpu"]), f(s["fp32_vs_einsum"], 2),
                f(s["fp32_vs_maxsim_cpu"], 2), f(s["fp16_vs_maxsim_cpu"], 2),
                f(s["fp32_pct_mm_peak"], 0), f(s["fp16_pct_mm_peak"], 0),
                f(s["fp16_vs_fp32"], 2))
        print("| " + " | ".join(vals) + " |")


def plot(rows: list[dict], peak: float, path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    keys = sorted({(r["n_cand"], r["layout"], r["batch"]) for r in rows})
    series = [("torch_fallback", "fp32"), ("torch_fallback", "fp16"), ("einsum", "fp32"),
              ("maxsim_cpu", "fp32")]
    fig, ax = plt.subplots(figsize=(12, 5))
    w = 0.2
    for i, (m, s) in enumerate(series):
        vals = []
        for k in keys:
            v = [r["gflops"] for r in rows if (r["n_cand"], r["layout"], r["batch"]) == k
                 and r["method"] == m and r["storage"] == s]
            vals.append(v[0] if v else 0)
        ax.bar(np.arange(len(keys)) + (i - 1.5) * w, vals, w, label=f"{m} ({s} docs)")
    ax.axhline(peak, color="k", ls="--", lw=1, label=f"torch.mm peak {peak:.0f}")
    ax.axhline(0.7 * peak, color="grey", ls=":", lw=1, label="70% of peak")
    ax.set_xticks(np.arange(len(keys)))
    ax.set_xticklabels([f"{n // 1000}k {lay}\nB={b}" for n, lay, b in keys], fontsize=8)
    ax.set_ylabel("GFLOP/s (2·Lq·d per doc token)")
    ax.set_title("MaxSim on CPU, Lq=32, d=128")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
