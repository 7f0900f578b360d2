"""PLAID stage 4 on a GPU: MaxSim straight from the compressed tokens (the fused Triton kernel,
``colengine.kernels.codes``) against decompress-then-MaxSim (the codec's decompression into a
float copy, then the packed Triton kernel), on the same compressed store.

Store: ``--docs`` documents with SciFact's real document lengths (MiniLM WordPiece,
bench/_common.scifact_doc_lengths), d = 128, a product codec at nbits 2 fitted on random
residuals, ``K`` random unit centroids. Work: ``B`` queries of 32 tokens, each with ``n``
random candidate documents (PLAID's n_exact: 64 at k = 10, 256 at k = 100, 1024 for a wide
search). Reported: milliseconds per batch (median of ``--repeats``), candidate tokens scored
per second, and the largest absolute difference between the two paths' scores.

Usage:
    python bench/bench_codes_gpu.py                      # on a CUDA machine
    python bench/bench_codes_gpu.py --smoke              # CPU, Triton interpreter, tiny shapes
Writes bench/results/codes_gpu_<date>.json (+ .png); --smoke writes codes_gpu_smoke_<date>.*
"""

from __future__ import annotations

import argparse
import os
import sys

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

from colengine.index.plaid.codec import ProductCodec  # noqa: E402
from colengine.index.plaid.search import SearchState  # noqa: E402
from colengine.kernels import score_candidates_packed  # noqa: E402
from colengine.kernels.codes import score_candidates_codes  # noqa: E402

D, LQ = 128, 32


def make_store(n_docs: int, k: int, dev: torch.device, seed: int = 0):
    rng = np.random.default_rng(seed)
    lens = _common.scifact_doc_lengths()
    lens = lens[rng.integers(0, lens.shape[0], size=n_docs)].astype(np.int64)
    off = np.zeros(n_docs + 1, dtype=np.int64)
    np.cumsum(lens, out=off[1:])
    T = int(off[-1])
    cents = rng.standard_normal((k, D)).astype(np.float32)
    cents /= np.linalg.norm(cents, axis=1, keepdims=True)
    codec = ProductCodec.fit(0.05 * rng.standard_normal((1 << 14, D)).astype(np.float32), nbits=2)
    res = torch.from_numpy(rng.integers(0, 256, size=(T, codec.packed_dim), dtype=np.uint8))
    codes = torch.from_numpy(rng.integers(0, k, size=T).astype(np.int32))
    # the engine's search state over this store (its inverted lists are not needed here:
    # only SearchState.decompress, stage 4's decoding, reads the state)
    none = torch.zeros(1, dtype=torch.int64, device=dev)
    state = SearchState(
        centroids=torch.from_numpy(cents).to(dev), ivf_starts=none[:0], ivf_lens=none[:0],
        ivf_docs=none[:0],
        doc_code_offsets=none, doc_codes=none[:0], n_docs=n_docs,
        tok_offsets=torch.from_numpy(off).to(dev), codes=codes.to(dev), residuals=res.to(dev),
        codec=codec, normalized=True)
    return dict(state=state, tokens=T)


def decompress_then_maxsim(s, q, ql, cand):
    """The engine's decompressing stage 4: the union of the candidates decoded to a float
    copy (SearchState.decompress), then the packed kernel over local numbers."""
    uniq, inv = torch.unique(cand[cand >= 0], return_inverse=True)
    x, offsets = s["state"].decompress(uniq)
    local = torch.full_like(cand, -1)
    local[cand >= 0] = inv
    return score_candidates_packed(q, ql, x, offsets, local, backend="triton")


def fused(s, q, ql, cand):
    st = s["state"]
    return score_candidates_codes(q, ql, st.codes, st.residuals, st.codec.lut(q.device),
                                  st.centroids, st.tok_offsets, cand, normalize=st.normalized)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; CPU under the interpreter")
    ap.add_argument("--docs", type=int, default=100_000)
    ap.add_argument("--centroids", type=int, default=32_768)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    smoke = args.smoke
    dev = torch.device("cpu" if smoke else "cuda")
    if not smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --smoke on a CPU")
    n_docs, k = (50, 64) if smoke else (args.docs, args.centroids)
    s = make_store(n_docs, k, dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    rows = []
    shapes = [(2, 3)] if smoke else [(1, 64), (32, 64), (32, 256), (8, 1024)]
    rng = np.random.default_rng(1)
    for B, n in shapes:
        q = torch.nn.functional.normalize(torch.randn(B, LQ, D, device=dev), dim=2)
        ql = torch.full((B,), LQ, device=dev)
        cand = torch.from_numpy(rng.integers(0, n_docs, size=(B, n))).to(dev)
        ref = decompress_then_maxsim(s, q, ql, cand)
        got = fused(s, q, ql, cand)
        diff = float((got - ref).abs().max())
        off = s["state"].tok_offsets
        n_tok = int((off[cand + 1] - off[cand]).sum())
        row = {"queries": B, "candidates": n, "candidate_tokens": n_tok, "max_abs_diff": diff}
        for name, fn in (("decompress_then_maxsim", decompress_then_maxsim), ("fused", fused)):
            t = _common.time_fn(lambda fn=fn: fn(s, q, ql, cand), repeats=args.repeats, sync=sync)
            row[f"{name}_ms"] = 1e3 * t["median_s"]
            row[f"{name}_mtok_per_s"] = n_tok / t["median_s"] / 1e6
        row["speedup"] = row["decompress_then_maxsim_ms"] / row["fused_ms"]
        rows.append(row)
        print({key: (round(v, 4) if isinstance(v, float) else v) for key, v in row.items()}, flush=True)
    name = f"codes_gpu{'_smoke' if smoke else ''}_{_common.today()}"
    payload = {"env": _common.env_info(), "docs": n_docs, "centroids": k, "tokens": s["tokens"],
               "dim": D, "query_tokens": LQ, "codec": "product, nbits 2", "rows": rows}
    path = _common.write_json(name, payload)
    plot(rows, path.with_suffix(".png"), payload["env"].get("gpu", "CPU (interpreter)"))
    print("wrote", path)


def plot(rows, path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"B={r['queries']}\nn={r['candidates']}" for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(x - 0.2, [r["decompress_then_maxsim_ms"] for r in rows], 0.4, label="decompress + MaxSim")
    ax.bar(x + 0.2, [r["fused_ms"] for r in rows], 0.4, label="fused (from codes)")
    ax.set_xticks(x, labels)
    ax.set_ylabel("ms per batch (median)")
    ax.set_title(f"PLAID stage 4 on {device}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
