"""``colengine eval``: the evaluation runner on the command line.

Registered by :mod:`colengine.cli` through :func:`add_eval_parser`; also runnable alone as
``python -m colengine.eval DATA ...``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

__all__ = ["add_eval_parser", "run_eval_from_args", "build_parser", "main"]

_EPILOG = """examples:
  colengine eval ../shared/data/scifact --pipeline bm25 --output runs/scifact
  colengine eval data/scifact data/nfcorpus --pipeline bm25,bm25+rerank,exhaustive,fusion \\
      --model minilm --output runs/minilm
  colengine eval miracl-v1.0-ar --split dev --pipeline bm25 --language ar --output runs/ar
  colengine eval data/scifact --pipeline dense,dense+rerank,hybrid --model minilm \
      --dense-model minilm --dense-precision int8 --output runs/dense
"""


def _configure(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from colengine.cli import add_knob_arguments
    from colengine.eval.runner import PIPELINES

    sp.add_argument("data", nargs="+",
                    help="BEIR folder, MIRACL folder, or ir_datasets name (irds:beir/scifact/test); "
                         "several give one table")
    sp.add_argument("--pipeline", "-p", action="append", default=None, metavar="P",
                    help=f"one of {', '.join(PIPELINES)}, 'late' (the default index kind) or "
                         "'all' (every pipeline without a dense model); repeat or comma-separate "
                         "(default: bm25)")
    sp.add_argument("--model", default=None,
                    help="hub name, local model folder, 'minilm' (offline stand-in) or 'tiny-pplx' "
                         "(default: the pplx model, or the MiniLM stand-in when offline)")
    sp.add_argument("--dense-model", default=None,
                    help="dense model of the dense, dense+rerank and hybrid pipelines: 'minilm', "
                         "'tiny-pplx', a sentence-transformers name or folder (default: "
                         "perplexity-ai/pplx-embed-v1-0.6b, or the MiniLM stand-in when offline)")
    sp.add_argument("--dense-dims", type=int, default=None, help="Matryoshka truncation")
    sp.add_argument("--dense-precision", choices=["float32", "int8", "ubinary"], default="float32")
    sp.add_argument("--dense-rescore", choices=["none", "int8", "float32"], default=None,
                    help="ubinary: rescore with int8 (default) or float32 vectors, or none")
    sp.add_argument("--k", "-k", type=int, default=100, help="results per query (default 100)")
    sp.add_argument("--output", "-o", required=True, help="folder for runs, metrics.json/.md/.png")
    sp.add_argument("--candidates", type=int, default=100,
                    help="first-stage depth for bm25+rerank and fusion (default 100)")
    sp.add_argument("--split", default=None, help="qrels split (default: test for BEIR, dev for MIRACL)")
    sp.add_argument("--language", default=None, help="BM25 language code (default: the data set's, else en)")
    sp.add_argument("--k1", type=float, default=None, help="BM25 k1 (default 0.9)")
    sp.add_argument("--b", type=float, default=None, help="BM25 b (default 0.4)")
    sp.add_argument("--nbits", type=int, default=None, help="PLAID residual bits")
    sp.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, mps")
    sp.add_argument("--batch-size", type=int, default=32)
    sp.add_argument("--cache-dir", default=None, help="cache of encoded corpora "
                                                       "(default $COLENGINE_CACHE or ~/.cache/colengine)")
    sp.add_argument("--max-queries", type=int, default=None, help="only the first N judged queries")
    sp.add_argument("--no-plot", action="store_true", help="skip metrics.png")
    sp.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    sp.add_argument("--trust-remote-code", action="store_true",
                    help="let a model folder or hub model run the Python code it ships")
    add_knob_arguments(sp)   # for the plaid pipeline
    sp.set_defaults(func=run_eval_from_args)
    return sp


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``eval`` on an ``argparse`` sub-parsers object; returns the new parser."""
    sp = subparsers.add_parser(
        "eval", help="evaluate pipelines on BEIR / MIRACL data (nDCG@10, R@100, MRR@10)",
        description="Run retrieval pipelines over test collections; write TREC runs, "
                    "metrics.json, metrics.md and metrics.png.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    return _configure(sp)


def run_eval_from_args(args: argparse.Namespace) -> int:
    """Run what ``colengine eval`` parsed; prints the markdown table; returns an exit code."""
    from colengine.cli import knobs_from_args
    from colengine.eval.report import markdown_table, written_files
    from colengine.eval.runner import evaluate

    bm25_params = {k: v for k, v in (("k1", args.k1), ("b", args.b)) if v is not None}
    index_kwargs = {"nbits": args.nbits} if args.nbits is not None else {}
    try:
        res = evaluate(
            args.data, args.pipeline or ["bm25"], model=args.model, k=args.k, output=args.output,
            candidates=args.candidates, split=args.split, language=args.language,
            bm25_params=bm25_params, index_kwargs=index_kwargs, knobs=knobs_from_args(args),
            cache_dir=args.cache_dir,
            device=args.device, batch_size=args.batch_size, max_queries=args.max_queries,
            show_progress=not args.quiet, plot=not args.no_plot,
            trust_remote_code=args.trust_remote_code or None,
            dense_model=args.dense_model, dense_dims=args.dense_dims,
            dense_precision=args.dense_precision,
            dense_options={"rescore": args.dense_rescore} if args.dense_rescore else None,
        )
    except (RuntimeError, ValueError, TypeError, OSError, ImportError) as e:
        if os.environ.get("COLENGINE_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown_table(res))
    print("wrote " + ", ".join(str(p) for p in written_files(res, args.output)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="colengine eval", epilog=_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    return _configure(p)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
