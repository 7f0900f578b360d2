"""Memory of a streamed build with BM25 and stored texts: a corpus read from disk on access
(colengine.corpus.JsonlCorpus) against the same corpus as a list, and against an engine
before this change (issue 15: "the BM25 side of a streamed Retriever.build must not hold every
text in memory").

    python bench/bench_stream_build.py --docs 40000 --baseline-tree ../wt-old

Writes a synthetic JSON-lines corpus (English-like words from a Zipf law, ``--bytes`` of text
a document) and builds ``Retriever.build(..., stream=True, bm25=True, store_texts=True,
path=...)`` over it in a fresh subprocess per configuration, so that each ``ru_maxrss`` is
its own:

* ``corpus``: this engine, documents from ``JsonlCorpus`` (what ``colengine index`` does now);
* ``list``: this engine, the documents read into a list of dicts first;
* ``baseline``: the engine of ``--baseline-tree`` (a git worktree of the commit before),
  documents in a list (what its ``colengine index`` did).

The encoder is the tiny pplx-architecture model with its document length cut to
``--doc-tokens`` (texts stay ``--bytes`` long: the build's token work stays small while the
texts are large, which is the case this measures). Reports the peak RSS above the process's
RSS once the model is loaded and the corpus indexed on disk, the build's seconds, the index's
size on disk, and checks that all configurations return the same top-10 ids for a few
queries. Writes bench/results/stream_build_<date>.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import (RESULTS, dir_bytes, env_info, peak_rss_mb, rss_mb, today,  # noqa: E402
                     write_json)


def write_corpus(path: Path, n_docs: int, n_bytes: int, seed: int = 0) -> int:
    """A JSON-lines corpus of ``n_docs`` documents of about ``n_bytes`` each; returns the
    number of text bytes."""
    rng = np.random.default_rng(seed)
    words = np.array([f"w{i}x" for i in range(100_000)])
    per_doc = max(1, n_bytes // 6)
    total = 0
    with open(path, "w") as f:
        for a in range(0, n_docs, 5000):
            m = min(n_docs, a + 5000) - a
            ids = (rng.zipf(1.2, m * per_doc) - 1) % words.size
            for j, row in enumerate(words[ids].reshape(m, per_doc)):
                text = " ".join(row)
                total += len(text)
                meta = {"year": int(2000 + (a + j) % 25)}
                f.write(json.dumps({"_id": f"d{a + j}", "text": text, "metadata": meta}) + "\n")
    return total


def child(config: str, corpus_path: str, out: str, doc_tokens: int, chunk_size: int) -> dict:
    import torch

    from colengine import Encoder, Retriever

    torch.set_num_threads(2)
    enc = Encoder("tiny-pplx", device="cpu", batch_size=64)
    enc.model.document_length = doc_tokens
    enc.encode_documents(["warm up"], show_progress=False)
    base = rss_mb()   # what reads the corpus is measured too: the old CLI read it whole
    if config == "corpus":
        from colengine.corpus import JsonlCorpus

        docs = JsonlCorpus(corpus_path)
        ids, metas = docs.ids, docs.metadata
    else:
        ids, docs, metas = [], [], []
        with open(corpus_path) as f:
            for line in f:
                row = json.loads(line)
                ids.append(row["_id"])
                docs.append({"title": "", "text": row["text"]})
                metas.append(row.get("metadata"))
    t = time.perf_counter()
    r = Retriever.build(docs, ids, model=enc, index="plaid", stream=True, chunk_size=chunk_size,
                        bm25=True, metadata=metas, path=out, show_progress=False,
                        long_documents="truncate", seed=0)
    seconds = time.perf_counter() - t
    peak = peak_rss_mb()
    disk = dir_bytes(out)
    queries = ["w1x w17x w300x", "w5x w2000x", "w42x w9x w77x w1234x"]
    top = {pipe: [[h.doc_id for h in hs] for hs in r.search_batch(queries, k=10, pipeline=pipe)]
           for pipe in ("late", "bm25")}
    return {"config": config, "rss_before_mb": base, "peak_rss_mb": peak,
            "peak_added_mb": peak - base, "build_s": seconds, "disk_mb": disk / 2**20,
            "documents": len(ids), "top10": top}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=40_000)
    ap.add_argument("--bytes", type=int, default=2_000, help="text bytes a document")
    ap.add_argument("--doc-tokens", type=int, default=32)
    ap.add_argument("--chunk-size", type=int, default=10_000)
    ap.add_argument("--baseline-tree", default=None,
                    help="a git worktree of the engine to compare (PYTHONPATH for 'baseline')")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--corpus", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        res = child(args.child, args.corpus, args.out, args.doc_tokens, args.chunk_size)
        print("RESULT " + json.dumps(res))
        return

    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus.jsonl"
        text_bytes = write_corpus(corpus, args.docs, args.bytes)
        print(f"corpus: {args.docs} documents, {text_bytes / 2**20:.1f} MiB of text, "
              f"{corpus.stat().st_size / 2**20:.1f} MiB on disk", flush=True)
        configs = ["corpus", "list"] + (["baseline"] if args.baseline_tree else [])
        runs = []
        for config in configs:
            env = dict(os.environ)
            if config == "baseline":
                env["PYTHONPATH"] = str(Path(args.baseline_tree).resolve())
            else:
                env["PYTHONPATH"] = str(HERE.parent)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child",
                   "list" if config == "baseline" else config, "--corpus", str(corpus),
                   "--out", str(tmp / f"idx-{config}"), "--doc-tokens", str(args.doc_tokens),
                   "--chunk-size", str(args.chunk_size)]
            p = subprocess.run(cmd, env=env, capture_output=True, text=True)
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if p.returncode or not line:
                raise SystemExit(f"{config} failed:\n{p.stderr[-3000:]}")
            res = json.loads(line[-1][7:])
            res["config"] = config
            runs.append(res)
            print(f"{config:>9}: peak +{res['peak_added_mb']:.0f} MiB (peak {res['peak_rss_mb']:.0f}, "
                  f"before {res['rss_before_mb']:.0f}), build {res['build_s']:.0f} s, "
                  f"index {res['disk_mb']:.0f} MiB", flush=True)
    same = all(r["top10"] == runs[0]["top10"] for r in runs)
    print(f"same top-10 (late and bm25) in every configuration: {same}")
    payload = {"env": env_info(), "docs": args.docs, "bytes_per_doc": args.bytes,
               "text_mb": text_bytes / 2**20, "doc_tokens": args.doc_tokens,
               "chunk_size": args.chunk_size, "baseline_tree": args.baseline_tree,
               "runs": runs, "same_top10": same}
    name = f"stream_build_{today()}"
    print(write_json(name, payload))
    plot(payload, RESULTS / f"{name}.png")


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = payload["runs"]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    names = [r["config"] for r in runs]
    ax.bar(names, [r["peak_added_mb"] for r in runs], color=["C0", "C1", "C7"][:len(runs)])
    ax.axhline(payload["text_mb"], color="k", ls="--", lw=1,
               label=f"texts: {payload['text_mb']:.0f} MiB")
    ax.set_ylabel("peak RSS added by the build (MiB)")
    env = payload["env"]
    ax.set_title(f"streamed build, {payload['docs']:,} docs, BM25 + stored texts\n"
                 f"{env['cpu']}, {env['date'][:10]}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
