"""Evaluation runner: metrics vs an independent pytrec_eval, loaders, self-hits, CLI, and the
Arabic subset end to end through BM25 + exact MaxSim rerank."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest

from colengine.eval import (DatasetUnavailableError, evaluate, load_dataset, parse_pipelines,
                            read_trec_run)
from colengine.eval.datasets import Dataset

DATA = Path(os.environ.get("COLENGINE_DATA", "/work/shared/data"))
if not DATA.is_dir():
    DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ARCD = DATA / "arcd-subset"
needs_arcd = pytest.mark.skipif(not ARCD.is_dir(), reason="shared/data/arcd-subset not present")


def parse_run_file(path: Path) -> dict[str, list[tuple[int, str, float]]]:
    out: dict[str, list[tuple[int, str, float]]] = {}
    for line in path.read_text().splitlines():
        qid, q0, did, rank, score, _tag = line.split()
        assert q0 == "Q0"
        out.setdefault(qid, []).append((int(rank), did, float(score)))
    return out


def independent_metrics(qrels, run_rows):
    """nDCG@10, R@100 (pytrec_eval on the file's ranks) and MRR@10 (recip_rank on the top 10)."""
    import pytrec_eval

    full = {q: {d: 1.0 / r for r, d, _ in rows} for q, rows in run_rows.items()}
    top10 = {q: {d: 1.0 / r for r, d, _ in rows if r <= 10} for q, rows in run_rows.items()}
    ev = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100"})
    res = ev.evaluate(full)
    rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10)
    n = len(qrels)
    return {
        "ndcg@10": sum(res.get(q, {}).get("ndcg_cut_10", 0.0) for q in qrels) / n,
        "recall@100": sum(res.get(q, {}).get("recall_100", 0.0) for q in qrels) / n,
        "mrr@10": sum(rr.get(q, {}).get("recip_rank", 0.0) for q in qrels) / n,
    }


# -- a small synthetic collection -------------------------------------------------------
def toy_dataset() -> Dataset:
    docs = {
        "d1": ("Cats", "cats purr and sleep"), "d2": ("Dogs", "dogs bark at cats"),
        "d3": ("", "stock markets and bonds"), "d4": ("Bonds", "bond yields rise"),
        "q2": ("", "a document whose id is a query id: bonds bonds bonds"),
        "d5": ("Birds", "birds sing"),
    }
    queries = {"q1": "cats", "q2": "bonds", "q3": "birds song"}
    qrels = {"q1": {"d1": 2, "d2": 1}, "q2": {"d3": 1, "d4": 2}, "q3": {"d5": 1, "d9": 1}}
    ids = list(docs)
    return Dataset("toy", ids, [docs[i][0] for i in ids], [docs[i][1] for i in ids], queries, qrels)


def test_metrics_match_independent_pytrec_eval_on_the_run_file(tmp_path):
    ds = toy_dataset()
    res = evaluate(ds, ["bm25"], output=tmp_path, show_progress=False, plot=False,
                   announce=lambda m: None)
    got = res["datasets"]["toy"]["pipelines"]["bm25"]["metrics"]
    rows = parse_run_file(tmp_path / "bm25.run")
    ref = independent_metrics(ds.qrels, rows)
    for m in ("ndcg@10", "recall@100", "mrr@10"):
        assert got[m] == pytest.approx(ref[m], abs=1e-9), m
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["datasets"]["toy"]["pipelines"]["bm25"]["metrics"] == pytest.approx(got)
    assert (tmp_path / "metrics.md").read_text().startswith("| dataset | pipeline | nDCG@10")


def test_beir_self_hits_are_dropped(tmp_path):
    ds = toy_dataset()
    res = evaluate(ds, ["bm25"], k=3, output=tmp_path, show_progress=False, plot=False,
                   announce=lambda m: None)
    run = read_trec_run(tmp_path / "bm25.run")
    assert "q2" not in [h.doc_id for h in run["q2"]]  # it would be BM25's top hit
    assert [h.doc_id for h in run["q2"]][:2] == ["d3", "d4"] or set(h.doc_id for h in run["q2"]) >= {"d3", "d4"}
    assert res["datasets"]["toy"]["pipelines"]["bm25"]["metrics"]["recall@100"] == pytest.approx(
        (1.0 + 1.0 + 0.5) / 3)


@needs_arcd
def test_metrics_match_pytrec_eval_on_a_real_run(tmp_path):
    res = evaluate(ARCD, "bm25", output=tmp_path, show_progress=False, plot=True,
                   announce=lambda m: None)
    assert res["datasets"]["arcd-subset"]["setup"]["bm25_language"] == "ar"  # guessed
    ds = load_dataset(ARCD)
    got = res["datasets"]["arcd-subset"]["pipelines"]["bm25"]["metrics"]
    ref = independent_metrics(ds.qrels, parse_run_file(tmp_path / "bm25.run"))
    assert got == pytest.approx(ref, abs=1e-9)
    assert got["ndcg@10"] > 0.6  # Arabic BM25 on ARCD finds the answer passage
    assert (tmp_path / "metrics.png").stat().st_size > 1000


# -- MIRACL layout ----------------------------------------------------------------------
def write_miracl(root: Path, lang: str, docs: list[dict], topics: list[tuple[str, str]],
                 qrels: list[tuple[str, str, int]]) -> Path:
    base = root / f"miracl-v1.0-{lang}"
    (base / "topics").mkdir(parents=True)
    (base / "qrels").mkdir()
    (base / "corpus").mkdir()
    (base / "topics" / f"topics.miracl-v1.0-{lang}-dev.tsv").write_text(
        "".join(f"{q}\t{t}\n" for q, t in topics), encoding="utf-8")
    (base / "qrels" / f"qrels.miracl-v1.0-{lang}-dev.tsv").write_text(
        "".join(f"{q} Q0 {d} {g}\n" for q, d, g in qrels), encoding="utf-8")
    with gzip.open(base / "corpus" / "docs-0.jsonl.gz", "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    return base


def test_miracl_loader_and_non_latin_bm25(tmp_path):
    ar = write_miracl(tmp_path, "ar", [
        {"docid": "1#0", "title": "مكة", "text": "مكة المكرمة مدينة مقدسة يحج إليها المسلمون."},
        {"docid": "1#1", "title": "القاهرة", "text": "القاهرة عاصمة مصر وأكبر مدنها."},
        {"docid": "2#0", "title": "الأبراج", "text": "الأبراج الفلكية اثنا عشر برجا."},
    ], [("10", "ما هي عاصمة مصر؟"), ("11", "ما اهمية مكة المكرمة؟"), ("12", "بدون أحكام")],
        [("10", "1#1", 1), ("10", "1#0", 0), ("11", "1#0", 1), ("12", "2#0", 0)])
    ds = load_dataset(ar)
    assert ds.language == "ar" and ds.meta["format"] == "miracl"
    assert ds.doc_ids == ["1#0", "1#1", "2#0"] and ds.titles[1] == "القاهرة"
    assert set(ds.queries) == {"10", "11"}  # 12 has no positive judgment
    assert ds.qrels["10"] == {"1#1": 1, "1#0": 0}

    zh = write_miracl(tmp_path, "zh", [
        {"docid": "a", "title": "信息检索", "text": "信息检索系统根据查询返回相关文档。"},
        {"docid": "b", "title": "天气", "text": "今天北京的天气晴朗。"},
    ], [("1", "检索系统"), ("2", "北京天气")], [("1", "a", 1), ("2", "b", 1)])
    th = write_miracl(tmp_path, "th", [
        {"docid": "t1", "title": "ภาษาไทย", "text": "ภาษาไทยเป็นภาษาราชการของประเทศไทย"},
        {"docid": "t2", "title": "อาหาร", "text": "ต้มยำกุ้งเป็นอาหารไทยที่มีชื่อเสียง"},
    ], [("1", "ภาษาราชการ"), ("2", "ต้มยำกุ้ง")], [("1", "t1", 1), ("2", "t2", 1)])
    out = tmp_path / "out"
    res = evaluate([ar, zh, th], ["bm25"], output=out, show_progress=False, plot=False,
                   announce=lambda m: None)
    for name in ("miracl-v1.0-ar", "miracl-v1.0-zh", "miracl-v1.0-th"):
        d = res["datasets"][name]
        assert d["setup"]["bm25_language"] == name[-2:]
        # every query's judged passage is ranked first: the tokenizer handles the script
        assert d["pipelines"]["bm25"]["metrics"]["mrr@10"] == pytest.approx(1.0), name
    assert (out / "miracl-v1.0-zh" / "bm25.run").is_file()


def test_miracl_explicit_paths_and_errors(tmp_path):
    base = write_miracl(tmp_path, "sw", [{"docid": "x", "title": "", "text": "habari ya dunia"}],
                        [("1", "habari")], [("1", "x", 1)])
    from colengine.eval import load_miracl

    ds = load_miracl(topics=next(base.rglob("topics*.tsv")), qrels=next(base.rglob("qrels*.tsv")),
                     corpus=next(base.rglob("*.jsonl.gz")))
    assert ds.language == "sw" and ds.doc_ids == ["x"]
    with pytest.raises(DatasetUnavailableError, match="neither a BEIR folder"):
        load_dataset(tmp_path / "empty" if (tmp_path / "empty").mkdir() is None else None)
    with pytest.raises(DatasetUnavailableError, match="no such data folder"):
        load_dataset(tmp_path / "missing")


def test_ir_datasets_unknown_and_offline(monkeypatch):
    with pytest.raises(DatasetUnavailableError, match="neither a folder nor an ir_datasets name"):
        load_dataset("irds:no-such-collection/xyz")
    import ir_datasets

    class Offline:
        def has_docs(self):
            return True

        has_queries = has_qrels = has_docs

        def docs_iter(self):
            raise ConnectionError("Failed to resolve 'example.org'")

    monkeypatch.setattr(ir_datasets, "load", lambda name: Offline())
    with pytest.raises(DatasetUnavailableError, match="needs network access"):
        load_dataset("beir/scifact/test")


def test_guess_language_from_script():
    from colengine.eval.runner import guess_language

    assert guess_language(["The cat sat on the mat."]) == "en"
    assert guess_language(["مكة المكرمة مدينة مقدسة"]) == "ar"
    assert guess_language(["信息检索系统根据查询返回相关文档"]) == "zh"
    assert guess_language(["東京タワーへ行きました"]) == "ja"
    assert guess_language(["ภาษาไทยเป็นภาษาราชการ"]) == "th"


def test_parse_pipelines():
    assert parse_pipelines(["bm25,fusion", "bm25+rerank", "bm25"]) == ["bm25", "fusion", "bm25+rerank"]
    assert parse_pipelines("all")[0] == "bm25"
    with pytest.raises(ValueError, match="unknown pipeline"):
        parse_pipelines("bm26")


def test_bad_knobs_and_devices_fail_before_any_work():
    said = []
    for knobs, err in (({"n_probe": 0}, ValueError), ({"nprobe": 2}, TypeError),
                       ({"centroid_score_threshold": float("nan")}, ValueError)):
        with pytest.raises(err):
            evaluate(toy_dataset(), ["plaid"], knobs=knobs, show_progress=False,
                     announce=said.append)
    with pytest.raises(ValueError, match="unknown device"):
        evaluate(toy_dataset(), ["plaid"], device="gpu", show_progress=False,
                 announce=said.append)
    assert said == []   # nothing was loaded or announced


def test_plaid_knobs_are_used_and_recorded(tmp_path, tiny_encoder):
    ds = toy_dataset()
    knobs = {"n_probe": 2, "centroid_score_threshold": None, "n_candidates": 8, "n_exact": 4}
    res = evaluate(ds, ["plaid"], model=tiny_encoder, k=3, knobs=knobs, device="cpu",
                   output=tmp_path, show_progress=False, plot=False, announce=lambda m: None)
    assert res["config"]["knobs"] == knobs
    from colengine.eval.metrics import read_trec_run

    run = read_trec_run(tmp_path / "plaid.run")
    assert set(run) == set(ds.queries) and all(len(h) == 3 for h in run.values())


def test_cli_runs_and_registers(tmp_path, capsys):
    from colengine.eval.cli import main

    ds_dir = tmp_path / "beir"
    (ds_dir / "qrels").mkdir(parents=True)
    ds = toy_dataset()
    with open(ds_dir / "corpus.jsonl", "w") as f:
        for i, t, x in zip(ds.doc_ids, ds.titles, ds.texts):
            f.write(json.dumps({"_id": i, "title": t, "text": x}) + "\n")
    with open(ds_dir / "queries.jsonl", "w") as f:
        for q, t in ds.queries.items():
            f.write(json.dumps({"_id": q, "text": t}) + "\n")
    (ds_dir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{q}\t{d}\t{g}\n" for q, docs in ds.qrels.items() for d, g in docs.items()))
    assert main([str(ds_dir), "--pipeline", "bm25", "-k", "10", "-o", str(tmp_path / "o"),
                 "-q", "--no-plot"]) == 0
    assert "| beir | bm25 |" in capsys.readouterr().out
    assert main([str(tmp_path / "nope"), "-o", str(tmp_path / "o2"), "-q"]) == 2
    from colengine.cli import build_parser, knobs_from_args

    args = build_parser().parse_args(["eval", str(ds_dir), "-p", "bm25", "-o", str(tmp_path / "o3")])
    assert args.pipeline == ["bm25"] and knobs_from_args(args) == {}
    args = build_parser().parse_args(["eval", str(ds_dir), "-p", "plaid", "-o", str(tmp_path / "o3"),
                                      "--n-probe", "2", "--n-exact", "40", "--threshold", "none"])
    assert knobs_from_args(args) == {"n_probe": 2, "centroid_score_threshold": None, "n_exact": 40}
    assert main([str(ds_dir), "-p", "plaid", "-o", str(tmp_path / "o4"), "--n-candidates", "0",
                 "-q"]) == 2
    assert "n_candidates must be positive" in capsys.readouterr().err


# -- Arabic end to end: BM25 + exact MaxSim rerank ---------------------------------------
@pytest.fixture(scope="module")
def short_tiny_encoder(tiny_model_path):
    """The tiny test model with documents cut at 96 tokens: keeps this test in seconds."""
    from colengine.encoder import Encoder

    return Encoder(tiny_model_path, device="cpu", document_length=96, batch_size=64,
                   trust_remote_code=True)


@needs_arcd
def test_arabic_bm25_rerank_is_exact_maxsim_over_the_bm25_candidates(tmp_path, short_tiny_encoder):
    from colengine.cache import cached_encode_documents

    tiny_encoder = short_tiny_encoder

    cache = tmp_path / "cache"
    res = evaluate(ARCD, ["bm25", "bm25+rerank", "fusion"], model=tiny_encoder, k=100,
                   candidates=100, language="ar", output=tmp_path / "out", cache_dir=cache,
                   show_progress=False, plot=False, announce=lambda m: None)
    d = res["datasets"]["arcd-subset"]
    assert d["setup"]["encode_corpus_cached"] is False
    ds = load_dataset(ARCD)
    bm25 = read_trec_run(tmp_path / "out" / "bm25.run")
    rr = read_trec_run(tmp_path / "out" / "bm25+rerank.run")
    # the same embeddings the runner scored (read back from the cache)
    docs = cached_encode_documents(tiny_encoder, ds.documents(), cache_dir=cache,
                                   show_progress=False)
    pos = {i: n for n, i in enumerate(ds.doc_ids)}
    qids = list(ds.queries)
    q = tiny_encoder.encode_queries([ds.queries[x] for x in qids]).numpy().astype(np.float64)
    checked = 0
    for qi, qid in enumerate(qids):
        cand = [h.doc_id for h in bm25.get(qid, [])]
        got = rr.get(qid, [])
        assert sorted(h.doc_id for h in got) == sorted(cand)  # exactly the BM25 candidates
        scores = [h.score for h in got]
        assert scores == sorted(scores, reverse=True)
        for h in got:
            m = docs[pos[h.doc_id]].astype(np.float64)
            ref = np.einsum("qd,td->qt", q[qi], m).max(axis=1).sum()
            assert h.score == pytest.approx(ref, abs=1e-3)
            checked += 1
    assert checked > 100
    # the rerank reorders (a random tiny model disagrees with BM25 somewhere)
    assert any([h.doc_id for h in rr[x]] != [h.doc_id for h in bm25[x]] for x in rr)
    # fusion holds documents from both lists; second run reads the encoded corpus from cache
    res2 = evaluate(ARCD, ["bm25+rerank"], model=tiny_encoder, language="ar", cache_dir=cache,
                    show_progress=False, plot=False, announce=lambda m: None)
    assert res2["datasets"]["arcd-subset"]["setup"]["encode_corpus_cached"] is True
    assert res2["datasets"]["arcd-subset"]["pipelines"]["bm25+rerank"]["metrics"] == pytest.approx(
        d["pipelines"]["bm25+rerank"]["metrics"])
