"""Metrics through ``pytrec_eval`` (trec_eval's C code), and TREC run files.

No metric is computed by hand here: nDCG@10 is trec_eval's ``ndcg_cut_10``, Recall@100 its
``recall_100``, MRR@10 its ``recip_rank`` on the run cut at rank 10.

trec_eval orders a run by score and breaks ties by document id, not by the order the engine
returned. So that the metrics judge exactly the ranking the engine produced, the runs handed
to trec_eval carry a score derived from the rank (``1 / rank``); the run files keep the
engine's real scores.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from colengine.types import Hit

__all__ = ["DEFAULT_METRICS", "evaluate_run", "per_query", "write_trec_run", "read_trec_run",
           "hits_to_run", "drop_self_hits"]

#: our name -> (trec_eval measure, cutoff applied to the run before evaluating, or None)
DEFAULT_METRICS: dict[str, tuple[str, int | None]] = {
    "ndcg@10": ("ndcg_cut_10", None),
    "recall@100": ("recall_100", None),
    "mrr@10": ("recip_rank", 10),
}
_EXTRA = {
    "ndcg@100": ("ndcg_cut_100", None),
    "recall@10": ("recall_10", None),
    "recall@1000": ("recall_1000", None),
    "map@100": ("map_cut_100", None),
    "p@10": ("P_10", None),
}

Run = Mapping[str, Sequence[Hit]]


def _measure(name: str) -> tuple[str, int | None]:
    spec = DEFAULT_METRICS.get(name) or _EXTRA.get(name)
    if spec is None:
        raise ValueError(f"unknown metric {name!r}; known: {sorted({**DEFAULT_METRICS, **_EXTRA})}")
    return spec


def drop_self_hits(qid: str, hits: Sequence[Hit]) -> list[Hit]:
    """BEIR's convention: a document whose id equals the query id is not a result."""
    return [h for h in hits if h.doc_id != qid]


def hits_to_run(run: Run, cutoff: int | None = None) -> dict[str, dict[str, float]]:
    """``{qid: [Hit, ...]}`` (best first) -> pytrec_eval's ``{qid: {docid: 1/rank}}``."""
    out: dict[str, dict[str, float]] = {}
    for qid, hits in run.items():
        d: dict[str, float] = {}
        for r, h in enumerate(hits[:cutoff] if cutoff else hits, 1):
            d.setdefault(h.doc_id, 1.0 / r)  # a repeated id keeps its best rank
        out[qid] = d
    return out


def per_query(qrels: Mapping[str, Mapping[str, int]], run: Run,
              metrics: Sequence[str] = tuple(DEFAULT_METRICS)) -> dict[str, dict[str, float]]:
    """``{metric: {qid: value}}`` over the judged queries (a judged query with no hits scores 0)."""
    import pytrec_eval

    qrels = {q: {d: int(g) for d, g in docs.items()} for q, docs in qrels.items()}
    out: dict[str, dict[str, float]] = {}
    by_cutoff: dict[int | None, list[tuple[str, str]]] = {}
    for m in metrics:
        measure, cut = _measure(m)
        by_cutoff.setdefault(cut, []).append((m, measure))
    for cut, pairs in by_cutoff.items():
        trec_run = hits_to_run(run, cut)
        measures = {".".join(measure.rsplit("_", 1)) if measure[-1].isdigit() else measure
                    for _, measure in pairs}
        ev = pytrec_eval.RelevanceEvaluator(qrels, measures)
        res = ev.evaluate({q: trec_run.get(q, {}) for q in qrels})
        for m, measure in pairs:
            out[m] = {q: float(res.get(q, {}).get(measure, 0.0)) for q in qrels}
    return out


def evaluate_run(qrels: Mapping[str, Mapping[str, int]], run: Run,
                 metrics: Sequence[str] = tuple(DEFAULT_METRICS)) -> dict[str, float]:
    """Mean of each metric over every judged query (BEIR's averaging)."""
    pq = per_query(qrels, run, metrics)
    return {m: (sum(v.values()) / len(v) if v else 0.0) for m, v in pq.items()}


def write_trec_run(path: str | os.PathLike, run: Run, tag: str = "colengine") -> Path:
    """TREC run format: ``qid Q0 docid rank score tag``, ranks from 1, best first."""
    path = Path(path)
    for qid, hits in run.items():   # checked before anything is written
        for h in hits:
            if not qid or not h.doc_id or any(c.isspace() for c in h.doc_id + qid):
                raise ValueError(f"{path}: empty ids or ids with whitespace cannot go into a "
                                 f"TREC run: {qid!r} / {h.doc_id!r}")
    if not tag or any(c.isspace() for c in tag):
        raise ValueError(f"{path}: the run tag must be one word, got {tag!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for qid, hits in run.items():
                for r, h in enumerate(hits, 1):
                    f.write(f"{qid} Q0 {h.doc_id} {r} {h.score:.6f} {tag}\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_trec_run(path: str | os.PathLike) -> dict[str, list[Hit]]:
    """Inverse of :func:`write_trec_run` (hits ordered by the rank column)."""
    rows: dict[str, list[tuple[int, Hit]]] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 6:
                raise ValueError(f"{path}:{n}: expected 'qid Q0 docid rank score tag'")
            qid, _, did, rank, score, _ = parts
            rows.setdefault(qid, []).append((int(rank), Hit(did, float(score))))
    return {q: [h for _, h in sorted(v, key=lambda t: t[0])] for q, v in rows.items()}
