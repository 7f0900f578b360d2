"""A new user's first hour (issue 12) and foreign code in model folders (issue 11 item 1)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from colengine import Retriever
from colengine.models import ModelNotFoundError, UntrustedModelError, resolve_model

DOCS = ["the cat sat on the mat", "dogs chase cats", "a quiet library of books",
        "rust prevents data races", "plants turn sunlight into sugar"]

EVIL = '''
from pathlib import Path
Path({marker!r}).write_text("ran")
'''


def _poisoned_copy(src: Path, dst: Path, marker: Path) -> Path:
    """A copy of the tiny model whose shipped Python file also writes ``marker``."""
    shutil.copytree(src, dst)
    py = dst / "modeling_pplx_qwen3.py"
    py.write_text(py.read_text() + EVIL.format(marker=str(marker)))
    return dst


def test_foreign_code_in_a_recorded_model_folder_is_not_run(tiny_model_path, tmp_path):
    model = shutil.copytree(tiny_model_path, tmp_path / "model")
    r = Retriever.build(DOCS, model=str(model), index="exhaustive", device="cpu",
                        show_progress=False, path=tmp_path / "idx")
    assert r.encoder.name == str(model.resolve())
    # the folder the manifest names is swapped for one whose code does something else
    marker = tmp_path / "marker"
    shutil.rmtree(model)
    _poisoned_copy(tiny_model_path, model, marker)
    with pytest.raises(UntrustedModelError, match="trust_remote_code=True.*--trust-remote-code"):
        Retriever.load(tmp_path / "idx", device="cpu")
    with pytest.raises(UntrustedModelError):
        Retriever.build(DOCS, model=str(model), device="cpu", show_progress=False)
    assert not marker.exists()


def test_auto_map_to_another_repository_is_not_trusted(tiny_model_path, tmp_path):
    import json

    model = shutil.copytree(tiny_model_path, tmp_path / "model")
    cfg = json.loads((model / "config.json").read_text())
    cfg["auto_map"]["AutoModel"] = "someone/else--modeling.Model"
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UntrustedModelError):
        resolve_model(model)
    assert resolve_model(model, trust_remote_code=True).trust_remote_code


def test_opting_in_runs_the_code(tiny_model_path, tmp_path):
    from colengine.encoder import Encoder

    marker = tmp_path / "marker"
    model = _poisoned_copy(tiny_model_path, tmp_path / "model", marker)
    enc = Encoder(model, device="cpu", trust_remote_code=True)
    assert marker.read_text() == "ran" and enc.dim == 128


def test_model_names_resolve_without_the_network(tiny_model_path, monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*a, **k):  # the offline path must never ask the hub
        raise AssertionError("network lookup while offline")

    monkeypatch.setattr(huggingface_hub, "model_info", no_network)
    folder = resolve_model(tiny_model_path)
    assert (folder.source, folder.trust_remote_code) == ("folder", True)
    with pytest.raises(ModelNotFoundError, match=r"'minilmx' is not an alias \(minilm, tiny-pplx\)"):
        resolve_model("minilmx")
    with pytest.raises(ModelNotFoundError, match="cannot be reached"):
        Retriever.build(DOCS, model="perplexity-ai/pplx-embed-v1-late-0.6b", show_progress=False)
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ModelNotFoundError, match="is a file"):
        resolve_model(tmp_path / "f.txt")
    with pytest.raises(ModelNotFoundError, match="not a model"):
        resolve_model(tmp_path)


@pytest.mark.parametrize("kwargs, bad", [
    ({"nbit": 1}, "'nbit'"),
    ({"totally_bogus": True}, "'totally_bogus'"),
    ({"index": "exhaustive", "nbits": 1}, "'nbits'"),
    ({"index": "plaid", "sample_tokens": 10}, "'sample_tokens'"),   # streaming only
])
def test_unknown_or_inapplicable_build_options_are_type_errors(tiny_encoder, kwargs, bad):
    with pytest.raises(TypeError, match=bad) as e:
        Retriever.build(DOCS, model=tiny_encoder, show_progress=False, **kwargs)
    assert "valid:" in str(e.value)


def test_valid_build_option_is_used(tiny_encoder):
    r = Retriever.build(DOCS, model=tiny_encoder, index="plaid", nbits=4, show_progress=False)
    assert r.index.nbits == 4


def test_repr_is_readable(tiny_encoder):
    r = Retriever.build(DOCS, model=tiny_encoder, index="exhaustive", bm25=True,
                        show_progress=False)
    text = repr(r)
    assert text.startswith("Retriever(5 documents, index='exhaustive'")
    assert "bm25='en'" in text and "dim=128" in text


def test_bm25_language_is_guessed_from_the_script(tiny_encoder):
    arabic = ["القطة تجلس على الحصيرة", "الكلاب تطارد القطط", "مكتبة هادئة من الكتب"]
    r = Retriever.build(arabic, model=tiny_encoder, index="exhaustive", bm25=True,
                        show_progress=False)
    assert r.bm25.language == "ar"


@pytest.mark.parametrize("device, msg", [("gpu", "unknown device"), ("cuda:99", "cuda")])
def test_bad_device_is_a_value_error(device, msg):
    import torch

    from colengine.devices import resolve_device

    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")  # the message for CPU-only machines
    with pytest.raises(ValueError, match=msg):
        resolve_device(device)


# -- evaluation inputs (issue 11 item 12) and eval output (issue 12 item 12) -----------------
def _beir(root: Path, corpus: list, queries: list | None = None, qrels: str | None = None) -> Path:
    import json

    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text("".join(
        (r if isinstance(r, str) else json.dumps(r)) + "\n" for r in corpus))
    queries = queries if queries is not None else [{"_id": "q1", "text": "cat"},
                                                   {"_id": "q2", "text": "rust"}]
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (root / "qrels" / "test.tsv").write_text(
        qrels if qrels is not None else "query-id\tcorpus-id\tscore\nq1\td0\t1\nq2\td3\t1\n")
    return root


GOOD = [{"_id": f"d{i}", "title": "", "text": t} for i, t in enumerate(DOCS)]


@pytest.mark.parametrize("corpus, queries, qrels, where, msg", [
    ([{"title": "x", "text": "y"}] + GOOD, None, None, "corpus.jsonl:1", "missing '_id'"),
    (GOOD + ["[1, 2]"], None, None, "corpus.jsonl:6", "expected a JSON object"),
    (GOOD + [{"_id": "z", "text": 12345}], None, None, "corpus.jsonl:6", "'text' must be a string"),
    (GOOD + [{"_id": "z", "text": None}], None, None, "corpus.jsonl:6", "null 'text'"),
    (GOOD, [{"_id": "q1"}], None, "queries.jsonl:1", "missing 'text'"),
    (GOOD, None, "query-id\tcorpus-id\tscore\nq1\td0\tabc\n", "test.tsv:2", "grade 'abc'"),
])
def test_bad_evaluation_inputs_name_file_and_line(tmp_path, corpus, queries, qrels, where, msg):
    from colengine.eval import load_dataset

    root = _beir(tmp_path / "ds", corpus, queries, qrels)
    with pytest.raises(ValueError, match=msg) as e:
        load_dataset(root)
    assert where in str(e.value)


def test_qrels_without_header_keep_their_first_line(tmp_path):
    from colengine.eval import load_dataset

    ds = load_dataset(_beir(tmp_path / "ds", GOOD, qrels="q1\td0\t1\nq2\td3\t1\n"))
    assert ds.qrels == {"q1": {"d0": 1}, "q2": {"d3": 1}}


def test_trec_run_with_empty_id_is_refused_and_leaves_no_temp_file(tmp_path):
    from colengine.eval.metrics import write_trec_run
    from colengine.types import Hit

    with pytest.raises(ValueError, match="empty ids"):
        write_trec_run(tmp_path / "x.run", {"q1": [Hit("d1", 1.0), Hit("", 0.5)]})
    assert list(tmp_path.iterdir()) == []


def test_evaluate_keeps_finished_pipelines_when_a_later_one_fails(tmp_path, monkeypatch):
    import json

    from colengine.eval import evaluate, runner

    root = _beir(tmp_path / "ds", GOOD)
    real = runner.write_trec_run

    def fail_on_fusion(path, run, tag="colengine"):
        if "fusion" in str(path):
            raise OSError("disk full")
        return real(path, run, tag=tag)

    monkeypatch.setattr(runner, "write_trec_run", fail_on_fusion)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        evaluate(root, ["bm25", "fusion"], model="tiny-pplx", k=3, output=out,
                 show_progress=False, plot=False, device="cpu", announce=lambda m: None)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["config"]["partial"] is True
    assert list(saved["datasets"]["ds"]["pipelines"]) == ["bm25"]
    assert (out / "bm25.run").is_file() and not any(p.name.endswith(".tmp") for p in out.iterdir())


def test_eval_warns_on_qrels_outside_the_corpus_and_names_every_file(tmp_path, capsys):
    from colengine.cli import main

    root = _beir(tmp_path / "ds", GOOD, qrels="q1\tnope1\t1\nq1\tnope2\t1\nq2\td3\t1\n")
    out = tmp_path / "out"
    assert main(["eval", str(root), "-p", "bm25", "-o", str(out), "-q", "-k", "3"]) == 0
    cap = capsys.readouterr()
    assert "2 of 3 qrels point at documents that are not in the corpus" in cap.err
    last = cap.out.strip().splitlines()[-1]
    for name in ("bm25.run", "metrics.json", "metrics.md", "metrics.png"):
        assert str(out / name) in last
    assert {p.name for p in out.iterdir()} == {"bm25.run", "metrics.json", "metrics.md",
                                               "metrics.png"}


# -- CLI (issue 12 items 2, 4, 8, 9, 10, 13, 14) -------------------------------------------
def _cli(*argv: str, stdin: str | None = None):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.run([sys.executable, "-m", "colengine.cli", *argv], input=stdin,
                          capture_output=True, text=True, env=env, timeout=300)


def test_cli_unknown_model_is_one_line_and_never_retries(tmp_path):
    (tmp_path / "c.txt").write_text("a cat\n")
    p = _cli("index", str(tmp_path / "c.txt"), "--out", str(tmp_path / "i"), "--model", "minilmx")
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "'minilmx' is not an alias" in lines[0]
    assert "Retry" not in p.stderr and not (tmp_path / "i").exists()


def test_cli_out_checked_first_and_overwrite(tmp_path):
    import gzip
    import json

    from colengine.cli import main

    (tmp_path / "file").write_text("x")
    corpus = tmp_path / "c.jsonl.gz"
    with gzip.open(corpus, "wt", encoding="utf-8") as f:
        for i, t in enumerate(DOCS + ["   "]):
            f.write(json.dumps({"pid": f"p{i}", "body": t}) + "\n")
    with pytest.raises(SystemExit, match="is a file"):
        main(["index", str(corpus), "--out", str(tmp_path / "file"), "--model", "tiny-pplx"])
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("keep")
    with pytest.raises(SystemExit, match="not a colengine index"):
        main(["index", str(corpus), "--out", str(tmp_path / "busy"), "--model", "tiny-pplx"])
    out = tmp_path / "idx"
    args = ["index", str(corpus), "--out", str(out), "--model", "tiny-pplx", "--index",
            "exhaustive", "--id-field", "pid", "--text-field", "body", "-q", "--device", "cpu"]
    assert main(args) == 0
    with pytest.raises(SystemExit, match="--overwrite"):
        main(args)
    assert main(args + ["--overwrite"]) == 0
    r = Retriever.load(out, device="cpu")
    assert sorted(r.index.ids) == [f"p{i}" for i in range(5)]    # the blank one skipped
    with pytest.raises(SystemExit, match="'p5' is empty"):
        main(args + ["--overwrite", "--no-skip-empty"])


def test_cli_plain_text_folder_and_null_text(tmp_path, capsys):
    import json

    from colengine.cli import _read_corpus

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("first doc")
    (tmp_path / "d" / "b.md").write_text("# second")
    ids, docs = _read_corpus(tmp_path / "d")
    assert ids == ["a.txt", "b.md"] and docs[1]["text"] == "# second"
    (tmp_path / "p.txt").write_text("one\n\nthree\n")
    assert _read_corpus(tmp_path / "p.txt")[0] == ["1", "3"]
    (tmp_path / "n.jsonl").write_text(json.dumps({"_id": "x", "text": None}) + "\n")
    with pytest.raises(SystemExit, match=r"n.jsonl:1: document 'x': 'text' must be a string, got null"):
        _read_corpus(tmp_path / "n.jsonl")


def test_cli_search_queries_from_stdin_bm25_and_version(tmp_path):
    import json

    from colengine.bm25 import BM25Index

    (tmp_path / "c.txt").write_text("\n".join(DOCS) + "\n")
    out = tmp_path / "idx"
    p = _cli("index", str(tmp_path / "c.txt"), "--out", str(out), "--model", "tiny-pplx",
             "--index", "exhaustive", "--bm25", "-q", "--device", "cpu")
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""                       # -q: no bars, no library chatter
    p = _cli("search", str(out), "--pipeline", "bm25", "-k", "2", stdin="cat\nrust data\n")
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    want = BM25Index.build(DOCS, [str(i) for i in range(1, 6)]).search(["cat", "rust data"], 2)
    assert [r["query"] for r in rows] == ["cat", "rust data"]
    for row, hits in zip(rows, want):
        assert [h["doc_id"] for h in row["hits"]] == [h.doc_id for h in hits]
    p = _cli("search", str(out), "cat", "--pipeline", "plaid")
    assert p.returncode == 2 and "this index is 'exhaustive'" in p.stderr
    info = json.loads(_cli("info", str(out)).stdout)
    assert info["bm25_language"] == "en"
    assert _cli("--version").stdout.startswith("colengine ")


def test_long_queries_are_reported(tiny_encoder):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_encoder.encode_queries(["short query"])        # no warning
    with pytest.warns(UserWarning, match="1 of 2 queries are longer than the model's query length"):
        tiny_encoder.encode_queries(["word " * 100, "short"])


def test_streamed_build_warns_once_about_truncation(tiny_encoder, recwarn):
    long = ["word " * 600 + str(i) for i in range(6)]
    Retriever.build(long + DOCS, model=tiny_encoder, index="plaid", stream=True, chunk_size=2,
                    show_progress=False, long_documents="truncate")
    msgs = [str(w.message) for w in recwarn if "longer than the model" in str(w.message)]
    assert msgs == [f"6 of 11 documents are longer than the model's limit of "
                    f"{tiny_encoder.document_length} tokens and were truncated"]


def test_cli_interrupt_and_bad_device(tmp_path, monkeypatch, capsys):
    from colengine import cli

    (tmp_path / "c.txt").write_text("\n".join(DOCS) + "\n")

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(Retriever, "build", interrupted)
    argv = ["index", str(tmp_path / "c.txt"), "--out", str(tmp_path / "i"), "--model", "tiny-pplx"]
    assert cli.main(argv + ["--stream"]) == 130
    assert "interrupted; run the same command again to resume" in capsys.readouterr().err
    assert cli.main(argv) == 130
    assert "interrupted; nothing was written" in capsys.readouterr().err
    monkeypatch.undo()
    assert cli.main(argv + ["--device", "gpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: unknown device 'gpu': use auto, cpu, cuda, cuda:N or mps"]


def test_one_set_of_pipeline_names():
    from colengine.cli import SEARCH_PIPELINES
    from colengine.eval import parse_pipelines
    from colengine.eval.runner import PIPELINES
    from colengine.retriever import default_index_kind

    assert parse_pipelines("late") == [default_index_kind()]
    for name in SEARCH_PIPELINES:          # every name search takes, eval takes too
        assert parse_pipelines(name)
    assert set(PIPELINES) <= set(SEARCH_PIPELINES)


def test_add_after_load_gives_no_torch_warning(tiny_encoder, tmp_path, recwarn):
    Retriever.build(DOCS, model=tiny_encoder, index="plaid", path=tmp_path / "r",
                    show_progress=False)
    r = Retriever.load(tmp_path / "r", model=tiny_encoder)
    r.add(["one more document about cats"])
    assert not [w for w in recwarn if "not writable" in str(w.message)]
    assert r.search("cats", k=3)


def test_null_text_and_empty_documents_are_named(tiny_encoder):
    with pytest.raises(TypeError, match=r"documents\[1\]: 'text' must be a string, got null"):
        Retriever.build([{"text": "a"}, {"text": None}], model=tiny_encoder, show_progress=False)
    with pytest.raises(ValueError, match=r"documents\[1\] is empty \(id 'b'; 1 empty in all\)"):
        Retriever.build(["a cat", "  ", "a dog"], ["a", "b", "c"], model=tiny_encoder,
                        show_progress=False)


def test_cli_bm25_pipeline_without_bm25_suggests_the_flag(tmp_path, capsys):
    from colengine.cli import main

    (tmp_path / "c.txt").write_text("\n".join(DOCS) + "\n")
    out = tmp_path / "idx"
    assert main(["index", str(tmp_path / "c.txt"), "--out", str(out), "--model", "tiny-pplx",
                 "--index", "exhaustive", "-q", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["search", str(out), "cat", "--pipeline", "bm25"]) == 2
    assert "re-index with --bm25" in capsys.readouterr().err
    assert main(["search", str(out), "cat", "--pipeline", "fusion", "--device", "cpu"]) == 2
    assert "--bm25" in capsys.readouterr().err
