"""Shared helpers for the bench scripts: environment record, timing, JSON + plot output,
SciFact document lengths."""

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

RESULTS = Path(__file__).resolve().parent / "results"
SCIFACT_CORPUS = Path("/work/shared/data/scifact/corpus.jsonl")
SCIFACT_LENGTHS = RESULTS / "maxsim_scifact_doclens.npy"
BERT_TOKENIZER = Path("/work/shared/models/all-MiniLM-L6-v2-tokenizer/tokenizer.json")


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


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload.setdefault("env", {})["loadavg_end"] = list(os.getloadavg())
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    return path


def scifact_doc_lengths(max_len: int = 512) -> np.ndarray:
    """Token count of every SciFact document (title + text), as a ColBERT document encoder sees
    it: BERT WordPiece tokens + [CLS] + [D] marker + [SEP], clipped to ``[1, max_len]``.

    Uses the all-MiniLM-L6-v2 (BERT uncased) tokenizer from /work/shared/models; cached as
    bench/results/maxsim_scifact_doclens.npy. If neither tokenizer nor cache is available, falls
    back to whitespace words * 1.3 (recorded in the result's ``lengths_source``).
    """
    if SCIFACT_LENGTHS.exists():
        return np.load(SCIFACT_LENGTHS)
    texts = []
    with SCIFACT_CORPUS.open() as f:
        for line in f:
            doc = json.loads(line)
            texts.append((doc.get("title", "") + " " + doc.get("text", "")).strip())
    try:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(BERT_TOKENIZER))
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
