"""All-or-nothing saves: a writer killed at random points, and readers racing a writer."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from colengine.storage import load_bundle, save_bundle

# Two states of an index, big enough that a save takes a few milliseconds. Each array's
# content is derived from the state's tag, so a mix of two states is detectable.
_STATE_CODE = textwrap.dedent("""
    import numpy as np
    from colengine.storage import Bundle

    def state(tag: int) -> Bundle:
        rng = np.random.default_rng(tag)
        n = 50_000 + 1000 * tag
        return Bundle("crash-test", {"tag": tag, "n": n}, {
            "tokens": rng.standard_normal((n, 16)).astype(np.float16),
            "offsets": np.arange(n + 1, dtype=np.int64) * (tag + 1),
            "ids/utf8": np.full(n, tag, dtype=np.uint8),
        })
""")


def _check_state(root) -> int:
    b = load_bundle(root, kind="crash-test")
    tag = b.meta["tag"]
    ns = {}
    exec(_STATE_CODE, ns)
    expect = ns["state"](tag)
    assert b.meta == expect.meta
    for name, arr in expect.arrays.items():
        np.testing.assert_array_equal(b.arrays[name], arr)
    return tag


def _writer_script(root) -> str:
    return _STATE_CODE + textwrap.dedent(f"""
        import sys
        from colengine.storage import save_bundle
        states = [state(0), state(1)]
        print("ready", flush=True)
        i = 0
        while True:
            save_bundle({str(root)!r}, states[i % 2])
            i += 1
    """)


def test_kill_during_save_leaves_old_or_new_state(tmp_path):
    root = tmp_path / "idx"
    ns = {}
    exec(_STATE_CODE, ns)
    save_bundle(root, ns["state"](0))
    rng = random.Random(1234)
    seen = set()
    for trial in range(8):
        proc = subprocess.Popen([sys.executable, "-c", _writer_script(root)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.4))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        seen.add(_check_state(root))  # loads, and equals exactly one of the two states
    assert seen <= {0, 1}


def test_readers_never_see_a_torn_index_while_a_writer_saves(tmp_path):
    root = tmp_path / "idx"
    ns = {}
    exec(_STATE_CODE, ns)
    save_bundle(root, ns["state"](0))
    proc = subprocess.Popen([sys.executable, "-c", _writer_script(root)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        tags = [_check_state(root) for _ in range(15)]
    finally:
        proc.kill()
        proc.wait()
    assert set(tags) <= {0, 1}


@pytest.mark.parametrize("stage", ["arrays", "manifest"])
def test_interrupted_retriever_save_keeps_previous_index(tiny_encoder, tmp_path, monkeypatch, stage):
    from colengine import Retriever
    import colengine.storage as st

    r = Retriever.build(["alpha text", "beta text", "gamma text"], model=tiny_encoder,
                        index="exhaustive", path=tmp_path / "idx", show_progress=False)
    before = r.search("alpha", k=3)
    r.add(["delta text"])

    def boom(*a, **k):
        raise KeyboardInterrupt(f"killed while writing {stage}")

    monkeypatch.setattr(st.np if stage == "arrays" else st.os, "save" if stage == "arrays" else "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        r.save()
    monkeypatch.undo()
    again = Retriever.load(tmp_path / "idx", model=tiny_encoder)
    assert len(again) == 3 and again.search("alpha", k=3) == before
