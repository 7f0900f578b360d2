"""How long does encoding a BEIR corpus take on this machine, and what does exhaustive MaxSim score?

Encodes every document of a BEIR folder with the given model (default: the MiniLM stand-in),
timing the encoder alone (wall and process CPU time), then searches the test queries with the
exhaustive index (exact MaxSim) and scores nDCG@10 / R@100 with pytrec_eval. The encoded corpus
is stored in the shared cache (``colengine.cache``) so other benchmarks reuse it.

    flock /tmp/colengine-bench.lock python bench/bench_encode.py --data DATA --dataset scifact
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytrec_eval  # noqa: E402

from colengine import Encoder, ExhaustiveIndex  # noqa: E402
from colengine.cache import default_cache_dir, model_fingerprint, texts_fingerprint  # noqa: E402
from colengine.storage import Bundle, save_bundle  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from _common import add_data_argument, data_root  # noqa: E402


def load_beir(folder: Path):
    ids, texts = [], []
    with open(folder / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            ids.append(str(row["_id"]))
            texts.append(f"{row.get('title') or ''} {row['text']}".strip())
    queries = {}
    with open(folder / "queries.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            queries[str(row["_id"])] = row["text"]
    qrels: dict[str, dict[str, int]] = {}
    with open(folder / "qrels" / "test.tsv", encoding="utf-8") as f:
        next(f)
        for line in f:
            qid, did, rel = line.rstrip("\n").split("\t")
            qrels.setdefault(qid, {})[did] = int(rel)
    return ids, texts, {q: queries[q] for q in qrels}, qrels


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="scifact")
    add_data_argument(ap)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()

    ids, texts, queries, qrels = load_beir(data_root(args.data) / args.dataset)
    enc = Encoder(args.model, device="cpu", batch_size=args.batch_size)
    load1 = os.getloadavg()
    t0, c0 = time.perf_counter(), time.process_time()
    docs = enc.encode_documents(texts)
    enc_wall, enc_cpu = time.perf_counter() - t0, time.process_time() - c0

    cache = default_cache_dir() / "encoded" / f"{model_fingerprint(enc)}-{texts_fingerprint(texts)}"
    if not (cache / "manifest.json").exists():
        save_bundle(cache, Bundle("encoded-corpus", {"model": enc.describe(), "n_documents": len(docs)},
                                  {"tokens": docs.tokens, "offsets": docs.offsets}))

    idx = ExhaustiveIndex.build(docs, ids)
    qids = list(queries)
    t0 = time.perf_counter()
    q = enc.encode_queries([queries[i] for i in qids])
    q_wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    hits = idx.search(q, k=100)
    s_wall = time.perf_counter() - t0
    run = {qid: {h.doc_id: h.score for h in hs if h.doc_id != qid} for qid, hs in zip(qids, hits)}
    ev = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100"})
    per_q = ev.evaluate(run)
    ndcg = sum(v["ndcg_cut_10"] for v in per_q.values()) / len(per_q)
    r100 = sum(v["recall_100"] for v in per_q.values()) / len(per_q)

    res = {
        "what": "encode a BEIR corpus + exhaustive MaxSim quality",
        "date": dt.date.today().isoformat(),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "loadavg_before": load1, "loadavg_after": os.getloadavg()},
        "dataset": args.dataset, "model": enc.describe(),
        "documents": len(docs), "tokens": docs.n_tokens,
        "encode_wall_s": round(enc_wall, 2), "encode_cpu_s": round(enc_cpu, 2),
        "docs_per_s": round(len(docs) / enc_wall, 1),
        "queries": len(qids), "query_encode_wall_s": round(q_wall, 2),
        "exhaustive_search_wall_s": round(s_wall, 2),
        "exhaustive_qps_batched": round(len(qids) / s_wall, 2),
        "ndcg@10": round(ndcg, 4), "recall@100": round(r100, 4),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
    }
    out = Path(args.out) / f"encode_{args.dataset}_{res['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
