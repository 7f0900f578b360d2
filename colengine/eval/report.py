"""Results of :func:`colengine.eval.evaluate` as JSON, a markdown table and a bar chart."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

__all__ = ["write_report", "markdown_table", "plot_metrics"]

_LABELS = {"ndcg@10": "nDCG@10", "recall@100": "R@100", "mrr@10": "MRR@10"}


def _label(m: str) -> str:
    return _LABELS.get(m, m)


def markdown_table(results: dict[str, Any]) -> str:
    """One table: a row per (data set, pipeline), metric columns, then timings."""
    metrics = results.get("config", {}).get("metrics") or []
    if not metrics:
        for d in results["datasets"].values():
            for p in d["pipelines"].values():
                metrics = list(p["metrics"])
                break
    head = ["dataset", "pipeline", *[_label(m) for m in metrics],
            "index s", "search s", "wall s", "queries/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for name, d in results["datasets"].items():
        for p, rec in d["pipelines"].items():
            t = rec["timing"]
            qps = t.get("queries_per_s", float("nan"))
            lines.append("| " + " | ".join([
                name, p, *[f"{rec['metrics'][m]:.4f}" for m in metrics],
                f"{t['index_s']:.1f}", f"{t['search_s']:.1f}", f"{t['wall_s']:.1f}",
                f"{qps:.1f}" if math.isfinite(qps) else "-",
            ]) + " |")
        s = d.get("setup", {})
        info = d.get("info", {})
        bits = [f"{info.get('documents', '?')} documents, {info.get('queries', '?')} judged queries"]
        if "encode_corpus_s" in s:
            bits.append(f"corpus encoding {s['encode_corpus_s']:.1f}s"
                        f"{' (read from cache)' if s.get('encode_corpus_cached') else ''}")
        if "bm25_language" in s:
            bits.append(f"BM25 language {s['bm25_language']}")
        notes.append(f"- {name}: " + ", ".join(bits))
    cfg = results.get("config", {})
    model = (cfg.get("model") or {}).get("name")
    foot = [
        "",
        f"k={cfg.get('k')}, first-stage candidates={cfg.get('candidates')}, "
        f"BM25 {cfg.get('bm25_params')}" + (f", model {model}" if model else ""),
        "index s: building what the pipeline searches (corpus encoding excluded, see below); "
        "search s: all queries, query encoding included; wall s = index s + search s.",
        *notes,
    ]
    return "\n".join(lines + foot) + "\n"


def plot_metrics(results: dict[str, Any], path: str | os.PathLike) -> Path | None:
    """Grouped bars: one panel per data set, metrics on the x axis, a bar per pipeline."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is in the eval extra
        return None
    names = list(results["datasets"])
    if not names:
        return None
    fig, axes = plt.subplots(1, len(names), figsize=(max(6.0, 5.5 * len(names)), 4.2),
                             squeeze=False)
    for ax, name in zip(axes[0], names):
        pipes = results["datasets"][name]["pipelines"]
        metrics = list(next(iter(pipes.values()))["metrics"]) if pipes else []
        width = 0.8 / max(1, len(pipes))
        for i, (p, rec) in enumerate(pipes.items()):
            xs = [j + (i - (len(pipes) - 1) / 2) * width for j in range(len(metrics))]
            vals = [rec["metrics"][m] for m in metrics]
            bars = ax.bar(xs, vals, width, label=f"{p} ({rec['timing']['wall_s']:.0f}s)")
            for b, v in zip(bars, vals):
                ax.text(b.get_x() + b.get_width() / 2, v + 0.01, f"{v:.2f}", ha="center",
                        va="bottom", fontsize=7)
        ax.set_xticks(range(len(metrics)))
        ax.set_xticklabels([_label(m) for m in metrics])
        ax.set_ylim(0, 1.05)
        ax.set_title(name)
        ax.grid(axis="y", alpha=0.3)
        # below the panel, so that it never hides bars or their labels
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1),
                  ncol=min(3, max(1, len(pipes))), frameon=False)
    model = ((results.get("config") or {}).get("model") or {}).get("name")
    fig.suptitle("colengine eval" + (f" - model {Path(str(model)).name}" if model else ""))
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def written_files(results: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """Every file an evaluation wrote into ``out_dir`` (runs, then the reports that exist)."""
    out = Path(out_dir)
    runs = [out / rec["run_file"] for d in results["datasets"].values()
            for rec in d["pipelines"].values() if rec.get("run_file")]
    reports = [out / n for n in ("metrics.json", "metrics.md", "metrics.png") if (out / n).is_file()]
    return runs + reports


def write_report(results: dict[str, Any], out_dir: str | os.PathLike, *, plot: bool = True) -> Path:
    """``metrics.json``, ``metrics.md`` and (if ``plot``) ``metrics.png`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".metrics.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, sort_keys=False, default=str), encoding="utf-8")
    os.replace(tmp, out / "metrics.json")
    (out / "metrics.md").write_text(markdown_table(results), encoding="utf-8")
    if plot:
        plot_metrics(results, out / "metrics.png")
    return out
