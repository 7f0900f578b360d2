"""Evaluation: data set loaders, pipelines, metrics (pytrec_eval) and reports.

>>> from colengine.eval import evaluate                              # doctest: +SKIP
>>> res = evaluate("../shared/data/scifact", ["bm25", "bm25+rerank"], model="minilm",
...                output="runs/scifact")                           # doctest: +SKIP
>>> res["datasets"]["scifact"]["pipelines"]["bm25"]["metrics"]["ndcg@10"]  # doctest: +SKIP
"""

from colengine.eval.datasets import (Dataset, DatasetUnavailableError, load_beir, load_dataset,
                                     load_ir_datasets, load_miracl)
from colengine.eval.metrics import DEFAULT_METRICS, evaluate_run, read_trec_run, write_trec_run
from colengine.eval.runner import PIPELINES, evaluate, load_encoder, parse_pipelines

__all__ = ["evaluate", "PIPELINES", "parse_pipelines", "load_encoder", "Dataset",
           "DatasetUnavailableError", "load_dataset", "load_beir", "load_miracl",
           "load_ir_datasets", "evaluate_run", "write_trec_run", "read_trec_run",
           "DEFAULT_METRICS"]
