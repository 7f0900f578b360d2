"""Shared data loading for bench_plaid: BEIR corpora encoded with the MiniLM stand-in (cached)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DATA_ROOT = Path(os.environ.get("COLENGINE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def load_beir(name: str):
    root = DATA_ROOT / name
    ids, texts = [], []
    with open(root / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            ids.append(str(r["_id"]))
            texts.append((r.get("title") or "") + " " + (r.get("text") or ""))
    qrels: dict[str, dict[str, int]] = {}
    with open(root / "qrels" / "test.tsv", encoding="utf-8") as f:
        next(f)
        for line in f:
            q, d, s = line.rstrip("\n").split("\t")[:3]
            qrels.setdefault(q, {})[d] = int(s)
    queries = {}
    with open(root / "queries.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if str(r["_id"]) in qrels:
                queries[str(r["_id"])] = r["text"]
    return ids, texts, queries, qrels


def encoded(name: str, *, wait: bool = True):
    """(doc_ids, PackedEmbeddings, query_ids, query tensor [Q, 32, 128], qrels, model description).

    Uses the same model folder ("minilm" alias) and document texts as ``colengine.eval``, so the
    on-disk cache of encoded corpora is shared with the other benchmarks.
    """
    import time

    from colengine.cache import cached_encode_documents, default_cache_dir, model_fingerprint, \
        texts_fingerprint
    from colengine.encoder import Encoder
    from colengine.eval.datasets import load_dataset
    from colengine.models import resolve_model_name
    from colengine.storage import Bundle, is_index, load_bundle, save_bundle

    cache = default_cache_dir()
    enc = Encoder(str(resolve_model_name("minilm")), device="cpu")
    ds = load_dataset(DATA_ROOT / name)
    texts = ds.documents()
    key = cache / "encoded" / f"{model_fingerprint(enc)}-{texts_fingerprint(texts)}"
    while wait and not is_index(key) and _someone_encoding():
        time.sleep(20)   # another process is filling the same cache entry
    docs = cached_encode_documents(enc, texts, cache_dir=cache)
    qids = list(ds.queries)
    qpath = cache / "encoded" / f"queries-{name}-{texts_fingerprint([ds.queries[i] for i in qids])}"
    if is_index(qpath):
        q = torch.from_numpy(np.asarray(load_bundle(qpath, kind="encoded-queries").arrays["q"]).copy())
    else:
        q = enc.encode_queries([ds.queries[i] for i in qids], show_progress=True)
        save_bundle(qpath, Bundle(kind="encoded-queries", meta={}, arrays={"q": q.numpy()}))
    return ds.doc_ids, docs, qids, q, ds.qrels, enc.describe()


def _someone_encoding() -> bool:
    import subprocess

    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return "prewarm" in out or "colengine.eval" in out and "index" in out


if __name__ == "__main__":
    import sys

    for name in sys.argv[1:]:
        ids, docs, qids, q, qrels, _ = encoded(name)
        print(name, len(ids), docs.n_tokens, tuple(q.shape))
