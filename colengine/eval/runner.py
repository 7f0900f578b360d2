"""Run retrieval pipelines over test collections and score them.

Pipelines (``k`` results per query, BEIR's self-hit rule applied: a hit whose id equals the
query id is dropped before cutting at ``k``):

``bm25``         BM25 alone (:class:`colengine.bm25.BM25Index`, the dataset's language).
``bm25+rerank``  BM25 top ``candidates``, re-scored by exact MaxSim from the stored token
                 vectors (exhaustive index, through the kernels), top ``k``.
``exhaustive``   exact MaxSim over the whole corpus (:class:`ExhaustiveIndex`).
``plaid``        the PLAID index (``colengine.index.INDEX_KINDS["plaid"]``).
``fusion``       reciprocal-rank fusion (c=60) of BM25 top ``candidates`` and exhaustive
                 MaxSim top ``candidates``.
``dense``        the single-vector dense index alone (:mod:`colengine.dense`, ``dense_model``).
``dense+rerank`` dense top ``candidates``, re-scored by exact MaxSim, top ``k``.
``hybrid``       BM25 and dense top ``candidates`` fused (c=60), the fused top ``candidates``
                 re-scored by exact MaxSim, top ``k``.

Query-time work of the model pipelines goes through :meth:`colengine.Retriever.search_batch`
(its ``dense``, ``bm25+rerank`` and ``fusion`` pipelines).

Timings, per pipeline: ``index_s`` is building what the pipeline searches (BM25 index,
dense index: corpus encoding excluded, it is shared, cached and reported once per dataset as
``encode_corpus_s``); ``search_s`` is all query-time work for every query (query encoding
included); ``wall_s = index_s + search_s``.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from colengine.bm25 import BM25Index
from colengine.eval.datasets import Dataset, load_dataset
from colengine.eval.metrics import DEFAULT_METRICS, drop_self_hits, evaluate_run, write_trec_run
from colengine.bm25 import guess_language
from colengine.devices import resolve_device
from colengine.index.plaid.search import Knobs
from colengine.types import Hit

if TYPE_CHECKING:
    from colengine.index.plaid.search import KnobOverrides

__all__ = ["PIPELINES", "parse_pipelines", "guess_language", "load_encoder", "evaluate"]

log = logging.getLogger(__name__)

PIPELINES = ("bm25", "bm25+rerank", "exhaustive", "plaid", "fusion", "dense", "dense+rerank",
             "hybrid")
#: ``"all"``: every pipeline that needs no dense model
ALL_LATE = ("bm25", "bm25+rerank", "exhaustive", "plaid", "fusion")
DENSE_PIPELINES = ("dense", "dense+rerank", "hybrid")
_NEEDS_MODEL = {"bm25+rerank", "exhaustive", "plaid", "fusion", "dense+rerank", "hybrid"}
_QUERY_CHUNK = 64


def parse_pipelines(spec: str | Sequence[str] | None) -> list[str]:
    """``"bm25,fusion"`` or ``["bm25", "fusion"]`` (or both mixed) -> validated, de-duplicated."""
    if spec is None:
        return ["bm25"]
    items = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in items:
        for p in str(item).split(","):
            p = p.strip().lower()
            if not p:
                continue
            if p == "all":
                cand = list(ALL_LATE)
            elif p == "late":   # the name `colengine search` uses: the default index kind
                from colengine.retriever import default_index_kind

                cand = [default_index_kind()]
            elif p in PIPELINES:
                cand = [p]
            else:
                raise ValueError(f"unknown pipeline {p!r}; choose from {', '.join(PIPELINES)} "
                                 "(or 'late' for the default index kind, or 'all' for "
                                 f"{', '.join(ALL_LATE)})")
            out.extend(c for c in cand if c not in out)
    if not out:
        raise ValueError("no pipeline given")
    return out


# -- model -----------------------------------------------------------------------------
def load_encoder(model: Any = None, *, device: str = "auto", batch_size: int = 32,
                 announce=print, trust_remote_code: bool | None = None):
    """An :class:`colengine.encoder.Encoder` for ``model``.

    ``model``: an Encoder or ``pylate`` ColBERT (used as is), ``"minilm"`` (the offline
    all-MiniLM-L6-v2 stand-in), ``"tiny-pplx"``/``"tiny"`` (tiny random model, tests only),
    a local model folder, or a hub name. ``None`` means the default model; when that cannot
    be loaded here (no network, not cached) the MiniLM stand-in is used and ``announce`` says
    so. An explicitly named model that cannot be loaded is an error, never a silent swap.
    """
    from colengine.encoder import DEFAULT_MODEL, Encoder
    from colengine.models import ModelNotFoundError, resolve_model

    if isinstance(model, Encoder):
        return model
    if model is not None and not isinstance(model, (str, os.PathLike)):
        return Encoder(model, device=device, batch_size=batch_size)  # a built ColBERT
    name = DEFAULT_MODEL if model is None else os.fspath(model)
    if name == "tiny":
        name = "tiny-pplx"
    if model is None:
        try:
            resolve_model(name)
        except ModelNotFoundError:
            announce(f"colengine eval: the default model {name!r} cannot be loaded here "
                     "(offline and not cached); using the MiniLM stand-in "
                     "(all-MiniLM-L6-v2 + fixed 128-dim projection) instead. "
                     "Pass --model to choose.")
            name = "minilm"
    return Encoder(name, device=device, batch_size=batch_size,
                   trust_remote_code=trust_remote_code)


def _self_cut(qids: Sequence[str], runs: Sequence[Sequence[Hit]], k: int) -> dict[str, list[Hit]]:
    return {q: drop_self_hits(q, h)[:k] for q, h in zip(qids, runs)}


class _Timer:
    def __init__(self) -> None:
        self.s = 0.0

    def __enter__(self):
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.s = time.perf_counter() - self._t


class _DatasetRun:
    """Everything built once per dataset and shared by its pipelines."""

    def __init__(self, ds: Dataset, *, k: int, candidates: int, language: str | None,
                 bm25_params: dict, encoder_factory, cache_dir, index_kwargs: dict,
                 knobs: dict[str, Any], device: str, show_progress: bool, announce,
                 dense_factory=None, dense_options: dict | None = None) -> None:
        self.ds = ds
        self.k = k
        self.candidates = candidates
        self.language = language or ds.language
        if self.language is None:
            self.language = guess_language(ds.documents())
            if self.language != "en":
                announce(f"{ds.name}: BM25 language guessed from the script: {self.language} "
                         "(pass --language to set it)")
        self.bm25_params = bm25_params
        self.encoder_factory = encoder_factory
        self.cache_dir = cache_dir
        self.index_kwargs = index_kwargs
        self.knobs = knobs
        self.device = device
        self.show_progress = show_progress
        self.announce = announce
        self.qids = list(ds.queries)
        self.qtexts = [ds.queries[q] for q in self.qids]
        self.texts = ds.documents()
        # BEIR drops a hit whose id is the query id; ask one deeper only where that can happen,
        # so that elsewhere the rerank candidates are exactly the BM25 run.
        self.extra = 1 if set(self.qids) & set(ds.doc_ids) else 0
        self.setup: dict[str, Any] = {}
        self._bm25: BM25Index | None = None
        self._docs = None
        self._dense: dict[str, Any] = {}
        self.dense_factory = dense_factory
        self.dense_options = dict(dense_options or {})
        self._stage = None

    # -- shared artefacts ---------------------------------------------------------------
    def bm25(self) -> BM25Index:
        if self._bm25 is None:
            with _Timer() as t:
                self._bm25 = BM25Index.build(self.texts, self.ds.doc_ids, language=self.language,
                                             show_progress=self.show_progress, **self.bm25_params)
            self.setup["bm25_index_s"] = t.s
            self.setup["bm25_language"] = self.language
        return self._bm25

    def encoder(self):
        return self.encoder_factory()

    def doc_embeddings(self):
        if self._docs is None:
            from colengine.cache import (cached_encode_documents, default_cache_dir,
                                         model_fingerprint, texts_fingerprint)
            from colengine.storage import is_index

            enc = self.encoder()
            root = Path(self.cache_dir) if self.cache_dir is not None else default_cache_dir()
            key = f"{model_fingerprint(enc)}-{texts_fingerprint(self.texts)}"
            cached = is_index(root / "encoded" / key)
            with _Timer() as t:
                self._docs = cached_encode_documents(enc, self.texts, cache_dir=root,
                                                     show_progress=self.show_progress)
            self.setup["encode_corpus_s"] = t.s
            self.setup["encode_corpus_cached"] = cached
            self.setup["corpus_tokens"] = int(self._docs.n_tokens)
        return self._docs

    def dense(self, kind: str):
        if kind not in self._dense:
            from colengine.index import INDEX_KINDS

            docs = self.doc_embeddings()
            kwargs = {"device": self.device, **self.index_kwargs} if kind == "plaid" else {}
            with _Timer() as t:
                self._dense[kind] = INDEX_KINDS[kind].build(docs, self.ds.doc_ids, **kwargs)
            self.setup[f"{kind}_index_s"] = t.s
        return self._dense[kind]

    def dense_stage(self):
        """The single-vector dense index (documents' vectors cached like the late ones)."""
        if self._stage is None:
            from colengine.dense.encoder import cached_encode_raw, dense_cache_path
            from colengine.dense.stage import DenseStage
            from colengine.dense.index import DenseIndex
            from colengine.storage import is_index

            enc = self.dense_factory()
            cached = is_index(dense_cache_path(enc, self.texts, self.cache_dir))
            with _Timer() as t:
                raw = cached_encode_raw(enc, self.texts, cache_dir=self.cache_dir,
                                        show_progress=self.show_progress)
            self.setup["dense_encode_corpus_s"] = t.s
            self.setup["dense_encode_corpus_cached"] = cached
            with _Timer() as t:
                index = DenseIndex.build(enc.finish(raw), self.ds.doc_ids,
                                         precision=enc.precision, **self.dense_options)
            self.setup["dense_index_s"] = t.s
            self.setup["dense"] = {**enc.describe(), **index.stats()}
            self._stage = DenseStage(enc, index)
        return self._stage

    def retriever(self, kind: str, with_bm25: bool, with_dense: bool = False):
        from colengine.retriever import Retriever

        return Retriever(self.encoder(), self.dense(kind), bm25=self.bm25() if with_bm25 else None,
                         dense=self.dense_stage() if with_dense else None)

    # -- pipelines ------------------------------------------------------------------------
    def run(self, pipeline: str) -> tuple[dict[str, list[Hit]], dict[str, float]]:
        k, cand, x = self.k, max(self.candidates, self.k), self.extra
        nq = len(self.qids)
        # building (timed into index_s) happens before the search timer starts
        if pipeline == "bm25":
            idx = self.bm25()
            index_s = self.setup["bm25_index_s"]
            with _Timer() as t:
                hits = idx.search(self.qtexts, k + x, show_progress=self.show_progress)
        elif pipeline in ("exhaustive", "plaid"):
            self.dense(pipeline)
            index_s = self.setup[f"{pipeline}_index_s"]
            r = self.retriever(pipeline, with_bm25=False)
            knobs = self.knobs if pipeline == "plaid" else {}
            with _Timer() as t:
                hits = self._batched(lambda qs: r.search_batch(qs, k + x, pipeline="late",
                                                               **knobs), pipeline)
        elif pipeline in ("bm25+rerank", "fusion"):
            self.bm25()
            self.dense("exhaustive")
            index_s = self.setup["bm25_index_s"] + self.setup["exhaustive_index_s"]
            r = self.retriever("exhaustive", with_bm25=True)
            with _Timer() as t:
                hits = self._batched(lambda qs: r.search_batch(
                    qs, k + x, pipeline=pipeline, candidates=cand + x), pipeline)
        elif pipeline == "dense":   # no late model needed
            stage = self.dense_stage()
            index_s = self.setup["dense_index_s"]
            with _Timer() as t:
                hits = []
                for a in range(0, nq, _QUERY_CHUNK):
                    hits.extend(stage.search(self.qtexts[a:a + _QUERY_CHUNK], k + x))
        elif pipeline in ("dense+rerank", "hybrid"):
            self.dense_stage()
            self.dense("exhaustive")
            if pipeline == "hybrid":
                self.bm25()
            index_s = (self.setup["dense_index_s"] + self.setup["exhaustive_index_s"]
                       + (self.setup["bm25_index_s"] if pipeline == "hybrid" else 0.0))
            r = self.retriever("exhaustive", with_bm25=pipeline == "hybrid", with_dense=True)
            with _Timer() as t:
                hits = self._batched(lambda qs: r.search_batch(
                    qs, k + x, pipeline=pipeline, candidates=cand + x), pipeline)
        else:  # pragma: no cover - parse_pipelines rejects these
            raise ValueError(pipeline)
        run = _self_cut(self.qids, hits, k)
        timing = {"index_s": index_s, "search_s": t.s, "wall_s": index_s + t.s,
                  "queries_per_s": nq / t.s if t.s > 0 else float("inf")}
        return run, timing

    def _batched(self, fn, desc: str) -> list[list[Hit]]:
        import warnings

        out: list[list[Hit]] = []
        n_cut = self.encoder().count_truncated(self.qtexts, is_query=True)
        if n_cut:   # one warning for the query set, not one per chunk
            warnings.warn(f"{self.ds.name}: {n_cut} of {len(self.qtexts)} queries are longer than "
                          f"the model's query length of {self.encoder().query_length} tokens and "
                          "were truncated", stacklevel=2)
        with tqdm(total=len(self.qtexts), desc=f"{self.ds.name}: {desc}", unit="query",
                  disable=not self.show_progress) as bar, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".* queries are longer than the model")
            for start in range(0, len(self.qtexts), _QUERY_CHUNK):
                qs = self.qtexts[start:start + _QUERY_CHUNK]
                out.extend(fn(qs))
                bar.update(len(qs))
        return out


def evaluate(
    data: "str | os.PathLike | Dataset | Sequence[str | os.PathLike | Dataset]",
    pipelines: str | Sequence[str] = ("bm25",),
    *,
    model: Any = None,
    k: int = 100,
    output: str | os.PathLike | None = None,
    candidates: int = 100,
    split: str | None = None,
    language: str | None = None,
    bm25_params: dict | None = None,
    index_kwargs: dict | None = None,
    knobs: "KnobOverrides | None" = None,
    cache_dir: str | os.PathLike | None = None,
    device: str = "auto",
    batch_size: int = 32,
    max_queries: int | None = None,
    metrics: Sequence[str] = tuple(DEFAULT_METRICS),
    show_progress: bool = True,
    plot: bool = True,
    announce=None,
    trust_remote_code: bool | None = None,
    dense_model: Any = None,
    dense_dims: int | None = None,
    dense_precision: str = "float32",
    dense_options: dict | None = None,
) -> dict[str, Any]:
    """Evaluate ``pipelines`` on one or more data sets; returns (and writes) the results.

    data: BEIR/MIRACL folder(s), ``irds:<name>``, or :class:`Dataset` objects.
    pipelines: names from :data:`PIPELINES`, a list or comma-separated (``"all"`` = every one).
    model: see :func:`load_encoder` (only loaded when a pipeline needs it).
    output: folder for ``<pipeline>.run`` (``<dataset>/<pipeline>.run`` for several data
        sets), ``metrics.json``, ``metrics.md`` and ``metrics.png``; ``None`` writes nothing.
    candidates: first-stage depth of ``bm25+rerank`` and ``fusion``.
    language: BM25 language (default: the data set's, else English).
    knobs: PLAID search knobs for the ``plaid`` pipeline (``n_probe``, ``n_candidates``,
        ``n_exact``, ``centroid_score_threshold``; see :class:`colengine.index.plaid.Knobs`);
        left out: the defaults for ``k``.
    max_queries: evaluate only the first n judged queries (quick runs).
    dense_model: the dense model of the ``dense``, ``dense+rerank`` and ``hybrid`` pipelines
        (``"minilm"``, ``"tiny-pplx"``, a name or folder, a :class:`colengine.DenseEncoder`;
        ``None``: ``perplexity-ai/pplx-embed-v1-0.6b``, or the MiniLM stand-in, announced,
        where it cannot be loaded); ``dense_dims`` / ``dense_precision`` / ``dense_options``
        as for :class:`colengine.DenseEncoder` and :meth:`colengine.DenseIndex.build`.

    Returns ``{"config": ..., "datasets": {name: {"info", "setup", "pipelines": {p: {"metrics",
    "timing", "run_file"}}}}}``.
    """
    from colengine.index.base import check_k

    check_k(k)
    check_k(candidates)
    knobs = dict(knobs or {})
    Knobs.for_k(k).replace(**knobs)   # bad names or values fail here, before any encoding
    resolve_device(device)            # and so does a device this machine does not have
    say = announce or (lambda msg: print(msg, file=sys.stderr))
    pipes = parse_pipelines(pipelines)
    sources = list(data) if isinstance(data, (list, tuple)) else [data]
    if not sources:
        raise ValueError("no data set given")
    out_dir = Path(output) if output is not None else None
    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output {out_dir} is a file, not a folder")
    enc_holder: dict[str, Any] = {}

    def encoder_factory():
        if "enc" not in enc_holder:
            enc_holder["enc"] = load_encoder(model, device=device, batch_size=batch_size,
                                             announce=say, trust_remote_code=trust_remote_code)
        return enc_holder["enc"]

    dense_holder: dict[str, Any] = {}

    def dense_factory():
        if "enc" not in dense_holder:
            from colengine.dense import DenseEncoder

            dense_holder["enc"] = (dense_model if isinstance(dense_model, DenseEncoder) else
                                   DenseEncoder(True if dense_model is None else dense_model,
                                                dims=dense_dims, precision=dense_precision,
                                                device=device, batch_size=batch_size,
                                                trust_remote_code=trust_remote_code,
                                                announce=say))
        return dense_holder["enc"]

    if _NEEDS_MODEL & set(pipes):
        encoder_factory()  # load (or fail) before the first long step
    if set(DENSE_PIPELINES) & set(pipes):
        from colengine.dense.stage import check_options

        dense_options = check_options(dense_options)
        dense_factory()
    elif dense_model is not None or dense_dims is not None or dense_options:
        raise ValueError("dense model options given without a dense pipeline "
                         f"({', '.join(DENSE_PIPELINES)})")

    results: dict[str, Any] = {"datasets": {}}
    try:
        _evaluate_sources(results, sources, pipes, split=split, language=language,
                          max_queries=max_queries, k=k, candidates=candidates,
                          bm25_params=bm25_params, encoder_factory=encoder_factory,
                          cache_dir=cache_dir, index_kwargs=index_kwargs, knobs=knobs,
                          device=device,
                          show_progress=show_progress, say=say, metrics=metrics, out_dir=out_dir,
                          dense_factory=dense_factory, dense_options=dense_options)
    except BaseException as e:
        done = sum(len(d["pipelines"]) for d in results["datasets"].values())
        if out_dir is not None and done:
            _finish(results, enc_holder, pipes, k, candidates, split, language, bm25_params,
                    index_kwargs, knobs, max_queries, metrics, out_dir, plot, partial=True)
            say(f"error after {done} finished pipeline run(s); their results are kept in "
                f"{out_dir} (metrics.json marks them partial)")
        raise e
    _finish(results, enc_holder, pipes, k, candidates, split, language, bm25_params,
            index_kwargs, knobs, max_queries, metrics, out_dir, plot, partial=False)
    return results


def _evaluate_sources(results, sources, pipes, *, split, language, max_queries, k, candidates,
                      bm25_params, encoder_factory, cache_dir, index_kwargs, knobs, device,
                      show_progress, say, metrics, out_dir, dense_factory=None,
                      dense_options=None) -> None:
    for src in sources:
        with _Timer() as t_load:
            ds = load_dataset(src, split, language=language).subset_queries(max_queries)
        name = ds.name
        while name in results["datasets"]:
            name += "_"
        say(f"{name}: {len(ds)} documents, {len(ds.queries)} judged queries")
        known = set(ds.doc_ids)
        judged = [d for rel in ds.qrels.values() for d in rel]
        missing = sum(d not in known for d in judged)
        if judged and missing * 2 > len(judged):
            say(f"warning: {name}: {missing} of {len(judged)} qrels point at documents that are "
                "not in the corpus; scores will be low (wrong corpus or split?)")
        dr = _DatasetRun(ds, k=k, candidates=candidates, language=language,
                         bm25_params=dict(bm25_params or {}), encoder_factory=encoder_factory,
                         cache_dir=cache_dir, index_kwargs=dict(index_kwargs or {}), knobs=knobs,
                         device=device,
                         show_progress=show_progress, announce=say, dense_factory=dense_factory,
                         dense_options=dense_options)
        dr.setup["load_s"] = t_load.s
        entry: dict[str, Any] = {"info": ds.describe(), "setup": dr.setup, "pipelines": {}}
        results["datasets"][name] = entry
        for p in pipes:
            run, timing = dr.run(p)
            m = evaluate_run(ds.qrels, run, metrics)
            rec: dict[str, Any] = {"metrics": m, "timing": timing, "queries": len(run)}
            if out_dir is not None:
                rel = f"{p}.run" if len(sources) == 1 else f"{name}/{p}.run"
                write_trec_run(out_dir / rel, run, tag=f"colengine-{p}")
                rec["run_file"] = rel
            entry["pipelines"][p] = rec
            say(f"{name} {p}: " + ", ".join(f"{a}={b:.4f}" for a, b in m.items())
                + f" (index {timing['index_s']:.1f}s, search {timing['search_s']:.1f}s)")


def _finish(results, enc_holder, pipes, k, candidates, split, language, bm25_params,
            index_kwargs, knobs, max_queries, metrics, out_dir, plot, *, partial: bool) -> None:
    enc = enc_holder.get("enc")
    results["config"] = {
        "pipelines": pipes, "k": k, "candidates": candidates, "split": split,
        "language": language, "bm25_params": {**{"k1": 0.9, "b": 0.4, "method": "lucene"},
                                              **(bm25_params or {})},
        "index_kwargs": dict(index_kwargs or {}), "knobs": dict(knobs),
        "max_queries": max_queries,
        "partial": partial,
        "metrics": list(metrics), "model": enc.describe() if enc is not None else None,
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
                    "device": str(enc.device) if enc is not None else "cpu"},
    }
    if out_dir is not None:
        from colengine.eval.report import write_report

        write_report(results, out_dir, plot=plot)
