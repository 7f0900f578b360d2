"""Evaluation data: BEIR folders, MIRACL's layout, and ``ir_datasets`` names.

Every loader returns a :class:`Dataset`: the corpus (ids, titles, texts), the queries of the
split that have judgments, and the qrels as ``{qid: {docid: grade}}``.

* **BEIR**: ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl`` (``_id``,
  ``text``), ``qrels/<split>.tsv`` (header ``query-id corpus-id score``).
* **MIRACL** (as distributed: ``miracl-v1.0-<lang>/topics/topics.miracl-v1.0-<lang>-<split>.tsv``
  with ``qid<TAB>query``, ``qrels/qrels.miracl-v1.0-<lang>-<split>.tsv`` in TREC format
  ``qid Q0 docid rel``, and a corpus of ``*.jsonl`` / ``*.jsonl.gz`` files with ``docid``,
  ``title``, ``text``): a folder holding those files anywhere below it, or the three paths
  given explicitly to :func:`load_miracl`.
* **ir_datasets**: ``"irds:<name>"`` (for example ``irds:beir/scifact/test``), or a bare name
  that is not a path. Needs the ``ir_datasets`` package and, the first time, network access;
  offline it fails with :class:`DatasetUnavailableError` saying so.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

__all__ = ["Dataset", "DatasetUnavailableError", "load_dataset", "load_beir", "load_miracl",
           "load_ir_datasets", "read_trec_qrels", "language_of"]


class DatasetUnavailableError(RuntimeError):
    """The data set cannot be read here (missing files, or a download that needs a network)."""


@dataclass
class Dataset:
    """A retrieval test collection held in memory."""

    name: str
    doc_ids: list[str]
    titles: list[str]
    texts: list[str]
    queries: dict[str, str]                      # qid -> text (judged queries only)
    qrels: dict[str, dict[str, int]]             # qid -> {docid: grade}
    language: str | None = None                  # ISO code when known (MIRACL)
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (len(self.doc_ids) == len(self.titles) == len(self.texts)):
            raise ValueError("doc_ids, titles and texts must have the same length")

    def __len__(self) -> int:
        return len(self.doc_ids)

    def documents(self) -> list[str]:
        """Title and text joined with a space (BEIR's and Anserini's "flat" document)."""
        return [f"{t} {x}".strip() if t else x for t, x in zip(self.titles, self.texts)]

    def describe(self) -> dict:
        return {"name": self.name, "documents": len(self), "queries": len(self.queries),
                "qrels": sum(len(v) for v in self.qrels.values()), "language": self.language,
                **self.meta}

    def subset_queries(self, n: int | None) -> "Dataset":
        """The first ``n`` judged queries (for quick runs); ``None`` keeps all."""
        if n is None or n >= len(self.queries):
            return self
        qids = list(self.queries)[:n]
        return Dataset(self.name, self.doc_ids, self.titles, self.texts,
                       {q: self.queries[q] for q in qids}, {q: self.qrels[q] for q in qids},
                       self.language, {**self.meta, "max_queries": n})


# -- helpers ---------------------------------------------------------------------------
def _open_text(path: Path):
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _iter_jsonl_lines(path: Path) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line; a row that is not a JSON object
    is a ``ValueError`` naming the file and line."""
    with _open_text(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from e
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            yield n, row


def _iter_jsonl(path: Path) -> Iterator[dict]:
    for _, row in _iter_jsonl_lines(path):
        yield row


def _field(row: dict, key: str, where: str, *, required: bool = True, ids: bool = False) -> str:
    """A string field of a JSONL row (ids may also be integers); clear errors otherwise."""
    v = row.get(key)
    if v is None:
        if required:
            raise ValueError(f"{where}: {'missing' if key not in row else 'null'} {key!r}")
        return ""
    if ids and isinstance(v, int) and not isinstance(v, bool):
        v = str(v)
    if not isinstance(v, str):
        raise ValueError(f"{where}: {key!r} must be a string, got {type(v).__name__} {v!r:.40}")
    if ids and not v.strip():
        raise ValueError(f"{where}: empty {key!r}")
    return v


def _keep_judged(queries: dict[str, str], qrels: dict[str, dict[str, int]], where: str
                 ) -> tuple[dict[str, str], dict[str, dict[str, int]]]:
    missing = [q for q in qrels if q not in queries]
    if missing:
        raise ValueError(f"{where}: {len(missing)} judged query ids have no query text "
                         f"(first: {missing[0]!r})")
    qrels = {q: d for q, d in qrels.items() if any(g > 0 for g in d.values())}
    return {q: queries[q] for q in queries if q in qrels}, qrels


def read_trec_qrels(path: str | os.PathLike) -> dict[str, dict[str, int]]:
    """TREC qrels ``qid Q0 docid grade`` (whitespace separated) -> ``{qid: {docid: grade}}``."""
    out: dict[str, dict[str, int]] = {}
    with _open_text(Path(path)) as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 4:
                raise ValueError(f"{path}:{n}: expected 'qid Q0 docid grade', got {line.strip()!r}")
            qid, _, did, grade = parts
            out.setdefault(qid, {})[did] = _grade(grade, f"{path}:{n}")
    return out


def _read_beir_qrels(path: Path) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        for n, row in enumerate(rows, 1):
            if not row:
                continue
            if n == 1 and row[-1].strip().lower() in _QRELS_HEADER:
                continue  # header (only a header: a first line of data is kept)
            if len(row) != 3:
                raise ValueError(f"{path}:{n}: expected 'query-id corpus-id score'")
            if not row[0].strip() or not row[1].strip():
                raise ValueError(f"{path}:{n}: empty query or corpus id")
            out.setdefault(row[0], {})[row[1]] = _grade(row[2], f"{path}:{n}")
    return out


_QRELS_HEADER = {"score", "relevance", "grade", "label", "rel"}


def _grade(text: str, where: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{where}: relevance grade {text!r} is not an integer") from None


def language_of(name: str) -> str | None:
    """A MIRACL-style language code found in a name (``miracl-v1.0-ar-dev`` -> ``ar``)."""
    m = re.search(r"miracl[^/]*?-([a-z]{2})(?:-|$|/|\.)", name)
    return m.group(1) if m else None


# -- BEIR ------------------------------------------------------------------------------
def load_beir(path: str | os.PathLike, split: str = "test", *, name: str | None = None,
              language: str | None = None) -> Dataset:
    """A BEIR folder (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``)."""
    root = Path(path)
    qrels_path = root / "qrels" / f"{split}.tsv"
    for p in (root / "corpus.jsonl", root / "queries.jsonl", qrels_path):
        if not p.is_file():
            raise DatasetUnavailableError(f"{root}: not a BEIR folder ({p.name} missing"
                                          f"{' for split ' + repr(split) if p == qrels_path else ''})")
    ids, titles, texts = [], [], []
    corpus = root / "corpus.jsonl"
    for n, d in _iter_jsonl_lines(corpus):
        where = f"{corpus}:{n}"
        ids.append(_field(d, "_id", where, ids=True))
        titles.append(_field(d, "title", where, required=False))
        texts.append(_field(d, "text", where))
    queries = {}
    qpath = root / "queries.jsonl"
    for n, q in _iter_jsonl_lines(qpath):
        where = f"{qpath}:{n}"
        queries[_field(q, "_id", where, ids=True)] = _field(q, "text", where)
    queries, qrels = _keep_judged(queries, _read_beir_qrels(qrels_path), str(root))
    return Dataset(name or root.name, ids, titles, texts, queries, qrels, language,
                   {"format": "beir", "split": split, "path": str(root)})


# -- MIRACL ----------------------------------------------------------------------------
def _find(root: Path, patterns: list[str], split: str, what: str) -> list[Path]:
    for pat in patterns:
        hits = sorted(p for p in root.rglob(pat) if p.is_file())
        if split:
            with_split = [p for p in hits if re.search(rf"(^|[-_./]){re.escape(split)}([-_.]|$)", p.name)]
            if with_split:
                return with_split
            if len(hits) > 1:
                continue
        if hits:
            return hits
    raise DatasetUnavailableError(f"{root}: no {what} file found for split {split!r} "
                                  f"(looked for {', '.join(patterns)})")


def load_miracl(path: str | os.PathLike | None = None, split: str = "dev", *,
                topics: str | os.PathLike | None = None, qrels: str | os.PathLike | None = None,
                corpus: str | os.PathLike | list | None = None, language: str | None = None,
                name: str | None = None) -> Dataset:
    """MIRACL's layout: topics TSV (``qid<TAB>query``), TREC qrels, corpus jsonl(.gz).

    Give a folder (files are found below it by name: ``*topics*``, ``*qrels*``, and
    ``*.jsonl[.gz]`` for the corpus), or the three paths explicitly.
    """
    root = Path(path) if path is not None else None
    if topics is None or qrels is None or corpus is None:
        if root is None:
            raise ValueError("give a MIRACL folder, or topics=, qrels= and corpus= paths")
        topics = topics or _find(root, ["*topics*.tsv", "*topics*.tsv.gz"], split, "topics")[0]
        qrels = qrels or _find(root, ["*qrels*.tsv", "*qrels*.txt", "*qrels*.trec",
                                      "*qrels*.tsv.gz"], split, "qrels")[0]
        if corpus is None:
            corpus = [p for p in sorted(root.rglob("*.jsonl")) + sorted(root.rglob("*.jsonl.gz"))
                      if "topic" not in p.name and "quer" not in p.name]
            if not corpus:
                raise DatasetUnavailableError(f"{root}: no corpus *.jsonl / *.jsonl.gz found")
    corpus_files = [Path(c) for c in (corpus if isinstance(corpus, (list, tuple)) else [corpus])]
    queries: dict[str, str] = {}
    with _open_text(Path(topics)) as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n\r")
            if not line.strip():
                continue
            if "\t" not in line:
                raise ValueError(f"{topics}:{n}: expected 'qid<TAB>query'")
            qid, text = line.split("\t", 1)
            queries[qid.strip()] = text.strip()
    qrel = read_trec_qrels(qrels)
    ids, titles, texts = [], [], []
    for cf in corpus_files:
        for d in _iter_jsonl(cf):
            did = d.get("docid", d.get("_id"))
            if did is None:
                raise ValueError(f"{cf}: corpus record without 'docid'")
            ids.append(str(did))
            titles.append(d.get("title") or "")
            texts.append(d.get("text") or "")
    queries, qrel = _keep_judged(queries, qrel, str(topics))
    language = language or language_of(Path(topics).name) or (language_of(str(root)) if root else None)
    return Dataset(name or (root.name if root else Path(topics).stem), ids, titles, texts,
                   queries, qrel, language,
                   {"format": "miracl", "split": split, "path": str(root or topics)})


# -- ir_datasets -----------------------------------------------------------------------
def load_ir_datasets(name: str, *, language: str | None = None) -> Dataset:
    """An ``ir_datasets`` collection by name (downloads on first use: needs a network)."""
    try:
        import ir_datasets
    except ImportError as e:  # pragma: no cover - installed with the eval extra
        raise DatasetUnavailableError(
            f"{name!r} is not a folder, and ir_datasets is not installed "
            "(pip install 'colengine[eval]')") from e
    try:
        ds = ir_datasets.load(name)
    except KeyError as e:
        raise DatasetUnavailableError(f"{name!r} is neither a folder nor an ir_datasets name") from e
    try:
        if not (ds.has_docs() and ds.has_queries() and ds.has_qrels()):
            raise DatasetUnavailableError(f"ir_datasets {name!r} lacks docs, queries or qrels "
                                          "(pick a split, e.g. beir/scifact/test)")
        ids, titles, texts = [], [], []
        for d in ds.docs_iter():
            ids.append(d.doc_id)
            titles.append(getattr(d, "title", "") or "")
            texts.append(getattr(d, "text", None) or getattr(d, "body", "") or "")
        queries = {q.query_id: getattr(q, "text", None) or getattr(q, "title", "")
                   for q in ds.queries_iter()}
        qrels: dict[str, dict[str, int]] = {}
        for r in ds.qrels_iter():
            qrels.setdefault(r.query_id, {})[r.doc_id] = int(r.relevance)
    except DatasetUnavailableError:
        raise
    except Exception as e:  # network errors come in many types (ConnectionError, IOError, ...)
        raise DatasetUnavailableError(
            f"ir_datasets could not provide {name!r}: {type(e).__name__}: {e}. It downloads "
            "collections on first use, which needs network access; offline, point at a local "
            "BEIR or MIRACL folder instead.") from e
    queries, qrels = _keep_judged(queries, qrels, name)
    return Dataset(name.replace("/", "-"), ids, titles, texts, queries, qrels,
                   language or language_of(name), {"format": "ir_datasets", "irds": name})


# -- dispatch --------------------------------------------------------------------------
def load_dataset(data: "str | os.PathLike | Dataset", split: str | None = None, *,
                 language: str | None = None) -> Dataset:
    """Any supported source -> :class:`Dataset`.

    A :class:`Dataset` passes through; a folder with ``corpus.jsonl`` is BEIR (split default
    ``test``); a folder with MIRACL files is MIRACL (split default ``dev``, or ``test`` when only
    that exists); ``irds:<name>`` or a non-path name goes to ``ir_datasets``.
    """
    if isinstance(data, Dataset):
        return data
    s = os.fspath(data)
    if s.startswith("irds:"):
        return load_ir_datasets(s[5:], language=language)
    p = Path(s).expanduser()
    if p.is_dir():
        if (p / "corpus.jsonl").is_file() and (p / "queries.jsonl").is_file():
            return load_beir(p, split or "test", language=language)
        if any(p.rglob("*topics*")) and any(p.rglob("*qrels*")):
            return load_miracl(p, split or "dev", language=language)
        raise DatasetUnavailableError(
            f"{p}: neither a BEIR folder (corpus.jsonl, queries.jsonl, qrels/) nor a MIRACL "
            "folder (topics, qrels, corpus jsonl)")
    if p.exists() or s.startswith((".", "/", "~")):
        raise DatasetUnavailableError(f"{s}: no such data folder")
    return load_ir_datasets(s, language=language)
