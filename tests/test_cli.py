"""The `colengine` command: quickstart, index, search, info, and its error messages."""

from __future__ import annotations

import json

import pytest

from colengine.cli import main
from colengine.testing import sample_corpus


@pytest.fixture()
def beir_dir(tmp_path):
    d = tmp_path / "beir"
    d.mkdir()
    with open(d / "corpus.jsonl", "w") as f:
        for doc in sample_corpus()[:12]:
            f.write(json.dumps(doc) + "\n")
    return d


def test_quickstart_prints_ranked_hits(tiny_model_path, tmp_path, capsys):
    assert main(["quickstart", "--model", str(tiny_model_path), "--index", "exhaustive",
                 "-k", "2", "--out", str(tmp_path / "qs")]) == 0
    out = capsys.readouterr().out
    assert "indexed 32 documents" in out
    assert out.count("query: ") == 4
    ranked = [line for line in out.splitlines() if line.strip().startswith(("1.", "2."))]
    assert len(ranked) == 8
    titles = {d["title"] for d in sample_corpus()}
    assert all(any(t in line for t in titles) for line in ranked)
    assert (tmp_path / "qs" / "manifest.json").is_file()


def test_index_search_info(beir_dir, tiny_model_path, tmp_path, capsys):
    out_dir = tmp_path / "idx"
    assert main(["index", str(beir_dir), "--out", str(out_dir), "--model", str(tiny_model_path),
                 "--index", "exhaustive", "--device", "cpu"]) == 0
    assert "indexed 12 documents" in capsys.readouterr().out
    assert main(["search", str(out_dir), "bees and flowers", "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 3 and all(h["doc_id"].startswith("doc") for h in hits)
    assert hits == sorted(hits, key=lambda h: -h["score"])
    assert main(["info", str(out_dir)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "retriever" and info["meta"]["n_documents"] == 12
    assert info["checksums"] == "verified"


def test_errors_are_one_line_messages(tmp_path, tiny_model_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no corpus.jsonl"):
        main(["index", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    (tmp_path / "empty" / "corpus.jsonl").write_text("")
    with pytest.raises(SystemExit, match="corpus is empty"):
        main(["index", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert main(["search", str(tmp_path / "nothing"), "q"]) == 2
    assert "no such index" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_search_filter_and_show_text(tmp_path, tiny_model_path, capsys):
    d = tmp_path / "beir"
    d.mkdir()
    corpus = sample_corpus()[:12]
    with open(d / "corpus.jsonl", "w") as f:
        for i, doc in enumerate(corpus):
            f.write(json.dumps({**doc, "metadata": {"half": "a" if i < 6 else "b", "i": i}}) + "\n")
    out_dir = tmp_path / "idx"
    assert main(["index", str(d), "--out", str(out_dir), "--model", str(tiny_model_path),
                 "--index", "exhaustive", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["search", str(out_dir), "bees and flowers", "-k", "20", "--json", "--show-text",
                 "--filter", '{"half": "b", "i": {"$ne": 7}}']) == 0
    hits = json.loads(capsys.readouterr().out)
    texts = {doc["_id"]: doc["text"] for doc in corpus}
    assert sorted(h["doc_id"] for h in hits) == sorted(doc["_id"] for i, doc in enumerate(corpus)
                                                       if i >= 6 and i != 7)
    assert all(h["text"] == texts[h["doc_id"]] and h["metadata"]["half"] == "b" for h in hits)
    assert main(["search", str(out_dir), "bees", "-k", "2", "--show-text"]) == 0
    out = capsys.readouterr().out
    assert any(texts[doc][:40] in out for doc in texts)
    assert main(["search", str(out_dir), "bees", "--filter", '{"$where": "1"}']) == 2
    assert "unknown top-level operator '$where'" in capsys.readouterr().err
    assert main(["search", str(out_dir), "bees", "--filter", "{half: b}"]) == 2
    assert "--filter is not valid JSON" in capsys.readouterr().err


def test_search_knobs(beir_dir, tiny_model_path, tmp_path, capsys):
    """--n-probe / --n-candidates / --n-exact / --threshold reach the PLAID search: unpruned
    knobs give what the Python API gives with the same knobs, bad values are named, and an
    exhaustive index refuses them."""
    from colengine import Retriever

    out_dir = tmp_path / "plaid"
    assert main(["index", str(beir_dir), "--out", str(out_dir), "--model", str(tiny_model_path),
                 "--index", "plaid", "--device", "cpu", "-q"]) == 0
    capsys.readouterr()
    wide = ["--n-probe", "1000", "--n-candidates", "1000", "--n-exact", "1000", "--threshold",
            "none"]
    assert main(["search", str(out_dir), "bees and flowers", "-k", "3", "--json", *wide]) == 0
    got = json.loads(capsys.readouterr().out)
    r = Retriever.load(out_dir, device="cpu")
    ref = r.search("bees and flowers", k=3, n_probe=1000, n_candidates=1000, n_exact=1000,
                   centroid_score_threshold=None)
    assert [h["doc_id"] for h in got] == [h.doc_id for h in ref]
    assert [h["score"] for h in got] == pytest.approx([h.score for h in ref], abs=1e-5)
    for flags, msg in ((["--n-probe", "0"], "n_probe must be positive"),
                       (["--n-exact", "-1"], "n_exact must be positive"),
                       (["--threshold", "nan"], "centroid_score_threshold must be finite")):
        assert main(["search", str(out_dir), "bees", "-k", "3", *flags]) == 2
        assert msg in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["search", str(out_dir), "bees", "--threshold", "high"])
    assert "expected a number or 'none'" in capsys.readouterr().err
    ex_dir = tmp_path / "ex"
    assert main(["index", str(beir_dir), "--out", str(ex_dir), "--model", str(tiny_model_path),
                 "--index", "exhaustive", "--device", "cpu", "-q"]) == 0
    assert main(["search", str(ex_dir), "bees", "--threshold", "0.3"]) == 2
    assert "--threshold: search knobs need a PLAID index" in capsys.readouterr().err


def test_index_tune_stores_the_tuned_knobs(beir_dir, tiny_model_path, tmp_path, capsys):
    from colengine import Retriever
    from colengine.index.plaid.tune import knobs_from_dict

    out_dir = tmp_path / "idx"
    assert main(["index", str(beir_dir), "--out", str(out_dir), "--model", str(tiny_model_path),
                 "--index", "plaid", "--device", "cpu", "--tune", "--target-recall", "0.9",
                 "--tune-k", "5"]) == 0
    out = capsys.readouterr().out
    assert "tuned k=5: recall" in out and "target 0.9 reached" in out
    assert main(["info", str(out_dir)]) == 0
    tuned = json.loads(capsys.readouterr().out)["meta"]["index_meta"]["tuned"]["5"]
    assert tuned["target"] == 0.9 and tuned["k"] == 5 and 0.9 <= tuned["recall"] <= 1
    assert tuned["source"] == "pseudo-queries" and tuned["reached"] is True
    r = Retriever.load(out_dir, device="cpu")
    assert r.index.default_knobs(5) == knobs_from_dict(5, tuned["knobs"])
    assert r.info()["index"]["tuned"][0]["knobs"] == tuned["knobs"]


def test_index_tune_options_are_checked_before_any_work(beir_dir, tiny_model_path, tmp_path,
                                                        capsys):
    out_dir = tmp_path / "idx"
    base = ["index", str(beir_dir), "--out", str(out_dir), "--model", str(tiny_model_path),
            "--device", "cpu"]
    with pytest.raises(SystemExit, match="exhaustive index has none"):
        main(base + ["--index", "exhaustive", "--tune"])
    with pytest.raises(SystemExit, match="go with --tune"):
        main(base + ["--target-recall", "0.9"])
    with pytest.raises(SystemExit, match="--tune-k must be positive"):
        main(base + ["--tune", "--tune-k", "0"])
    assert main(base + ["--tune", "--target-recall", "1.5"]) == 2
    assert "target_recall must lie in (0, 1]" in capsys.readouterr().err
    assert not out_dir.exists()


def test_serve_checks_write_nice_before_it_starts(beir_dir, tiny_model_path, tmp_path, capsys):
    """``colengine serve --write-nice`` outside 0-19 (or ``--search-slots`` below 0) is
    refused with a one-line error and nothing is served (a valid value would block here
    serving, so only refusals are run)."""
    out_dir = tmp_path / "idx"
    assert main(["index", str(beir_dir), "--out", str(out_dir), "--model", str(tiny_model_path),
                 "--index", "exhaustive", "--device", "cpu"]) == 0
    capsys.readouterr()
    for bad in ("20", "-1"):
        assert main(["serve", str(out_dir), "--port", "1", "--write-nice", bad]) == 2
        err = capsys.readouterr().err
        assert "write_nice must be an int from 0" in err and bad in err
    assert main(["serve", str(out_dir), "--port", "1", "--search-slots", "-2"]) == 2
    err = capsys.readouterr().err
    assert "search_slots must be an int >= 0" in err and "-2" in err
