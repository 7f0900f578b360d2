"""Token assignment to many centroids, and one k-means iteration: speed and faithfulness.

    flock /tmp/colengine-bench.lock python bench/bench_assign.py [--centroids 131072]

What a 1M-document build spends most of its time on (``bench/bench_scale.py``: 100M tokens,
K = 131,072 by PLAID's rule). On the synthetic clustered corpus (``bench/synthetic.py``):

1. centroids trained by the build's own k-means (``train_centroids``, 2 iterations) on
   ``8 K`` tokens of two chunks;
2. ``--tokens`` tokens of another chunk assigned to them by each method: faiss
   ``IndexIVFFlat`` (``K / 64`` lists, 8 probed: the engine's assigner until 2026-12-07),
   :class:`~colengine.index.plaid.centroids.CentroidGroups` at a few (group size, probes),
   and faiss HNSW (the assigner below 65,536 centroids); tokens a second, the share given the
   exact nearest centroid and the mean inner-product gap to it (exact arg-max on the first
   ``--check`` tokens);
3. one k-means iteration on ``--kmeans-sample`` tokens with each of the assignment indexes
   k-means can use (HNSW, the engine's choice until 2026-12-07, and an inverted file at 16 and
   32 probes): seconds, and the objective (mean best inner product over 20,000 held-out
   tokens, exact).

Writes bench/results/assign_<date><tag>.json and .png.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
from _common import RESULTS, env_info, today, write_json  # noqa: E402


def _quality(x: np.ndarray, C: np.ndarray, got: np.ndarray, exact: np.ndarray) -> dict:
    n = exact.size
    best = np.einsum("nd,nd->n", x[:n], C[exact])
    mine = np.einsum("nd,nd->n", x[:n], C[got[:n]])
    return {"exact_share": round(float(np.mean(got[:n] == exact)), 4),
            "mean_gap": round(float(np.mean(best - mine)), 5)}


def _assign_rows(x: np.ndarray, C: np.ndarray, check: int) -> list[dict]:
    import faiss
    import torch

    from colengine.index.plaid import centroids as cm

    xt, Ct = torch.from_numpy(x), torch.from_numpy(C)
    exact = torch.cat([(xt[a:a + 2048] @ Ct.T).argmax(1)
                       for a in range(0, check, 2048)])[:check].numpy()
    rows = []

    def measure(name: str, setup, run) -> None:
        t0 = time.perf_counter()
        index = setup()
        t1 = time.perf_counter()
        got = run(index)
        t2 = time.perf_counter()
        rows.append({"method": name, "setup_s": round(t1 - t0, 2),
                     "tokens_per_s": round(x.shape[0] / (t2 - t1)), **_quality(x, C, got, exact)})
        print(rows[-1], flush=True)

    def ivf():
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(C.shape[1]), C.shape[1], C.shape[0] // 64,
                                   faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = 0
        index.train(C)
        index.add(C)
        index.nprobe = 8
        return index

    def hnsw():
        index = cm._hnsw_ip(C.shape[1], cm._HNSW_EF_ASSIGN)
        index.add(C)
        return index

    def faiss_run(index):
        return index.search(x, 1)[1][:, 0]

    measure(f"faiss IVF {C.shape[0] // 64} lists, 8 probed", ivf, faiss_run)
    for size, probe in ((256, 8), (256, 4), (256, 12), (128, 8)):
        measure(f"CentroidGroups {size}/group, {probe} probed",
                lambda s=size, p=probe: cm.CentroidGroups(C, group_size=s, n_probe=p),
                lambda g: g.nearest(xt).numpy())
    measure("faiss HNSW (M 32, ef 16)", hnsw, faiss_run)
    return rows


def _kmeans_rows(x: np.ndarray, held: np.ndarray, k: int, modes: list[str]) -> list[dict]:
    import faiss

    from colengine.index.plaid import centroids as cm

    rows = []
    for mode in modes:
        km = faiss.Kmeans(x.shape[1], k, niter=1, spherical=True, seed=0, verbose=False,
                          min_points_per_centroid=1, max_points_per_centroid=-(-x.shape[0] // k))
        t0 = time.perf_counter()
        if mode == "hnsw":
            km.index = cm._hnsw_ip(x.shape[1], cm._HNSW_EF_KMEANS)
        else:
            km.index = cm._kmeans_ivf(x, k, 0)
            km.index.nprobe = int(mode.removeprefix("ivf"))
        t1 = time.perf_counter()
        km.train(x)
        t2 = time.perf_counter()
        C = np.asarray(km.centroids, dtype=np.float32)
        obj = float(np.mean([np.max(held[a:a + 2000] @ C.T, axis=1).mean()
                             for a in range(0, held.shape[0], 2000)]))
        rows.append({"index": mode, "setup_s": round(t1 - t0, 2),
                     "iteration_s": round(t2 - t1, 1), "objective": round(obj, 5)})
        print(rows[-1], flush=True)
    return rows


def _plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    for r in res["assign"]:
        ax.scatter(r["tokens_per_s"] / 1000, r["exact_share"])
        ax.annotate(r["method"], (r["tokens_per_s"] / 1000, r["exact_share"]), fontsize=7)
    ax.set_xlabel("thousand tokens assigned a second")
    ax.set_ylabel("share given the exact nearest centroid")
    ax.set_title(f"assignment to {res['centroids']:,} centroids", fontsize=9)
    ax = axes[1]
    for r in res["kmeans"]:
        ax.scatter(r["iteration_s"], r["objective"])
        ax.annotate(r["index"], (r["iteration_s"], r["objective"]), fontsize=8)
    ax.set_xlabel("seconds for one k-means iteration")
    ax.set_ylabel("objective (mean best inner product)")
    e = res["env"]
    ax.set_title(f"k-means, {res['kmeans_sample']:,} tokens: {e['cpu']}, {e['date'][:10]}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--centroids", type=int, default=131072)
    ap.add_argument("--tokens", type=int, default=131072, help="tokens assigned per method")
    ap.add_argument("--check", type=int, default=8192, help="tokens checked against the exact")
    ap.add_argument("--kmeans-sample", type=int, default=2_000_000)
    ap.add_argument("--kmeans", default="hnsw,ivf16,ivf32",
                    help="k-means assignment indexes to time ('' for none)")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    from synthetic import SyntheticCorpus

    from colengine.index.plaid.centroids import quantize_centroids, train_centroids

    corpus = SyntheticCorpus(1_000_000)
    k = args.centroids
    train = np.concatenate([np.asarray(corpus.chunk(i).tokens, dtype=np.float32)
                            for i in range(5, 5 + -(-8 * k // 900_000))])[:8 * k]
    t0 = time.perf_counter()
    C = quantize_centroids(train_centroids(train, k, niter=2, seed=0)).astype(np.float32)
    print(f"centroids: {time.perf_counter() - t0:.0f} s", flush=True)
    x = np.asarray(corpus.chunk(0).tokens[:args.tokens], dtype=np.float32)
    res = {"env": env_info(), "centroids": k, "tokens": int(x.shape[0]), "check": args.check,
           "kmeans_sample": args.kmeans_sample,
           "corpus": "bench.synthetic.SyntheticCorpus(1_000_000), chunks 0 (assigned), 5.. "
                     "(centroids), 1.. (k-means sample), 9 (held out)",
           "assign": _assign_rows(x, C, args.check)}
    modes = [m for m in args.kmeans.split(",") if m]
    if modes:
        sample = np.concatenate([np.asarray(corpus.chunk(i).tokens, dtype=np.float32) for i in
                                 range(1, 1 + -(-args.kmeans_sample // 900_000))])
        held = np.asarray(corpus.chunk(9).tokens[:20_000], dtype=np.float32)
        res["kmeans"] = _kmeans_rows(sample[:args.kmeans_sample], held, k, modes)
    else:
        res["kmeans"] = []
    out = write_json(f"assign_{today()}{args.tag}", res)
    _plot(res, RESULTS / f"assign_{today()}{args.tag}.png")
    print(out)


if __name__ == "__main__":
    main()
