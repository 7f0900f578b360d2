"""Sharded PLAID on Ray, 1 / 2 / 4 shards on this machine, against one index in process.

    flock /tmp/colengine-bench.lock python bench/bench_sharded.py --data DATA

SciFact's corpus and queries come encoded from the shared cache (``_common.encoded``), so
nothing is re-encoded: each configuration is built with ``ShardedRetriever.build_encoded``
(vectors spooled per shard, centroids trained once on a global sample, one Ray task per
shard), then searched through its shard actors. The reference is one PLAID index on the same
centroids searched in this process, with no Ray in the way (torch threads as given, and 1).

What it measures, per configuration: build time by stage; q/s one query at a time and in
batches of 32; single-query p50 / p95; nDCG@10; agreement of the top-10 with the in-process
index; each shard actor's resident memory and a bare actor's (what a shard adds); the time
the driver spends merging. On 2 cores, 2 and 4 shards cannot search faster than 1: the
shards share the same two cores, so this shows the fan-out and merge overhead, not scaling.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    add_data_argument,
    encoded,
    env_info,
    ndcg10,
    recall_with_ties,
    timed_search,
    today,
    write_json,
)

RESULTS = Path(__file__).resolve().parent / "results"


def _bare_actor_rss() -> int:
    """Resident bytes of a Ray actor that imported what a shard actor imports, holding no
    shard (the floor every shard actor pays)."""
    import ray

    @ray.remote(num_cpus=0.1)
    class Bare:
        def facts(self) -> dict:
            import colengine.retriever  # noqa: F401
            from colengine.distributed.shard import process_facts

            return process_facts()

    a = Bare.remote()
    facts = ray.get(a.facts.remote())
    ray.kill(a)
    return int(facts["rss_bytes"])


def _search_timings(search, q: torch.Tensor, n_single: int) -> dict:  # noqa: F821
    """Hits of every query (batches of 32), q/s single and batched, single p50 / p95."""
    out, lat, qps_batch = timed_search(search, q, n_single)
    return {"hits": out, "qps_single": float(len(lat) / lat.sum()),
            "p50_ms": float(np.percentile(lat, 50) * 1e3),
            "p95_ms": float(np.percentile(lat, 95) * 1e3), "qps_batch": float(qps_batch)}


def _shard_latency(r, enc, q, n: int) -> list[float]:
    """Single-query p50 (ms) of each shard of ``r`` alone, loaded in this process with one
    torch thread: what one shard costs on a machine of its own, without Ray."""
    import torch

    from colengine import Retriever

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    out = []
    for name in r.names:
        shard = Retriever.load(r.path / name, model=enc, verify=False)
        search = shard.index.search
        search(q[:2], k=10)
        lat = []
        for i in range(n):
            t = time.perf_counter()
            search(q[i:i + 1], k=10)
            lat.append(time.perf_counter() - t)
        out.append(float(np.percentile(lat, 50) * 1e3))
        del shard, search
    torch.set_num_threads(before)
    return out


def _run_of(hits) -> list:
    return [[(h.doc_id, float(h.score)) for h in row] for row in hits]


def _agreement(a, b) -> float:
    return float(np.mean([len({h.doc_id for h in x} & {h.doc_id for h in y}) / max(1, len(y))
                          for x, y in zip(a, b)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_argument(ap)
    ap.add_argument("--dataset", default="scifact")
    ap.add_argument("--shards", default="1,2,4")
    ap.add_argument("--single", type=int, default=100, help="queries timed one at a time")
    ap.add_argument("--cpus", type=int, default=os.cpu_count())
    args = ap.parse_args()

    import ray
    import torch

    from colengine import Encoder
    from colengine.distributed import ShardedRetriever
    from colengine.distributed.shard import build_plaid_shard, process_facts
    from colengine.distributed.sharded import merge_topk
    from colengine.models import resolve_model_name

    env = env_info()
    doc_ids, docs, qids, q, qrels, model = encoded(args.dataset, data=args.data)
    enc = Encoder(str(resolve_model_name("minilm")), device="cpu")
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    bare = _bare_actor_rss()
    tokens = int(docs.n_tokens)
    judged = [i for i, qid in enumerate(qids) if qid in qrels]
    q = q[judged]
    qids = [qids[i] for i in judged]
    rows: list[dict] = []
    ref_hits = None
    # the exact top-10 (float MaxSim over every document), for recall; one torch thread (two
    # intra-op threads on this busy 2-core machine wait on each other)
    from colengine.index.exhaustive import ExhaustiveIndex

    torch.set_num_threads(1)
    exh = ExhaustiveIndex.build(docs, doc_ids)
    exact = [[(h.doc_id, h.score) for h in row] for a in range(0, q.shape[0], 32)
             for row in exh.search(q[a:a + 32], k=20)]
    del exh
    torch.set_num_threads(env["torch_threads"])
    with tempfile.TemporaryDirectory(prefix="bench-sharded-", dir="/tmp") as tmp:
        for n in [int(x) for x in args.shards.split(",")]:
            t0 = time.perf_counter()
            r = ShardedRetriever.build_encoded(docs, doc_ids, model=enc, shards=n,
                                               path=Path(tmp) / f"s{n}", timeout=120)
            build_s = time.perf_counter() - t0
            if ref_hits is None:   # the same centroids, one index, in this process
                ref = build_plaid_shard(docs, doc_ids, centroids=r.centroids, codec=r.codec,
                                        normalized=r.normalized, device="cpu")
                ref_rows = []
                for threads in sorted({torch.get_num_threads(), 1}, reverse=True):
                    torch.set_num_threads(threads)
                    res = _search_timings(lambda x, ref=ref: ref.search(x, k=10), q, args.single)
                    ref_hits = ref_hits or res["hits"]
                    ref_rows.append({"config": f"one index in process, {threads} torch "
                                               f"thread{'s' if threads > 1 else ''}",
                                     "shards": 0, "torch_threads": threads,
                                     "ndcg10": ndcg10(_run_of(res["hits"]), qids, qrels),
                                     "recall_of_exact_top10": recall_with_ties(
                                         _run_of(res["hits"]), exact, 10),
                                     **{k: v for k, v in res.items() if k != "hits"}})
                torch.set_num_threads(env["torch_threads"])
                rss_ref = process_facts()
                rows.extend(ref_rows)
                del ref
            res = _search_timings(
                lambda x, r=r: r.search_batch(["q"] * x.shape[0], k=10, query_embeddings=x),
                q, args.single)
            # the driver's merge alone: n lists of 10 hits per query, 32 queries
            parts = [list(row) for row in res["hits"][:32]]
            t = time.perf_counter()
            for _ in range(100):
                for row in parts:
                    merge_topk([row] * n, 10)
            merge_ms = (time.perf_counter() - t) / (100 * len(parts)) * 1e3
            info = r.info()
            b = r.meta["build"]
            shard_rss = [s["rss_bytes"] for s in info["shards"]]
            rows.append({
                "config": f"{n} shard{'s' if n > 1 else ''} on Ray", "shards": n,
                "torch_threads": info["shards"][0]["torch_threads"],
                "ndcg10": ndcg10(_run_of(res["hits"]), qids, qrels),
                "top10_agreement_with_one_index": _agreement(res["hits"], ref_hits),
                "recall_of_exact_top10": recall_with_ties(_run_of(res["hits"]), exact, 10),
                "shard_p50_ms_in_process": _shard_latency(r, enc, q, args.single // 2),
                **{k: v for k, v in res.items() if k != "hits"},
                "merge_ms_per_query": merge_ms,
                "build_s": build_s, "build_stages_s": b["seconds"],
                "tokens": tokens, "shard_tokens": [s["tokens"] for s in r.meta["shards"]],
                "n_centroids": r.meta["n_centroids"],
                "shard_disk_bytes": b["shard_disk_bytes"],
                "shard_actor_rss_bytes": shard_rss,
                "bare_actor_rss_bytes": bare,
                "shard_rss_over_bare_bytes": [x - bare for x in shard_rss],
                "build_worker_peak_rss_bytes": b["worker_peak_rss_bytes"],
            })
            print({k: v for k, v in rows[-1].items() if not isinstance(v, (list, dict))},
                  flush=True)
            r.close()
    payload = {"name": "sharded", "dataset": args.dataset, "documents": len(doc_ids),
               "tokens": tokens, "queries": len(qids), "model": model, "k": 10,
               "knobs": "PLAID defaults for k = 10, per shard",
               "driver_rss_after_reference_bytes": rss_ref.get("rss_bytes"),
               "env": {**env, "ray": ray.__version__, "ray_cpus": args.cpus},
               "note": ("All shards share this machine's cores: more shards add fan-out and "
                        "merge work and cannot make a search faster here."),
               "rows": rows}
    name = f"sharded_{args.dataset}_{today()}"
    path = write_json(name, payload)
    _plot(rows, RESULTS / f"{name}.png", env, args.dataset)
    print(path)
    ray.shutdown()


def _plot(rows: list[dict], out: Path, env: dict, dataset: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["config"].replace(" on Ray", "\non Ray").replace("one index in process, ", "in process\n")
              .replace(" torch thread", " thread") for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.5))
    ax[0].bar(x - 0.2, [r["qps_single"] for r in rows], 0.4, label="one query at a time")
    ax[0].bar(x + 0.2, [r["qps_batch"] for r in rows], 0.4, label="batches of 32")
    ax[0].set_ylabel("queries / s")
    ax[0].legend()
    ax[1].bar(x - 0.2, [r["p50_ms"] for r in rows], 0.4, label="p50")
    ax[1].bar(x + 0.2, [r["p95_ms"] for r in rows], 0.4, label="p95")
    ax[1].set_ylabel("single-query latency, ms")
    ax[1].legend()
    sh = [r for r in rows if r["shards"]]
    stages = ["spool", "train", "shards"]
    bottom = np.zeros(len(sh))
    for st in stages:
        v = np.asarray([r["build_stages_s"].get(st, 0.0) for r in sh])
        ax[2].bar([r["config"].replace(" on Ray", "") for r in sh], v, bottom=bottom, label=st)
        bottom += v
    ax[2].set_ylabel("build seconds")
    ax[2].legend()
    for a in ax[:2]:
        a.set_xticks(x, labels, fontsize=7)
    fig.suptitle(f"Sharded PLAID on Ray, {dataset} (MiniLM stand-in, nbits 2, k = 10): "
                 f"{env['cpu']}, {env['cpu_count']} cores shared by all shards, "
                 f"{env['date'][:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
