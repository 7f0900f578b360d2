"""CPU MaxSim from compressed tokens: the compiled kernel (``colengine.kernels.codes_cpu``) vs the
torch path it replaced (residuals decoded a chunk at a time into the padded block of the MaxSim
kernel: ``score_candidates_packed`` fed ``SearchState.decode``), on one synthetic PLAID store.

The store: ``--centroids`` unit centroids (bfloat16 where the CPU multiplies bfloat16 natively,
as a search state holds them, else float32), tokens of SciFact-like lengths (uniform 50-256)
coded with a product codec at nbits 2, renormalised on decoding. Workloads: one query against
``{64, 256, 1024}`` candidates (stage 4 at default and wider knobs), and a batch of 32 queries
with 64 candidates each. Both paths' scores are compared (max abs difference) before timing.
GFLOP/s count 2 * Lq * d per (query, document token).

    flock /tmp/colengine-bench.lock python bench/bench_codes_cpu.py

Writes bench/results/codes_cpu_<date>.json and .png.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

from colengine import devices  # noqa: E402
from colengine.index.plaid.codec import ProductCodec  # noqa: E402
from colengine.index.plaid.search import SearchState  # noqa: E402
from colengine.kernels import score_candidates_packed_unchecked  # noqa: E402
from colengine.kernels.codes_cpu import score_candidates_codes_cpu  # noqa: E402

LQ, D = 32, 128


def make_store(n_docs: int, n_centroids: int, rng: np.random.Generator):
    cents = rng.standard_normal((n_centroids, D)).astype(np.float32)
    cents /= np.linalg.norm(cents, axis=1, keepdims=True)
    lens = rng.integers(50, 257, n_docs)
    off = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    codes = rng.integers(0, n_centroids, int(off[-1]))
    resid = rng.standard_normal((int(off[-1]), D)).astype(np.float32) * (0.25 / np.sqrt(D))
    codec = ProductCodec.fit(resid[:20_000], nbits=2)
    packed = codec.compress(torch.from_numpy(resid))
    cent_t = torch.from_numpy(cents)
    if devices.native_bf16_matmul(torch.device("cpu")):
        cent_t = cent_t.to(torch.bfloat16)
    return cent_t, torch.from_numpy(codes.astype(np.int16 if n_centroids <= 32767 else np.int32)), \
        packed, torch.from_numpy(off), codec


def torch_path(q, ql, cents, codes, packed, off, codec, cand):
    """What stage 4 did before: the residuals decoded a chunk at a time by a search state
    (:meth:`SearchState.decode`: centroid + residual, renormalised) straight into the
    MaxSim kernel's block. The state holds no inverted lists: only decoding is used."""
    none = torch.zeros(0, dtype=torch.int64)
    st = SearchState(centroids=cents, ivf_starts=none, ivf_lens=none, ivf_docs=none,
                     doc_code_offsets=none, doc_codes=none, n_docs=off.shape[0] - 1,
                     tok_offsets=off, codes=codes, residuals=packed, codec=codec,
                     normalized=True)
    return score_candidates_packed_unchecked(q, ql, st.decode, off, cand)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=20_000)
    ap.add_argument("--centroids", type=int, default=16_384)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    cents, codes, packed, off, codec = make_store(args.docs, args.centroids, rng)
    lut = codec.lut("cpu")
    rows = []
    for B, n in ((1, 64), (1, 256), (1, 1024), (32, 64)):
        q = torch.nn.functional.normalize(torch.randn(B, LQ, D), dim=2)
        ql = torch.full((B,), LQ)
        cand = torch.from_numpy(rng.choice(args.docs, (B, n)))
        tokens = int((off[cand + 1] - off[cand]).sum())
        mine = score_candidates_codes_cpu(q, ql, codes, packed, lut, cents, off, cand)
        ref = torch_path(q, ql, cents, codes, packed, off, codec, cand)
        diff = float((mine - ref).abs().max())
        t_mine = _common.time_fn(lambda: score_candidates_codes_cpu(
            q, ql, codes, packed, lut, cents, off, cand), repeats=args.repeats, warmup=2)
        t_ref = _common.time_fn(lambda: torch_path(
            q, ql, cents, codes, packed, off, codec, cand), repeats=args.repeats, warmup=2)
        flop = 2.0 * LQ * D * tokens
        row = {"queries": B, "candidates": n, "tokens": tokens, "max_abs_diff": diff,
               "compiled_ms": 1e3 * t_mine["median_s"], "torch_ms": 1e3 * t_ref["median_s"],
               "compiled_gflops": flop / t_mine["median_s"] / 1e9,
               "torch_gflops": flop / t_ref["median_s"] / 1e9}
        row["speedup"] = row["torch_ms"] / row["compiled_ms"]
        rows.append(row)
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    payload = {"bench": "codes_cpu", "env": _common.env_info(), "store": {
        "docs": args.docs, "centroids": args.centroids, "centroid_dtype": str(cents.dtype),
        "nbits": 2, "codec": "product", "lengths": "uniform 50-256"}, "rows": rows}
    path = _common.write_json(f"codes_cpu_{_common.today()}", payload)
    _plot(rows, payload["env"], path.with_suffix(".png"))
    print("wrote", path)


def _plot(rows, env, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"{r['queries']} q x {r['candidates']}" for r in rows]
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["torch_ms"] for r in rows], 0.4, label="torch: decode + MaxSim kernel")
    ax.bar(x + 0.2, [r["compiled_ms"] for r in rows], 0.4, label="compiled, from the codes")
    ax.set_xticks(x, labels)
    ax.set_ylabel("ms (median)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title(f"MaxSim from codes on the CPU: {env['cpu']} x{env['cpu_count']}, {env['date']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
