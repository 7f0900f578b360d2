"""Issue 11 items 6-8: ids and texts at the door, and the one persistent automatic-id counter.

Checked against a plain Python model (the set of ids that must be present)."""

from __future__ import annotations

import numpy as np
import pytest

from colengine import Retriever
from colengine.errors import DuplicateIdError, UnknownIdError
from colengine.index.exhaustive import ExhaustiveIndex
from colengine.index.plaid import PlaidIndex


def _docs(n, seed=0, dim=16):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.standard_normal((4, dim)).astype(np.float32)
        out.append(x / np.linalg.norm(x, axis=1, keepdims=True))
    return out


def _build(kind, n=30):
    if kind == "plaid":
        return PlaidIndex.build(_docs(n), nbits=2, seed=0)
    return ExhaustiveIndex.build(_docs(n))


@pytest.mark.parametrize("kind", ["exhaustive", "plaid"])
def test_a_bare_string_is_not_a_list_of_ids(kind):
    """Before: ``delete("12")`` deleted ids "1" and "2"."""
    idx = _build(kind)
    with pytest.raises(TypeError, match="single string"):
        idx.delete("12")
    assert {"1", "2", "12"} <= set(idx.ids) and len(idx) == 30


@pytest.mark.parametrize("kind", ["exhaustive", "plaid"])
def test_automatic_ids_are_never_reused(kind, tmp_path):
    """Before: after deleting the last automatic id, save and load, ``add()`` handed it out
    again; after ``delete(["3"])`` every later automatic add failed with DuplicateIdError."""
    idx = _build(kind)
    model = set(idx.ids)
    idx.delete(["29"])
    model.discard("29")
    idx.save(tmp_path / "i")
    idx = type(idx).load(tmp_path / "i")
    new = idx.add(_docs(1, seed=5))
    assert new == ["30"]
    model |= set(new)
    idx.delete(["3"])
    model.discard("3")
    for i in range(3):
        got = idx.add(_docs(2, seed=10 + i))
        assert not set(got) & {"3", "29"} and not set(got) & model
        model |= set(got)
    idx.add(_docs(1, seed=20), ["37"])               # an explicit id on the counter's path
    model.add("37")
    got = idx.add(_docs(2, seed=21))
    assert "37" not in got and not set(got) & model
    model |= set(got)
    assert len(idx) == len(model) and all(i in idx.ids for i in model)
    assert "3" not in idx.ids and "29" not in idx.ids


def test_ids_that_cannot_be_saved_are_refused_at_the_door():
    """Before: a lone surrogate was accepted and every later save() failed."""
    with pytest.raises(ValueError, match="UTF-8"):
        ExhaustiveIndex.build(_docs(2), ["ok", "\ud800"])
    idx = ExhaustiveIndex.build(_docs(2), ["a", "b"])
    with pytest.raises(ValueError, match="UTF-8"):
        idx.add(_docs(1), ["\udfff"])
    assert list(idx.ids) == ["a", "b"]


def test_retriever_takes_no_bare_strings_and_keeps_one_counter(tiny_encoder, tmp_path):
    r = Retriever.build(["alpha text", "beta text", "gamma text"], model=tiny_encoder,
                        index="exhaustive", show_progress=False)
    with pytest.raises(TypeError, match="single string"):
        r.add("hello")                       # before: five one-character documents
    with pytest.raises(TypeError, match="single string"):
        r.delete("12")
    with pytest.raises(TypeError, match="single string"):
        r.rerank("alpha", "12")
    with pytest.raises(TypeError, match="single string"):
        r.rerank_texts("alpha", "some text")
    assert len(r) == 3
    r.add(["an explicit one"], ids=["3"])    # before: blocked every later automatic add
    assert r.add(["delta text"]) == ["4"]
    r.delete(["4"])
    r.save(tmp_path / "r")
    back = Retriever.load(tmp_path / "r", model=tiny_encoder)
    assert back.add(["epsilon"]) == ["5"]
    with pytest.raises(UnknownIdError):
        back.delete(["4"])
    with pytest.raises(DuplicateIdError):
        back.add(["x"], ids=["5"])
