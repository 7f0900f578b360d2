"""BEIR SciFact / NFCorpus with the MiniLM stand-in: BM25, BM25 + MaxSim rerank, exhaustive,
PLAID, fusion, side by side. Writes bench/results/eval_<dataset>_<date>/ (metrics.json, .md,
.png; the .run files are left out of git).

    HF_HUB_OFFLINE=1 flock /tmp/colengine-bench.lock python bench/eval_beir.py [--data DIR ...]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from colengine.eval import evaluate  # noqa: E402
from colengine.eval.report import markdown_table  # noqa: E402

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from _common import DATA_ENV, data_root  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", nargs="+", default=None,
                    help=f"BEIR data set folders (default: scifact and nfcorpus under ${DATA_ENV})")
    ap.add_argument("--pipeline", default="bm25,bm25+rerank,exhaustive,plaid,fusion")
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--date", default=dt.date.today().strftime("%Y%m%d"))
    args = ap.parse_args()
    if args.data is None:
        args.data = [str(data_root() / "scifact"), str(data_root() / "nfcorpus")]
    for d in args.data:
        name = Path(d).name
        out = ROOT / "results" / f"eval_{name}_{args.date}"
        res = evaluate(d, args.pipeline, model=args.model, k=100, candidates=100, output=out)
        print(markdown_table(res))


if __name__ == "__main__":
    main()
