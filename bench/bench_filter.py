"""Filtered search: recall of the exhaustive-on-allowed top-k, and speed, by filter selectivity.

    flock /tmp/colengine-bench.lock python bench/bench_filter.py --data DATA   # or $COLENGINE_DATA

SciFact encoded with the MiniLM stand-in (cached, shared with bench_plaid), a PLAID index
(nbits 2 by default) and an exhaustive index over the same float vectors. Every document gets a
random integer field ``bucket`` in [0, 100000); a filter ``{"bucket": {"$lt": s * 100000}}``
keeps a share ``s`` of the corpus, evaluated by the real SQLite store. For each selectivity:

- ``recall_vs_exhaustive``: filtered PLAID (default knobs, the selectivity planner on) against
  exhaustive float MaxSim restricted to the allowed documents (the issue's measure; it includes
  what nbits-2 compression loses, which the 100% row shows without any filter);
- ``recall_vs_compressed_exact``: against every allowed document scored exactly on its
  decompressed vectors (its refinement vectors with ``--refine``), i.e. what the filter itself
  costs, compression aside;
- ``post_filter_recall``: the naive alternative (unfiltered PLAID top-k, then drop what the
  filter rejects), against the same float reference;
- q/s of filtered PLAID and of exhaustive-on-allowed, queries in batches of 32, and the SQL
  filter's time.

Recall of a query is |hits ∩ reference| / |reference| (a reference has fewer than k hits when
fewer than k documents are allowed), averaged over queries.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]   # this checkout's colengine, and _common
from _common import add_data_argument, data_root, encoded, env_info, today  # noqa: E402

SELECTIVITIES = [1.0, 0.5, 0.1, 0.01, 0.001]
BUCKETS = 100_000


def _args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_argument(p)
    p.add_argument("--dataset", default="scifact")
    p.add_argument("--nbits", type=int, default=2)
    p.add_argument("--refine", choices=["float16", "int8"], default=None,
                   help="build PLAID with refinement vectors (the exact stage scores them)")
    p.add_argument("--knobs", default="{}", help="JSON search knobs for PLAID (default: none)")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tag", default="", help="appended to the result files' names")
    p.add_argument("--plot-only", default=None, metavar="JSON",
                   help="redraw the plot (and table) of an earlier result file")
    return p.parse_args()


def _recall(got, ref) -> float:
    vals = []
    for g, r in zip(got, ref):
        r = {h.doc_id for h in r}
        if r:
            vals.append(len({h.doc_id for h in g} & r) / len(r))
    return float(np.mean(vals)) if vals else float("nan")


def _batched(search, q, batch: int):
    """(hits for every query, q/s) with queries in batches of ``batch`` after one warm-up."""
    search(q[:2])
    t0 = time.perf_counter()
    out = []
    for a in range(0, q.shape[0], batch):
        out.extend(search(q[a:a + batch]))
    return out, q.shape[0] / (time.perf_counter() - t0)


def main() -> None:
    args = _args()
    if args.plot_only:
        res = json.loads(Path(args.plot_only).read_text())
        _plot(res["results"], res["env"], Path(args.plot_only).with_suffix(".png"))
        _table(res["results"])
        return
    data_root(args.data)
    import torch

    from colengine.ids import IdMap
    from colengine.index.exhaustive import ExhaustiveIndex
    from colengine.index.plaid import PlaidIndex
    from colengine.metadata import MetadataStore

    doc_ids, docs, qids, q, _qrels, model = encoded(args.dataset)
    print(f"{args.dataset}: {len(doc_ids)} documents, {docs.n_tokens} tokens, {q.shape[0]} queries",
          flush=True)
    t0 = time.perf_counter()
    plaid = PlaidIndex.build(docs, doc_ids, nbits=args.nbits, seed=0, refine=args.refine)
    knobs = json.loads(args.knobs)
    build_s = time.perf_counter() - t0
    exh = ExhaustiveIndex(docs, IdMap(doc_ids))
    rng = np.random.default_rng(args.seed)
    buckets = rng.integers(0, BUCKETS, len(doc_ids))
    store = MetadataStore(store_texts=False)
    store.add(doc_ids, metadata=[{"bucket": int(b)} for b in buckets])
    k = args.k
    unfiltered, _ = _batched(lambda x: plaid.search(x, k=k, **knobs), q, args.batch)

    rows = []
    for s in SELECTIVITIES:
        flt = {"bucket": {"$lt": int(s * BUCKETS)}}
        t0 = time.perf_counter()
        allowed_ids = store.matching_ids(flt)
        mask = np.zeros(len(doc_ids), dtype=bool)
        mask[exh.ids.positions(allowed_ids)] = True
        filter_ms = (time.perf_counter() - t0) * 1e3
        n_allowed = int(mask.sum())
        allowed_tokens = int(np.diff(docs.offsets)[mask].sum())
        ref, exh_qps = _batched(lambda x: exh.search(x, k=k, allowed=mask), q, args.batch)
        default_tokens = plaid.exact_filter_tokens
        plaid.exact_filter_tokens = 1 << 62   # every allowed document scored exactly
        ref_c, _ = _batched(lambda x: plaid.search(x, k=k, allowed=mask, **knobs), q, args.batch)
        plaid.exact_filter_tokens = default_tokens
        got, plaid_qps = _batched(lambda x: plaid.search(x, k=k, allowed=mask, **knobs), q,
                                  args.batch)
        allowed_set = set(allowed_ids)
        post = [[h for h in hits if h.doc_id in allowed_set] for hits in unfiltered]
        row = {
            "selectivity": s, "allowed_docs": n_allowed, "allowed_tokens": allowed_tokens,
            "plan": "exact" if allowed_tokens <= default_tokens else "probe",
            "recall_vs_exhaustive": _recall(got, ref),
            "recall_vs_compressed_exact": _recall(got, ref_c),
            "post_filter_recall": _recall(post, ref),
            "mean_hits": float(np.mean([len(h) for h in got])),
            "plaid_qps": plaid_qps, "exhaustive_on_allowed_qps": exh_qps,
            "filter_sql_ms": filter_ms,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    info = env_info()
    info.update(dataset=args.dataset, documents=len(doc_ids), tokens=int(docs.n_tokens),
                queries=int(q.shape[0]), k=k, nbits=args.nbits, refine=args.refine,
                knobs=knobs, model=model,
                plaid_build_s=build_s, n_centroids=plaid.n_centroids,
                exact_filter_tokens=PlaidIndex.exact_filter_tokens,
                timing=f"all queries in batches of {args.batch}, after one warm-up batch; "
                       f"torch threads {torch.get_num_threads()}")
    tag = (f"_{args.refine}" if args.refine else "") + ("_knobs" if knobs else "")
    name = f"filter_{args.dataset}_nbits{args.nbits}{tag}_{today()}{args.tag}"
    out = HERE / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    info["loadavg_end"] = list(os.getloadavg())
    out.write_text(json.dumps({"env": info, "results": rows}, indent=2) + "\n")
    _plot(rows, info, HERE / "results" / f"{name}.png")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    _table(rows)


def _table(rows) -> None:
    print("| selectivity | allowed docs | plan | recall vs exhaustive | recall vs compressed exact "
          "| post-filter recall | PLAID q/s | exhaustive-on-allowed q/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['selectivity']:.1%} | {r['allowed_docs']} | {r['plan']} | "
              f"{r['recall_vs_exhaustive']:.3f} | {r['recall_vs_compressed_exact']:.3f} | "
              f"{r['post_filter_recall']:.3f} | {r['plaid_qps']:.1f} | "
              f"{r['exhaustive_on_allowed_qps']:.1f} |")


def _plot(rows, info, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['selectivity']:.1%}" for r in rows]
    x = np.arange(len(rows))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    w = 0.27
    for i, (key, name) in enumerate([("recall_vs_exhaustive", "filtered PLAID vs exhaustive"),
                                     ("recall_vs_compressed_exact",
                                      "filtered PLAID vs exact on decompressed"),
                                     ("post_filter_recall", "post-filter (naive) vs exhaustive")]):
        a1.bar(x + (i - 1) * w, [r[key] for r in rows], w, label=name)
    a1.axhline(0.95, color="k", ls="--", lw=0.8)
    a1.set_xticks(x, labels)
    a1.set_xlabel("filter selectivity (share of documents allowed)")
    a1.set_ylabel(f"recall of the top-{info['k']}")
    a1.set_ylim(0, 1.05)
    a1.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    a2.plot(x, [r["plaid_qps"] for r in rows], "o-", label="filtered PLAID")
    a2.plot(x, [r["exhaustive_on_allowed_qps"] for r in rows], "s-", label="exhaustive on allowed")
    a2.set_xticks(x, labels)
    a2.set_yscale("log")
    a2.set_xlabel("filter selectivity")
    a2.set_ylabel("queries / s (batches of 32)")
    a2.legend(fontsize=8)
    fig.suptitle(f"{info['dataset']} ({info['documents']} docs), MiniLM stand-in, PLAID nbits "
                 f"{info['nbits']}, refine {info.get('refine')}, "
                 f"knobs {info.get('knobs') or 'default'}, "
                 f"k={info['k']} — {info['cpu']}, {info['cpu_count']} cores, "
                 f"{info['date'][:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
