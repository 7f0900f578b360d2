"""Encoder: the tiny pplx-architecture model through trust_remote_code, PyLate semantics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from colengine import Encoder
from colengine.testing import TINY_MASK_TOKEN


def test_tiny_model_is_the_pplx_architecture_loaded_as_remote_code(tiny_model_path, tiny_encoder):
    cfg = json.loads((tiny_model_path / "config.json").read_text())
    assert cfg["model_type"] == "bidirectional_pplx_qwen3"
    assert cfg["auto_map"]["AutoModel"] == "modeling_pplx_qwen3.PPLXQwen3Model"
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 16)
    auto_model = tiny_encoder.model[0].auto_model
    # loaded from the folder's own modeling file, not from transformers' registry
    assert type(auto_model).__module__.startswith("transformers_modules")
    dense = tiny_encoder.model[-1]
    assert dense.linear.bias is None and tuple(dense.linear.weight.shape) == (128, 64)
    tok = tiny_encoder.model.tokenizer
    assert tok.convert_tokens_to_ids("[Q] ") == tiny_encoder.model.query_prefix_id
    assert tok.convert_tokens_to_ids("[D] ") == tiny_encoder.model.document_prefix_id
    assert tok.mask_token == TINY_MASK_TOKEN
    # the mask token is never produced by ordinary text
    ids = tok("Mask tokens <mask> [MASK] | mask |> <| mask", add_special_tokens=False)["input_ids"]
    assert tok.mask_token_id not in ids


def test_attention_is_bidirectional(tiny_encoder):
    """Changing the last token must change the first token's vector (impossible if causal)."""
    a = tiny_encoder.encode_documents(["alpha beta gamma delta"], show_progress=False)
    b = tiny_encoder.encode_documents(["alpha beta gamma zebra"], show_progress=False)
    assert not np.allclose(a[0][0], b[0][0], atol=1e-3)


def test_queries_follow_pylate_exactly(tiny_encoder):
    q = tiny_encoder.encode_queries(["what is photosynthesis", "x"])
    assert q.shape == (2, 32, 128) and q.dtype == torch.float32
    ref = tiny_encoder.model.encode(["what is photosynthesis", "x"], is_query=True,
                                    convert_to_numpy=True)
    for i in range(2):
        np.testing.assert_allclose(q[i].numpy(), ref[i], atol=1e-5)
    np.testing.assert_allclose(q.norm(dim=-1).numpy(), 1.0, atol=1e-4)
    feats = tiny_encoder.model.tokenize(["x"], is_query=True)
    ids = feats["input_ids"][0].tolist()
    assert tiny_encoder.model.query_prefix_id in ids[:2]
    mask_id = tiny_encoder.model.tokenizer.mask_token_id
    assert ids[-1] == mask_id and ids.count(mask_id) >= 25  # expanded with mask tokens
    assert feats["attention_mask"].all()  # ... which are attended to


def test_documents_packed_fp16_with_skiplist(tiny_encoder):
    docs = tiny_encoder.encode_documents(["Hello, world!", "A longer document about plants."],
                                         show_progress=False)
    assert docs.tokens.dtype == np.float16 and docs.tokens.shape[1] == 128
    ref = tiny_encoder.model.encode(["Hello, world!", "A longer document about plants."],
                                    is_query=False, convert_to_numpy=True)
    assert docs.lengths.tolist() == [r.shape[0] for r in ref]
    for i in range(2):
        np.testing.assert_allclose(docs[i].astype(np.float32), ref[i], atol=2e-3)
    f32 = tiny_encoder.encode_documents(["Hello, world!"], show_progress=False, dtype="float32")
    assert f32.tokens.dtype == np.float32


def test_truncation_is_counted_in_a_warning(tiny_encoder):
    long = " ".join(["photosynthesis"] * 600)
    with pytest.warns(UserWarning, match="1 of 2 documents .* truncated"):
        docs = tiny_encoder.encode_documents([long, "short"], show_progress=False)
    assert docs.lengths[0] <= tiny_encoder.document_length


@pytest.mark.parametrize("bad, err, match", [
    ([], ValueError, "empty corpus"),
    (["ok", ""], ValueError, r"documents\[1\] is empty"),
    (["ok", "   "], ValueError, "empty"),
    (["ok", 3], TypeError, r"documents\[1\] must be str"),
    ("a single string", TypeError, "list of strings"),
])
def test_bad_documents(tiny_encoder, bad, err, match):
    with pytest.raises(err, match=match):
        tiny_encoder.encode_documents(bad, show_progress=False)


def test_bad_queries_and_models(tiny_encoder, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        tiny_encoder.encode_queries([""])
    with pytest.raises(TypeError):
        tiny_encoder.encode_queries([None])
    with pytest.raises(ValueError, match="not a model"):
        Encoder(tmp_path)
    with pytest.raises(TypeError, match="model must be"):
        Encoder(42)


def test_accepts_a_built_pylate_model(tiny_encoder):
    enc = Encoder(tiny_encoder.model)
    assert enc.model is tiny_encoder.model and enc.dim == 128


def test_loading_a_model_prints_no_weight_loading_bar_and_restores_the_setting(tiny_model_path,
                                                                                capfd):
    """Issue 12 item 11: transformers' "Loading weights" bar appeared on every load through
    the Python API (the CLI silenced it, the API did not)."""
    import transformers.utils.logging as hf_logging

    from colengine import Encoder

    hf_logging.enable_progress_bar()
    capfd.readouterr()
    Encoder(tiny_model_path, device="cpu", trust_remote_code=True)
    err = capfd.readouterr().err
    assert "Loading weights" not in err
    assert hf_logging.is_progress_bar_enabled()


@pytest.mark.parametrize("which", ["tiny", "minilm"])
def test_queries_and_documents_encode_at_once_from_several_threads(which, tiny_encoder,
                                                                  minilm_encoder):
    """Forward passes of several threads run at once (only tokenizing takes the encoder's
    lock), yet each thread gets what it gets alone: a long document stays cut at the
    document length, not the query length another thread's tokenize() set meanwhile, and
    queries keep their expansion."""
    import threading

    enc = tiny_encoder if which == "tiny" else minilm_encoder
    long_doc = ["glaciers of iceland " + " ".join(f"word{i}" for i in range(400))]
    queries = ["glaciers of iceland", "how do glaciers move"]
    want_d = enc.encode_documents(long_doc, show_progress=False)
    want_q = enc.encode_queries(queries)
    assert want_d.tokens.shape[0] > enc.query_length          # longer than any query
    errors: list[str] = []

    def run(f) -> None:
        try:
            for _ in range(25):
                f()
        except Exception as e:  # noqa: BLE001 - collected and reported below
            errors.append(repr(e))

    def docs() -> None:
        got = enc.encode_documents(long_doc, show_progress=False)
        assert got.tokens.shape == want_d.tokens.shape
        np.testing.assert_allclose(np.asarray(got.tokens, dtype=np.float32),
                                   np.asarray(want_d.tokens, dtype=np.float32), atol=2e-3)

    def qs() -> None:
        got = enc.encode_queries(queries)
        assert got.shape == want_q.shape
        assert torch.allclose(got, want_q, atol=1e-4)

    threads = [threading.Thread(target=run, args=(f,)) for f in (docs, qs, docs, qs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
