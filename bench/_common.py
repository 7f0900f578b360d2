"""Shared helpers for the bench scripts: where the data is, encoded BEIR corpora (cached),
environment record, timing, JSON output, retrieval metrics, SciFact document lengths.

Every bench script imports this module (``sys.path`` holds bench/) and no other script: a
helper two scripts need lives here. Data sets are read from ``--data`` or, without it, the
environment variable ``COLENGINE_DATA`` (a folder of BEIR data sets), never from a path of
one machine.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

RESULTS = Path(__file__).resolve().parent / "results"
SCIFACT_LENGTHS = RESULTS / "maxsim_scifact_doclens.npy"
DATA_ENV = "COLENGINE_DATA"
#: fast-plaid's own defaults probe 8 cells a query token and score 4,096 documents exactly; the
#: same budget on our side (``--wide`` of bench_scale and bench_synthetic_recall) puts both
#: engines at one point of the curve
WIDE_KNOBS = {"probe 8, cand 4096, exact 4096": {"n_probe": 8, "n_candidates": 4096,
                                                 "n_exact": 4096}}


# -- data ------------------------------------------------------------------------------------
def add_data_argument(ap) -> None:
    """``--data``: the folder of BEIR data sets (default: ``$COLENGINE_DATA``)."""
    ap.add_argument("--data", default=os.environ.get(DATA_ENV),
                    help=f"folder holding BEIR data sets (default: ${DATA_ENV})")


def add_kept_index_arguments(ap, queries: int, queries_help: str | None = None) -> None:
    """``--index`` (a ``bench_scale.py --index-dir`` index folder), ``--docs`` (its synthetic
    corpus size), ``--queries`` and ``--knobs`` (JSON, default: the knobs that reach 0.95 of
    the exact top-10 at 1M) of the benches that search a kept index."""
    ap.add_argument("--index", required=True, help="a kept bench_scale index folder")
    ap.add_argument("--docs", type=int, required=True, help="its synthetic corpus size")
    ap.add_argument("--queries", type=int, default=queries, help=queries_help)
    ap.add_argument("--knobs", default='{"n_probe": 4, "n_candidates": 2048, "n_exact": 768}')


def kept_index_queries(n_docs: int, n: int):
    """``n`` query token matrices of the synthetic corpus of ``n_docs`` documents, as one
    float32 tensor ``[n, Lq, d]``."""
    import torch
    from synthetic import SyntheticCorpus

    q, _ = SyntheticCorpus(n_docs, chunk_docs=10_000).queries(n)
    return torch.from_numpy(np.asarray(q, dtype=np.float32))


def data_root(data: str | os.PathLike | None = None) -> Path:
    """The folder of BEIR data sets: ``data`` if given (it is also exported as
    ``$COLENGINE_DATA``, so spawned children see it), else ``$COLENGINE_DATA``."""
    if data is None:
        data = os.environ.get(DATA_ENV)
    if not data:
        raise SystemExit(f"no data folder: pass --data DIR or set {DATA_ENV}=DIR "
                         "(a folder of BEIR data sets such as scifact/)")
    root = Path(data)
    if not root.is_dir():
        raise SystemExit(f"data folder {root} does not exist")
    os.environ[DATA_ENV] = str(root)
    return root


def encoded(name: str, *, data: str | os.PathLike | None = None, wait: bool = True):
    """(doc_ids, PackedEmbeddings, query_ids, query tensor [Q, 32, 128], qrels, model
    description) for the BEIR data set ``name`` under :func:`data_root`.

    Uses the same model folder ("minilm" alias) and document texts as ``colengine.eval``, so
    the on-disk cache of encoded corpora is shared with the other benchmarks.
    """
    import torch

    from colengine.cache import (cached_encode_documents, default_cache_dir, model_fingerprint,
                                 texts_fingerprint)
    from colengine.encoder import Encoder
    from colengine.eval.datasets import load_dataset
    from colengine.models import resolve_model_name
    from colengine.storage import Bundle, is_index, load_bundle, save_bundle

    cache = default_cache_dir()
    enc = Encoder(str(resolve_model_name("minilm")), device="cpu")
    ds = load_dataset(data_root(data) / name)
    texts = ds.documents()
    key = cache / "encoded" / f"{model_fingerprint(enc)}-{texts_fingerprint(texts)}"
    while wait and not is_index(key) and _someone_encoding():
        time.sleep(20)   # another process is filling the same cache entry
    docs = cached_encode_documents(enc, texts, cache_dir=cache)
    qids = list(ds.queries)
    qtexts = [ds.queries[i] for i in qids]
    qpath = cache / "encoded" / f"queries-{name}-{texts_fingerprint(qtexts)}"
    if is_index(qpath):
        q = torch.from_numpy(np.asarray(load_bundle(qpath, kind="encoded-queries").arrays["q"]).copy())
    else:
        q = enc.encode_queries(qtexts, show_progress=True)
        save_bundle(qpath, Bundle(kind="encoded-queries", meta={}, arrays={"q": q.numpy()}))
    return ds.doc_ids, docs, qids, q, ds.qrels, enc.describe()


def _someone_encoding() -> bool:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return "prewarm" in out or "colengine.eval" in out and "index" in out


# -- metrics ---------------------------------------------------------------------------------
def ndcg10(run, qids, qrels) -> float:
    """Mean nDCG@10 (pytrec_eval) of ``run`` (per query, in ``qids`` order: [(doc_id, score)])."""
    import pytrec_eval

    r = {qid: {d: float(s) for d, s in hits[:10]} for qid, hits in zip(qids, run)}
    ev = pytrec_eval.RelevanceEvaluator({q: qrels[q] for q in qids}, {"ndcg_cut.10"})
    per = ev.evaluate(r)
    return float(np.mean([per[q]["ndcg_cut_10"] if q in per else 0.0 for q in qids]))


def recall_of(run, ref, k: int) -> float:
    """Mean share of each reference top-``k`` found in the run's top-``k``."""
    vals = []
    for got, want in zip(run, ref):
        w = {d for d, _ in want[:k]}
        vals.append(len({d for d, _ in got[:k]} & w) / max(1, len(w)))
    return float(np.mean(vals))


def recall_with_ties(run, ref, k: int, tol: float = 1e-4) -> float:
    """Recall of the exhaustive top-``k``, ties counted: a returned document is a hit when its
    exact score (from ``ref``, a deeper exhaustive run with scores) is within ``tol`` of the
    ``k``-th exact score, so equally good documents swapped at the cut are not misses."""
    vals = []
    for got, want in zip(run, ref):
        if not want:
            continue
        exact = dict(want)
        kth = want[min(k, len(want)) - 1][1]
        hits = sum(1 for d, _ in got[:k] if d in exact and exact[d] >= kth - tol)
        vals.append(hits / min(k, len(want)))
    return float(np.mean(vals))


# -- environment -----------------------------------------------------------------------------


def rss_mb() -> float:
    """This process's resident set size now, in MiB (``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (``ru_maxrss``), in MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def dir_bytes(path: Path) -> int:
    """Bytes of every file under ``path`` (an index folder on disk)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def timed_search(search: Callable, q, timing_queries: int):
    """(results for all queries ``q`` via batches of 32, single-query latencies in seconds for
    the first ``timing_queries``, batched q/s) of ``search(queries) -> results``, after a
    warm-up call on two queries."""
    search(q[:2])
    lat = []
    for i in range(min(timing_queries, q.shape[0])):
        t = time.perf_counter()
        search(q[i:i + 1])
        lat.append(time.perf_counter() - t)
    out = []
    t = time.perf_counter()
    for a in range(0, q.shape[0], 32):
        out.extend(search(q[a:a + 32]))
    batched_qps = q.shape[0] / (time.perf_counter() - t)
    return out, np.asarray(lat), batched_qps


def today() -> str:
    return _dt.date.today().isoformat()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def env_info() -> dict:
    """Hardware / software facts recorded with every result file."""
    import torch

    info: dict = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "loadavg_start": list(os.getloadavg()),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def time_fn(fn: Callable[[], object], repeats: int = 3, warmup: int = 1,
            sync: Callable[[], None] | None = None) -> dict:
    """Wall-clock seconds of ``fn``: min / median over ``repeats`` after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
        if sync:
            sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return {"min_s": min(times), "median_s": statistics.median(times), "runs": len(times)}


def run_engine(cmd: list[str], root: str | os.PathLike | None, timeout: float) -> dict:
    """Run a bench script's child command ``cmd`` with the engine of checkout ``root`` first on
    the path (a git worktree of another commit; ``None``: this checkout) and return the JSON
    of its last line of output."""
    env = dict(os.environ)
    if root:
        env["PYTHONPATH"] = str(root)   # the other engine's colengine comes first
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root or None,
                       timeout=timeout)
    if p.returncode:
        raise SystemExit(f"engine {root or 'this checkout'} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def engine_commit(root: str | os.PathLike | None = None) -> str:
    """The short commit of checkout ``root`` (default: this one)."""
    p = subprocess.run(["git", "-C", str(root or Path(__file__).resolve().parent.parent),
                        "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return p.stdout.strip() or "unknown"


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload.setdefault("env", {})["loadavg_end"] = list(os.getloadavg())
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    return path


def scifact_doc_lengths(max_len: int = 512, data: str | os.PathLike | None = None) -> np.ndarray:
    """Token count of every SciFact document (title + text), as a ColBERT document encoder sees
    it: BERT WordPiece tokens + [CLS] + [D] marker + [SEP], clipped to ``[1, max_len]``.

    Uses the all-MiniLM-L6-v2 (BERT uncased) tokenizer of the MiniLM stand-in model; cached
    as bench/results/maxsim_scifact_doclens.npy (SciFact is then not read). If the tokenizer is
    not available, falls back to whitespace words * 1.3.
    """
    if SCIFACT_LENGTHS.exists():
        return np.load(SCIFACT_LENGTHS)
    texts = []
    with (data_root(data) / "scifact" / "corpus.jsonl").open() as f:
        for line in f:
            doc = json.loads(line)
            texts.append((doc.get("title", "") + " " + doc.get("text", "")).strip())
    try:
        from tokenizers import Tokenizer

        from colengine.models import resolve_model_name

        tok = Tokenizer.from_file(str(Path(resolve_model_name("minilm")) / "tokenizer.json"))
        tok.no_truncation()
        tok.no_padding()
        enc = tok.encode_batch(texts, add_special_tokens=False)
        lens = np.array([len(e.ids) + 3 for e in enc], dtype=np.int64)
    except Exception:  # noqa: BLE001 - approximate, and say so
        lens = np.array([int(len(t.split()) * 1.3) + 3 for t in texts], dtype=np.int64)
    lens = np.clip(lens, 1, max_len)
    RESULTS.mkdir(parents=True, exist_ok=True)
    np.save(SCIFACT_LENGTHS, lens)
    return lens
