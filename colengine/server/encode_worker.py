"""The child process of :class:`colengine.server.encoding.ProcessEncoder`: loads the model
named by its one argument (a JSON :class:`~colengine.server.encoding.EncoderSpec`; one
torch thread), answers ``{"ready": true}``, then for each JSON line
``{"texts": [...]}`` on its input one line ``{"vectors": ...}`` (:func:`colengine.wal.pack_vectors`)
or ``{"error": "..."}``, until its input ends."""

from __future__ import annotations

import json
import os
import sys
from typing import Any, BinaryIO


def _send(out: BinaryIO, msg: dict[str, Any]) -> None:
    out.write(json.dumps(msg).encode() + b"\n")
    out.flush()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # the answers own the real standard output; anything a library prints goes to stderr
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    cfg = json.loads(argv[0])
    try:
        import torch

        torch.set_num_threads(1)
        from colengine.encoder import Encoder
        from colengine.retriever import encode_for_index
        from colengine.wal import pack_vectors

        enc = Encoder(cfg["model"], device="cpu", trust_remote_code=cfg["trust_remote_code"],
                      batch_size=int(cfg["batch_size"]))
        if enc.dim != cfg["dim"]:
            raise ValueError(f"model {cfg['model']!r} has dim {enc.dim}, the index {cfg['dim']}")
    except Exception as e:  # noqa: BLE001 - told to the server, which falls back or reports
        _send(out, {"error": f"loading the model failed: {type(e).__name__}: {e}"})
        return 1
    _send(out, {"ready": True})
    policy = cfg.get("passage_policy")
    for line in sys.stdin.buffer:
        try:
            texts = json.loads(line)["texts"]
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise TypeError("texts must be a list of strings")
            msg = {"vectors": pack_vectors(encode_for_index(enc, texts, policy))}
        except Exception as e:  # noqa: BLE001 - one bad request fails alone
            msg = {"error": f"{type(e).__name__}: {e}"}
        _send(out, msg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
