"""The colengine server: ``colengine serve`` (:mod:`.app`), its Python client (:mod:`.client`)
and the index service behind them (:mod:`.service`). Needs the ``serve`` extra."""

from __future__ import annotations
