"""The examples in docstrings are executed, so they cannot drift from the code.

Every module of the package whose source holds an example (``>>>``) is collected, so a new
example runs without being registered here."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest

import colengine


def _modules_with_examples() -> list[str]:
    out = []
    for info in pkgutil.walk_packages(colengine.__path__, "colengine."):
        spec = importlib.util.find_spec(info.name)
        origin = Path(spec.origin) if spec is not None and spec.origin else None
        if origin is not None and origin.suffix == ".py" and ">>>" in origin.read_text("utf-8"):
            out.append(info.name)
    return sorted(out)


MODULES = _modules_with_examples()


def test_the_known_examples_are_collected():
    for name in ("colengine.ids", "colengine.metadata", "colengine.devices",
                 "colengine.index.plaid.search", "colengine.index.base"):
        assert name in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    # (a module whose examples all need data or a network marks them +SKIP)
    skipped = "doctest: +SKIP" in Path(module.__file__).read_text("utf-8")
    assert result.attempted > 0 or skipped, f"{name}: its examples were not found by doctest"
    assert result.failed == 0
