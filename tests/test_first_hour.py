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

    from colengine.encoder import resolve_device

    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")  # the message for CPU-only machines
    with pytest.raises(ValueError, match=msg):
        resolve_device(device)
