"""Long documents: nDCG@10 of truncate / chunk / late chunking with the MiniLM stand-in.

    flock /tmp/colengine-bench.lock python bench/bench_longdocs.py --data DATA \\
        [--datasets scifact,nfcorpus] [--modes truncate,chunk,late,late512]

For each data set (BEIR layout under ``--data`` / ``$COLENGINE_DATA``) and each mode it
indexes the corpus exhaustively (exact float16 MaxSim: the comparison is about what the
vectors hold, not about PLAID's approximations), searches every test query at k = 10 and
reports nDCG@10 (pytrec_eval) with the documents longer than one window, passages, token
vectors and text tokens kept / lost:

* ``truncate``: one passage per document, cut at the model's 256 tokens (the cached
  encodings of ``_common.encoded``).
* ``chunk``: windows of 256 tokens (253 text tokens + [CLS] [D] [SEP]), overlap 32.
* ``late``: late chunking with the default context, capped by the model's limit: MiniLM's
  tokenizer says 256 positions, so a segment is one window and late chunking is the same
  computation as ``chunk``. The script checks this on the long documents (max |difference|
  of the vectors) instead of encoding the corpus again.
* ``late512``: late chunking with a 512-token context, the size of BERT's position table,
  beyond the 256 tokens all-MiniLM-L6-v2 documents (the tokenizer's limit is lifted for this
  run only): each window's vectors saw up to one neighbouring window of context.

Encoded passages are cached (``colengine.longdocs.cached_encode_passages`` under the shared
cache), so a rerun only searches. Each (data set, mode) is merged into
bench/results/longdocs_<date>.json, and the .png is redrawn from all of them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, add_data_argument, data_root, encoded, env_info, ndcg10, today  # noqa: E402

MODES = ("truncate", "chunk", "late", "late512")


def _search(index, q, k: int = 10):
    out = []
    for a in range(0, q.shape[0], 32):
        out.extend(index.search(q[a:a + 32], k))
    return [[(h.doc_id, h.score) for h in hits] for hits in out]


def _late_equals_chunk(enc, texts, lengths, content, chunk, sample: int) -> float:
    """Max |difference| between late (default context) and chunk vectors on up to
    ``sample`` long documents."""
    from colengine.longdocs import check_policy, encode_passages

    longs = [i for i in np.flatnonzero(lengths > content)[:sample].tolist()]
    late = encode_passages(enc, [texts[i] for i in longs], check_policy("late"), show_progress=False)
    diff = 0.0
    for j, i in enumerate(longs):
        a = late.docs.tokens[late.docs.offsets[np.flatnonzero(late.doc == j)[0]]:
                             late.docs.offsets[np.flatnonzero(late.doc == j)[-1] + 1]]
        rows = np.flatnonzero(chunk.doc == i)
        b = chunk.docs.tokens[chunk.docs.offsets[rows[0]]:chunk.docs.offsets[rows[-1] + 1]]
        if a.shape != b.shape:
            return float("inf")
        diff = max(diff, float(np.abs(a.astype(np.float32) - b.astype(np.float32)).max()))
    return diff


def run(name: str, modes: list[str], data, save) -> dict:
    from colengine.cache import default_cache_dir
    from colengine.encoder import Encoder
    from colengine.eval.datasets import load_dataset
    from colengine.index.exhaustive import ExhaustiveIndex
    from colengine.longdocs import (PassageIndex, _specials, _text_ids, cached_encode_passages,
                                    check_policy)
    from colengine.models import resolve_model_name

    ids, docs_trunc, qids, q, qrels, model = encoded(name, data=data)
    texts = load_dataset(data_root(data) / name).documents()
    enc = Encoder(str(resolve_model_name("minilm")), device="cpu", batch_size=32)
    sp = _specials(enc)
    lengths = np.array([len(x) for x in _text_ids(enc, texts, sp)], dtype=np.int64)
    content = enc.document_length - sp.n_extra
    rel = {d for qid in qids for d, g in qrels.get(qid, {}).items() if g > 0}
    pos = {d: i for i, d in enumerate(ids)}
    rel_long = sum(1 for d in rel if d in pos and lengths[pos[d]] > content)
    base = {"documents": len(ids), "queries": len(qids), "text_tokens": int(lengths.sum()),
            "documents_longer_than_window": int((lengths > content).sum()),
            "relevant_documents": len(rel), "relevant_documents_longer_than_window": rel_long,
            "window_text_tokens": int(content), "model": model}
    out: dict[str, dict] = {}
    chunk_enc = chunk_run = None
    limit = enc.model.tokenizer.model_max_length
    for mode in modes:
        t0 = time.perf_counter()
        row: dict = {}
        if mode == "truncate":
            index = ExhaustiveIndex.build(docs_trunc, ids)
            row.update(passages=len(ids), vectors=docs_trunc.n_tokens,
                       text_tokens_indexed=int(np.minimum(lengths, content).sum()),
                       documents_truncated=int((lengths > content).sum()))
        else:
            if mode == "late512":
                enc.model.tokenizer.model_max_length = 512   # BERT's position table
                policy = check_policy("late", None, 512)
            else:
                policy = check_policy(mode)
            rp = policy.resolve(enc)
            if mode == "late" and rp.context_content == rp.content:
                chunk_enc = chunk_enc or cached_encode_passages(
                    enc, texts, check_policy("chunk"), cache_dir=default_cache_dir())
                diff = _late_equals_chunk(enc, texts, lengths, content, chunk_enc, 100)
                row.update(same_as_chunk=True, checked_long_documents=100,
                           max_abs_diff_vs_chunk=diff, context=rp.context)
                ep = chunk_enc
            else:
                ep = cached_encode_passages(enc, texts, policy, cache_dir=default_cache_dir())
                if mode == "chunk":
                    chunk_enc = ep
                row.update(context=rp.context if mode != "chunk" else None)
            enc.model.tokenizer.model_max_length = limit   # back to the model's own
            index = PassageIndex.build(ExhaustiveIndex, ep, ids, rp)
            row.update(passages=len(ep.docs), vectors=ep.docs.n_tokens,
                       text_tokens_indexed=int(lengths.sum()), documents_truncated=0,
                       documents_split=int(ep.report["long_documents"]),
                       segments=int(ep.report["segments"]), overlap=rp.overlap,
                       window=rp.window)
        row["prepare_s"] = round(time.perf_counter() - t0, 1)
        t1 = time.perf_counter()
        if row.get("same_as_chunk") and chunk_run is not None:
            res = chunk_run          # the same vectors: the same ranking (not searched again)
        else:
            res = _search(index, q)
            row["search_qps"] = round(len(qids) / (time.perf_counter() - t1), 1)
        if mode == "chunk":
            chunk_run = res
        row["ndcg10"] = ndcg10(res, qids, qrels)
        out[mode] = row
        save(name, base, {mode: row})   # each mode as soon as it is measured
        print(f"{name:9s} {mode:9s} nDCG@10 {row['ndcg10']:.4f}  passages {row['passages']}  "
              f"vectors {row['vectors']}  ({row['prepare_s']}s prepare, "
              f"{time.perf_counter() - t1:.0f}s search)", flush=True)
    return {"facts": base, "modes": out}


def plot(payload: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(payload["datasets"])
    fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 3.6), squeeze=False)
    for ax, name in zip(axes[0], sets):
        modes = payload["datasets"][name]["modes"]
        names = [m for m in MODES if m in modes]
        vals = [modes[m]["ndcg10"] for m in names]
        bars = ax.bar(names, vals, color=["#999999", "#1f77b4", "#aec7e8", "#ff7f0e"][:len(names)])
        for b, m, v in zip(bars, names, vals):
            ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.4f}\n{modes[m]['passages']} pass.",
                    ha="center", va="bottom", fontsize=8)
        f = payload["datasets"][name]["facts"]
        ax.set_title(f"{name}: {f['documents_longer_than_window']} of {f['documents']} docs "
                     f"> 1 window", fontsize=9)
        ax.set_ylabel("nDCG@10 (exhaustive MaxSim)")
        ax.set_ylim(0, max(vals) * 1.25)
    env = payload["env"]
    fig.suptitle(f"long documents, MiniLM stand-in; {env['cpu']}, {env['date'][:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_argument(ap)
    ap.add_argument("--datasets", default="scifact,nfcorpus")
    ap.add_argument("--modes", default=",".join(MODES))
    args = ap.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    bad = sorted(set(modes) - set(MODES))
    if bad:
        raise SystemExit(f"unknown mode(s) {bad}; choose from {MODES}")
    path = RESULTS / f"longdocs_{today()}.json"
    env = env_info()

    def save(name: str, facts: dict, rows: dict) -> None:
        import os

        payload = json.loads(path.read_text()) if path.exists() else {"datasets": {}}
        payload["env"] = {**env, "loadavg_end": list(os.getloadavg())}
        entry = payload["datasets"].setdefault(name, {"facts": {}, "modes": {}})
        entry["facts"] = facts
        for mode, row in rows.items():
            entry["modes"][mode] = {**row, "measured": env["date"]}
        payload["note"] = ("exhaustive float16 MaxSim over passages, document score = best "
                           "passage; late = chunk for MiniLM (256-position limit: one window per "
                           "segment); late512 lifts the tokenizer limit to BERT's 512 positions")
        path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
        plot(payload, path.with_suffix(".png"))

    for name in [d for d in args.datasets.split(",") if d]:
        run(name, modes, args.data, save)
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
